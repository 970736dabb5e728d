using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Bench.Benches;
using DeepSeekCuda.Inference;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Synthetic;
using DeepSeekCuda.Model;
using DeepSeekCuda.Tests.Loader;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Tools;

/// <summary>
/// The CPU-checkable pieces of <c>run-bench e2e</c> (the bench itself needs a GPU): the activation storage asked for,
/// the pool a slot needs, which (batch, context) combinations are measured and why the others are skipped, and how the
/// slots are prefilled in steps of at most one chunk, and the bench's slots driven on the CPU backend: a batched decode
/// step gives each slot the logits a session gives it alone, and rewinding makes every run the same.
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
    public void TheActivationStorageIsF32UnlessBf16IsAskedForAndAnythingElseIsRefused()
    {
        Assert.IsFalse(E2eBench.Bf16Activations(null));
        Assert.IsFalse(E2eBench.Bf16Activations(""));
        Assert.IsFalse(E2eBench.Bf16Activations("f32"));
        Assert.IsTrue(E2eBench.Bf16Activations("bf16"));
        var e = Assert.ThrowsExactly<ArgumentException>(() => E2eBench.Bf16Activations("BF16x"));
        Assert.AreEqual("DSCUDA_E2E_ACTIVATIONS=BF16x: expected f32 or bf16", e.Message);
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

    [TestMethod]
    public void BatchedDecodeOfPrefilledSlotsMatchesEachSessionAloneAndRepeats()
    {
        const int context = 40;
        using var dir = new TempDir();
        SyntheticCheckpoint.Write(dir.Path, ModelPresets.Tiny, seed: 5);
        using var checkpoint = Checkpoint.Open(dir.Path);
        using var backend = new CpuBackend();
        using var model = DeepSeekModel.Load(checkpoint, backend, new ModelOptions { MaxSequenceLength = context + 1, LoadMtp = false });
        var v = model.VocabSize;
        var rng = new Random(5);
        var prompt = Enumerable.Range(0, context).Select(_ => rng.Next(v)).ToArray();
        int[] next = [3, v - 1, 11];

        // Chunks of 32: slot 0 alone in two steps, then slots 1 and 2 packed into steps of 32 tokens across them.
        using var paged = new E2eBench.PagedSlots(model, context, maxBatch: 3, prompt, chunk: 32);
        paged.Prefill(1);
        var prefilled = paged.Logits.AsSpan(0, v).ToArray();
        Assert.IsGreaterThan(0, paged.PrefillFirst());
        Tolerance.AssertMaxRel(paged.Logits.AsSpan(0, v), prefilled, 0, "slot 0 prefilled again");
        paged.Prefill(3);
        Assert.AreEqual(3, paged.Count);

        Assert.IsGreaterThan(0, paged.Decode(next, downloadLogits: true));
        var first = paged.Logits.AsSpan(0, 3 * v).ToArray();
        paged.Decode(next, downloadLogits: true);
        Tolerance.AssertMaxRel(paged.Logits.AsSpan(0, 3 * v), first, 0, "the same step after a rewind");
        paged.Decode(next.AsSpan(0, 1), downloadLogits: true);
        Tolerance.AssertMaxRel(paged.Logits.AsSpan(0, v), first.AsSpan(0, v), 1e-5, "batch 1 after batch 3");

        // The timed step: the same step with each slot's greedy token chosen on the backend, only the ids back.
        Assert.IsGreaterThan(0, paged.Decode(next));
        for (var b = 0; b < next.Length; b++)
        {
            Assert.AreEqual(Sampler.ArgMax(first.AsSpan(b * v, v)), paged.Chosen[b], $"slot {b}: the greedy id of its logits");
        }

        using var session = model.CreateSession();
        var alone = new float[v];
        session.Forward(prompt, alone);
        Tolerance.AssertMaxRel(prefilled, alone, 1e-5, "prefill logits");
        for (var b = 0; b < next.Length; b++)
        {
            session.Truncate(context);
            session.Forward([next[b]], alone);
            Tolerance.AssertMaxRel(first.AsSpan(b * v, v), alone, 1e-5, $"slot {b} decoded in the batch");
        }
    }
}
