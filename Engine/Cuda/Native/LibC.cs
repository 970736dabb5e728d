using System.Runtime.InteropServices;

namespace DeepSeekCuda.Cuda.Native;

/// <summary>
/// The C library (glibc). Its environment: the CUDA driver reads variables such as <c>CUDA_DEVICE_MAX_CONNECTIONS</c>
/// with getenv, which <see cref="Environment.SetEnvironmentVariable(string, string)"/> does not reach on Linux
/// (.NET keeps its own copy of the environment).
/// And an atomic rename of any kind of entry. (The file type lives in the loader's <c>FileStatus</c>.)
/// </summary>
internal static unsafe partial class LibC
{
    private const string Lib = "libc.so.6";

    [LibraryImport(Lib, EntryPoint = "setenv", StringMarshalling = StringMarshalling.Utf8)]
    private static partial int SetEnvNative(string name, string value, int overwrite);

    [LibraryImport(Lib, EntryPoint = "getenv", StringMarshalling = StringMarshalling.Utf8)]
    private static partial IntPtr GetEnvNative(string name);

    /// <summary>The process environment's value of <paramref name="name"/> as native code sees it, or null.</summary>
    public static string? GetEnv(string name) => Marshal.PtrToStringUTF8(GetEnvNative(name));

    /// <summary>Sets <paramref name="name"/> in the process environment native code sees (and in .NET's copy).</summary>
    public static void SetEnv(string name, string value)
    {
        if (SetEnvNative(name, value, 1) != 0)
        {
            throw new InvalidOperationException($"setenv({name}) failed");
        }

        Environment.SetEnvironmentVariable(name, value);
    }

    [LibraryImport(Lib, EntryPoint = "rename", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    private static partial int RenameNative(string from, string to);

    private const int Enoent = 2;

    /// <summary>
    /// Renames whatever is at <paramref name="from"/> (a file, folder, link or FIFO; a link is never followed) to
    /// <paramref name="to"/> in one atomic step; false when nothing is at <paramref name="from"/>. .NET splits this by
    /// type (<see cref="File.Move(string, string)"/>, <see cref="Directory.Move"/>) and checks the type first, which is
    /// a race of its own when another process may replace the entry in between.
    /// </summary>
    public static bool Rename(string from, string to)
    {
        if (RenameNative(from, to) == 0)
        {
            return true;
        }

        var errno = Marshal.GetLastPInvokeError();
        return errno == Enoent ? false : throw new IOException($"rename({from}, {to}) failed: {Marshal.GetPInvokeErrorMessage(errno)}");
    }
}
