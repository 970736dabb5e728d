using System.Collections.Concurrent;
using System.Globalization;
using System.Security.Cryptography;
using System.Text;
using DeepSeekCuda.Cuda.Native;
using DeepSeekCuda.Loader;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace DeepSeekCuda.Cuda;

/// <summary>
/// On-disk cache of compiled kernel images, best-effort and shared by processes. One folder per key holds the image,
/// its lowered names, the NVRTC log and a manifest with the full key and each file's length and SHA-256.
/// <list type="bullet">
/// <item>Never a wrong image: an entry is served only when its manifest names this key, family, architecture and
/// format and every file matches its length and hash; anything else (truncated, edited, foreign, a file or link where
/// the folder goes) is a miss, compiled again and replaced.</item>
/// <item>Bounded reads: only regular files are opened (a FIFO or device would block or never end), never through a
/// symbolic link, and none larger than <see cref="MaxFileBytes"/>.</item>
/// <item>Several processes: an entry is written into a unique temporary folder beside it and renamed into place, so a
/// reader never sees half an entry; when another process renamed first, its entry is kept if valid.</item>
/// <item>Best-effort: a cache that cannot be read or written (no permission, disk full, a file where a folder goes)
/// costs a compile and a warning, never the compile itself. A temporary folder is removed whether its store succeeds
/// or fails; only a process killed mid-store leaves one behind.</item>
/// </list>
/// </summary>
internal sealed class KernelCache
{
    /// <summary>The largest image, names or log file the cache reads or writes (bytes); a larger image runs uncached.</summary>
    public const long MaxFileBytes = 256L << 20;

    /// <summary>The largest manifest the cache reads (bytes); a real one is under 1 KB.</summary>
    public const long MaxManifestBytes = 64 << 10;

    private const string Manifest = "manifest.txt";
    private const string Names = "names.tsv";
    private const string LogFile = "nvrtc.log";
    private const string FormatVersion = "2";

    // Attempts to rename an entry into place; between two, what is in the way is removed unless it is a valid entry.
    private const int StoreAttempts = 3;

    private readonly ConcurrentDictionary<string, object> _locks = new(StringComparer.Ordinal);
    private readonly ILogger _logger;
    private int _hits;
    private int _misses;
    private int _rebuilt;
    private int _storeFailures;

    /// <summary>A cache at <paramref name="directory"/>, created at the first store; nothing is touched before.</summary>
    /// <param name="directory">The cache folder.</param>
    /// <param name="logger">Receives a warning for every entry found broken and every store that failed.</param>
    public KernelCache(string directory, ILogger? logger = null)
    {
        Directory = directory;
        _logger = logger ?? NullLogger.Instance;
    }

    /// <summary>The default location: <c>$DSCUDA_KERNEL_CACHE</c>, else <c>~/.cache/deepseekcuda/kernels</c>.</summary>
    public static string DefaultDirectory =>
        Environment.GetEnvironmentVariable("DSCUDA_KERNEL_CACHE") is { Length: > 0 } d
            ? d
            : Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".cache", "deepseekcuda", "kernels");

    /// <summary>The cache folder.</summary>
    public string Directory { get; }

    /// <summary>Lookups served from disk.</summary>
    public int Hits => Volatile.Read(ref _hits);

    /// <summary>Lookups that compiled.</summary>
    public int Misses => Volatile.Read(ref _misses);

    /// <summary>Lookups that found something broken or foreign at the entry's place and compiled instead.</summary>
    public int Rebuilt => Volatile.Read(ref _rebuilt);

    /// <summary>Compiled images that could not be stored (they were returned all the same).</summary>
    public int StoreFailures => Volatile.Read(ref _storeFailures);

    /// <summary>The folder of an entry.</summary>
    public string EntryPath(string family, string key) => Path.Combine(Directory, $"{family}-{key}");

    /// <summary>
    /// The cached image for <paramref name="key"/> when a valid one is on disk, else the result of
    /// <paramref name="compile"/>, stored under it when the cache can be written. Only <paramref name="compile"/>'s
    /// own exceptions reach the caller.
    /// </summary>
    public CompiledKernel GetOrAdd(string family, string key, KernelTarget target, Func<CompiledKernel> compile)
    {
        // One compilation per key in this process; other processes are kept safe by the atomic rename.
        lock (_locks.GetOrAdd(key, _ => new object()))
        {
            var path = EntryPath(family, key);
            var cached = TryRead(path, family, key, target, out var problem);
            if (cached is not null)
            {
                Interlocked.Increment(ref _hits);
                return cached;
            }

            if (problem is not null)
            {
                Interlocked.Increment(ref _rebuilt);
                _logger.LogWarning("Kernel cache entry {Entry} not used ({Problem}); compiling it again", path, problem);
            }

            Interlocked.Increment(ref _misses);
            var compiled = compile();
            Store(path, family, key, target, compiled);
            return compiled;
        }
    }

    private static string ImageName(bool isPtx) => isPtx ? "image.ptx" : "image.cubin";

    private static string Format(bool isPtx) => isPtx ? "ptx" : "cubin";

    /// <summary>
    /// The entry at <paramref name="path"/> when it is valid for this key. Null with a null <paramref name="problem"/>
    /// when nothing is there; null with the reason when something unusable is.
    /// </summary>
    private static CompiledKernel? TryRead(string path, string family, string key, KernelTarget target, out string? problem)
    {
        try
        {
            switch (FileStatus.Lstat(path).Kind)
            {
                case FileKind.Missing:
                    problem = null;
                    return null;
                case not FileKind.Directory:
                    problem = "not a folder";
                    return null;
            }

            if (ReadBounded(Path.Combine(path, Manifest), MaxManifestBytes, out problem) is not { } manifestBytes)
            {
                return null;
            }

            var manifest = ParseManifest(Encoding.UTF8.GetString(manifestBytes));
            var isPtx = !target.IsCubin;
            var image = ImageName(isPtx);
            problem = manifest is null ? "malformed manifest"
                : manifest.GetValueOrDefault("version") != FormatVersion ? "manifest of another version"
                : manifest.GetValueOrDefault("key") != key ? "manifest of another key"
                : manifest.GetValueOrDefault("family") != family ? "manifest of another family"
                : manifest.GetValueOrDefault("arch") != target.Arch ? "manifest of another architecture"
                : manifest.GetValueOrDefault("format") != Format(isPtx) ? "manifest of another format"
                : null;
            if (problem is not null
                || ReadVerified(path, image, manifest!, out problem) is not { } imageBytes
                || ReadVerified(path, Names, manifest!, out problem) is not { } namesBytes
                || ReadVerified(path, LogFile, manifest!, out problem) is not { } logBytes)
            {
                return null;
            }

            var names = new Dictionary<string, string>(StringComparer.Ordinal);
            foreach (var line in Encoding.UTF8.GetString(namesBytes).Split('\n', StringSplitOptions.RemoveEmptyEntries))
            {
                if (line.Split('\t') is not [var expression, var lowered] || !names.TryAdd(expression, lowered))
                {
                    problem = "malformed names";
                    return null;
                }
            }

            return new CompiledKernel(family, target.Arch, isPtx, imageBytes, names, Encoding.UTF8.GetString(logBytes), FromCache: true);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            problem = e.Message;
            return null;
        }
    }

    /// <summary>key=value lines; null when a line is not one or a name repeats.</summary>
    private static Dictionary<string, string>? ParseManifest(string text)
    {
        var values = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var line in text.Split('\n', StringSplitOptions.RemoveEmptyEntries))
        {
            if (line.Split('=', 2) is not [var name, var value] || !values.TryAdd(name, value))
            {
                return null;
            }
        }

        return values;
    }

    /// <summary>The manifest's record of a file: its length and SHA-256.</summary>
    private static string FileRecord(byte[] bytes) =>
        $"{bytes.Length.ToString(CultureInfo.InvariantCulture)} {Convert.ToHexStringLower(SHA256.HashData(bytes))}";

    /// <summary>File <paramref name="name"/> of the entry when its length and hash are the manifest's; else null and why.</summary>
    private static byte[]? ReadVerified(string entry, string name, Dictionary<string, string> manifest, out string? problem)
    {
        if (!manifest.TryGetValue("file " + name, out var record)
            || record.Split(' ') is not [var lengthText, _]
            || !long.TryParse(lengthText, NumberStyles.None, CultureInfo.InvariantCulture, out var length))
        {
            problem = $"no record of {name} in the manifest";
            return null;
        }

        var bytes = ReadBounded(Path.Combine(entry, name), Math.Min(length, MaxFileBytes), out problem);
        if (bytes is not null && FileRecord(bytes) != record)
        {
            problem = $"{name} does not match its length and SHA-256";
            return null;
        }

        return bytes;
    }

    /// <summary>
    /// The bytes of <paramref name="path"/> when it is a regular file (checked before opening it: opening a FIFO
    /// blocks, a device may never end) of at most <paramref name="max"/> bytes; else null and why.
    /// </summary>
    private static byte[]? ReadBounded(string path, long max, out string? problem)
    {
        var (kind, size) = FileStatus.Lstat(path);
        problem = kind != FileKind.Regular ? $"{Path.GetFileName(path)} is {(kind == FileKind.Missing ? "missing" : "not a regular file")}"
            : size > max ? $"{Path.GetFileName(path)} has {size} bytes, more than the {max} expected"
            : null;
        if (problem is not null)
        {
            return null;
        }

        using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 1);
        return FileStatus.ReadExactly(stream, size); // a size changed since is an IOException: TryRead's miss
    }

    private void Store(string path, string family, string key, KernelTarget target, CompiledKernel compiled)
    {
        string? leftover = null; // the temporary folder while it has not been renamed into place
        try
        {
            if (compiled.Image.Length > MaxFileBytes)
            {
                // Reported like any store that failed.
                throw new IOException($"the image has {compiled.Image.Length} bytes, more than the cache's {MaxFileBytes}");
            }

            System.IO.Directory.CreateDirectory(Directory);
            var tmp = leftover = SidePath(".tmp-");
            System.IO.Directory.CreateDirectory(tmp);
            var files = new Dictionary<string, byte[]>(StringComparer.Ordinal)
            {
                [ImageName(compiled.IsPtx)] = compiled.Image,
                [Names] = Encoding.UTF8.GetBytes(string.Concat(compiled.LoweredNames.Select(kv => $"{kv.Key}\t{kv.Value}\n"))),
                [LogFile] = Encoding.UTF8.GetBytes(compiled.Log),
            };
            var manifest = new StringBuilder()
                .Append($"version={FormatVersion}\nkey={key}\nfamily={family}\narch={target.Arch}\nformat={Format(compiled.IsPtx)}\n");
            foreach (var (name, bytes) in files)
            {
                File.WriteAllBytes(Path.Combine(tmp, name), bytes);
                manifest.Append($"file {name}={FileRecord(bytes)}\n");
            }

            File.WriteAllText(Path.Combine(tmp, Manifest), manifest.ToString());
            for (var attempt = 1; ; attempt++)
            {
                try
                {
                    System.IO.Directory.Move(tmp, path);
                    leftover = null;
                    return;
                }
                catch (IOException) when (attempt < StoreAttempts)
                {
                    // Something is in the way: another process's entry that won the race ("Directory not empty") is
                    // kept and ours discarded; what made this lookup a miss is removed before the next attempt.
                    if (TryRead(path, family, key, target, out _) is not null || !RemoveBroken(path, family, key, target))
                    {
                        return;
                    }
                }
            }
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            Interlocked.Increment(ref _storeFailures);
            _logger.LogWarning("Kernel cache could not store {Entry} ({Reason}); the kernel runs uncached", path, e.Message);
        }
        finally
        {
            if (leftover is not null)
            {
                DeleteQuietly(leftover);
            }
        }
    }

    /// <summary>A new unique name beside the entries (same folder, so a rename is atomic).</summary>
    private string SidePath(string prefix) => Path.Combine(Directory, prefix + Guid.NewGuid().ToString("N"));

    /// <summary>
    /// Removes what is at <paramref name="path"/> unless it is a valid entry after all; false when a valid entry is in
    /// place (then nothing more is to be stored), true when the place is free. What is there is first renamed to a
    /// unique name, so that only this process reads or deletes it from then on: judged in place, it may since have been
    /// replaced by another process's valid entry, or been half read while another remover took it away; removing on
    /// such a verdict would break the others' reads in turn, and so on.
    /// </summary>
    private bool RemoveBroken(string path, string family, string key, KernelTarget target)
    {
        var aside = SidePath(".old-");
        if (!LibC.Rename(path, aside))
        {
            return true; // another process took it away first
        }

        try
        {
            if (TryRead(aside, family, key, target, out _) is null)
            {
                return true;
            }

            // Valid after all (renamed in by another process after this one judged the place): put it back.
            try
            {
                LibC.Rename(aside, path);
            }
            catch (IOException)
            {
                // A third process's entry has taken the place meanwhile ("Directory not empty"); this copy goes.
            }

            return false;
        }
        finally
        {
            DeleteQuietly(aside);
        }
    }

    /// <summary>Deletes a temporary or moved-aside folder, or a file or link (never its target); a failure is logged.</summary>
    private void DeleteQuietly(string path)
    {
        try
        {
            switch (FileStatus.Lstat(path).Kind)
            {
                case FileKind.Missing:
                    break; // never created, or put back in place
                case FileKind.Directory:
                    System.IO.Directory.Delete(path, recursive: true);
                    break;
                default:
                    File.Delete(path);
                    break;
            }
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            _logger.LogWarning("Kernel cache could not remove {Path}: {Reason}", path, e.Message);
        }
    }
}
