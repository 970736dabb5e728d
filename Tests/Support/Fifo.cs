using System.Runtime.InteropServices;

namespace DeepSeekCuda.Tests.Support;

/// <summary>Makes named pipes for the tests that check a FIFO is never opened (opening one blocks until a writer comes).</summary>
internal static partial class Fifo
{
    [LibraryImport("libc.so.6", EntryPoint = "mkfifo", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    private static partial int MkFifo(string path, uint mode);

    /// <summary>Creates a FIFO at <paramref name="path"/> (mode 0644).</summary>
    public static void Create(string path) =>
        Assert.AreEqual(0, MkFifo(path, Convert.ToUInt32("644", 8)), $"mkfifo {path} failed: errno {Marshal.GetLastPInvokeError()}");
}
