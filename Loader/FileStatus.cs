using System.Runtime.InteropServices;

namespace DeepSeekCuda.Loader;

/// <summary>What <see cref="FileStatus"/> found at a path.</summary>
internal enum FileKind
{
    /// <summary>Nothing there (or a path component is not a folder).</summary>
    Missing,

    /// <summary>A regular file.</summary>
    Regular,

    /// <summary>A folder.</summary>
    Directory,

    /// <summary>A symbolic link (only when links are not followed).</summary>
    Symlink,

    /// <summary>A FIFO, socket or device: opening one can block or never end.</summary>
    Other,
}

/// <summary>
/// The file type and real path of a path without opening it, which .NET does not expose: a FIFO and a
/// regular file look alike to <see cref="File.GetAttributes(string)"/>, and opening a FIFO blocks until a
/// writer comes. Linux (glibc) only; the model files and the kernel cache are read there.
/// </summary>
internal static unsafe partial class FileStatus
{
    private const string Lib = "libc.so.6";

    // statx, not stat: struct statx has one layout on every architecture (struct stat differs between
    // x86-64 and arm64). glibc has it since 2.28.
    [LibraryImport(Lib, EntryPoint = "statx", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    private static partial int StatxNative(int dirfd, string path, int flags, uint mask, byte* buffer);

    [LibraryImport(Lib, EntryPoint = "realpath", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    private static partial IntPtr RealPathNative(string path, IntPtr resolved);

    [LibraryImport(Lib, EntryPoint = "free")]
    private static partial void Free(IntPtr p);

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
    /// The kind and size of what is at <paramref name="path"/>, without opening it or following a final
    /// symbolic link; throws <see cref="IOException"/> when it cannot be read (permission denied on a parent folder).
    /// </summary>
    public static (FileKind Kind, long Size) Lstat(string path) => Statx(path, AtSymlinkNoFollow);

    /// <summary>As <see cref="Lstat"/>, following links to what they name (a link to nothing is <see cref="FileKind.Missing"/>).</summary>
    public static (FileKind Kind, long Size) Stat(string path) => Statx(path, 0);

    /// <summary>The canonical path of <paramref name="path"/>, every link resolved; null when it or a link on the way names nothing.</summary>
    public static string? RealPath(string path)
    {
        var p = RealPathNative(path, IntPtr.Zero);
        if (p == IntPtr.Zero)
        {
            return null;
        }

        try
        {
            return Marshal.PtrToStringUTF8(p);
        }
        finally
        {
            Free(p);
        }
    }

    /// <summary>
    /// Reads exactly <paramref name="length"/> bytes, the size checked before opening, from <paramref name="stream"/>;
    /// an <see cref="IOException"/> when the file holds fewer or more by now.
    /// </summary>
    public static byte[] ReadExactly(FileStream stream, long length)
    {
        var bytes = new byte[length];
        stream.ReadExactly(bytes);
        if (stream.ReadByte() >= 0)
        {
            throw new IOException("the file changed size while being read");
        }

        return bytes;
    }

    /// <summary>A short name of a kind, for messages.</summary>
    public static string Describe(FileKind kind) => kind switch
    {
        FileKind.Missing => "nothing",
        FileKind.Regular => "a regular file",
        FileKind.Directory => "a folder",
        FileKind.Symlink => "a symbolic link",
        _ => "a FIFO, socket or device",
    };

    private static (FileKind Kind, long Size) Statx(string path, int flags)
    {
        var buffer = stackalloc byte[StatxBytes];
        if (StatxNative(AtFdCwd, path, flags, StatxType | StatxSize, buffer) != 0)
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
