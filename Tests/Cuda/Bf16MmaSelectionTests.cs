using DeepSeekCuda.Cuda;
using DeepSeekCuda.Kernels;
using DeepSeekCuda.Model;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>
/// The tensor-core BF16 GEMM's launch logic without a GPU: which calls it takes, the named refusals, the split-K choice,
/// the fold/unfold/router problems addressing what the CUDA-core kernels and the CPU reference compute, and the kernel
/// source's constants against the launcher's.
/// </summary>
[TestClass]
public sealed class Bf16MmaSelectionTests
{
    private static Bf16MmaProblem Dense(int m, int n, int k, ElementType a = ElementType.F32) =>
        new(0x1000, a, k, 0x100000, false, k, 0x200000, ElementType.F32, n, m, n, k);

    [TestMethod]
    public void LmHeadTakesTheTensorCoresAboveFourRows()
    {
        Assert.IsFalse(Bf16GemmKernel.TakesTensorCores(Dense(4, 129280, 7168)), "4 rows: the warp kernel reads the weight once already");
        Assert.IsTrue(Bf16GemmKernel.TakesTensorCores(Dense(5, 129280, 7168)));
        Assert.IsTrue(Bf16GemmKernel.TakesTensorCores(Dense(64, 129280, 7168, ElementType.BF16)));
        Assert.IsFalse(Bf16GemmKernel.TakesTensorCores(Dense(9, 300, 129)), "K = 129 stays on the warp kernel");
    }

    [TestMethod]
    public void EachUnmetRequirementIsNamed()
    {
        var ok = Dense(17, 300, 1000);
        Assert.IsNull(Bf16MmaKernel.Refusal(ok));
        Assert.IsNull(Bf16MmaKernel.Refusal(ok with { M = 0 }), "no rows is nothing to do, not an error");
        Assert.IsNull(Bf16MmaKernel.Refusal(ok with { Lda = 1004 }), "f32 rows need 16 bytes: 4 elements");
        StringAssert.Contains(Bf16MmaKernel.Refusal(ok with { N = 0 }), "empty or negative");
        StringAssert.Contains(Bf16MmaKernel.Refusal(ok with { K = 1001, Lda = 1004, Ldb = 1008 }), "K = 1001 is not a multiple of 8");
        StringAssert.Contains(Bf16MmaKernel.Refusal(ok with { BKMajor = true, Ldb = 304 }), "N = 300 is not a multiple of 8");
        Assert.IsNull(Bf16MmaKernel.Refusal(ok with { BKMajor = true, N = 296, Ldb = 296 }));
        StringAssert.Contains(Bf16MmaKernel.Refusal(ok with { B = 0x100008 }), "weight at 0x100008");
        StringAssert.Contains(Bf16MmaKernel.Refusal(ok with { Ldb = 1004 }), "row stride 1004");
        StringAssert.Contains(Bf16MmaKernel.Refusal(ok with { Batch = 2, BBatch = 12 }), "batch stride 12");
        StringAssert.Contains(Bf16MmaKernel.Refusal(ok with { A = 0x1004 }), "F32 activations at 0x1004");
        StringAssert.Contains(Bf16MmaKernel.Refusal(ok with { Lda = 1002 }), "row stride 1002");
        StringAssert.Contains(Bf16MmaKernel.Refusal(ok with { AType = ElementType.BF16, Lda = 1004 }), "BF16 activations");
        StringAssert.Contains(Bf16MmaKernel.Refusal(ok with { M = 64 * 65535 + 1 }), "65536 row tiles");
        StringAssert.Contains(Bf16MmaKernel.Refusal(ok with { Batch = 30000, Splits = 3, ABatch = 0 }), "90000 batches × splits");
        StringAssert.Contains(Bf16MmaKernel.Refusal(ok with { Splits = 33 }), "33 splits of K = 1000 leave a split empty (at most 32, one stage each)");
        Assert.IsNull(Bf16MmaKernel.Refusal(ok with { Splits = 32 }), "31 splits of 32 and one of 8");
    }

    public static IEnumerable<object[]> SplitCases =>
        from m in new[] { 1, 7, 64, 65, 300, 8192 }
        from nk in new[] { (256, 7168), (129280, 7168), (512, 128), (128, 512), (12, 192), (16, 256), (256, 600) }
        from sms in new[] { 132, 78, 1 }
        select new object[] { m, nk.Item1, nk.Item2, sms };

    [TestMethod]
    [DynamicData(nameof(SplitCases))]
    public void SplitsFillTheSmsWithoutEmptyOrTinySplits(int m, int n, int k, int sms)
    {
        var splits = Bf16MmaKernel.SplitsFor(m, n, k, 1, sms);
        var tiles = (long)((m + 63) / 64) * ((n + 127) / 128);
        var chunk = Bf16MmaKernel.ChunkFor(k, splits);
        Assert.IsGreaterThanOrEqualTo(1, splits);
        Assert.AreEqual(0, chunk % Bf16MmaKernel.TileK, "a split's K is whole stages");
        Assert.IsLessThan(k, (long)chunk * (splits - 1), "no split is empty");
        Assert.IsGreaterThanOrEqualTo(k, (long)chunk * splits, "the splits cover K");
        Assert.IsNull(Bf16MmaKernel.Refusal(Dense(m, n, k) with { Splits = splits, YSplit = (long)m * n }));
        if (tiles >= sms)
        {
            Assert.AreEqual(1, splits, "the output tiles fill the SMs alone");
        }
        else if (splits > 1)
        {
            Assert.IsGreaterThanOrEqualTo(Bf16MmaKernel.MinSplitK / 2, chunk, "no split far below the minimum K");
            Assert.IsTrue(tiles * splits >= 0.8 * sms || chunk < Bf16MmaKernel.MinSplitK + Bf16MmaKernel.TileK,
                $"{splits} splits of {chunk} over {tiles} tiles stop short of {sms} SMs though K allows more");
            Assert.IsLessThan(2 * sms, tiles * (splits - 1), "no more splits than about one block per SM");
        }
        else
        {
            Assert.IsTrue(k < 2 * Bf16MmaKernel.MinSplitK || tiles * 2 > sms, $"one split of K = {k} over {tiles} tiles leaves {sms} SMs idle");
        }

        Assert.AreEqual(splits, Bf16MmaKernel.SplitsFor(m, n, k, 1, sms), "a pure function");
    }

    [TestMethod]
    public void TheV3RouterSplitsKAtDecodeAndNotForALongPrefill()
    {
        // 1 token: 2 output tiles on 132 SMs, K = 7168 split into 28 chunks of 256.
        Assert.AreEqual(28, Bf16MmaKernel.SplitsFor(1, 256, 7168, 1, 132));
        Assert.AreEqual(256, Bf16MmaKernel.ChunkFor(7168, 28));
        // 8192 tokens: 128 x 2 tiles already fill the SMs.
        Assert.AreEqual(1, Bf16MmaKernel.SplitsFor(8192, 256, 7168, 1, 132));
    }

    /// <summary>
    /// The fold and unfold problems, evaluated by the float64 interpreter over host arrays, compute exactly the
    /// products that define them (q_nope · W_UK[h], W_UV[h] · latent), for V3's and tiny shapes: the strides, batch
    /// offsets and W_UV's row offset in kv_b are right without a GPU.
    /// </summary>
    [TestMethod]
    [DataRow(512, 64, 128, 128, 4, 3)]
    [DataRow(80, 16, 32, 48, 3, 2)]
    public void FoldAndUnfoldProblemsAddressTheirProducts(int latent, int rope, int nope, int v, int heads, int tokens)
    {
        var shape = new LatentShape(latent, rope);
        var r = new Random(latent + heads);
        float[] Values(long n) => [.. Enumerable.Range(0, (int)n).Select(_ => (float)Math.Round(r.NextDouble() * 8 - 4))];
        var q = Values((long)tokens * heads * (nope + rope));
        var kvB = Values((long)heads * (nope + v) * latent);
        var dims = new MlaHeadDims(heads, nope, v);
        var weight = new DeviceRows(0, ElementType.BF16, heads * (nope + v), latent);
        var fold = MlaDecodeKernel.FoldProblem(shape, dims, new DeviceRows(0, ElementType.F32, tokens, heads * (nope + rope)), weight,
            new DeviceRows(0, ElementType.BF16, tokens, heads * shape.RowWidth));
        Assert.IsNull(Bf16MmaKernel.Refusal(fold));
        var (foldSum, _) = Bf16MmaReference.Run(fold, q, kvB);
        var unfoldIn = Values((long)tokens * heads * latent);
        var unfold = MlaDecodeKernel.UnfoldProblem(shape, dims, new DeviceRows(0, ElementType.F32, tokens, heads * latent), weight,
            new DeviceRows(0, ElementType.F32, tokens, heads * v));
        Assert.IsNull(Bf16MmaKernel.Refusal(unfold));
        var (unfoldSum, _) = Bf16MmaReference.Run(unfold, unfoldIn, kvB);
        for (var t = 0; t < tokens; t++)
        {
            for (var h = 0; h < heads; h++)
            {
                for (var c = 0; c < latent; c += 7)
                {
                    double want = 0;
                    for (var d = 0; d < nope; d++)
                    {
                        want += (double)q[(t * heads + h) * (nope + rope) + d] * kvB[((long)h * (nope + v) + d) * latent + c];
                    }

                    Assert.AreEqual(want, foldSum[((long)h * tokens + t) * latent + c], $"fold t{t} h{h} c{c}");
                    Assert.AreEqual(t * heads * shape.RowWidth + h * shape.RowWidth + c, Bf16MmaReference.OutputIndex(fold, h, 0, t, c), "q_abs layout");
                }

                for (var d = 0; d < v; d += 5)
                {
                    double want = 0;
                    for (var c = 0; c < latent; c++)
                    {
                        want += (double)kvB[((long)h * (nope + v) + nope + d) * latent + c] * unfoldIn[(t * heads + h) * latent + c];
                    }

                    Assert.AreEqual(want, unfoldSum[((long)h * tokens + t) * v + d], $"unfold t{t} h{h} d{d}");
                    Assert.AreEqual((t * heads + h) * v + d, Bf16MmaReference.OutputIndex(unfold, h, 0, t, d), "output layout");
                }
            }
        }
    }

    /// <summary>The launcher's tile, stage and shared-memory constants against the kernel source, through NVRTC static_asserts.</summary>
    [TestMethod]
    public void TheKernelSourceAgreesWithTheLauncher()
    {
        NvrtcSupport.RequireNvrtc();
        string Source(int wrongBy)
        {
            var s = $"#include \"{Bf16MmaKernel.FamilyName}.cu\"\n" +
                    $"static_assert(kBf16MmaBM == {Bf16MmaKernel.TileM} && kBf16MmaBN == {Bf16MmaKernel.TileN} && kBf16MmaBK == {Bf16MmaKernel.TileK}, \"tile differs from C#\");\n" +
                    $"static_assert(kBf16MmaStages == {Bf16MmaKernel.Stages} && kBf16MmaThreads == {Bf16MmaKernel.Threads}, \"pipeline differs from C#\");\n";
            foreach (var a in Enum.GetValues<ElementType>())
            {
                foreach (var kn in new[] { false, true })
                {
                    s += $"static_assert(Bf16MmaGeometry<{(int)a}, {(kn ? 1 : 0)}>::SMEM == {Bf16MmaKernel.SharedBytes(a, kn) + wrongBy}, \"shared bytes differ from C#\");\n";
                }
            }

            return s;
        }

        Assert.IsNotEmpty(new NvrtcCompiler().CompileSource(Bf16MmaKernel.FamilyName, Source(0), [], new KernelTarget("compute_80")).Image);
        var e = Assert.ThrowsExactly<KernelCompileException>(() =>
            new NvrtcCompiler().CompileSource(Bf16MmaKernel.FamilyName, Source(16), [], new KernelTarget("compute_80")));
        StringAssert.Contains(e.Log, "shared bytes differ from C#");
    }
}
