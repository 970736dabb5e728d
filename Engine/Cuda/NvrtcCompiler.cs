using System.Runtime.InteropServices;
using System.Security.Cryptography;
using System.Text;
using DeepSeekCuda.Cuda.Native;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace DeepSeekCuda.Cuda;

/// <summary>
/// What NVRTC compiles for: <c>sm_XY</c>/<c>sm_90a</c> give CUBIN (NVRTC runs ptxas), <c>compute_XY</c>
/// gives PTX that the driver compiles at load.
/// </summary>
internal readonly record struct KernelTarget(string Arch)
{
    /// <summary>Whether the output is CUBIN (else PTX).</summary>
    public bool IsCubin => Arch.StartsWith("sm_", StringComparison.Ordinal);

    /// <inheritdoc />
    public override string ToString() => Arch;
}

/// <summary>One template instantiation to compile: the kernel's name expression and its parameter struct.</summary>
/// <param name="NameExpression">e.g. <c>rmsnorm_kernel&lt;256, 1, 0, 1&gt;</c>.</param>
/// <param name="ParamsType">The CUDA parameter struct the kernel takes by value.</param>
internal readonly record struct KernelInstance(string NameExpression, string ParamsType)
{
    /// <summary>Dynamic shared memory the launcher gives every block of this specialization (bytes).</summary>
    public int DynamicSharedBytes { get; init; }
}

/// <summary>A compiled image with the mangled names of its kernels.</summary>
internal sealed record CompiledKernel(
    string Family, string Arch, bool IsPtx, byte[] Image, IReadOnlyDictionary<string, string> LoweredNames, string Log, bool FromCache)
{
    /// <summary>
    /// The PTX NVRTC produced on the way to a CUBIN (what ptxas was given), for inspection: kept only by a
    /// compiler created with <c>keepPtx</c>; null otherwise, for PTX images (the image is the PTX) and for
    /// images read from the cache.
    /// </summary>
    public string? Ptx { get; init; }
}

/// <summary>
/// Compiles kernel families with NVRTC. A specialization is a tiny generated source that includes the
/// family and explicitly instantiates templates; mangled names come back through name expressions.
/// Needs no GPU: CI compiles every family with it.
/// </summary>
internal sealed unsafe class NvrtcCompiler
{
    private readonly KernelCache? _cache;
    private readonly ILogger _logger;
    private readonly bool _lineInfo;
    private readonly string? _dumpDir;
    private readonly bool _keepPtx;
    private int _invocations;

    /// <summary>Creates a compiler over <paramref name="sources"/> (default: the embedded ones).</summary>
    /// <param name="sources">Kernel sources.</param>
    /// <param name="cache">Disk cache, or null to always compile.</param>
    /// <param name="logger">Receives NVRTC warnings.</param>
    /// <param name="keepPtx">Keep the PTX of CUBIN compiles in <see cref="CompiledKernel.Ptx"/> (the resource report
    /// reads it; the engine does not, and a loaded module holds its image for its lifetime).</param>
    public NvrtcCompiler(KernelSources? sources = null, KernelCache? cache = null, ILogger? logger = null, bool keepPtx = false)
    {
        _keepPtx = keepPtx;
        Sources = sources ?? KernelSources.Embedded;
        _cache = cache;
        _logger = logger ?? NullLogger.Instance;
        _lineInfo = Environment.GetEnvironmentVariable("DSCUDA_LINEINFO") == "1";
        _dumpDir = Environment.GetEnvironmentVariable("DSCUDA_DUMP_DIR") is { Length: > 0 } d ? d : null;
    }

    /// <summary>The sources this compiler reads.</summary>
    public KernelSources Sources { get; }

    /// <summary>How many times NVRTC actually ran (cache hits do not count).</summary>
    public int NvrtcInvocations => Volatile.Read(ref _invocations);

    private static readonly Lazy<(int Major, int Minor)> VersionLazy = new(() =>
    {
        NativeLibraries.RequireNvrtc();
        int major, minor;
        NvrtcCheck.Check(NvrtcApi.nvrtcVersion(&major, &minor));
        return (major, minor);
    });

    /// <summary>The loaded NVRTC's version; throws <see cref="CudaUnavailableException"/> without NVRTC.</summary>
    public static (int Major, int Minor) Version => VersionLazy.Value;

    private static readonly Lazy<string?> LibraryIdentityLazy = new(() =>
    {
        var (major, minor) = Version;
        if (NativeLibraries.NvrtcFile is not { } file)
        {
            return null;
        }

        try
        {
            using var stream = File.OpenRead(file);
            return $"{major}.{minor} {Path.GetFileName(file)} sha256:{Convert.ToHexStringLower(SHA256.HashData(stream))}";
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return null;
        }
    });

    /// <summary>
    /// The loaded NVRTC as the cache key records it: <see cref="Version"/>, the real file's name
    /// (<see cref="NativeLibraries.NvrtcFile"/>, e.g. <c>libnvrtc.so.12.4.127</c>) and the SHA-256 of that file.
    /// nvrtcVersion gives only major.minor and a Python wheel's file name carries no patch level, so the file's bytes
    /// are what tell two patch releases apart (hashing the 60 MB library takes about 0.2 s, once per process). Null
    /// when the file cannot be found or read: the compiler then runs without its cache rather than risk a wrong hit.
    /// </summary>
    public static string? LibraryIdentity => LibraryIdentityLazy.Value;

    /// <summary>Whether NVRTC can be loaded, and if not, why.</summary>
    public static bool IsAvailable(out string reason) => NativeLibraries.TryNvrtc(out _, out reason);

    /// <summary>
    /// The best target for a device: <c>sm_90a</c> on Hopper, else the device's own <c>sm_XY</c> when
    /// NVRTC lists it, else PTX for the newest architecture NVRTC knows below the device, which the driver
    /// compiles forward.
    /// </summary>
    public static KernelTarget TargetFor(int major, int minor)
    {
        _ = Version; // loads NVRTC (12.4 or newer) or throws CudaUnavailableException
        var cc = major * 10 + minor;
        if (cc == 90)
        {
            return new KernelTarget("sm_90a");
        }

        var archs = NvrtcApi.SupportedArchs();
        if (archs.Contains(cc))
        {
            return new KernelTarget($"sm_{cc}");
        }

        var below = archs.Where(a => a <= cc).DefaultIfEmpty(80).Max();
        return new KernelTarget($"compute_{below}");
    }

    /// <summary>The options every compilation uses (without the architecture).</summary>
    public IReadOnlyList<string> BaseOptions()
    {
        // No --use_fast_math: kernels must match the CPU reference (true division, accurate exp/sin/cos).
        var o = new List<string> { "-std=c++17", "-default-device" };
        if (_lineInfo)
        {
            o.Add("-lineinfo");
        }

        return o;
    }

    /// <summary>The generated translation unit for <paramref name="instances"/> of <paramref name="family"/>.</summary>
    public static string GenerateSource(string family, IReadOnlyList<KernelInstance> instances)
    {
        var sb = new StringBuilder();
        sb.Append("// generated by DeepSeekCuda.NvrtcCompiler\n");
        sb.Append("#include \"").Append(family).Append(".cu\"\n");
        foreach (var k in instances)
        {
            sb.Append("template __global__ void ").Append(k.NameExpression).Append("(const __grid_constant__ ").Append(k.ParamsType).Append(");\n");
        }

        return sb.ToString();
    }

    /// <summary>
    /// Compiles <paramref name="instances"/> of <paramref name="family"/> for <paramref name="target"/>,
    /// through the disk cache when there is one.
    /// </summary>
    public CompiledKernel Compile(string family, IReadOnlyList<KernelInstance> instances, KernelTarget target, IEnumerable<string>? extraOptions = null)
    {
        var source = GenerateSource(family, instances);
        return CompileSource(family, source, instances.Select(i => i.NameExpression).ToArray(), target, extraOptions);
    }

    /// <summary>Compiles a generated source (already including its family) with the given name expressions.</summary>
    public CompiledKernel CompileSource(string family, string source, IReadOnlyList<string> nameExpressions, KernelTarget target, IEnumerable<string>? extraOptions = null)
    {
        _ = Sources.Family(family);
        var options = BaseOptions().Concat(extraOptions ?? []).Append($"--gpu-architecture={target.Arch}").ToArray();
        if (_cache is null)
        {
            return Run(family, source, nameExpressions, target, options);
        }

        if (LibraryIdentity is not { } nvrtc)
        {
            _logger.LogWarning("Kernel cache not used for {Family}: the loaded NVRTC's file could not be identified ({Path})",
                family, NativeLibraries.NvrtcPath);
            return Run(family, source, nameExpressions, target, options);
        }

        var key = CacheKey(family, source, nameExpressions, options, target, nvrtc);
        return _cache.GetOrAdd(family, key, target, () => Run(family, source, nameExpressions, target, options));
    }

    /// <summary>
    /// SHA-256 of the family name, the generated source, the name expressions, the family and every header, the
    /// options in their order, the architecture and the loaded NVRTC (<see cref="LibraryIdentity"/>): any change that
    /// can change the image, or the names looked up in it, changes the key.
    /// </summary>
    /// <param name="family">The kernel family.</param>
    /// <param name="source">The generated source.</param>
    /// <param name="options">Every option, the architecture's included, in the order NVRTC is given them.</param>
    /// <param name="target">The target.</param>
    /// <param name="nameExpressions">The names looked up in the image (<see cref="Compile"/>: the instances' name
    /// expressions); the key of a <see cref="CompileSource"/> entry needs the same ones.</param>
    public string CacheKey(string family, string source, IEnumerable<string> options, KernelTarget target, IEnumerable<string>? nameExpressions = null) =>
        CacheKey(family, source, nameExpressions ?? [], options, target,
            LibraryIdentity ?? throw new InvalidOperationException($"The loaded NVRTC's file ({NativeLibraries.NvrtcPath}) could not be identified, so it has no cache key."));

    /// <summary><see cref="CacheKey(string, string, IEnumerable{string}, KernelTarget, IEnumerable{string})"/> with the NVRTC identity given.</summary>
    internal string CacheKey(string family, string source, IEnumerable<string> nameExpressions, IEnumerable<string> options, KernelTarget target, string nvrtc)
    {
        var sb = new StringBuilder();
        sb.Append("family\0").Append(family).Append('\0');
        sb.Append("source\0").Append(source).Append('\0');
        foreach (var n in nameExpressions)
        {
            sb.Append("name\0").Append(n).Append('\0');
        }

        foreach (var (name, text) in Sources.Files)
        {
            if (name.EndsWith(".cuh", StringComparison.Ordinal) || name == family + ".cu")
            {
                sb.Append("file\0").Append(name).Append('\0').Append(text).Append('\0');
            }
        }

        // In their order, not sorted: NVRTC reads options left to right and a later one wins (-O3 then -O0, -DX=1
        // then -DX=2, a second --gpu-architecture), so two orders of one set can compile to different images.
        foreach (var o in options)
        {
            sb.Append("option\0").Append(o).Append('\0');
        }

        sb.Append("arch\0").Append(target.Arch).Append('\0');
        sb.Append("nvrtc\0").Append(nvrtc);
        return Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(sb.ToString())));
    }

    private CompiledKernel Run(string family, string source, IReadOnlyList<string> nameExpressions, KernelTarget target, string[] options)
    {
        NativeLibraries.RequireNvrtc();
        Interlocked.Increment(ref _invocations);
        var started = System.Diagnostics.Stopwatch.GetTimestamp();
        var headers = Sources.Files.ToArray();
        using var strings = new Utf8Strings();
        var headerPtrs = stackalloc byte*[headers.Length];
        var namePtrs = stackalloc byte*[headers.Length];
        for (var i = 0; i < headers.Length; i++)
        {
            headerPtrs[i] = strings.Add(headers[i].Value);
            namePtrs[i] = strings.Add(headers[i].Key);
        }

        IntPtr program;
        NvrtcCheck.Check(NvrtcApi.nvrtcCreateProgram(&program, strings.Add(source), strings.Add(family + ".generated.cu"), headers.Length, headerPtrs, namePtrs));
        try
        {
            var exprPtrs = new byte*[nameExpressions.Count];
            for (var i = 0; i < nameExpressions.Count; i++)
            {
                exprPtrs[i] = strings.Add(nameExpressions[i]);
                NvrtcCheck.Check(NvrtcApi.nvrtcAddNameExpression(program, exprPtrs[i]));
            }

            var optPtrs = stackalloc byte*[options.Length];
            for (var i = 0; i < options.Length; i++)
            {
                optPtrs[i] = strings.Add(options[i]);
            }

            var result = NvrtcApi.nvrtcCompileProgram(program, options.Length, optPtrs);
            var log = ProgramLog(program);
            var specialization = string.Join("; ", nameExpressions);
            if (result == NvrtcResult.Compilation)
            {
                Dump(family, source, log, null, target);
                throw new KernelCompileException(family, specialization, target.Arch, log);
            }

            NvrtcCheck.Check(result, "nvrtcCompileProgram");
            if (log.Length > 0)
            {
                _logger.LogWarning("NVRTC warnings compiling {Family} ({Specialization}) for {Arch}:\n{Log}", family, specialization, target.Arch, log);
            }

            var ptx = !target.IsCubin || _keepPtx || _dumpDir is not null ? ReadPtx(program) : null;
            byte[] image;
            if (target.IsCubin)
            {
                nuint size;
                NvrtcCheck.Check(NvrtcApi.nvrtcGetCUBINSize(program, &size));
                image = new byte[size];
                fixed (byte* p = image)
                {
                    NvrtcCheck.Check(NvrtcApi.nvrtcGetCUBIN(program, p));
                }
            }
            else
            {
                image = ptx!;
            }

            Dump(family, source, log, ptx, target);

            var lowered = new Dictionary<string, string>(StringComparer.Ordinal);
            for (var i = 0; i < nameExpressions.Count; i++)
            {
                byte* name;
                NvrtcCheck.Check(NvrtcApi.nvrtcGetLoweredName(program, exprPtrs[i], &name));
                lowered[nameExpressions[i]] = Marshal.PtrToStringUTF8((IntPtr)name)!;
            }

            _logger.LogInformation("Compiled {Family} for {Arch} ({Format}, {Bytes} bytes) in {Milliseconds:F0} ms",
                family, target.Arch, target.IsCubin ? "CUBIN" : "PTX", image.Length, System.Diagnostics.Stopwatch.GetElapsedTime(started).TotalMilliseconds);
            return new CompiledKernel(family, target.Arch, !target.IsCubin, image, lowered, log, FromCache: false)
            {
                Ptx = target.IsCubin && _keepPtx ? Encoding.UTF8.GetString(ptx.AsSpan().TrimEnd((byte)0)) : null,
            };
        }
        finally
        {
            NvrtcCheck.Check(NvrtcApi.nvrtcDestroyProgram(&program));
        }
    }

    // NVRTC keeps the PTX of a CUBIN compile too (it is what ptxas was given).
    private static byte[] ReadPtx(IntPtr program)
    {
        nuint size;
        NvrtcCheck.Check(NvrtcApi.nvrtcGetPTXSize(program, &size));
        var ptx = new byte[size];
        fixed (byte* p = ptx)
        {
            NvrtcCheck.Check(NvrtcApi.nvrtcGetPTX(program, p));
        }

        return ptx;
    }

    private static string ProgramLog(IntPtr program)
    {
        nuint size;
        NvrtcCheck.Check(NvrtcApi.nvrtcGetProgramLogSize(program, &size));
        var buffer = new byte[size];
        fixed (byte* p = buffer)
        {
            NvrtcCheck.Check(NvrtcApi.nvrtcGetProgramLog(program, p));
        }

        return Encoding.UTF8.GetString(buffer).TrimEnd('\0', '\n', ' ');
    }

    private void Dump(string family, string source, string log, byte[]? ptx, KernelTarget target)
    {
        if (_dumpDir is null)
        {
            return;
        }

        Directory.CreateDirectory(_dumpDir);
        var stem = Path.Combine(_dumpDir, $"{family}.{target.Arch}.{Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(source)))[..12]}");
        File.WriteAllText(stem + ".cu", source);
        File.WriteAllText(stem + ".log", log);
        if (ptx is not null)
        {
            File.WriteAllBytes(stem + ".ptx", ptx.AsSpan().TrimEnd((byte)0).ToArray());
        }
    }

    /// <summary>NUL-terminated UTF-8 copies in unmanaged memory for the duration of one compilation.</summary>
    private sealed class Utf8Strings : IDisposable
    {
        private readonly List<IntPtr> _allocations = [];

        public byte* Add(string s)
        {
            var p = Marshal.StringToCoTaskMemUTF8(s);
            _allocations.Add(p);
            return (byte*)p;
        }

        public void Dispose()
        {
            foreach (var p in _allocations)
            {
                Marshal.FreeCoTaskMem(p);
            }
        }
    }
}
