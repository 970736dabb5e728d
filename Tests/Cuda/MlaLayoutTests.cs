using DeepSeekCuda.Cuda;
using DeepSeekCuda.Kernels;
using DeepSeekCuda.Loader.Numerics;
using DeepSeekCuda.Loader.Synthetic;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>The paged latent cache layout, the decode launcher's pure geometry (no GPU), and its NVRTC cross-checks.</summary>
[TestClass]
public sealed class MlaLayoutTests
{
    // Shared memory one block may opt in to (CUDA's per-compute-capability table): H100/H200, A100, L40S/RTX 4090.
    private const int H100 = 227 * 1024, A100 = 163 * 1024, Ada = 99 * 1024;

    // Two requests with out-of-order physical blocks: r0 → [3, 0], r1 → [1, 2].
    private static readonly int[] Table = [3, 0, 1, 2];

    [TestMethod]
    public void RowOffsetFollowsTheBlockTable()
    {
        Assert.AreEqual(3L * 64 * 576, PagedLatentCache.RowOffset(Table, 2, 0, 0, 576));
        Assert.AreEqual((3L * 64 + 63) * 576, PagedLatentCache.RowOffset(Table, 2, 0, 63, 576));
        Assert.AreEqual(1L * 576, PagedLatentCache.RowOffset(Table, 2, 0, 65, 576));
        Assert.AreEqual((1L * 64 + 5) * 96, PagedLatentCache.RowOffset(Table, 2, 1, 5, 96));
        Assert.AreEqual(2L * 64 + 63, PagedLatentCache.Slot(Table, 2, 1, 127));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => PagedLatentCache.Slot(Table, 2, 1, 128));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => PagedLatentCache.Slot(Table, 2, 1, -1));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => PagedLatentCache.Slot([0, -1], 2, 0, 64));
        Assert.AreEqual(0, PagedLatentCache.BlocksFor(0));
        Assert.AreEqual(1, PagedLatentCache.BlocksFor(64));
        Assert.AreEqual(2, PagedLatentCache.BlocksFor(65));
        Assert.AreEqual(5L * 64 * 576 * 2, PagedLatentCache.Bytes(5, LatentShape.V3));
        Assert.AreEqual(PagedLatentCache.V3RowWidth, LatentShape.V3.RowWidth);
        Assert.AreEqual(LatentShape.TinyPreset, LatentShape.Of(ModelPresets.Tiny));
        Assert.AreEqual(LatentShape.V3, LatentShape.Of(ModelPresets.DeepSeekV3));
    }

    [TestMethod]
    public void GatherInvertsScatterAndTouchesOnlyOwnedRows()
    {
        var shape = LatentShape.TinyPreset;
        int[] lengths = [1, 64, 130];
        const int maxBlocks = 3;
        // Physical blocks handed out in a shuffled order; -1 where a request owns no block.
        int[] table = [6, -1, -1, 2, -1, -1, 4, 0, 5];
        const int numBlocks = 8;
        var paged = new ushort[numBlocks * 64 * shape.RowWidth];
        var r = new Random(7);
        var rows = new float[lengths.Length][];
        for (var q = 0; q < lengths.Length; q++)
        {
            rows[q] = [.. Enumerable.Range(0, lengths[q] * shape.RowWidth).Select(_ => (float)(r.NextDouble() * 4 - 2))];
            PagedLatentCache.Scatter(rows[q], table, maxBlocks, q, lengths[q], shape, paged);
        }

        for (var q = 0; q < lengths.Length; q++)
        {
            var back = new float[lengths[q] * shape.RowWidth];
            PagedLatentCache.Gather(paged, table, maxBlocks, q, lengths[q], shape, back);
            var expected = (float[])rows[q].Clone();
            BFloat16.Round(expected);
            CollectionAssert.AreEqual(expected, back, $"request {q}");
        }

        // Blocks 1, 3 and 7 belong to nobody and the tail of block 5 (request 2, rows 130..191) is unused.
        foreach (var b in new[] { 1, 3, 7 })
        {
            Assert.IsTrue(paged.AsSpan(b * 64 * shape.RowWidth, 64 * shape.RowWidth).IndexOfAnyExcept((ushort)0) < 0, $"block {b} was written");
        }

        Assert.IsTrue(paged.AsSpan((5 * 64 + 2) * shape.RowWidth, 62 * shape.RowWidth).IndexOfAnyExcept((ushort)0) < 0, "tail of block 5 was written");
    }

    [TestMethod]
    public void ShapesValidate()
    {
        foreach (var s in LatentShape.Known)
        {
            s.Validate();
        }

        Assert.ThrowsExactly<ArgumentException>(() => new LatentShape(72, 16).Validate());
        Assert.ThrowsExactly<ArgumentException>(() => new LatentShape(512, 8).Validate());
    }

    [TestMethod]
    public void TilingPicksRowsAndColumnGroups()
    {
        Assert.AreEqual(new MlaDecodeTiling(16, 4), MlaDecodeKernel.TilingFor(LatentShape.V3, 16, 1, H100));
        Assert.AreEqual(new MlaDecodeTiling(16, 4), MlaDecodeKernel.TilingFor(LatentShape.V3, 16, 2, H100));
        Assert.AreEqual(new MlaDecodeTiling(64, 2), MlaDecodeKernel.TilingFor(LatentShape.V3, 32, 2, H100));
        Assert.AreEqual(new MlaDecodeTiling(64, 2), MlaDecodeKernel.TilingFor(LatentShape.V3, 128, 1, H100));
        Assert.AreEqual(new MlaDecodeTiling(16, 2), MlaDecodeKernel.TilingFor(LatentShape.TinyPreset, 3, 2, H100)); // 80 = 10 column tiles of 8
        // The 64-row block needs 152 KiB: where a block may have only 99 KiB (Ada) the 16-row tiling serves every head count.
        Assert.AreEqual(new MlaDecodeTiling(16, 4), MlaDecodeKernel.TilingFor(LatentShape.V3, 128, 1, Ada));
        Assert.AreEqual(new MlaDecodeTiling(64, 2), MlaDecodeKernel.TilingFor(LatentShape.V3, 128, 1, A100));
        Assert.AreEqual(4, MlaDecodeKernel.RowGroups(128, 2, new MlaDecodeTiling(64, 2)));
        Assert.AreEqual(1, MlaDecodeKernel.RowGroups(3, 2, new MlaDecodeTiling(16, 2)));
        Assert.AreEqual(256, new MlaDecodeTiling(64, 2).Threads);
        Assert.AreEqual(128, new MlaDecodeTiling(16, 4).Threads);

        // Q tile + two stages of 32 rows (pitch 584) + P + row statistics; fits A100's 163 KiB opt-in and H100's 227 KiB.
        Assert.AreEqual(2 * (64 * 584 + 64 * 584 + 64 * 40) + 4 * 64 * 2, MlaDecodeKernel.SharedBytes(LatentShape.V3, new MlaDecodeTiling(64, 2)));
        foreach (var s in LatentShape.Known)
        {
            foreach (var h in new[] { 1, 16, 128 })
            {
                Assert.IsLessThanOrEqualTo(166_912, MlaDecodeKernel.SharedBytes(s, MlaDecodeKernel.TilingFor(s, h, 2, A100)));
            }
        }
    }

    [TestMethod]
    public void SplitCountFillsWavesWithinItsCaps()
    {
        // One request, one row group, 132 SMs: as many splits as the context allows (8192 / 256 = 32).
        Assert.AreEqual(32, MlaDecodeKernel.SplitCount(1, 132, 8192));
        // Short contexts are never split.
        Assert.AreEqual(1, MlaDecodeKernel.SplitCount(1, 132, 511));
        // FlashMLA's batch 128 × 16 heads, two resident blocks per SM: 128 blocks half-fill 264 slots, 2 splits fill 97 %.
        Assert.AreEqual(2, MlaDecodeKernel.SplitCount(128, 264, 4096));
        // 128 heads × 2 query tokens: 4 row groups × 128 requests = 512 blocks ≈ 3.9 waves of 132: no split.
        Assert.AreEqual(1, MlaDecodeKernel.SplitCount(512, 132, 8192));
        // Never above 64, even for a huge context on a huge device.
        Assert.AreEqual(MlaDecodeKernel.MaxSplits, MlaDecodeKernel.SplitCount(1, 10_000, 1 << 20));

        var r = new Random(3);
        for (var i = 0; i < 2000; i++)
        {
            int blocks = r.Next(1, 2000), slots = r.Next(1, 600), ctx = r.Next(0, 40_000);
            var s = MlaDecodeKernel.SplitCount(blocks, slots, ctx);
            Assert.IsTrue(s >= 1 && s <= Math.Clamp(ctx / MlaDecodeKernel.MinTokensPerSplit, 1, MlaDecodeKernel.MaxSplits), $"{blocks} {slots} {ctx} -> {s}");
            if (blocks % slots == 0)
            {
                Assert.AreEqual(1, s, "whole waves need no split");
            }
        }

        Assert.AreEqual(0, MlaDecodeKernel.WorkspaceBytes(LatentShape.V3, 4, 16, 1, 1));
        Assert.AreEqual(3L * 4 * 16 * 2 * 513 * 4, MlaDecodeKernel.WorkspaceBytes(LatentShape.V3, 4, 16, 2, 3));
    }

    [TestMethod]
    [TestCategory("Nvrtc")]
    public void SharedBytesAgreeWithTheKernel()
    {
        NvrtcSupport.RequireNvrtc();
        var source = "#include \"mla_decode.cu\"\n";
        foreach (var s in LatentShape.Known)
        {
            foreach (var t in new[] { MlaDecodeKernel.TilingFor(s, 16, 1, H100), MlaDecodeKernel.TilingFor(s, 128, 1, H100) })
            {
                source += $"static_assert(MlaDecodeGeometry<{s.Latent}, {s.Rope}, {t.Rows}, {t.ColumnWarps}>::SMEM == {MlaDecodeKernel.SharedBytes(s, t)}, \"smem\");\n" +
                          $"static_assert(MlaDecodeGeometry<{s.Latent}, {s.Rope}, {t.Rows}, {t.ColumnWarps}>::THREADS == {t.Threads}, \"threads\");\n";
            }
        }

        source += $"static_assert(kMlaTile == {MlaDecodeKernel.Tile} && kMlaMaxSplits == {MlaDecodeKernel.MaxSplits} && kMlaMaxNope == {MlaDecodeKernel.MaxNope}" +
                  $" && kMlaDecodeBlockTokens == {PagedLatentCache.BlockSize}, \"constants\");\n";
        var compiled = new NvrtcCompiler().CompileSource(MlaDecodeKernel.FamilyName, source, [], new KernelTarget("compute_80"));
        Assert.IsNotEmpty(compiled.Image);
    }
}
