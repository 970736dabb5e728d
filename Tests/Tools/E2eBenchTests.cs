using DeepSeekCuda.Bench.Benches;
using DeepSeekCuda.Loader.Synthetic;

namespace DeepSeekCuda.Tests.Tools;

/// <summary>
/// The CPU-checkable pieces of <c>run-bench e2e</c> (the bench itself needs a GPU): the pool a slot needs, which
/// (batch, context) combinations are measured and why the others are skipped, and how the slots are prefilled in
/// steps of at most one chunk.
/// </summary>
[TestClass]
public sealed class E2eBenchTests
{
    [TestMethod]
    public void SlotCacheIsContextPlusTheDecodedTokenInWholeBlocksOverEveryLayer()
    {
        var slice = ModelPresets.DeepSeekV3Slice(2);
        // 16384 tokens and the decoded one: 257 blocks of 64 rows of 576 BF16 values, per layer.
        Assert.AreEqual(257L * 64 * 576 * 2 * 2, E2eBench.SlotCacheBytes(slice, 16384));
        Assert.AreEqual(17L * 64 * 576 * 2 * 2, E2eBench.SlotCacheBytes(slice, 1024));
        Assert.AreEqual(1L * 64 * 576 * 2 * 4, E2eBench.SlotCacheBytes(ModelPresets.DeepSeekV3Slice(4), 10));
    }

    [TestMethod]
    public void BatchesOverTheMemoryOrPrefillBudgetAreSkippedWithTheirReason()
    {
        const long slot = 38_000_000; // about a 16K-context slot of the 2-layer slice
        int[] batches = [1, 8, 32, 128];

        var (fit, skipped) = E2eBench.FitBatches(batches, slot, 2_000_000_000, null, 60);
        CollectionAssert.AreEqual(new[] { 1, 8, 32 }, fit);
        Assert.HasCount(1, skipped);
        StringAssert.StartsWith(skipped[0], "batch 128: its cache is 4.86 GB");
        StringAssert.Contains(skipped[0], "over the 2.00 GB budget");

        // Unknown prefill time: memory alone decides; then 0.9 s per slot leaves 32 slots (28.8 s) but not 128 (115 s).
        (fit, skipped) = E2eBench.FitBatches(batches, slot, 100_000_000_000, null, 60);
        CollectionAssert.AreEqual(batches, fit);
        Assert.IsEmpty(skipped);
        (fit, skipped) = E2eBench.FitBatches(fit, slot, 100_000_000_000, 0.9, 60);
        CollectionAssert.AreEqual(new[] { 1, 8, 32 }, fit);
        Assert.HasCount(1, skipped);
        StringAssert.StartsWith(skipped[0], "batch 128: prefilling 128 slots takes about 115 s");

        // Memory is reported before time; order is kept.
        (fit, skipped) = E2eBench.FitBatches([8, 1], slot, slot * 4, 100, 60);
        Assert.IsEmpty(fit);
        StringAssert.Contains(skipped[0], "cache");
        StringAssert.Contains(skipped[1], "prefilling 1 slot takes");
    }

    [TestMethod]
    [DataRow(1, 16384, 4096, 4)]
    [DataRow(8, 1024, 4096, 2)]
    [DataRow(3, 3000, 4096, 3)]
    [DataRow(5, 7, 4, 9)]
    [DataRow(128, 16384, 4096, 512)]
    [DataRow(0, 10, 4, 0)]
    public void PrefillStepsFeedEverySlotOnceInOrderWithinTheChunk(int slots, int tokens, int chunk, int expectedSteps)
    {
        var steps = E2eBench.PrefillSteps(slots, tokens, chunk);
        Assert.HasCount(expectedSteps, steps);
        var next = new int[slots];
        foreach (var step in steps)
        {
            Assert.IsNotEmpty(step);
            Assert.IsLessThanOrEqualTo(chunk, step.Sum(e => e.Count));
            Assert.AreEqual(step.Length, step.Select(e => e.Slot).Distinct().Count(), "a slot twice in one step");
            foreach (var (slot, position, count) in step)
            {
                Assert.AreEqual(next[slot], position, $"slot {slot}");
                Assert.IsGreaterThan(0, count);
                next[slot] += count;
            }
        }

        Assert.IsTrue(next.All(n => n == tokens), string.Join(",", next));
        // Packed: every step but the last is a full chunk.
        Assert.IsTrue(steps.SkipLast(1).All(s => s.Sum(e => e.Count) == chunk));
    }
}
