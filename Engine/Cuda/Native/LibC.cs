using System.Runtime.InteropServices;

namespace DeepSeekCuda.Cuda.Native;

/// <summary>What <see cref="LibC.Lstat"/> found at a path (a final symbolic link is not followed).</summary>
internal enum FileKind
{
    /// <summary>Nothing there (or a path component is not a folder).</summary>
    Missing,

    /// <summary>A regular file.</summary>
    Regular,

    /// <summary>A folder.</summary>
    Directory,

    /// <summary>A symbolic link.</summary>
    Symlink,

    /// <summary>A FIFO, socket or device: opening one can block or never end.</summary>
    Other,
}

/// <summary>
/// The C library (glibc). Its environment: the CUDA driver reads variables such as <c>CUDA_DEVICE_MAX_CONNECTIONS</c>
/// with getenv, which <see cref="Environment.SetEnvironmentVariable(string, string)"/> does not reach on Linux
/// (.NET keeps its own copy of the environment). And the file type, which .NET does not expose: a FIFO and a
/// regular file look alike to <see cref="File.GetAttributes(string)"/>.
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

    // statx, not lstat: struct statx has one layout on every architecture (struct stat differs between x86-64 and
    // arm64). glibc has it since 2.28.
    [LibraryImport(Lib, EntryPoint = "statx", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    private static partial int StatxNative(int dirfd, string path, int flags, uint mask, byte* buffer);

    private const int AtFdCwd = -100;
    private const int AtSymlinkNoFollow = 0x100;
    private const uint StatxType = 0x1;
    private const uint StatxSize = 0x200;
    private const int StatxBytes = 256;
    private const int ModeOffset = 28; // __u16 stx_mode
    private const int SizeOffset = 40; // __u64 stx_size
    private const int Enoent = 2;
    private const int Enotdir = 20;

    /// <summary>
    /// The kind and size of what is at <paramref name="path"/>, without opening it or following a final symbolic
    /// link; throws <see cref="IOException"/> when it cannot be read (permission denied on a parent folder).
    /// </summary>
    public static (FileKind Kind, long Size) Lstat(string path)
    {
        var buffer = stackalloc byte[StatxBytes];
        if (StatxNative(AtFdCwd, path, AtSymlinkNoFollow, StatxType | StatxSize, buffer) != 0)
        {
            var errno = Marshal.GetLastPInvokeError();
            return errno is Enoent or Enotdir
                ? (FileKind.Missing, 0)
                : throw new IOException($"statx({path}) failed: {Marshal.GetPInvokeErrorMessage(errno)}");
        }

        var kind = (*(ushort*)(buffer + ModeOffset) & 0xF000) switch
        {
            0x8000 => FileKind.Regular,
            0x4000 => FileKind.Directory,
            0xA000 => FileKind.Symlink,
            _ => FileKind.Other,
        };
        return (kind, *(long*)(buffer + SizeOffset));
    }
}
