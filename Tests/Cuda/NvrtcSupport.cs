using System.Text.RegularExpressions;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Kernels;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>What the NVRTC tests share: the families and their specializations, and the NVRTC guard.</summary>
internal static partial class NvrtcSupport
{
    /// <summary>The targets CI checks: PTX for Ampere and Hopper, CUBIN for Hopper (NVRTC runs ptxas).</summary>
    public static readonly string[] Targets = ["compute_80", "compute_90", "sm_90"];

    /// <summary>Every family with every specialization its launcher can request.</summary>
    public static IReadOnlyDictionary<string, IReadOnlyList<KernelInstance>> Families { get; } = new Dictionary<string, IReadOnlyList<KernelInstance>>
    {
        [EmbeddingKernel.FamilyName] = EmbeddingKernel.AllInstances(),
        [RmsNormKernel.FamilyName] = RmsNormKernel.AllInstances(),
        [ActQuantKernel.FamilyName] = ActQuantKernel.AllInstances(),
        [RopeKernel.FamilyName] = RopeKernel.AllInstances(),
        [SiluMulKernel.FamilyName] = SiluMulKernel.AllInstances(),
        [SamplingKernel.FamilyName] = SamplingKernel.AllInstances(),
        [MoeGateKernel.FamilyName] = MoeGateKernel.AllInstances(),
        [MoeDispatchKernel.FamilyName] = MoeDispatchKernel.AllInstances(),
        [Fp8GemmKernel.GemvFamily] = Fp8GemmKernel.AllGemvInstances(),
        [Fp8GemmKernel.MmaFamily] = Fp8GemmKernel.AllMmaInstances(),
        [MoeGroupedGemmKernel.FamilyName] = MoeGroupedGemmKernel.AllInstances(),
        [MoeCombineKernel.FamilyName] = MoeCombineKernel.AllInstances(),
        [MlaPrefillKernel.FamilyName] = MlaPrefillKernel.AllInstances(),
        [MlaCacheKernel.FamilyName] = MlaCacheKernel.AllInstances(),
        [MlaDecodeKernel.FamilyName] = MlaDecodeKernel.AllInstances(),
        [AllReduceKernel.FamilyName] = AllReduceKernel.AllInstances(),
        [Bf16GemmKernel.FamilyName] = Bf16GemmKernel.AllInstances(),
        [BackendGlueKernel.FamilyName] = BackendGlueKernel.AllInstances(),
    };

    /// <summary>Every params struct: C# type, CUDA name, family.</summary>
    public static readonly (Type Type, string CudaName, string Family)[] ParamStructs =
    [
        (typeof(EmbeddingParams), EmbeddingKernel.ParamsType, EmbeddingKernel.FamilyName),
        (typeof(RmsNormParams), RmsNormKernel.ParamsType, RmsNormKernel.FamilyName),
        (typeof(ActQuantParams), ActQuantKernel.ParamsType, ActQuantKernel.FamilyName),
        (typeof(RopeParams), RopeKernel.ParamsType, RopeKernel.FamilyName),
        (typeof(SiluMulParams), SiluMulKernel.ParamsType, SiluMulKernel.FamilyName),
        (typeof(SamplingParams), SamplingKernel.ParamsType, SamplingKernel.FamilyName),
        (typeof(MoeGateParams), MoeGateKernel.ParamsType, MoeGateKernel.FamilyName),
        (typeof(MoeDispatchParams), MoeDispatchKernel.ParamsType, MoeDispatchKernel.FamilyName),
        (typeof(Fp8GemmParams), Fp8GemmKernel.ParamsType, Fp8GemmKernel.GemvFamily), // shared with fp8_gemm_mma (fp8_gemm.cuh)
        (typeof(MoeGroupedGemmParams), MoeGroupedGemmKernel.ParamsType, MoeGroupedGemmKernel.FamilyName),
        (typeof(MoeMaskedLayoutParams), MoeGroupedGemmKernel.MaskedLayoutParamsType, MoeGroupedGemmKernel.FamilyName),
        (typeof(MoeCombineParams), MoeCombineKernel.ParamsType, MoeCombineKernel.FamilyName),
        (typeof(MlaPrefillParams), MlaPrefillKernel.ParamsType, MlaPrefillKernel.FamilyName),
        (typeof(MlaCacheParams), MlaCacheKernel.ParamsType, MlaCacheKernel.FamilyName),
        (typeof(MlaDecodeParams), MlaDecodeKernel.ParamsType, MlaDecodeKernel.FamilyName),
        (typeof(MlaProjParams), MlaDecodeKernel.ProjParamsType, MlaDecodeKernel.FamilyName),
        (typeof(AllReduceParams), AllReduceKernel.ParamsType, AllReduceKernel.FamilyName),
        (typeof(Bf16GemmParams), Bf16GemmKernel.ParamsType, Bf16GemmKernel.FamilyName),
        (typeof(BackendGlueParams), BackendGlueKernel.ParamsType, BackendGlueKernel.FamilyName),
    ];

    /// <summary>Fails (never skips) when NVRTC is missing: CI installs it, so a missing library is a broken setup.</summary>
    public static void RequireNvrtc()
    {
        if (!NvrtcCompiler.IsAvailable(out var reason))
        {
            Assert.Fail("NVRTC is required for the kernel compile tests and was not found. Install it " +
                        "(Debian: add 'contrib non-free' to the apt sources, then apt-get install libnvrtc11.2 libnvrtc-builtins11.8). " + reason);
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
