using System.Text.RegularExpressions;
using System.Collections.Concurrent;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Cuda.Inspection;
using DeepSeekCuda.Cuda.Native;
using DeepSeekCuda.Kernels;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>What the NVRTC tests share: the families and their specializations, and the NVRTC guard.</summary>
internal static partial class NvrtcSupport
{
    /// <summary>The targets CI compiles every specialization for, to CUBIN: the report's default targets.</summary>
    public static IReadOnlyList<string> Targets => KernelReport.DefaultTargets;

    /// <summary>Every family name.</summary>
    public static IReadOnlyList<string> FamilyNames => KernelCatalog.Names;

    /// <summary>Every (family, target) pair CI compiles and gates: a family only on the targets that run it.</summary>
    public static IEnumerable<(string Family, string Arch)> Pairs =>
        from f in FamilyNames from t in Targets where KernelCatalog.For(t).ContainsKey(f) select (f, t);

    /// <summary>Test data: <see cref="Pairs"/>.</summary>
    public static IEnumerable<object[]> FamilyTargets => Pairs.Select(p => new object[] { p.Family, p.Arch });

    private static readonly ConcurrentDictionary<string, IReadOnlyDictionary<string, IReadOnlyList<KernelInstance>>> Catalogs = new();

    /// <summary>The specializations the launcher of <paramref name="family"/> can request on <paramref name="arch"/>.</summary>
    public static IReadOnlyList<KernelInstance> Instances(string family, string arch = "sm_90a") =>
        Catalogs.GetOrAdd(arch, KernelCatalog.For)[family];

    private static readonly ConcurrentDictionary<(string Family, string Arch), Lazy<CompiledKernel>> CompiledImages = new();
    private static readonly ConcurrentDictionary<(string Family, string Arch), Lazy<IReadOnlyList<KernelResources>>> Inspected = new();

    /// <summary>
    /// Every specialization of <paramref name="family"/> compiled for <paramref name="arch"/>, once per test run
    /// (the compile tests and the resource gate read the same image), without the disk cache so the PTX comes too.
    /// </summary>
    public static CompiledKernel Compiled(string family, string arch) =>
        CompiledImages.GetOrAdd((family, arch), key => new Lazy<CompiledKernel>(() =>
            new NvrtcCompiler(keepPtx: true).Compile(key.Family, Instances(key.Family, key.Arch), new KernelTarget(key.Arch)))).Value;

    /// <summary>The resources of <see cref="Compiled"/>'s kernels, read with cuobjdump (once per test run).</summary>
    public static IReadOnlyList<KernelResources> Resources(string family, string arch) =>
        Inspected.GetOrAdd((family, arch), key => new Lazy<IReadOnlyList<KernelResources>>(() =>
            CubinInspector.Inspect(Compiled(key.Family, key.Arch), Instances(key.Family, key.Arch), Tools))).Value;

    private static readonly Lazy<CudaBinaryTools> ToolsLazy = new(CudaBinaryTools.Find);

    /// <summary>cuobjdump (tools/cuda/toolchain.sh fetches it); a missing tool fails the test, never skips it.</summary>
    public static CudaBinaryTools Tools => ToolsLazy.Value;

    /// <summary>Every params struct: C# type, CUDA name, family.</summary>
    public static readonly (Type Type, string CudaName, string Family)[] ParamStructs =
    [
        (typeof(EmbeddingParams), EmbeddingKernel.ParamsType, EmbeddingKernel.FamilyName),
        (typeof(RmsNormParams), RmsNormKernel.ParamsType, RmsNormKernel.FamilyName),
        (typeof(ActQuantParams), ActQuantKernel.ParamsType, ActQuantKernel.FamilyName),
        (typeof(RopeParams), RopeKernel.ParamsType, RopeKernel.FamilyName),
        (typeof(SiluMulParams), SiluMulKernel.ParamsType, SiluMulKernel.FamilyName),
        (typeof(SamplingParams), SamplingKernel.ParamsType, SamplingKernel.FamilyName),
        (typeof(TokenChoiceRow), SamplingKernel.RowType, SamplingKernel.FamilyName),
        (typeof(MoeGateParams), MoeGateKernel.ParamsType, MoeGateKernel.FamilyName),
        (typeof(MoeDispatchParams), MoeDispatchKernel.ParamsType, MoeDispatchKernel.FamilyName),
        (typeof(Fp8GemmParams), Fp8GemmKernel.ParamsType, Fp8GemmKernel.GemvFamily), // shared with fp8_gemm_mma (fp8_gemm.cuh)
        (typeof(Fp8WgmmaParams), Fp8GemmKernel.WgmmaParamsType, Fp8GemmKernel.WgmmaFamily),
        (typeof(MoeGroupedGemmParams), MoeGroupedGemmKernel.ParamsType, MoeGroupedGemmKernel.FamilyName),
        (typeof(MoeMaskedLayoutParams), MoeGroupedGemmKernel.MaskedLayoutParamsType, MoeGroupedGemmKernel.FamilyName),
        (typeof(MoeWgmmaParams), MoeGroupedGemmKernel.WgmmaParamsType, MoeGroupedGemmKernel.WgmmaFamily),
        (typeof(MoeCombineParams), MoeCombineKernel.ParamsType, MoeCombineKernel.FamilyName),
        (typeof(MlaPrefillParams), MlaPrefillKernel.ParamsType, MlaPrefillKernel.FamilyName),
        (typeof(MlaCacheParams), MlaCacheKernel.ParamsType, MlaCacheKernel.FamilyName),
        (typeof(MlaDecodeParams), MlaDecodeKernel.ParamsType, MlaDecodeKernel.FamilyName),
        (typeof(MlaProjParams), MlaDecodeKernel.ProjParamsType, MlaDecodeKernel.FamilyName),
        (typeof(AllReduceParams), AllReduceKernel.ParamsType, AllReduceKernel.FamilyName),
        (typeof(Bf16GemmParams), Bf16GemmKernel.ParamsType, Bf16GemmKernel.FamilyName),
        (typeof(Bf16MmaParams), Bf16MmaKernel.ParamsType, Bf16MmaKernel.FamilyName),
        (typeof(BackendGlueParams), BackendGlueKernel.ParamsType, BackendGlueKernel.FamilyName),
    ];

    /// <summary>Fails (never skips) when NVRTC is missing: CI installs it, so a missing library is a broken setup.</summary>
    public static void RequireNvrtc()
    {
        if (!NvrtcCompiler.IsAvailable(out var reason))
        {
            Assert.Fail("NVRTC 12.4 or newer is required for the kernel compile tests and was not found. Run tools/cuda/toolchain.sh (fetches NVRTC 12.4 into " +
                        NativeLibraries.ToolchainDirectory + ", installs nothing) or set DSCUDA_CUDA_LIB to the folder holding libnvrtc.so.12/13. " + reason);
        }
    }

    /// <summary>C# field name to the CUDA struct's field name: XStride → x_stride.</summary>
    public static string SnakeCase(string pascal) => SnakeRegex().Replace(pascal, "_$1").ToLowerInvariant();

    [GeneratedRegex("(?<=.)([A-Z])")]
    private static partial Regex SnakeRegex();

    /// <summary>A fresh cache folder under the temp directory.</summary>
    public static string TempCacheDir()
    {
        var d = Path.Combine(Path.GetTempPath(), "dscuda-kcache-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(d);
        return d;
    }
}
