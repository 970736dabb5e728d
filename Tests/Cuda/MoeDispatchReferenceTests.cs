using DeepSeekCuda.Kernels;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>The CPU reference of the MoE dispatch (no GPU): its invariants and a worked example.</summary>
[TestClass]
public sealed class MoeDispatchReferenceTests
{
    /// <summary>Distinct experts per token (what the gate produces), uniform or skewed toward one hot expert among few.</summary>
    internal static int[] Routing(Random r, int tokens, int k, int experts, bool skewed)
    {
        var idx = new int[tokens * k];
        var pool = skewed ? Math.Max(k, experts / 4) : experts; // skewed: the upper experts never receive a token
        for (var t = 0; t < tokens; t++)
        {
            var chosen = new HashSet<int>();
            if (skewed && r.NextDouble() < 0.95)
            {
                chosen.Add(pool - 1); // the hot expert takes most tokens
            }

            while (chosen.Count < k)
            {
                chosen.Add(r.Next(pool));
            }

            var order = chosen.OrderBy(_ => r.Next()).ToArray();
            order.CopyTo(idx, t * k);
        }

        return idx;
    }

    /// <summary>Every invariant of a layout for the first <paramref name="tokens"/> tokens of <paramref name="idx"/>.</summary>
    internal static void AssertInvariants(MoeDispatchLayout l, int[] idx, int tokens, int k, int experts, int tile, string what)
    {
        var n = tokens * k;
        var routed = idx.Take(n).Count(e => (uint)e < (uint)experts);
        Assert.AreEqual(routed, l.Counts.Sum(), $"{what}: counts sum to the routed slots");
        Assert.AreEqual(0, l.Offsets[0], what);
        for (var e = 0; e < experts; e++)
        {
            Assert.AreEqual(0, l.Offsets[e] % tile, $"{what}: offset of expert {e} is a tile multiple");
            Assert.AreEqual((l.Counts[e] + tile - 1) / tile * tile, l.Offsets[e + 1] - l.Offsets[e], $"{what}: expert {e} padded span");
            for (var row = l.Offsets[e]; row < l.Offsets[e + 1]; row++)
            {
                if (row < l.Offsets[e] + l.Counts[e])
                {
                    var s = l.Perm[row];
                    Assert.IsTrue(s >= 0 && s < n, $"{what}: row {row} holds slot {s}");
                    Assert.AreEqual(e, idx[s], $"{what}: row {row} is expert {e}'s");
                    Assert.AreEqual(row, l.Inv[s], $"{what}: inv(perm(row {row}))");
                    if (row > l.Offsets[e])
                    {
                        Assert.IsGreaterThan(l.Perm[row - 1], s, $"{what}: expert {e} rows in token, slot order");
                    }
                }
                else
                {
                    Assert.AreEqual(-1, l.Perm[row], $"{what}: padding row {row}");
                }
            }
        }

        Assert.IsLessThanOrEqualTo(l.Perm.Length, l.Offsets[experts], what);
        for (var row = l.Offsets[experts]; row < l.Perm.Length; row++)
        {
            Assert.AreEqual(-1, l.Perm[row], $"{what}: unused row {row}");
        }

        for (var s = 0; s < l.Inv.Length; s++)
        {
            if (s < n && (uint)idx[s] < (uint)experts)
            {
                Assert.AreEqual(s, l.Perm[l.Inv[s]], $"{what}: perm(inv(slot {s}))");
            }
            else
            {
                Assert.AreEqual(-1, l.Inv[s], $"{what}: slot {s} is not routed");
            }
        }
    }

    [TestMethod]
    public void WorkedExample()
    {
        // 3 tokens, k = 2, 4 experts, tile 2.
        int[] idx = [2, 0, 0, 2, 3, 0];
        var l = MoeDispatch.Compute(idx, tokens: 3, k: 2, experts: 4, tile: 2);
        CollectionAssert.AreEqual(new[] { 3, 0, 2, 1 }, l.Counts);
        CollectionAssert.AreEqual(new[] { 0, 4, 4, 6, 8 }, l.Offsets);
        // expert 0: slots 1, 2, 5, pad; expert 2: slots 0, 3; expert 3: slot 4, pad; then unused rows.
        CollectionAssert.AreEqual(new[] { 1, 2, 5, -1, 0, 3, 4, -1, -1, -1 }, l.Perm);
        CollectionAssert.AreEqual(new[] { 4, 0, 1, 5, 6, 2 }, l.Inv);
        Assert.HasCount(MoeDispatch.RowsMax(3, 2, 4, 2), l.Perm);
    }

    public static IEnumerable<object[]> Cases =>
        from tokens in new[] { 1, 7, 1000, 4096 }
        from shape in new[] { (256, 8), (16, 4), (12, 3) }
        from skewed in new[] { false, true }
        from tile in new[] { 1, 64 }
        select new object[] { tokens, shape.Item1, shape.Item2, skewed, tile };

    [TestMethod]
    [DynamicData(nameof(Cases))]
    public void InvariantsHold(int tokens, int experts, int k, bool skewed, int tile)
    {
        var idx = Routing(new Random(tokens * 7 + experts + (skewed ? 1 : 0) + tile), tokens, k, experts, skewed);
        var l = MoeDispatch.Compute(idx, tokens, k, experts, tile, tMax: tokens + 3);
        AssertInvariants(l, idx, tokens, k, experts, tile, $"{tokens} tokens, {experts}/{k}, skewed {skewed}, tile {tile}");
        if (skewed)
        {
            Assert.IsTrue(l.Counts.Any(c => c == 0), "skewed routing leaves experts without tokens");
        }
    }

    [TestMethod]
    public void OutOfRangeExpertsAreNotRouted()
    {
        int[] idx = [1, -1, 4, 0];
        var l = MoeDispatch.Compute(idx, tokens: 2, k: 2, experts: 4, tile: 1);
        CollectionAssert.AreEqual(new[] { 1, 1, 0, 0 }, l.Counts);
        CollectionAssert.AreEqual(new[] { 1, -1, -1, 0 }, l.Inv);
        AssertInvariants(l, idx, 2, 2, 4, 1, "out of range");
    }

    [TestMethod]
    public void KernelGeometryCoversTheCapacity()
    {
        Assert.AreEqual(1, MoeDispatchKernel.Chunks(1, 8));
        Assert.AreEqual(8, MoeDispatchKernel.Chunks(4096, 8));
        Assert.AreEqual(9, MoeDispatchKernel.Chunks(4097, 8));
        Assert.AreEqual(9L * 256, MoeDispatchKernel.WorkspaceInts(4097, 8, 256));
        Assert.AreEqual(4096 * 8 + (256 * 127), MoeDispatch.RowsMax(4096, 8, 256, 128));
        Assert.HasCount(5 * 3, MoeDispatchKernel.AllInstances());
    }

    [TestMethod]
    public void ExpertMapSendsEachHeldExpertToItsSlot()
    {
        CollectionAssert.AreEqual(new[] { -1, 0, -1, 1, 2, -1 }, MoeDispatch.ExpertMap(6, [1, 3, 4]));
        CollectionAssert.AreEqual(new[] { 0, 1, 2 }, MoeDispatch.ExpertMap(3, [0, 1, 2]));
        foreach (var held in new int[][] { [], [3, 1], [1, 1], [6], [-1] })
        {
            var e = Assert.ThrowsExactly<ArgumentException>(() => MoeDispatch.ExpertMap(6, held), string.Join(",", held));
            Assert.AreEqual("held", e.ParamName);
        }
    }

    [TestMethod]
    public void MappedWorkedExample()
    {
        // 3 tokens, k = 2, 6 experts; this device holds experts 1, 3 and 4 (slots 0, 1, 2); tile 2.
        var map = MoeDispatch.ExpertMap(6, [1, 3, 4]);
        int[] idx = [3, 0, 4, 3, 1, 5];
        var local = MoeDispatch.Localize(idx, 6, map);
        CollectionAssert.AreEqual(new[] { 1, -1, 2, 1, 0, -1 }, local);
        CollectionAssert.AreEqual(new[] { -1, -1, 0 }, MoeDispatch.Localize([6, -1, 1], 3, map), "ids outside the map are not routed");
        var l = MoeDispatch.Compute(local, tokens: 3, k: 2, experts: 3, tile: 2);
        CollectionAssert.AreEqual(new[] { 1, 2, 1 }, l.Counts);
        CollectionAssert.AreEqual(new[] { 0, 2, 4, 6 }, l.Offsets);
        // slot 0: slot 4 (expert 1), pad; slot 1: slots 0, 3 (expert 3); slot 2: slot 2 (expert 4), pad; then unused rows.
        CollectionAssert.AreEqual(new[] { 4, -1, 0, 3, 2, -1, -1, -1, -1 }, l.Perm);
        CollectionAssert.AreEqual(new[] { 2, -1, 4, 3, 0, -1 }, l.Inv);
    }

    /// <summary>
    /// Expert parallelism: V3's 256 experts round-robin over 8 devices (and a contiguous split of the Tiny preset's 12
    /// over 5, uneven), each device dispatching through its map. Every token slot is served by exactly one device, by
    /// the expert the gate chose, and each device's layout keeps every invariant over its slots.
    /// </summary>
    [TestMethod]
    [DataRow(256, 8, 8, true)]
    [DataRow(12, 3, 5, false)]
    public void MappedDispatchServesEverySlotOnExactlyOneDevice(int experts, int k, int devices, bool roundRobin)
    {
        const int tokens = 300, tile = 64;
        var idx = Routing(new Random(experts + devices), tokens, k, experts, skewed: false);
        var served = new int[tokens * k];
        for (var d = 0; d < devices; d++)
        {
            int[] held = roundRobin
                ? [.. Enumerable.Range(0, experts).Where(e => e % devices == d)]
                : [.. Enumerable.Range(0, experts).Where(e => e * devices / experts == d)];
            var local = MoeDispatch.Localize(idx, tokens * k, MoeDispatch.ExpertMap(experts, held));
            var l = MoeDispatch.Compute(local, tokens, k, held.Length, tile);
            AssertInvariants(l, local, tokens, k, held.Length, tile, $"device {d}");
            for (var s = 0; s < served.Length; s++)
            {
                if (l.Inv[s] >= 0)
                {
                    served[s]++;
                    Assert.AreEqual(idx[s], held[local[s]], $"device {d} slot {s}: the gate's expert");
                }
            }
        }

        Assert.IsTrue(served.All(n => n == 1), "every slot on exactly one device");
    }
}
