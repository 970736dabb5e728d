using System.Text;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Kernels;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>
/// The FP8 GEMMs' choices that need no GPU: which kernel a call takes (dense and grouped expert GEMMs), when the Hopper
/// kernels refuse one, the Hopper kernel's persistent tile order and grid, and the TMA rules their tensor maps must meet.
/// The tile order and the kernels' constants are also checked against the CUDA sources themselves, by compile-time asserts
/// under NVRTC.
/// </summary>
[TestClass]
public sealed class Fp8GemmSelectionTests
{
    private static readonly KernelTarget Hopper = new("sm_90a");

    [TestMethod]
    public void DecodeRowsTakeTheGemvAndPrefillRowsTheMmaUnlessTheHopperKernelsArePreferred()
    {
        foreach (var m in new[] { 1, 3, 17, 64 })
        {
            Assert.AreEqual(Fp8GemmPath.Gemv, Fp8GemmKernel.Choose(m), $"M={m}: the gemv kernel stays the default until a GPU confirms wgmma");
            Assert.AreEqual(Fp8GemmPath.Wgmma, Fp8GemmKernel.Choose(m, wgmma: true), $"M={m}, wgmma preferred");
            Assert.IsTrue(Fp8GemmKernel.WgmmaDecodes(m), $"M={m} runs on the decode variant (weights as the wide side)");
        }

        foreach (var m in new[] { 65, 129, 4095 })
        {
            Assert.AreEqual(Fp8GemmPath.Mma, Fp8GemmKernel.Choose(m), $"M={m}: the mma.sync kernel stays the default until a GPU confirms wgmma");
            Assert.AreEqual(Fp8GemmPath.Wgmma, Fp8GemmKernel.Choose(m, wgmma: true), $"M={m}, wgmma preferred");
            Assert.IsFalse(Fp8GemmKernel.WgmmaDecodes(m), $"M={m} runs on the prefill variant");
        }
    }

    [TestMethod]
    [DataRow(576, 7168, 132, 19, 3)]    // kv_a: 5 weight tiles, K split 19 ways
    [DataRow(2112, 7168, 132, 7, 8)]    // fused q_a + kv_a: 17 tiles
    [DataRow(7168, 18432, 132, 2, 72)]  // dense down: 56 tiles
    [DataRow(7168, 2048, 132, 2, 8)]    // expert down
    [DataRow(24576, 1536, 132, 1, 12)]  // q_b: 192 tiles fill the GPU alone
    [DataRow(32768, 512, 132, 1, 4)]
    [DataRow(300, 208, 132, 2, 1)]      // K of two blocks, the last partial
    [DataRow(576, 7168, 1, 1, 56)]
    public void TheDecodeVariantSplitsKOnlyWhereTheWeightTilesLeaveSmsIdle(int n, int k, int sms, int splits, int perSplit)
    {
        var (s, per) = Fp8GemmKernel.WgmmaDecodeSplits(n, k, sms);
        Assert.AreEqual((splits, perSplit), (s, per), $"N={n} K={k} on {sms} SMs");
        var blocks = Fp8GemmKernel.BlocksFor(k);
        var tiles = (n + 127) / 128;
        Assert.IsTrue(s * per >= blocks && (s - 1) * per < blocks, "every split holds at least one K block, together all of them");
        Assert.IsTrue(tiles * s <= Math.Max(sms, tiles), "no more work units than SMs unless the tiles alone exceed them");
    }

    [TestMethod]
    public void TheHopperKernelRunsOnlyOnSm90aWithSixteenByteRows()
    {
        Assert.IsTrue(Fp8GemmKernel.HasWgmma(Hopper));
        foreach (var arch in new[] { "sm_90", "sm_89", "sm_80", "compute_90" })
        {
            Assert.IsFalse(Fp8GemmKernel.HasWgmma(new KernelTarget(arch)), arch);
            StringAssert.Contains(Fp8GemmKernel.WgmmaRefusal(new KernelTarget(arch), 7168, 7168, 0x1000), $"needs sm_90a (wgmma and TMA), the device compiles for {arch}");
        }

        foreach (var (n, k) in Fp8GemmKernel.DeepSeekV3Shapes)
        {
            Assert.IsNull(Fp8GemmKernel.WgmmaRefusal(Hopper, k, k, 0x1000), $"N={n} K={k}");
        }

        StringAssert.Contains(Fp8GemmKernel.WgmmaRefusal(Hopper, 200, 208, 0x1000), "K = 200 is not a multiple of 16");
        StringAssert.Contains(Fp8GemmKernel.WgmmaRefusal(Hopper, 208, 216, 0x1000), "row stride 216 B is not a multiple of 16");
        StringAssert.Contains(Fp8GemmKernel.WgmmaRefusal(Hopper, 208, 208, 0x1008), "0x1008 are not 16-byte aligned");
    }

    [TestMethod]
    public void TheCatalogCompilesTheHopperKernelForSm90aOnlyAndForEveryShapeItTakes()
    {
        Assert.IsFalse(KernelCatalog.For("sm_90").ContainsKey(Fp8GemmKernel.WgmmaFamily));
        Assert.IsFalse(KernelCatalog.For("sm_80").ContainsKey(Fp8GemmKernel.WgmmaFamily));
        var instances = KernelCatalog.For("sm_90a")[Fp8GemmKernel.WgmmaFamily];
        var expected = Fp8GemmKernel.DeepSeekV3Shapes.Concat(Fp8GemmKernel.RaggedShapes).Distinct().Where(s => s.K % 16 == 0).ToList();
        Assert.IsTrue(Fp8GemmKernel.DeepSeekV3Shapes.All(expected.Contains));
        Assert.IsTrue(expected.Any(s => s.K % 128 != 0) && expected.Any(s => s.N % 128 != 0), "ragged K and N are compiled too");
        CollectionAssert.AreEquivalent(
            expected.SelectMany(s => new[] { $"fp8_gemm_wgmma_kernel<{s.N}, {s.K}>", $"fp8_gemm_wgmma_decode_kernel<{s.N}, {s.K}>" }).ToList(),
            instances.Select(i => i.NameExpression).ToList());
        Assert.IsTrue(instances.All(i => i.ParamsType == Fp8GemmKernel.WgmmaParamsType));
        Assert.IsTrue(instances.All(i => i.DynamicSharedBytes == (i.NameExpression.Contains("decode", StringComparison.Ordinal)
            ? Fp8GemmKernel.WgmmaDecodeSharedBytes : Fp8GemmKernel.WgmmaSharedBytes)));
    }

    public static IEnumerable<object[]> Grids =>
    [
        [1, 1, 16], [1, 57, 16], [32, 56, 16], [3, 4, 2], [17, 5, 16], [33, 9, 16], [7, 3, 1], [40, 144, 16],
    ];

    [TestMethod]
    [DynamicData(nameof(Grids))]
    public void TheTileOrderVisitsEveryTileOnceInGroupsOfMTiles(int tilesM, int tilesN, int groupM)
    {
        var seen = new HashSet<(int, int)>();
        for (var t = 0; t < tilesM * tilesN; t++)
        {
            var (m, n) = Fp8GemmKernel.WgmmaTileAt(t, tilesM, tilesN, groupM);
            Assert.IsTrue(m >= 0 && m < tilesM && n >= 0 && n < tilesN, $"tile {t} -> ({m}, {n}) outside {tilesM} x {tilesN}");
            Assert.IsTrue(seen.Add((m, n)), $"tile ({m}, {n}) visited twice");

            // Inside a group M runs fastest: the group's rows, then the next column.
            var group = m / groupM;
            var rows = Math.Min(groupM, tilesM - group * groupM);
            Assert.AreEqual(group * groupM * tilesN + n * rows + m % groupM, t, $"tile ({m}, {n})");
        }

        Assert.HasCount(tilesM * tilesN, seen);
    }

    [TestMethod]
    public void TheExpertGemmsTakeTheHopperKernelsOnlyWhenPreferredAndAble()
    {
        Assert.IsTrue(MoeGroupedGemmKernel.UsesWgmma(true, Hopper, 7168, 7168, 0x1000), "V3 gate/up");
        Assert.IsTrue(MoeGroupedGemmKernel.UsesWgmma(true, Hopper, 2048, 2048, 0x1000), "V3 down");
        Assert.IsFalse(MoeGroupedGemmKernel.UsesWgmma(false, Hopper, 7168, 7168, 0x1000), "not preferred: the default mma.sync kernel");
        Assert.IsFalse(MoeGroupedGemmKernel.UsesWgmma(true, new KernelTarget("sm_90"), 7168, 7168, 0x1000), "no wgmma on plain sm_90");
        Assert.IsFalse(MoeGroupedGemmKernel.UsesWgmma(true, Hopper, 200, 200, 0x1000), "hidden 200: K not a multiple of 16");
        Assert.IsFalse(MoeGroupedGemmKernel.UsesWgmma(true, Hopper, 72, 72, 0x1000), "inter 72");

        Assert.IsFalse(KernelCatalog.For("sm_90").ContainsKey(MoeGroupedGemmKernel.WgmmaFamily));
        var names = KernelCatalog.For("sm_90a")[MoeGroupedGemmKernel.WgmmaFamily].Select(i => i.NameExpression).ToList();
        foreach (var layout in new[] { 0, 1 })
        {
            CollectionAssert.Contains(names, $"moe_grouped_gemm_wgmma_kernel<4096, 7168, 1, {layout}>", "V3 gate/up");
            CollectionAssert.Contains(names, $"moe_grouped_gemm_wgmma_kernel<7168, 2048, 0, {layout}>", "V3 down");
        }

        Assert.HasCount(8 * 2 - 4, names, "V3, tiny-a and the Tiny preset, both passes and layouts; the ragged shapes (widths not multiples of 16) stay on mma.sync");
        Assert.IsTrue(KernelCatalog.For("sm_90a")[MoeGroupedGemmKernel.WgmmaFamily].All(i => i.DynamicSharedBytes == MoeGroupedGemmKernel.WgmmaSharedBytes));
    }

    [TestMethod]
    public void ThePersistentGridHasOneBlockPerSmAndNoMoreThanTheTiles()
    {
        Assert.AreEqual(1, Fp8GemmKernel.WgmmaGrid(1, 100, 132));
        Assert.AreEqual(56, Fp8GemmKernel.WgmmaGrid(100, 7168, 132));
        Assert.AreEqual(132, Fp8GemmKernel.WgmmaGrid(4096, 7168, 132));
        Assert.AreEqual(2 * 3, Fp8GemmKernel.WgmmaGrid(129, 257, 132), "ragged M and N round up to whole tiles");
    }

    /// <summary>
    /// The C# mirror of the tile order and the launcher's constants against the kernel source: NVRTC evaluates the
    /// CUDA constexpr function and constants in static_asserts (no GPU), and a wrong value fails the compile.
    /// </summary>
    [TestMethod]
    public void TheKernelSourceAgreesWithTheLauncher()
    {
        NvrtcSupport.RequireNvrtc();
        var compiled = new NvrtcCompiler().CompileSource(Fp8GemmKernel.WgmmaFamily, AgreementSource(wrongBy: 0), [], new KernelTarget("compute_90"));
        Assert.IsNotEmpty(compiled.Image);

        var e = Assert.ThrowsExactly<KernelCompileException>(() =>
            new NvrtcCompiler().CompileSource(Fp8GemmKernel.WgmmaFamily, AgreementSource(wrongBy: 1), [], new KernelTarget("compute_90")));
        StringAssert.Contains(e.Log, "tile order differs from C#");

        var moe = $"#include \"{MoeGroupedGemmKernel.WgmmaFamily}.cu\"\n" +
                  $"static_assert(kMoeWgmmaSharedBytes == {MoeGroupedGemmKernel.WgmmaSharedBytes}, \"shared bytes differ from C#\");\n" +
                  $"static_assert(kMoeWgmmaStages == {MoeGroupedGemmKernel.WgmmaStages}, \"stages differ from C#\");\n" +
                  $"static_assert(kMoeWgmmaThreads == {MoeGroupedGemmKernel.WgmmaThreads}, \"threads differ from C#\");\n" +
                  $"static_assert(kMoeWgmmaSwigluColumns == {MoeGroupedGemmKernel.WgmmaSwigluColumns}, \"gate/up columns differ from C#\");\n" +
                  $"static_assert(kMoeWgmmaDownColumns == {MoeGroupedGemmKernel.WgmmaDownColumns}, \"down columns differ from C#\");\n" +
                  $"static_assert(kMoeTile == {MoeGroupedGemmKernel.Tile}, \"tile differs from C#\");\n";
        Assert.IsNotEmpty(new NvrtcCompiler().CompileSource(MoeGroupedGemmKernel.WgmmaFamily, moe, [], new KernelTarget("compute_90")).Image);
    }

    private static string AgreementSource(int wrongBy)
    {
        var sb = new StringBuilder($"#include \"{Fp8GemmKernel.WgmmaFamily}.cu\"\n");
        sb.Append($"static_assert(kWgmmaSharedBytes == {Fp8GemmKernel.WgmmaSharedBytes}, \"shared bytes differ from C#\");\n");
        sb.Append($"static_assert(kWgmmaStages == {Fp8GemmKernel.WgmmaStages}, \"stages differ from C#\");\n");
        sb.Append($"static_assert(kWgmmaThreads == {Fp8GemmKernel.WgmmaThreads}, \"threads differ from C#\");\n");
        sb.Append($"static_assert(kWgmmaTile == {Fp8GemmKernel.WgmmaTileEdge}, \"tile differs from C#\");\n");
        sb.Append($"static_assert(kWgmmaDecodeSharedBytes == {Fp8GemmKernel.WgmmaDecodeSharedBytes}, \"decode shared bytes differ from C#\");\n");
        sb.Append($"static_assert(kWgmmaDecodeStages == {Fp8GemmKernel.WgmmaDecodeStages}, \"decode stages differ from C#\");\n");
        sb.Append($"static_assert(kWgmmaDecodeRows == {Fp8GemmKernel.WgmmaDecodeRows}, \"decode rows differ from C#\");\n");
        foreach (var g in Grids)
        {
            int tilesM = (int)g[0], tilesN = (int)g[1], groupM = (int)g[2];
            for (var t = 0; t < tilesM * tilesN; t += Math.Max(1, tilesM * tilesN / 23))
            {
                var (m, n) = Fp8GemmKernel.WgmmaTileAt(t, tilesM, tilesN, groupM);
                sb.Append($"static_assert(fp8_wgmma_tile({t}, {tilesM}, {tilesN}, {groupM}).m == {m + wrongBy} && ")
                  .Append($"fp8_wgmma_tile({t}, {tilesM}, {tilesN}, {groupM}).n == {n}, \"tile order differs from C#\");\n");
            }
        }

        return sb.ToString();
    }

    [TestMethod]
    public void ATmaTileMeetsTheDriversRules()
    {
        var ok = new TmaTile(0x10000, 7168, 4095, 7168, 128, 128, TmaSwizzle.Swizzle128B);
        Assert.IsNull(ok.Problem());
        Assert.IsNull((ok with { Outer = 1 }).Problem(), "a box larger than the tensor reads zeros past its end");
        Assert.IsNull((ok with { Inner = 208, RowStride = 208 }).Problem(), "K a multiple of 16, not of 128");

        StringAssert.Contains((ok with { Address = 0x10008 }).Problem(), "not 16-byte aligned");
        StringAssert.Contains((ok with { Outer = 0 }).Problem(), "dimensions 7168 x 0");
        StringAssert.Contains((ok with { RowStride = 7176 }).Problem(), "row stride 7176 B must be a multiple of 16 B");
        StringAssert.Contains((ok with { RowStride = 7152 }).Problem(), "at least the row's 7168 B");
        StringAssert.Contains((ok with { RowStride = 1L << 40 }).Problem(), "below 2^40");
        StringAssert.Contains((ok with { BoxOuter = 257 }).Problem(), "edges from 1 to 256");
        StringAssert.Contains((ok with { BoxInner = 120 }).Problem(), "multiple of 16 B");
        StringAssert.Contains((ok with { BoxInner = 256, Swizzle = TmaSwizzle.Swizzle128B }).Problem(), "exceeds the 128 B of the 128-byte swizzle");
        Assert.IsNull((ok with { BoxInner = 256, Swizzle = TmaSwizzle.None }).Problem());

        var stack = new TmaTile(0x10000, 7168, 4096, 7168, 128, 64, TmaSwizzle.Swizzle128B) { Planes = 256, PlaneStride = 4096L * 7168 };
        Assert.AreEqual(2, ok.Rank);
        Assert.AreEqual(3, stack.Rank);
        Assert.IsNull(stack.Problem());
        StringAssert.Contains((stack with { PlaneStride = 4096L * 7168 - 16 }).Problem(), "plane stride 29360112 B must be a multiple of 16 B, at least the matrix's 29360128 B");
        StringAssert.Contains((stack with { PlaneStride = 4096L * 7168 + 8 }).Problem(), "multiple of 16 B");

        var e = Assert.ThrowsExactly<ArgumentException>(() => (ok with { RowStride = 7176 }).Check("FP8 GEMM M=3 N=576 K=7168 activation codes"));
        StringAssert.StartsWith(e.Message, "FP8 GEMM M=3 N=576 K=7168 activation codes: not a TMA tile source: row stride 7176 B");
    }
}
