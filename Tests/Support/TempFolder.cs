namespace DeepSeekCuda.Tests.Support;

/// <summary>Temporary folders of the test fixtures that write synthetic checkpoints.</summary>
internal static class TempFolder
{
    /// <summary>A fresh path under the temp directory (not created), named <paramref name="prefix"/>-guid.</summary>
    public static string NewPath(string prefix) => Path.Combine(Path.GetTempPath(), prefix + "-" + Guid.NewGuid().ToString("N"));

    /// <summary>Deletes <paramref name="path"/> and everything in it, leaving what cannot go yet.</summary>
    public static void DeleteBestEffort(string path)
    {
        try
        {
            Directory.Delete(path, recursive: true);
        }
        catch (IOException)
        {
            // Mapped shards may still be open on some platforms; the temp cleaner gets them.
        }
    }
}
