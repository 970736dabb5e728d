using System.Collections.Concurrent;
using System.Security.Cryptography;
using System.Text;

namespace DeepSeekCuda.Cuda;

/// <summary>
/// On-disk cache of compiled kernel images. One folder per key holds the image, its lowered names, the
/// NVRTC log and a manifest with the image's SHA-256. Entries are written into a temporary folder and
/// renamed into place, so a reader never sees half an entry; an entry whose hash does not match (a
/// truncated or edited file) is rebuilt.
/// </summary>
public sealed class KernelCache
{
    private const string Manifest = "manifest.txt";
    private const string Names = "names.tsv";
    private const string LogFile = "nvrtc.log";

    private readonly ConcurrentDictionary<string, object> _locks = new(StringComparer.Ordinal);
    private int _hits;
    private int _misses;
    private int _rebuilt;

    /// <summary>Opens (and creates) a cache at <paramref name="directory"/>.</summary>
    public KernelCache(string directory)
    {
        Directory = directory;
        System.IO.Directory.CreateDirectory(directory);
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

    /// <summary>Entries found corrupt and rebuilt.</summary>
    public int Rebuilt => Volatile.Read(ref _rebuilt);

    /// <summary>The folder of an entry.</summary>
    public string EntryPath(string family, string key) => Path.Combine(Directory, $"{family}-{key}");

    /// <summary>The cached image for <paramref name="key"/>, or the result of <paramref name="compile"/> stored under it.</summary>
    public CompiledKernel GetOrAdd(string family, string key, KernelTarget target, Func<CompiledKernel> compile)
    {
        // One compilation per key in this process; other processes are kept safe by the atomic rename.
        lock (_locks.GetOrAdd(key, _ => new object()))
        {
            var path = EntryPath(family, key);
            if (System.IO.Directory.Exists(path))
            {
                if (TryRead(path, family, key, target) is { } cached)
                {
                    Interlocked.Increment(ref _hits);
                    return cached;
                }

                Interlocked.Increment(ref _rebuilt);
                DeleteEntry(path);
            }

            Interlocked.Increment(ref _misses);
            var compiled = compile();
            Store(path, key, compiled);
            return compiled;
        }
    }

    private static string ImageName(bool isPtx) => isPtx ? "image.ptx" : "image.cubin";

    private static CompiledKernel? TryRead(string path, string family, string key, KernelTarget target)
    {
        try
        {
            var manifest = File.ReadAllLines(Path.Combine(path, Manifest))
                .Select(l => l.Split('=', 2)).Where(p => p.Length == 2).ToDictionary(p => p[0], p => p[1], StringComparer.Ordinal);
            var isPtx = !target.IsCubin;
            if (!manifest.TryGetValue("key", out var k) || k != key
                || !manifest.TryGetValue("arch", out var arch) || arch != target.Arch
                || !manifest.TryGetValue("image_sha256", out var hash)
                || !manifest.TryGetValue("names_sha256", out var namesHash))
            {
                return null;
            }

            var image = File.ReadAllBytes(Path.Combine(path, ImageName(isPtx)));
            var namesText = File.ReadAllBytes(Path.Combine(path, Names));
            if (Convert.ToHexStringLower(SHA256.HashData(image)) != hash || Convert.ToHexStringLower(SHA256.HashData(namesText)) != namesHash)
            {
                return null;
            }

            var names = Encoding.UTF8.GetString(namesText).Split('\n', StringSplitOptions.RemoveEmptyEntries)
                .Select(l => l.Split('\t', 2)).ToDictionary(p => p[0], p => p[1], StringComparer.Ordinal);
            var logPath = Path.Combine(path, LogFile);
            var log = File.Exists(logPath) ? File.ReadAllText(logPath) : "";
            return new CompiledKernel(family, target.Arch, isPtx, image, names, log, FromCache: true);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or IndexOutOfRangeException or ArgumentException)
        {
            // A missing or unreadable file is a broken entry: the caller rebuilds it.
            return null;
        }
    }

    private void Store(string path, string key, CompiledKernel compiled)
    {
        var tmp = Path.Combine(Directory, $".tmp-{Guid.NewGuid():N}");
        System.IO.Directory.CreateDirectory(tmp);
        try
        {
            var namesText = Encoding.UTF8.GetBytes(string.Concat(compiled.LoweredNames.Select(kv => $"{kv.Key}\t{kv.Value}\n")));
            File.WriteAllBytes(Path.Combine(tmp, ImageName(compiled.IsPtx)), compiled.Image);
            File.WriteAllBytes(Path.Combine(tmp, Names), namesText);
            File.WriteAllText(Path.Combine(tmp, LogFile), compiled.Log);
            File.WriteAllText(Path.Combine(tmp, Manifest),
                $"key={key}\nfamily={compiled.Family}\narch={compiled.Arch}\nformat={(compiled.IsPtx ? "ptx" : "cubin")}\n" +
                $"image_sha256={Convert.ToHexStringLower(SHA256.HashData(compiled.Image))}\nnames_sha256={Convert.ToHexStringLower(SHA256.HashData(namesText))}\n");
            System.IO.Directory.Move(tmp, path);
        }
        catch (IOException) when (System.IO.Directory.Exists(path))
        {
            // Another process renamed the same entry into place first; its content is equivalent.
            DeleteEntry(tmp);
        }
    }

    private static void DeleteEntry(string path)
    {
        try
        {
            System.IO.Directory.Delete(path, recursive: true);
        }
        catch (DirectoryNotFoundException)
        {
            // Already gone (another process removed it).
        }
    }
}
