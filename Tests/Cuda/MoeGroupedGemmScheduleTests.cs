using DeepSeekCuda.Kernels;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>
/// The C# side of the grouped expert GEMM (no GPU): the contiguous tile schedule over the dispatch's padded offsets
/// (the same binary search the kernel runs), the row bound the grid and the down quantization cover, the checks that
/// name their limit, and the specialization names.
/// </summary>
[TestClass]
public sealed class MoeGroupedGemmScheduleTests
{
    public static IEnumerable<object[]> Cases =>
        from tokens in new[] { 1, 3, 64, 129, 1000 }
        from shape in new[] { (256, 8), (16, 4), (12, 3) }
        from skewed in new[] { false, true }
        select new object[] { tokens, shape.Item1, shape.Item2, skewed };

    [TestMethod]
    [DynamicData(nameof(Cases))]
    public void ScheduleCoversEveryLiveRowOnceWithinOneExpert(int tokens, int experts, int k, bool skewed)
    {
        var idx = MoeDispatchReferenceTests.Routing(new Random(tokens * 31 + experts + (skewed ? 7 : 0)), tokens, k, experts, skewed);
        var l = MoeDispatch.Compute(idx, tokens, k, experts, MoeGroupedGemmKernel.Tile);
        var bound = MoeGroupedGemmKernel.RowsBound(tokens, k, experts);
        Assert.IsTrue(l.Offsets[experts] <= bound, $"rows in use {l.Offsets[experts]} exceed the bound {bound}");
        Assert.IsTrue(bound <= MoeDispatch.RowsMax(tokens, k, experts, MoeGroupedGemmKernel.Tile));

        var covered = new int[l.Offsets[experts]];
        foreach (var (row0, e, live) in MoeGroupedGemmKernel.Schedule(l.Counts, l.Offsets, bound))
        {
            Assert.AreEqual(0, row0 % MoeGroupedGemmKernel.Tile);
            Assert.IsTrue(live is > 0 and <= MoeGroupedGemmKernel.Tile);
            Assert.IsTrue(row0 >= l.Offsets[e] && row0 + live <= l.Offsets[e] + l.Counts[e], $"tile {row0} leaves expert {e}");
            for (var r = row0; r < row0 + live; r++)
            {
                covered[r]++;
                Assert.AreEqual(e, idx[l.Perm[r]], $"row {r} holds a slot of another expert");
            }
        }

        for (var e = 0; e < experts; e++)
        {
            for (var r = l.Offsets[e]; r < l.Offsets[e + 1]; r++)
            {
                Assert.AreEqual(r < l.Offsets[e] + l.Counts[e] ? 1 : 0, covered[r], $"row {r} of expert {e} (count {l.Counts[e]})");
            }
        }
    }

    [TestMethod]
    public void ExpertOfTileSkipsEmptyExperts()
    {
        // Experts 0 and 2 and 3 are empty; 1 has 70 rows (two tiles), 4 has 1.
        int[] counts = [0, 70, 0, 0, 1];
        int[] offsets = [0, 0, 128, 128, 128, 192];
        Assert.AreEqual(1, MoeGroupedGemmKernel.ExpertOfTile(offsets, 0));
        Assert.AreEqual(1, MoeGroupedGemmKernel.ExpertOfTile(offsets, 64));
        Assert.AreEqual(4, MoeGroupedGemmKernel.ExpertOfTile(offsets, 128));
        Assert.AreEqual(-1, MoeGroupedGemmKernel.ExpertOfTile(offsets, 192));
        var s = MoeGroupedGemmKernel.Schedule(counts, offsets, 256);
        CollectionAssert.AreEqual(new[] { (0, 1, 64), (64, 1, 6), (128, 4, 1) }, s.ToArray());
    }

    [TestMethod]
    public void UnpaddedOffsetsAreRejectedNamingTheTile()
    {
        var l = MoeDispatch.Compute([0, 1, 1, 2], 2, 2, 3, tile: 1);
        var e = Assert.ThrowsExactly<ArgumentException>(() => MoeGroupedGemmKernel.ValidateContiguous(l.Counts, l.Offsets));
        StringAssert.Contains(e.Message, $"tile ({MoeGroupedGemmKernel.Tile})");
        Assert.ThrowsExactly<ArgumentException>(() => MoeGroupedGemmKernel.ValidateContiguous([1, 1], [0, 64]));
    }

    [TestMethod]
    public void RowsBoundIsTightForTheWorstCase()
    {
        // 3 tokens, top-2 over 16 experts, every slot on its own expert: 6 experts padded to 64 rows each.
        var l = MoeDispatch.Compute([0, 1, 2, 3, 4, 5], 3, 2, 16, MoeGroupedGemmKernel.Tile);
        Assert.AreEqual(6 * 64, l.Offsets[16]);
        Assert.AreEqual(6 * 64, MoeGroupedGemmKernel.RowsBound(3, 2, 16));
        Assert.AreEqual(0, MoeGroupedGemmKernel.RowsBound(0, 8, 256));
        Assert.AreEqual((4096 * 8) + (256 * 63), MoeGroupedGemmKernel.RowsBound(4096, 8, 256));
    }

    [TestMethod]
    public void SpecializationsStackGateAndUp()
    {
        Assert.AreEqual("moe_grouped_gemm_kernel<4096, 7168, 1, 0>", MoeGroupedGemmKernel.GateUpInstance(7168, 2048, MoeGroupedLayout.Contiguous).NameExpression);
        Assert.AreEqual("moe_grouped_gemm_kernel<7168, 2048, 0, 1>", MoeGroupedGemmKernel.DownInstance(7168, 2048, MoeGroupedLayout.Masked).NameExpression);
        Assert.AreEqual(MoeGroupedLayout.Masked, MoeLayer.Choose(MoeLayer.MaskedMaxTokens, null));
        Assert.AreEqual(MoeGroupedLayout.Contiguous, MoeLayer.Choose(MoeLayer.MaskedMaxTokens + 1, null));
        Assert.AreEqual(MoeGroupedLayout.Contiguous, MoeLayer.Choose(1, MoeGroupedLayout.Contiguous));
    }
}
