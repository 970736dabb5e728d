using System.Reflection;
using System.Runtime.InteropServices;
using System.Text;

namespace DeepSeekCuda.Cuda.Native;

/// <summary>
/// Finds the CUDA driver, NVRTC, cuBLAS and cuBLASLt at run time. The P/Invoke declarations name logical
/// libraries (<see cref="Driver"/>, <see cref="Nvrtc"/>, <see cref="Cublas"/>, <see cref="CublasLt"/>); the
/// resolver maps them to the first candidate file that loads, so one build runs against CUDA 12.4 to 13 wherever
/// it is installed (a CUDA toolkit, a Python wheel, the folder <c>tools/cuda/toolchain.sh</c> fills), and a
/// machine without CUDA gets a clear <see cref="CudaUnavailableException"/> (or, for the BLAS libraries,
/// <see cref="Blas.CublasUnavailableException"/>) naming every place looked, instead of
/// <see cref="DllNotFoundException"/>.
/// </summary>
internal static class NativeLibraries
{
    /// <summary>Logical name of the driver API library in the declarations.</summary>
    public const string Driver = "dscuda-driver";

    /// <summary>Logical name of NVRTC in the declarations.</summary>
    public const string Nvrtc = "dscuda-nvrtc";

    /// <summary>Logical name of cuBLAS in the declarations (used only for baselines).</summary>
    public const string Cublas = "dscuda-cublas";

    /// <summary>Logical name of cuBLASLt in the declarations (used only for baselines).</summary>
    public const string CublasLt = "dscuda-cublaslt";

    /// <summary>
    /// Environment variable naming the folder (or a <c>:</c>-separated list of folders) that holds the CUDA
    /// libraries; searched before every other place.
    /// </summary>
    public const string LibraryFolderVariable = "DSCUDA_CUDA_LIB";

    /// <summary>
    /// Environment variable overriding <see cref="ToolchainDirectory"/> (the script honours it too).
    /// </summary>
    public const string ToolchainVariable = "DSCUDA_TOOLCHAIN";

    /// <summary>
    /// The oldest NVRTC accepted: the version CI compiles every kernel with (<c>tools/cuda/toolchain.sh</c>).
    /// An older one is skipped like a missing one, so a newer copy elsewhere still wins.
    /// </summary>
    public static (int Major, int Minor) NvrtcMinimum { get; } = (12, 4);

    private static readonly string[] DriverFiles = ["libcuda.so.1", "libcuda.so"];

    // Newest major first. NvrtcMinimum is 12.4, so no 11.x soname, and no bare libnvrtc.so (a dev symlink).
    private static readonly string[] NvrtcFiles = ["libnvrtc.so.13", "libnvrtc.so.12"];

    /// <summary>cuBLAS sonames probed, newest first.</summary>
    public static readonly IReadOnlyList<string> CublasFiles = ["libcublas.so.13", "libcublas.so.12", "libcublas.so.11", "libcublas.so"];

    /// <summary>cuBLASLt sonames probed, newest first.</summary>
    public static readonly IReadOnlyList<string> CublasLtFiles = ["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so.11", "libcublasLt.so"];

    // Wheel layouts under site-packages: CUDA 13 puts every library in one folder, CUDA 12 one per package.
    private static readonly string[] WheelLayouts = ["nvidia/cu13/lib", "nvidia/cuda_nvrtc/lib", "nvidia/cublas/lib"];

    private const string LookedIn = "Looked in:";
    private const string LoaderOrigin = "the dynamic loader's search (LD_LIBRARY_PATH, ld.so.cache)";
    private const string WheelOrigin = "Python wheel";
    private const string ToolchainOrigin = "tools/cuda/toolchain.sh";
    private const string LibraryFolderOrigin = "$" + LibraryFolderVariable;

    // The only process-wide state: the lazily loaded handles (and why a load failed), and the folder list the
    // three CUDA libraries share (read from the environment and the file system once).
    private static readonly Lazy<List<SearchFolder>> LibraryFolders = new(() => SearchDirectories(Environment.GetEnvironmentVariable).ToList());
    private static readonly Lazy<LoadResult> DriverLib = new(() =>
        Load(DriverDirectories(), DriverFiles, "the NVIDIA driver", "Fix: install the NVIDIA driver (a GPU machine), or use the CPU backend."));
    private static readonly Lazy<LoadResult> NvrtcLib = new(() =>
        LoadNvrtc(LibraryFolders.Value, ToolchainDirectory, NvrtcMinimum));
    private static readonly Lazy<LoadResult> CublasLib = new(() =>
    {
        // libcublas needs libcublasLt: loading Lt first (by full path where it was found outside the loader's
        // path) lets the dependency resolve by soname even when the CUDA folder is not in LD_LIBRARY_PATH.
        _ = CublasLtLib!.Value;
        return Load(LibraryFolders.Value, CublasFiles, "cuBLAS", BlasFix("libcublas.so"));
    });
    private static readonly Lazy<LoadResult> CublasLtLib = new(() =>
        Load(LibraryFolders.Value, CublasLtFiles, "cuBLASLt", BlasFix("libcublasLt.so")));

    /// <summary>A loaded library (or zero) and the file it came from, else why nothing loaded.</summary>
    internal readonly record struct LoadResult(IntPtr Handle, string? Path, string? Error);

    /// <summary>A folder to look in (<see cref="Path"/> null: the dynamic loader's own search) and why it is on the list.</summary>
    internal readonly record struct SearchFolder(string? Path, string? Origin)
    {
        /// <summary>Named by the user in <see cref="LibraryFolderVariable"/>: every soname there comes first.</summary>
        public bool IsExplicit => Origin == LibraryFolderOrigin;

        public override string ToString() => Path is null ? LoaderOrigin : Origin is null ? Path : $"{Path} ({Origin})";
    }

    static NativeLibraries()
    {
        // One resolver per assembly; the declaring classes call EnsureResolver from their static
        // constructors, so it is in place before the first P/Invoke binds.
        NativeLibrary.SetDllImportResolver(typeof(NativeLibraries).Assembly, Resolve);
    }

    /// <summary>Runs the static constructor (registers the resolver) if it has not run.</summary>
    internal static void EnsureResolver()
    {
    }

    private static IntPtr Resolve(string name, Assembly assembly, DllImportSearchPath? searchPath) => name switch
    {
        Driver => DriverLib.Value.Handle,
        Nvrtc => NvrtcLib.Value.Handle,
        Cublas => CublasLib.Value.Handle,
        CublasLt => CublasLtLib.Value.Handle,
        _ => IntPtr.Zero,
    };

    /// <summary>
    /// The folder <c>tools/cuda/toolchain.sh</c> fills with NVRTC 12.4 (<c>lib/</c>) and ptxas, cuobjdump and
    /// nvdisasm (<c>bin/</c>): <c>$DSCUDA_TOOLCHAIN</c>, else <c>$XDG_CACHE_HOME/deepseekcuda/cuda-12.4</c>, else
    /// <c>~/.cache/deepseekcuda/cuda-12.4</c>. Its <c>lib/</c> is the last place NVRTC and cuBLAS are looked for.
    /// </summary>
    public static string ToolchainDirectory => ToolchainDirectoryFor(Environment.GetEnvironmentVariable);

    /// <summary><see cref="ToolchainDirectory"/> for a given environment (the script's rule; empty counts as unset).</summary>
    internal static string ToolchainDirectoryFor(Func<string, string?> env)
    {
        if (NonEmpty(env(ToolchainVariable)) is { } explicitDir)
        {
            return explicitDir;
        }

        var cache = NonEmpty(env("XDG_CACHE_HOME")) ?? Path.Combine(Home(env), ".cache");
        return Path.Combine(cache, "deepseekcuda", "cuda-12.4");
    }

    /// <summary>
    /// Where NVRTC and cuBLAS are looked for, in order: <c>$DSCUDA_CUDA_LIB</c> (each folder of the list), the
    /// dynamic loader's own search, <c>$CUDA_PATH</c> and <c>$CUDA_HOME</c> (lib64, lib), <c>/usr/local/cuda/lib64</c>,
    /// the CUDA 12/13 Python wheel folders that exist, <c>/usr/lib/x86_64-linux-gnu</c>, <c>/usr/lib/wsl/lib</c>, and
    /// last the toolchain folder. Reads the environment only through <paramref name="env"/>; the file system only to
    /// list the python3* folders.
    /// </summary>
    internal static IEnumerable<SearchFolder> SearchDirectories(Func<string, string?> env)
    {
        var seen = new HashSet<string>(StringComparer.Ordinal);
        foreach (var folder in Unfiltered())
        {
            if (folder.Path is null || seen.Add(Path.TrimEndingDirectorySeparator(Path.GetFullPath(folder.Path))))
            {
                yield return folder;
            }
        }

        IEnumerable<SearchFolder> Unfiltered()
        {
            foreach (var dir in (env(LibraryFolderVariable) ?? "").Split(':', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
            {
                yield return new SearchFolder(dir, LibraryFolderOrigin);
            }

            yield return new SearchFolder(null, null);
            foreach (var variable in new[] { "CUDA_PATH", "CUDA_HOME" })
            {
                if (NonEmpty(env(variable)) is { } root)
                {
                    yield return new SearchFolder(Path.Combine(root, "lib64"), "$" + variable);
                    yield return new SearchFolder(Path.Combine(root, "lib"), "$" + variable);
                }
            }

            yield return new SearchFolder("/usr/local/cuda/lib64", null);
            foreach (var site in SitePackages(env))
            {
                foreach (var layout in WheelLayouts)
                {
                    var lib = Path.Combine(site, layout);
                    if (Directory.Exists(lib))
                    {
                        yield return new SearchFolder(lib, WheelOrigin);
                    }
                }
            }

            yield return new SearchFolder("/usr/lib/x86_64-linux-gnu", null);
            yield return new SearchFolder("/usr/lib/wsl/lib", null);
            yield return new SearchFolder(Path.Combine(ToolchainDirectoryFor(env), "lib"), ToolchainOrigin);
        }
    }

    /// <summary>site-packages folders that may hold NVIDIA's wheels: virtualenv, conda, system, user.</summary>
    private static IEnumerable<string> SitePackages(Func<string, string?> env)
    {
        foreach (var prefix in new[] { NonEmpty(env("VIRTUAL_ENV")), NonEmpty(env("CONDA_PREFIX")) })
        {
            if (prefix is not null)
            {
                foreach (var python in PythonFolders(Path.Combine(prefix, "lib")))
                {
                    yield return Path.Combine(python, "site-packages");
                }
            }
        }

        foreach (var lib in new[] { "/usr/local/lib", "/usr/lib" })
        {
            foreach (var python in PythonFolders(lib))
            {
                yield return Path.Combine(python, "dist-packages");
                yield return Path.Combine(python, "site-packages");
            }
        }

        foreach (var python in PythonFolders(Path.Combine(Home(env), ".local", "lib")))
        {
            yield return Path.Combine(python, "site-packages");
        }
    }

    private static IEnumerable<string> PythonFolders(string lib) =>
        Directory.Exists(lib) ? Directory.EnumerateDirectories(lib, "python3*").Order(StringComparer.Ordinal) : [];

    /// <summary>The driver lives where the loader looks, or in the two folders drivers install into.</summary>
    // /usr/local/nvidia/lib64: where NVIDIA's container runtime mounts the driver when LD_LIBRARY_PATH does not name it.
    private static List<SearchFolder> DriverDirectories() =>
        [new(null, null), new("/usr/lib/x86_64-linux-gnu", null), new("/usr/local/nvidia/lib64", null), new("/usr/local/nvidia/lib", null), new("/usr/lib/wsl/lib", null)];

    /// <summary>
    /// The order files are tried in. Every soname in the user's own folders (<c>$DSCUDA_CUDA_LIB</c>) comes first:
    /// they said where. Elsewhere the newest major wins across all folders: a <c>.so.13</c> anywhere before a
    /// <c>.so.12</c> anywhere, folders in search order within one soname.
    /// </summary>
    internal static IEnumerable<(SearchFolder Folder, string File)> Candidates(IReadOnlyList<SearchFolder> folders, IReadOnlyList<string> files)
    {
        foreach (var folder in folders.Where(f => f.IsExplicit))
        {
            foreach (var file in files)
            {
                yield return (folder, file);
            }
        }

        foreach (var file in files)
        {
            foreach (var folder in folders.Where(f => !f.IsExplicit))
            {
                yield return (folder, file);
            }
        }
    }

    /// <summary>
    /// The <c>libnvrtc-builtins.so.MAJOR.*</c> file NVRTC of <paramref name="major"/> opens by soname when it
    /// compiles, or null: the soname (<c>.so.12.4</c>) over the full version (<c>.so.12.4.127</c>), the newest minor first.
    /// </summary>
    internal static string? BuiltinsFor(string folder, int major)
    {
        if (!Directory.Exists(folder))
        {
            return null;
        }

        var prefix = $"libnvrtc-builtins.so.{major}.";
        return Directory.EnumerateFiles(folder, prefix + "*")
            .Select(path => (path, parts: Path.GetFileName(path)[prefix.Length..].Split('.')))
            .Where(c => c.parts.All(p => int.TryParse(p, out _)))
            .OrderBy(c => c.parts.Length)
            .ThenByDescending(c => int.Parse(c.parts[0]))
            .Select(c => c.path)
            .FirstOrDefault();
    }

    /// <summary>
    /// Loads NVRTC <paramref name="minimum"/> (<see cref="NvrtcMinimum"/>) or newer from <paramref name="folders"/>:
    /// preloads its builtins from the same folder, then rejects (and frees) an older library.
    /// </summary>
    internal static LoadResult LoadNvrtc(IReadOnlyList<SearchFolder> folders, string toolchainDirectory, (int Major, int Minor) minimum)
    {
        var (minMajor, minMinor) = minimum;
        return Load(folders, NvrtcFiles, $"NVRTC {minMajor}.{minMinor} or newer",
            $"Fix: run tools/cuda/toolchain.sh (fetches NVRTC 12.4 into {toolchainDirectory}) " +
            $"or set {LibraryFolderVariable} to the folder holding libnvrtc.so.12/13.",
            beforeLoad: PreloadBuiltins,
            reject: TooOld);

        // NVRTC dlopens libnvrtc-builtins.so.X.Y by soname at its first compile, which fails unless the folder is on
        // the loader's path; loaded here first, the soname is already resolved. The handle stays loaded for the process.
        static void PreloadBuiltins(string folder, string file)
        {
            var major = int.Parse(file[(file.LastIndexOf('.') + 1)..]);
            if (BuiltinsFor(folder, major) is { } builtins)
            {
                NativeLibrary.TryLoad(builtins, out _);
            }
        }

        unsafe string? TooOld(IntPtr handle, string path)
        {
            if (!NativeLibrary.TryGetExport(handle, "nvrtcVersion", out var export))
            {
                return $"{path} has no nvrtcVersion export";
            }

            int major, minor;
            var version = (delegate* unmanaged<int*, int*, NvrtcResult>)export;
            if (version(&major, &minor) != NvrtcResult.Success)
            {
                return $"nvrtcVersion failed in {path}";
            }

            return (major, minor).CompareTo(minimum) < 0
                ? $"NVRTC {major}.{minor} at {path} is older than {minMajor}.{minMinor}, the oldest version CI compiles with"
                : null;
        }
    }

    /// <summary>
    /// Tries <see cref="Candidates"/> in order and returns the first that loads and is not rejected; else an
    /// error naming, folder by folder, every file tried and why it was passed over, then <paramref name="fix"/>.
    /// </summary>
    internal static LoadResult Load(IReadOnlyList<SearchFolder> folders, IReadOnlyList<string> files, string what, string fix,
        Action<string, string>? beforeLoad = null, Func<IntPtr, string, string?>? reject = null)
    {
        var outcomes = new Dictionary<SearchFolder, List<(string File, string Why)>>();
        foreach (var (folder, file) in Candidates(folders, files))
        {
            var list = outcomes.TryGetValue(folder, out var l) ? l : outcomes[folder] = [];
            var path = folder.Path is null ? file : Path.Combine(folder.Path, file);
            if (folder.Path is not null)
            {
                if (!Directory.Exists(folder.Path))
                {
                    continue; // reported once per folder
                }

                if (!File.Exists(path))
                {
                    list.Add((file, "not found"));
                    continue;
                }

                beforeLoad?.Invoke(folder.Path, file);
            }

            if (!TryLoad(path, out var handle, out var failure))
            {
                list.Add((file, failure));
                continue;
            }

            if (reject?.Invoke(handle, path) is { } why)
            {
                NativeLibrary.Free(handle);
                list.Add((file, why));
                continue;
            }

            return new LoadResult(handle, path, null);
        }

        return new LoadResult(IntPtr.Zero, null, Describe(folders, files, what, fix, outcomes));
    }

    private static bool TryLoad(string path, out IntPtr handle, out string failure)
    {
        try
        {
            handle = NativeLibrary.Load(path);
            failure = "";
            return true;
        }
        catch (DllNotFoundException e)
        {
            // .NET's message ends with dlerror's text on its own line: "<path>: invalid ELF header".
            var dlerror = e.Message.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).LastOrDefault() ?? e.Message;
            handle = IntPtr.Zero;
            failure = dlerror.Contains("cannot open shared object file: No such file or directory", StringComparison.Ordinal)
                ? "not found"
                : $"failed to load ({dlerror})";
            return false;
        }
    }

    private static string Describe(IReadOnlyList<SearchFolder> folders, IReadOnlyList<string> files, string what, string fix,
        Dictionary<SearchFolder, List<(string File, string Why)>> outcomes)
    {
        var text = new StringBuilder($"{what} ({string.Join(", ", files)}) could not be loaded. {LookedIn}");
        foreach (var folder in folders.Distinct())
        {
            text.Append("\n  ").Append(folder).Append(": ");
            if (folder.Path is not null && !Directory.Exists(folder.Path))
            {
                text.Append("no such folder");
                continue;
            }

            var tried = outcomes.GetValueOrDefault(folder) ?? [];
            var notFound = tried.Where(t => t.Why == "not found").Select(t => t.File).ToList();
            var reasons = tried.Where(t => t.Why != "not found").Select(t => $"{t.File}: {t.Why}").ToList();
            if (notFound.Count > 0)
            {
                reasons.Insert(0, $"{string.Join(", ", notFound)} not found");
            }

            text.Append(string.Join("; ", reasons));
        }

        // Wheel folders are listed only where they exist; on the full search (the one ending in the toolchain
        // folder) say they were looked for.
        if (!folders.Any(f => f.Origin == WheelOrigin) && folders.Any(f => f.Origin == ToolchainOrigin))
        {
            text.Append($"\n  no Python wheel folder ({string.Join(", ", WheelLayouts)} in site-packages of $VIRTUAL_ENV, " +
                        "$CONDA_PREFIX, /usr/local/lib/python3*, /usr/lib/python3*, ~/.local/lib/python3*)");
        }

        return text.Append('\n').Append(fix).ToString();
    }

    private static string BlasFix(string file) =>
        $"Fix: install the CUDA toolkit's {file}.12/13 (or pip install nvidia-cublas-cu12) or set {LibraryFolderVariable} to its folder.";

    private static string? NonEmpty(string? value) => string.IsNullOrEmpty(value) ? null : value;

    private static string Home(Func<string, string?> env) =>
        NonEmpty(env("HOME")) ?? Environment.GetFolderPath(Environment.SpecialFolder.UserProfile);

    /// <summary>Whether the driver library loaded; <paramref name="reason"/> says why not.</summary>
    public static bool TryDriver(out IntPtr handle, out string reason) => Try(DriverLib.Value, out handle, out reason);

    /// <summary>Whether NVRTC (12.4 or newer) loaded; <paramref name="reason"/> says why not.</summary>
    public static bool TryNvrtc(out IntPtr handle, out string reason) => Try(NvrtcLib.Value, out handle, out reason);

    /// <summary>Whether cuBLAS loaded; <paramref name="reason"/> says why not (naming every file tried).</summary>
    public static bool TryCublas(out IntPtr handle, out string reason) => Try(CublasLib.Value, out handle, out reason);

    /// <summary>Whether cuBLASLt loaded; <paramref name="reason"/> says why not (naming every file tried).</summary>
    public static bool TryCublasLt(out IntPtr handle, out string reason) => Try(CublasLtLib.Value, out handle, out reason);

    /// <summary>The file cuBLAS was loaded from, or null.</summary>
    public static string? CublasPath => CublasLib.Value.Path;

    /// <summary>The file cuBLASLt was loaded from, or null.</summary>
    public static string? CublasLtPath => CublasLtLib.Value.Path;

    /// <summary>Throws <see cref="Blas.CublasUnavailableException"/> when cuBLAS cannot be loaded.</summary>
    public static IntPtr RequireCublas() =>
        TryCublas(out var h, out var reason) ? h : throw new Blas.CublasUnavailableException("cublas", reason);

    /// <summary>Throws <see cref="Blas.CublasUnavailableException"/> when cuBLASLt cannot be loaded.</summary>
    public static IntPtr RequireCublasLt() =>
        TryCublasLt(out var h, out var reason) ? h : throw new Blas.CublasUnavailableException("cublasLt", reason);

    /// <summary>
    /// The first line of a reason this class gave (or any text), without the "Looked in:" that introduces its list of
    /// searched folders: "the NVIDIA driver (libcuda.so.1, libcuda.so) could not be loaded".
    /// </summary>
    public static string Headline(string reason)
    {
        var line = reason.Split('\n')[0].TrimEnd();
        return line.EndsWith(LookedIn, StringComparison.Ordinal) ? line[..^LookedIn.Length].TrimEnd(' ', '.') : line;
    }

    /// <summary>The file the driver library was loaded from (a soname when the dynamic loader found it), or null.</summary>
    public static string? DriverPath => DriverLib.Value.Path;

    /// <summary>The file NVRTC was loaded from, or null.</summary>
    public static string? NvrtcPath => NvrtcLib.Value.Path;

    private static readonly Lazy<string?> NvrtcFileLazy = new(() => TryNvrtc(out var handle, out _) ? FileOf(handle, "nvrtcVersion") : null);

    /// <summary>
    /// The real file the loaded NVRTC was mapped from, all symbolic links resolved (e.g.
    /// <c>libnvrtc.so.12.4.127</c> behind <see cref="NvrtcPath"/>'s <c>libnvrtc.so.12</c>, which is a bare soname when
    /// the dynamic loader found it). Null without NVRTC, without <c>/proc</c>, or when the file was replaced after it
    /// was loaded (its bytes are then no longer the ones running).
    /// </summary>
    public static string? NvrtcFile => NvrtcFileLazy.Value;

    /// <summary>
    /// The real file a loaded library was mapped from, found by one of its exports (<see cref="MappedFile"/>); null
    /// when the export is missing or the file cannot be told.
    /// </summary>
    public static string? FileOf(IntPtr library, string export) =>
        NativeLibrary.TryGetExport(library, export, out var address) ? MappedFile(address) : null;

    /// <summary>
    /// The file mapped at <paramref name="address"/> in this process, from <c>/proc/self/maps</c> (the kernel writes the
    /// path with links resolved); null when none is, or the file was deleted or replaced since.
    /// </summary>
    internal static string? MappedFile(IntPtr address)
    {
        const string Deleted = " (deleted)";
        var at = (ulong)address;
        try
        {
            foreach (var line in File.ReadLines("/proc/self/maps"))
            {
                // start-end perms offset dev inode path (the path may hold spaces)
                var fields = line.Split(' ', 6, StringSplitOptions.RemoveEmptyEntries);
                var range = fields[0].Split('-');
                if (fields.Length == 6 && range.Length == 2
                    && ulong.TryParse(range[0], System.Globalization.NumberStyles.HexNumber, null, out var start)
                    && ulong.TryParse(range[1], System.Globalization.NumberStyles.HexNumber, null, out var end)
                    && at >= start && at < end)
                {
                    var path = fields[5].TrimStart();
                    return path.StartsWith('/') && !path.EndsWith(Deleted, StringComparison.Ordinal) ? path : null;
                }
            }
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            // No /proc (or not readable): the caller goes without the file.
        }

        return null;
    }

    /// <summary>Throws <see cref="CudaUnavailableException"/> when the driver cannot be loaded.</summary>
    public static IntPtr RequireDriver() =>
        TryDriver(out var h, out var reason) ? h : throw new CudaUnavailableException(reason);

    /// <summary>Throws <see cref="CudaUnavailableException"/> when NVRTC cannot be loaded.</summary>
    public static IntPtr RequireNvrtc() =>
        TryNvrtc(out var h, out var reason) ? h : throw new CudaUnavailableException(reason);

    /// <summary>An optional export (an entry point newer drivers or NVRTC versions add), or zero.</summary>
    public static IntPtr OptionalExport(IntPtr library, string name) =>
        library != IntPtr.Zero && NativeLibrary.TryGetExport(library, name, out var p) ? p : IntPtr.Zero;

    private static bool Try(LoadResult r, out IntPtr handle, out string reason)
    {
        handle = r.Handle;
        reason = r.Error ?? "";
        return handle != IntPtr.Zero;
    }
}
