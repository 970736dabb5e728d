using DeepSeekCuda.Cuda;
using DeepSeekCuda.Cuda.Inspection;

namespace DeepSeekCuda.Kernels;

/// <summary>
/// Every kernel family with every specialization its launcher can request on a target: what CI compiles for
/// each target and what the static resource report (<see cref="KernelReport"/>) inspects.
/// </summary>
internal static class KernelCatalog
{
    /// <summary>The family names (each a <c>Kernels/&lt;family&gt;.cu</c> file with one launcher).</summary>
    public static IReadOnlyList<string> Names { get; } = [.. For("sm_90a").Keys.Order(StringComparer.Ordinal)];

    /// <summary>
    /// Family name to the specializations its launcher can request on <paramref name="arch"/>. A family only one
    /// architecture runs (the wgmma GEMM: sm_90a) is absent on the others.
    /// </summary>
    public static IReadOnlyDictionary<string, IReadOnlyList<KernelInstance>> For(string arch)
    {
        var limits = ArchLimits.For(arch);
        var families = new Dictionary<string, IReadOnlyList<KernelInstance>>
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
            [MlaDecodeKernel.FamilyName] = MlaDecodeKernel.AllInstances(limits.MaxSharedPerBlock),
            [AllReduceKernel.FamilyName] = AllReduceKernel.AllInstances(),
            [Bf16GemmKernel.FamilyName] = Bf16GemmKernel.AllInstances(),
            [Bf16MmaKernel.FamilyName] = Bf16MmaKernel.AllInstances(),
            [BackendGlueKernel.FamilyName] = BackendGlueKernel.AllInstances(),
        };
        if (Fp8GemmKernel.HasWgmma(new KernelTarget(arch)))
        {
            families[Fp8GemmKernel.WgmmaFamily] = Fp8GemmKernel.AllWgmmaInstances();
            families[MoeGroupedGemmKernel.WgmmaFamily] = MoeGroupedGemmKernel.AllWgmmaInstances();
        }

        return families;
    }
}
