using DeepSeekCuda.Cuda;
using DeepSeekCuda.Cuda.Inspection;
using DeepSeekCuda.Kernels;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>
/// The static resource gate over every specialization on every CI target (CUBIN from NVRTC, read with cuobjdump),
/// and proof that the gate can fail: planted kernels with an in-place FP8 mma.sync and with a spilling local array.
/// </summary>
[TestClass]
[TestCategory("Nvrtc")]
public sealed class KernelResourceGateTests
{
    [TestMethod]
    [DynamicData(nameof(NvrtcSupport.FamilyTargets), typeof(NvrtcSupport))]
    public void EverySpecializationPassesTheGate(string family, string arch)
    {
        NvrtcSupport.RequireNvrtc();
        var rows = NvrtcSupport.Resources(family, arch);
        CollectionAssert.AreEquivalent(NvrtcSupport.Instances(family, arch).Select(i => i.NameExpression).ToArray(), rows.Select(r => r.Kernel).ToArray(),
            "the report covers every specialization exactly once");
        var violations = rows.SelectMany(ResourceGate.Violations).ToList();
        Assert.IsEmpty(violations, string.Join("\n", violations));
        foreach (var r in rows)
        {
            Assert.IsGreaterThan(0, r.Registers, $"{r.Kernel}: no register count read");
            Assert.IsGreaterThan(0, r.MaxThreads, $"{r.Kernel}: no __launch_bounds__ read");
            Assert.IsGreaterThanOrEqualTo(1, r.BlocksPerSm);
        }
    }

    [TestMethod]
    public void EveryLocalMemoryExceptionIsStillNeeded()
    {
        NvrtcSupport.RequireNvrtc();
        var all = NvrtcSupport.Pairs.SelectMany(p => NvrtcSupport.Resources(p.Family, p.Arch)).ToList();
        foreach (var e in ResourceGate.LocalMemoryAllowed)
        {
            Assert.IsFalse(string.IsNullOrWhiteSpace(e.Reason));
            Assert.IsTrue(all.Any(r => r.Template == e.Template && (e.Arch is null || e.Arch == r.Arch) && r.StackBytes + r.LocalBytes > 0),
                $"{e.Template} ({e.Arch ?? "every target"}) no longer uses local memory: remove its exception");
        }
    }

    [TestMethod]
    [DataRow("sm_90a")]
    [DataRow("sm_90")]
    [DataRow("sm_80")]
    [DataRow("sm_89")]
    public void Fp8GemmsRunEveryProductOnTheTensorCores(string arch)
    {
        NvrtcSupport.RequireNvrtc();
        // One 128-wide K block per warp: 2 x 4 tiles of m16n8, 8 k16 steps (f16 on widened codes) or 4 k32 steps (FP8).
        // NVRTC 12.4's emulated in-place FP8 mma.sync on sm_90 left 16 HMMA here, the signature of its lost accumulator.
        var native = ArchLimits.For(arch).HasFp8MmaSync;
        var (op, perBlock) = native ? ("QMMA", 32) : ("HMMA", 64);
        foreach (var family in new[] { "fp8_gemm_mma", "moe_grouped_gemm" })
        {
            foreach (var r in NvrtcSupport.Resources(family, arch).Where(r => r.Template is "fp8_gemm_mma_kernel" or "moe_grouped_gemm_kernel"))
            {
                var count = r.TensorOps.GetValueOrDefault(op);
                Assert.IsTrue(count > 0 && count % perBlock == 0, $"{r.Kernel} on {arch}: {count} {op}, expected a positive multiple of {perBlock}");
                if (native)
                {
                    Assert.IsGreaterThan(0, r.PtxFp8Mma, $"{r.Kernel} on {arch}: the FP8 mma.sync path was not taken");
                }
                else
                {
                    Assert.AreEqual(0, r.PtxFp8Mma, $"{r.Kernel} on {arch}: FP8 mma.sync in the PTX");
                }
            }
        }
    }

    /// <summary>
    /// The tensor-core BF16 GEMM is what it claims on every target: 32 BF16 HMMA per 32-wide K stage (2 k16 steps x 2 x 8
    /// m16n8 tiles per warp), twice that with an f32 activation (its hi and lo terms), no other tensor-core instruction,
    /// no local memory, the dynamic shared memory the launcher asks for, and two blocks resident per SM where an SM has
    /// 164 KiB or more of shared memory (Ada's 100 KiB hold one block with an f32 activation).
    /// </summary>
    [TestMethod]
    [DataRow("sm_90a")]
    [DataRow("sm_80")]
    [DataRow("sm_89")]
    public void TheBf16GemmRunsOnTheTensorCores(string arch)
    {
        NvrtcSupport.RequireNvrtc();
        var rows = NvrtcSupport.Resources(Bf16MmaKernel.FamilyName, arch);
        Assert.HasCount(8, rows);
        foreach (var r in rows)
        {
            var bf16A = r.Kernel.StartsWith("bf16_gemm_mma_kernel<1,", StringComparison.Ordinal);
            Assert.AreEqual(bf16A ? 32 : 64, r.TensorOps.GetValueOrDefault("HMMA"), $"{r.Kernel} on {arch}");
            Assert.HasCount(1, r.TensorOps, $"{r.Kernel}: {string.Join(", ", r.TensorOps.Select(o => $"{o.Key} x{o.Value}"))}");
            Assert.AreEqual(0, r.StackBytes + r.LocalBytes, r.Kernel);
            Assert.AreEqual(Bf16MmaKernel.SharedBytes(bf16A ? ElementType.BF16 : ElementType.F32, r.Kernel.Contains(", 1, ", StringComparison.Ordinal)),
                r.DynamicSharedBytes, r.Kernel);
            var fits = ArchLimits.For(arch).SharedPerSm >= 164 * 1024 || bf16A ? 2 : 1;
            Assert.IsGreaterThanOrEqualTo(fits, r.BlocksPerSm, $"{r.Kernel} on {arch}: limited by {r.Limiter}");
        }
    }

    /// <summary>
    /// The Hopper GEMMs are what they claim on sm_90a: FP8 wgmma (QGMMA: m64n128k32 for prefill, m64n64k32 for decode,
    /// four per 128-wide K block), no other tensor-core instruction, TMA loads on mbarriers, register reconfiguration,
    /// no local memory, and one 384-thread block with its stages resident per SM.
    /// </summary>
    [TestMethod]
    public void TheHopperGemmRunsOnWgmmaAndTma()
    {
        NvrtcSupport.RequireNvrtc();
        var rows = NvrtcSupport.Resources(Fp8GemmKernel.WgmmaFamily, "sm_90a");
        Assert.HasCount(NvrtcSupport.Instances(Fp8GemmKernel.WgmmaFamily).Count, rows);
        AssertWgmmaRows(rows, r => r.Template == "fp8_gemm_wgmma_decode_kernel" ? Fp8GemmKernel.WgmmaDecodeSharedBytes : Fp8GemmKernel.WgmmaSharedBytes);

        var ptx = NvrtcSupport.Compiled(Fp8GemmKernel.WgmmaFamily, "sm_90a").Ptx!;
        foreach (var instruction in new[]
                 {
                     "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3", "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3",
                     "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes",
                     "mbarrier.arrive.expect_tx", "mbarrier.try_wait.parity", "setmaxnreg.dec.sync.aligned.u32 40", "setmaxnreg.inc.sync.aligned.u32 232",
                 })
        {
            StringAssert.Contains(ptx, instruction);
        }
    }

    /// <summary>
    /// The Hopper expert GEMMs likewise: QGMMA only, the weights by 3-D TMA (one expert deep), the gathered activation rows by
    /// cp.async arriving on the stage barrier, and the proxy fence that lets wgmma read what cp.async wrote.
    /// </summary>
    [TestMethod]
    public void TheHopperExpertGemmRunsOnWgmmaTmaAndCpAsync()
    {
        NvrtcSupport.RequireNvrtc();
        var rows = NvrtcSupport.Resources(MoeGroupedGemmKernel.WgmmaFamily, "sm_90a");
        Assert.HasCount(NvrtcSupport.Instances(MoeGroupedGemmKernel.WgmmaFamily).Count, rows);
        AssertWgmmaRows(rows, _ => MoeGroupedGemmKernel.WgmmaSharedBytes);
        var ptx = NvrtcSupport.Compiled(MoeGroupedGemmKernel.WgmmaFamily, "sm_90a").Ptx!;
        foreach (var instruction in new[]
                 {
                     "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3", "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes",
                     "cp.async.cg.shared.global", "cp.async.mbarrier.arrive.noinc.shared::cta.b64", "fence.proxy.async.shared::cta",
                     "setmaxnreg.dec.sync.aligned.u32 56", "setmaxnreg.inc.sync.aligned.u32 224",
                 })
        {
            StringAssert.Contains(ptx, instruction);
        }
    }

    private static void AssertWgmmaRows(IReadOnlyList<KernelResources> rows, Func<KernelResources, int> sharedBytes)
    {
        foreach (var r in rows)
        {
            var qgmma = r.TensorOps.GetValueOrDefault("QGMMA");
            Assert.IsTrue(qgmma > 0 && qgmma % 4 == 0, $"{r.Kernel}: {qgmma} QGMMA, expected a positive multiple of 4");
            Assert.HasCount(1, r.TensorOps, $"{r.Kernel}: {string.Join(", ", r.TensorOps.Select(o => $"{o.Key} x{o.Value}"))}");
            Assert.AreEqual(0, r.StackBytes + r.LocalBytes, r.Kernel);
            Assert.AreEqual(384, r.MaxThreads, r.Kernel);
            Assert.AreEqual(sharedBytes(r), r.DynamicSharedBytes, r.Kernel);
            Assert.AreEqual(1, r.BlocksPerSm, $"{r.Kernel}: limited by {r.Limiter}");
            Assert.IsEmpty(ResourceGate.Violations(r));
        }
    }

    // An accumulating FP8 mma.sync with the accumulator in place: the pattern NVRTC 12.4 miscompiles on sm_90.
    private const string PlantedFp8 = """
        #include "common.cuh"
        struct PlantedParams { const u32* a; float* y; };
        template <int N>
        __global__ void __launch_bounds__(32) planted_fp8_kernel(const __grid_constant__ PlantedParams p)
        {
            float c[4] = {0.f, 0.f, 0.f, 0.f};
            const u32* a = p.a + threadIdx.x * 6;
            for (int k = 0; k < N; k++)
                asm volatile("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                             : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                             : "r"(a[0] + k), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(a[4]), "r"(a[5]));
            for (int i = 0; i < 4; i++) p.y[threadIdx.x * 4 + i] = c[i];
        }
        """;

    // A local array written and read at run-time indices: it cannot live in registers.
    private const string PlantedSpill = """
        #include "common.cuh"
        struct PlantedParams { const u32* a; float* y; };
        template <int N>
        __global__ void __launch_bounds__(32) planted_spill_kernel(const __grid_constant__ PlantedParams p)
        {
            float t[N];
            for (int i = 0; i < N; i++) t[i] = 0.0f;
            for (int i = 0; i < N; i++) t[p.a[i] % N] += (float)i;
            p.y[threadIdx.x] = t[p.a[threadIdx.x] % N];
        }
        """;

    private static IReadOnlyList<KernelResources> InspectPlanted(string file, string source, string kernel, string arch)
    {
        var family = Path.GetFileNameWithoutExtension(file);
        var sources = KernelSources.Embedded.With(file, source);
        KernelInstance[] instances = [new(kernel, "PlantedParams")];
        var compiled = new NvrtcCompiler(sources, keepPtx: true).Compile(family, instances, new KernelTarget(arch));
        return CubinInspector.Inspect(compiled, instances, NvrtcSupport.Tools);
    }

    [TestMethod]
    public void AnInPlaceFp8MmaSyncOnHopperIsCaught()
    {
        NvrtcSupport.RequireNvrtc();
        foreach (var arch in new[] { "sm_90a", "sm_90" })
        {
            var k = InspectPlanted("planted_fp8.cu", PlantedFp8, "planted_fp8_kernel<8>", arch).Single();
            Assert.IsGreaterThan(0, k.PtxFp8Mma);
            var violations = ResourceGate.Violations(k);
            Assert.HasCount(1, violations, string.Join("\n", violations));
            StringAssert.Contains(violations[0], "FP8 mma.sync in the PTX");
            StringAssert.Contains(violations[0], arch);
        }

        // Where the hardware has FP8 mma.sync the same instruction is native (QMMA) and allowed.
        var ada = InspectPlanted("planted_fp8.cu", PlantedFp8, "planted_fp8_kernel<8>", "sm_89").Single();
        Assert.IsGreaterThan(0, ada.TensorOps.GetValueOrDefault("QMMA"));
        Assert.IsEmpty(ResourceGate.Violations(ada));
    }

    [TestMethod]
    public void ALocalArrayIsCaught()
    {
        NvrtcSupport.RequireNvrtc();
        var k = InspectPlanted("planted_spill.cu", PlantedSpill, "planted_spill_kernel<64>", "sm_90a").Single();
        Assert.IsGreaterThan(0, k.StackBytes + k.LocalBytes);
        var violations = ResourceGate.Violations(k);
        Assert.HasCount(1, violations, string.Join("\n", violations));
        StringAssert.Contains(violations[0], "stack");
    }

    [TestMethod]
    public void TheReportRoundTripsAsJsonAndPrintsATable()
    {
        NvrtcSupport.RequireNvrtc();
        var report = KernelReport.Build(new NvrtcCompiler(keepPtx: true), NvrtcSupport.Tools, ["silu_mul"], ["sm_90a"]);
        Assert.HasCount(NvrtcSupport.Instances("silu_mul").Count, report.Kernels);
        Assert.IsEmpty(report.Violations);
        var back = KernelReport.FromJson(report.ToJson());
        Assert.AreEqual(report.Nvrtc, back.Nvrtc);
        CollectionAssert.AreEqual(report.Kernels.Select(k => (k.Kernel, k.Registers, k.BlocksPerSm)).ToArray(),
            back.Kernels.Select(k => (k.Kernel, k.Registers, k.BlocksPerSm)).ToArray());
        StringAssert.Contains(report.ToJson(), "\"blocks_per_sm\"");
        var table = report.ToTable();
        foreach (var k in report.Kernels)
        {
            StringAssert.Contains(table, k.Kernel);
        }

        StringAssert.Contains(table, "0 break the resource gate");
    }
}
