namespace DeepSeekCuda.Model;

/// <summary>
/// What a load has uploaded so far, so that a load that fails part way (or is cancelled) leaves nothing on the device: each
/// upload is tracked as it returns, and a failure releases them all, last first (a GPU backend would otherwise keep the memory
/// until the backend itself goes).
/// </summary>
internal static class Uploads
{
    /// <summary>Adds <paramref name="item"/> to <paramref name="loaded"/> and returns it.</summary>
    public static T Track<T>(this List<IDisposable> loaded, T item)
        where T : IDisposable
    {
        loaded.Add(item);
        return item;
    }

    /// <summary>Disposes what a failed load had uploaded, last first.</summary>
    public static void Release(this List<IDisposable> loaded)
    {
        for (var i = loaded.Count - 1; i >= 0; i--)
        {
            loaded[i].Dispose();
        }
    }
}
