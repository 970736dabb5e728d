using System.Reflection;
using System.Runtime.InteropServices;

namespace DeepSeekCuda.Cuda.Native;

/// <summary>
/// Finds the CUDA driver, NVRTC, cuBLAS and cuBLASLt at run time. The P/Invoke declarations name logical
/// libraries (<see cref="Driver"/>, <see cref="Nvrtc"/>, <see cref="Cublas"/>, <see cref="CublasLt"/>); the
/// resolver maps them to the first candidate file that loads, so one build runs against CUDA 11.8, 12 or 13
/// and a machine without CUDA gets a clear <see cref="CudaUnavailableException"/> (or, for the BLAS
/// libraries, <see cref="Blas.CublasUnavailableException"/>) instead of <see cref="DllNotFoundException"/>.
/// </summary>
public static class NativeLibraries
{
    /// <summary>Logical name of the driver API library in the declarations.</summary>
    public const string Driver = "dscuda-driver";

    /// <summary>Logical name of NVRTC in the declarations.</summary>
    public const string Nvrtc = "dscuda-nvrtc";

    /// <summary>Logical name of cuBLAS in the declarations (used only for baselines).</summary>
    public const string Cublas = "dscuda-cublas";

    /// <summary>Logical name of cuBLASLt in the declarations (used only for baselines).</summary>
    public const string CublasLt = "dscuda-cublaslt";

    private static readonly string[] DriverFiles = ["libcuda.so.1", "libcuda.so"];
    private static readonly string[] NvrtcFiles = ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so.11.2", "libnvrtc.so"];

    /// <summary>cuBLAS sonames probed, newest first.</summary>
    public static readonly IReadOnlyList<string> CublasFiles = ["libcublas.so.13", "libcublas.so.12", "libcublas.so.11", "libcublas.so"];

    /// <summary>cuBLASLt sonames probed, newest first.</summary>
    public static readonly IReadOnlyList<string> CublasLtFiles = ["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so.11", "libcublasLt.so"];

    // The only process-wide state: the lazily loaded handles (and why a load failed).
    private static readonly Lazy<LoadResult> DriverLib = new(() => Load(DriverFiles, "the NVIDIA driver (libcuda.so.1)"));
    private static readonly Lazy<LoadResult> NvrtcLib = new(() => Load(NvrtcFiles, "NVRTC (libnvrtc.so.13/.12/.11.2; on Debian: apt-get install libnvrtc11.2 libnvrtc-builtins11.8)"));
    private static readonly Lazy<LoadResult> CublasLib = new(() =>
    {
        // libcublas needs libcublasLt: loading Lt first (by full path where it was found outside the loader's
        // path) lets the dependency resolve by soname even when the CUDA folder is not in LD_LIBRARY_PATH.
        _ = CublasLtLib!.Value;
        return Load(CublasFiles, "cuBLAS (libcublas.so.13/.12/.11; part of the CUDA toolkit; Debian non-free has libcublas11 for CUDA 11.8)");
    });
    private static readonly Lazy<LoadResult> CublasLtLib = new(() => Load(CublasLtFiles, "cuBLASLt (libcublasLt.so.13/.12/.11; part of the CUDA toolkit; Debian non-free has libcublaslt11 for CUDA 11.8)"));

    private readonly record struct LoadResult(IntPtr Handle, string? Path, string? Error);

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

    /// <summary>Whether the driver library loaded; <paramref name="reason"/> says why not.</summary>
    public static bool TryDriver(out IntPtr handle, out string reason) => Try(DriverLib.Value, out handle, out reason);

    /// <summary>Whether NVRTC loaded; <paramref name="reason"/> says why not.</summary>
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

    /// <summary>The file NVRTC was loaded from, or null.</summary>
    public static string? NvrtcPath => NvrtcLib.Value.Path;

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

    private static LoadResult Load(IReadOnlyList<string> files, string what)
    {
        var tried = new List<string>();
        foreach (var dir in SearchDirectories())
        {
            foreach (var file in files)
            {
                var path = dir is null ? file : System.IO.Path.Combine(dir, file);
                if (dir is not null && !File.Exists(path))
                {
                    continue;
                }

                tried.Add(path);
                if (NativeLibrary.TryLoad(path, out var handle))
                {
                    return new LoadResult(handle, path, null);
                }
            }
        }

        return new LoadResult(IntPtr.Zero, null,
            $"{what} could not be loaded (tried {string.Join(", ", tried.Distinct())}; searched the loader path, $CUDA_PATH, $CUDA_HOME, /usr/local/cuda/lib64, /usr/lib/x86_64-linux-gnu)");
    }

    private static IEnumerable<string?> SearchDirectories()
    {
        yield return null; // the dynamic loader's own search (LD_LIBRARY_PATH, ld.so.cache)
        foreach (var env in new[] { "CUDA_PATH", "CUDA_HOME" })
        {
            var root = Environment.GetEnvironmentVariable(env);
            if (!string.IsNullOrEmpty(root))
            {
                yield return System.IO.Path.Combine(root, "lib64");
                yield return System.IO.Path.Combine(root, "lib");
            }
        }

        yield return "/usr/local/cuda/lib64";
        yield return "/usr/lib/x86_64-linux-gnu";
        yield return "/usr/lib/wsl/lib";
    }
}
