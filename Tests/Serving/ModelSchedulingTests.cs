using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Inference;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Model;
using DeepSeekCuda.Serving;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Serving;

/// <summary>
/// The scheduler and MTP speculative decoding on a real DeepSeek-V3-architecture model: the Tiny preset
/// (synthetic weights, one MTP layer) and tiny-a (the official reference's fixture model, MTP included).
/// Each request's greedy output is compared with plain token-by-token decoding of that request alone (a
/// <see cref="DeepSeekSession"/>): <see cref="PagedStepRunner"/> throughout, and <see cref="SessionStepRunner"/> where it applies (no drafts).
/// </summary>
[TestClass]
public sealed class ModelSchedulingTests
{
    private const int MaxLength = 256;
    private static SyntheticModel s_fixture = null!;
    private static DeepSeekModel s_tiny = null!;
    private static DeepSeekModel s_tinyNoMtp = null!;

    public TestContext TestContext { get; set; } = null!;

    [ClassInitialize]
    public static void Init(TestContext _)
    {
        s_fixture = SyntheticModel.Tiny("dscuda-serving", seed: 23, MaxLength);
        s_tiny = s_fixture.Model;
        s_tinyNoMtp = s_fixture.Load(s_fixture.Backend, o => o with { LoadMtp = false });
    }

    [ClassCleanup]
    public static void Cleanup()
    {
        s_tinyNoMtp.Dispose();
        s_fixture.Dispose();
    }

    /// <summary>A runner of the kind named: "session" or "paged".</summary>
    internal static IStepRunner Runner(string kind, DeepSeekModel model) => kind switch
    {
        "session" => new SessionStepRunner(model),
        "paged" => new PagedStepRunner(model),
        "paged-graphs" => new PagedStepRunner(model) { DecodeGraphs = true },
        _ => throw new ArgumentException(kind, nameof(kind)),
    };

    private static List<ScheduledResult> RunStaggered(string kind, DeepSeekModel model, bool speculative, int[][] prompts, int maxTokens, int maxTokensPerStep,
        out BatchScheduler scheduler, out KvBlockManager blocks, Func<int, bool>? forceRightDrafts = null)
    {
        blocks = new KvBlockManager(48, 8, KvBlockManager.BlocksFor(MaxLength));
        var runner = forceRightDrafts is null ? Runner(kind, model) : new RightDraftRunner(Runner(kind, model), model, forceRightDrafts);
        scheduler = new BatchScheduler(runner, blocks, new SchedulerOptions
        {
            MaxTokensPerStep = maxTokensPerStep,
            EosId = model.Config.EosTokenId,
            // On, not Auto: the random MTP layer would be switched off within these runs.
            SpeculativeDecoding = speculative ? SpeculativeDecodingMode.On : SpeculativeDecodingMode.Off,
        });
        var requests = new List<ScheduledRequest>();
        for (var i = 0; i < prompts.Length; i++)
        {
            requests.Add(scheduler.Submit(prompts[i], SamplingOptions.Greedy with { MaxTokens = maxTokens }));
            scheduler.Step(); // staggered: each arrives while the earlier ones are mid-prefill or decoding
        }

        while (requests.Any(r => !r.Completion.IsCompleted))
        {
            Assert.IsTrue(scheduler.Step());
        }

        runner.Dispose();
        return [.. requests.Select(r => r.Completion.Result)];
    }

    [TestMethod]
    [DataRow("session", false)]
    [DataRow("paged", false)]
    [DataRow("paged", true)]
    [DataRow("paged-graphs", true)]
    public void StaggeredBatchEqualsEachRequestAlone(string kind, bool speculative)
    {
        var model = s_tiny;
        int[][] prompts = [.. new[] { 9, 40, 1, 70, 23 }.Select((n, i) => SyntheticPrompts.Make(model.VocabSize, n, i))];
        var results = RunStaggered(kind, model, speculative, prompts, maxTokens: 24, maxTokensPerStep: 32, out var scheduler, out var blocks);
        using (scheduler)
        {
            Assert.AreEqual(speculative, scheduler.SpeculativeDecoding);
            for (var i = 0; i < prompts.Length; i++)
            {
                CollectionAssert.AreEqual(Alone.Run(model, prompts[i], SamplingOptions.Greedy with { MaxTokens = 24 }), results[i].Tokens.ToArray(), $"request {i}");
            }

            CheckCounters(scheduler, results, speculative);
            Assert.AreEqual(blocks.TotalBlocks, blocks.FreeBlocks);
        }
    }

    /// <summary>
    /// The synthetic MTP layer's random weights almost never guess right, so acceptance is forced: the
    /// runner is the real one (sessions, hiddens, MTP passes, rollbacks), but the draft it returns is the
    /// main model's true greedy token at two of three positions. Accepted drafts keep both verified
    /// positions in the real cache; the output must still equal plain decoding.
    /// </summary>
    [TestMethod]
    [DataRow("paged")]
    [DataRow("paged-graphs")]
    public void AcceptedDraftsKeepTheRealCacheExact(string kind)
    {
        var model = s_tiny;
        int[][] prompts = [.. new[] { 20, 3, 45 }.Select((n, i) => SyntheticPrompts.Make(model.VocabSize, n, 60 + i))];
        var results = RunStaggered(kind, model, true, prompts, maxTokens: 30, maxTokensPerStep: 24, out var scheduler, out var blocks, length => length % 3 != 0);
        using (scheduler)
        {
            for (var i = 0; i < prompts.Length; i++)
            {
                CollectionAssert.AreEqual(Alone.Run(model, prompts[i], SamplingOptions.Greedy with { MaxTokens = 30 }), results[i].Tokens.ToArray(), $"request {i}");
            }

            CheckCounters(scheduler, results, true);
            var c = scheduler.Counters;
            Assert.IsGreaterThan(0L, c.Accepted);
            Assert.IsLessThan(c.Drafted, c.Accepted);
            Assert.AreEqual(blocks.TotalBlocks, blocks.FreeBlocks);
        }
    }

    /// <summary>The real runner, with each draft replaced by the main model's greedy token (recomputed alone) where <c>right(length)</c>.</summary>
    private sealed class RightDraftRunner(IStepRunner inner, DeepSeekModel model, Func<int, bool> right) : DelegatingStepRunner(inner)
    {
        private readonly Dictionary<int, List<int>> _fed = [];

        public override void Open(int slot, bool drafts)
        {
            Inner.Open(slot, drafts);
            _fed[slot] = [];
        }

        public override void Close(int slot)
        {
            Inner.Close(slot);
            _fed.Remove(slot);
        }

        public override void Truncate(int slot, int length)
        {
            Inner.Truncate(slot, length);
            _fed[slot].RemoveRange(length, _fed[slot].Count - length);
        }

        public override void Forward(ReadOnlySpan<StepSequence> batch, Span<float> logits)
        {
            Inner.Forward(batch, logits);
            foreach (var e in batch)
            {
                _fed[e.Slot].AddRange(e.Tokens.ToArray());
            }
        }

        public override void Draft(ReadOnlySpan<DraftSequence> batch, Span<float> logits)
        {
            Inner.Draft(batch, logits); // keeps the MTP bookkeeping real
            var v = VocabSize;
            for (var i = 0; i < batch.Length; i++)
            {
                List<int> history = [.. _fed[batch[i].Slot], batch[i].NextToken];
                if (!right(history.Count))
                {
                    continue; // the MTP layer's own (almost always wrong) draft
                }

                using var session = model.CreateSession();
                var row = new float[v];
                session.Forward([.. history], row);
                var target = logits.Slice(i * v, v);
                target.Clear();
                target[Sampler.ArgMax(row)] = 1;
            }
        }
    }

    [TestMethod]
    public void SpeculativeDecodingIsOnByDefaultOnlyWithMtpWeights()
    {
        using var withMtp = new PagedStepRunner(s_tiny);
        using var without = new PagedStepRunner(s_tinyNoMtp);
        using var sessions = new SessionStepRunner(s_tiny);
        Assert.IsFalse(sessions.CanDraft, "the session runner never drafts");
        Assert.IsTrue(withMtp.CanDraft);
        Assert.IsFalse(without.CanDraft);
        using var on = new BatchScheduler(withMtp, new KvBlockManager(4, 1, 4));
        using var off = new BatchScheduler(without, new KvBlockManager(4, 1, 4));
        using var again = new PagedStepRunner(s_tiny); // a runner serves one scheduler (Attach)
        using var forcedOff = new BatchScheduler(again, new KvBlockManager(4, 1, 4), new SchedulerOptions { SpeculativeDecoding = SpeculativeDecodingMode.Off });
        Assert.IsTrue(on.SpeculativeDecoding);
        Assert.IsFalse(off.SpeculativeDecoding);
        Assert.IsFalse(forcedOff.SpeculativeDecoding);
    }

    /// <summary>
    /// The runner's incremental MTP bookkeeping (hiddens kept across prefill chunks, consumed by drafts, dropped by a
    /// rollback) against one MTP pass over the whole sequence from a fresh session, for two requests drafted together:
    /// after a chunked prefill (one row each), then with one rejecting its draft (one row) and the other accepting it (two
    /// rows), then the other way round, then after both accepted theirs and took one more plain step before drafting (the
    /// MTP layer catches up over the two positions left pending). With graphs, the verify steps, that step and the drafts
    /// replay their graphs.
    /// </summary>
    [TestMethod]
    [DataRow("paged")]
    [DataRow("paged-graphs")]
    public void RunnerDraftsEqualOneMtpPassOverTheWholeSequence(string kind)
    {
        var model = s_tiny;
        var v = model.VocabSize;
        int[][] prompts = [SyntheticPrompts.Make(v, 50, 7), SyntheticPrompts.Make(v, 37, 8)];
        using var runner = Runner(kind, model);
        var blocks = new KvBlockManager(8, 4, 4);
        runner.Attach(blocks, 96);
        blocks.Admit(1); // slot 0 taken by another request: the ones under test sit in slots 1 and 2
        var slots = prompts.Select(_ => blocks.Admit(60)).ToArray();
        foreach (var slot in slots)
        {
            runner.Open(slot, drafts: true);
        }

        List<int>[] fed = [[.. prompts[0]], [.. prompts[1]]];
        var logits = new float[4 * v];
        runner.Forward([new StepSequence(slots[0], 0, prompts[0][..30], 0), new StepSequence(slots[1], 0, prompts[1], 1)], logits);
        var next = new int[2];
        next[1] = Sampler.ArgMax(logits.AsSpan(0, v));
        runner.Forward([new StepSequence(slots[0], 30, prompts[0][30..], 1)], logits);
        next[0] = Sampler.ArgMax(logits.AsSpan(0, v));
        var draft = new float[2 * v];
        void Draft(string what)
        {
            runner.Draft([new DraftSequence(slots[0], next[0]), new DraftSequence(slots[1], next[1])], draft);
            for (var i = 0; i < 2; i++)
            {
                Tolerance.AssertMaxRel(draft.AsSpan(i * v, v), Reference(model, [.. fed[i], next[i]]), 1e-4, $"request {i}: draft {what}");
            }
        }

        Draft("after a chunked prefill");

        // Verify [next, draft] for both: request `wrong` gets a wrong draft, rolls back a position and goes on from the
        // corrected token; the other gets the main model's own token and keeps both positions.
        void Verify(int wrong, string? what)
        {
            var drafts = new int[2];
            for (var i = 0; i < 2; i++)
            {
                var right = GreedyNext(model, [.. fed[i], next[i]]);
                drafts[i] = i == wrong ? (right + 1) % v : right;
            }

            runner.Forward([.. Enumerable.Range(0, 2).Select(i => new StepSequence(slots[i], fed[i].Count, new[] { next[i], drafts[i] }, 2))], logits);
            for (var i = 0; i < 2; i++)
            {
                var first = Sampler.ArgMax(logits.AsSpan(2 * i * v, v));
                fed[i].Add(next[i]);
                if (i == wrong)
                {
                    Assert.AreNotEqual(drafts[i], first, $"request {i}: the wrong draft is not the model's token");
                    runner.Truncate(slots[i], fed[i].Count);
                    next[i] = first;
                }
                else
                {
                    Assert.AreEqual(drafts[i], first, $"request {i}: the right draft is the main model's own token");
                    fed[i].Add(drafts[i]);
                    next[i] = Sampler.ArgMax(logits.AsSpan((2 * i + 1) * v, v));
                }
            }

            if (what is not null)
            {
                Draft(what);
            }
        }

        Verify(wrong: 0, "after request 0 rejected and request 1 accepted its draft");
        Verify(wrong: 1, "after request 1 rejected and request 0 accepted its draft");
        Verify(wrong: -1, null);
        runner.Forward([.. Enumerable.Range(0, 2).Select(i => new StepSequence(slots[i], fed[i].Count, new[] { next[i] }, 1))], logits);
        for (var i = 0; i < 2; i++)
        {
            fed[i].Add(next[i]);
            next[i] = Sampler.ArgMax(logits.AsSpan(i * v, v));
        }

        Draft("after both accepted a draft and took a plain step");
        if (runner is PagedStepRunner { DecodeGraphs: true } paged)
        {
            Assert.AreEqual(2, paged.CapturedGraphs, "the verify steps (4 rows) replay one graph; the plain step (2 rows) has one");
            Assert.AreEqual(2, paged.CapturedDraftGraphs, "drafts of 2 and of 3 rows (buckets 2 and 4)");
        }
    }

    private static int GreedyNext(DeepSeekModel model, int[] tokens)
    {
        using var session = model.CreateSession();
        var row = new float[model.VocabSize];
        session.Forward(tokens, row);
        return Sampler.ArgMax(row);
    }

    [TestMethod]
    public void ForwardWithHiddensMatchesOnePrefillAndItsFinalNorm()
    {
        var model = s_tiny;
        int v = model.VocabSize, d = model.Config.HiddenSize;
        var ids = SyntheticPrompts.Make(v, 40, 3);
        float[] finalNorm = [];
        var all = model.ComputeLogits(ids, x =>
        {
            if (x.Name == "final_norm")
            {
                finalNorm = x.Values!;
            }
        });
        using var session = model.CreateSession();
        var hiddens = new float[25 * d];
        var first = session.Forward(ids.AsSpan(0, 25), 2, hiddens);
        var second = session.Forward(ids.AsSpan(25), 3, []);
        Assert.AreEqual(40, session.Length);
        Tolerance.AssertMaxRel(hiddens, finalNorm.AsSpan(0, 25 * d), 1e-5, "hiddens of the first chunk");
        Tolerance.AssertMaxRel(first, all.AsSpan(23 * v, 2 * v), 1e-4, "last two logit rows of the first chunk");
        Tolerance.AssertMaxRel(second, all.AsSpan(37 * v, 3 * v), 1e-4, "last three logit rows of the second chunk");
        Tolerance.AssertMaxRel(session.GetLastHidden(), finalNorm.AsSpan(39 * d, d), 1e-4, "last hidden");
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => session.Forward(ids.AsSpan(0, 2), 3, []));
        Assert.ThrowsExactly<ArgumentException>(() => session.Forward(ids.AsSpan(0, 2), 1, new float[d]));
    }

    /// <summary>Draft logits for the token after the last of <paramref name="tokens"/>: main hiddens of all but the last, MTP over all positions.</summary>
    private static float[] Reference(DeepSeekModel model, int[] tokens)
    {
        int v = model.VocabSize, d = model.Config.HiddenSize, n = tokens.Length - 1;
        using var session = model.CreateSession();
        var hiddens = new float[n * d];
        session.Forward(tokens.AsSpan(0, n), 1, hiddens);
        var all = session.MtpForward(hiddens, tokens.AsSpan(1), 0);
        return all[((n - 1) * v)..];
    }

    [TestMethod]
    [DataRow("paged")]
    [DataRow("paged-graphs")]
    public void TinyAGreedySpeculativeEqualsPlainDecoding(string kind)
    {
        // The fixture model's MTP layer is the reference's own; acceptance depends on its random weights.
        using var checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        using var model = DeepSeekModel.Load(checkpoint, s_fixture.Backend, new ModelOptions { MaxSequenceLength = MaxLength });
        Assert.IsTrue(model.HasMtp);
        int[][] prompts = [.. new[] { 12, 33, 5 }.Select((n, i) => SyntheticPrompts.Make(model.VocabSize, n, 40 + i))];
        var results = RunStaggered(kind, model, true, prompts, maxTokens: 20, maxTokensPerStep: 64, out var scheduler, out _);
        using (scheduler)
        {
            for (var i = 0; i < prompts.Length; i++)
            {
                CollectionAssert.AreEqual(Alone.Run(model, prompts[i], SamplingOptions.Greedy with { MaxTokens = 20 }), results[i].Tokens.ToArray(), $"request {i}");
            }

            CheckCounters(scheduler, results, true);
        }
    }

    /// <summary>
    /// tiny-a on the CPU's GpuEmulation (the GPU's numbers, where the naive and absorbed attention forms round differently):
    /// 64 greedy requests of 1 to 137 tokens submitted together under an 88-token step budget, so prompts are cut wherever
    /// the budget falls, beside decode rows, and a prompt's last token is often fed alone; each gives the ids of its session
    /// alone (the whole prompt in one forward, then a token at a time). Rows attend by their kind, not by the size of the cut.
    /// </summary>
    [TestMethod]
    public void TinyAEmulationBatchEqualsEachRequestAloneWhereverItsPromptIsCut()
    {
        const int Requests = 64, Tokens = 12;
        using var checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        using var backend = new CpuBackend(CpuNumerics.GpuEmulation);
        using var model = DeepSeekModel.Load(checkpoint, backend, new ModelOptions { MaxSequenceLength = MaxLength });
        var prompts = SyntheticPrompts.Staggered(model.VocabSize, Requests);
        var blocks = new KvBlockManager(Requests * KvBlockManager.BlocksFor(MaxLength), Requests, KvBlockManager.BlocksFor(MaxLength));
        using var runner = new PagedStepRunner(model);
        using var scheduler = new BatchScheduler(runner, blocks, new SchedulerOptions
        {
            MaxTokensPerStep = Requests + 24, EosId = model.Config.EosTokenId, SpeculativeDecoding = SpeculativeDecodingMode.Off,
        });
        var requests = prompts.Select(p => scheduler.Submit(p, SamplingOptions.Greedy with { MaxTokens = Tokens })).ToList();
        while (requests.Any(r => !r.Completion.IsCompleted))
        {
            Assert.IsTrue(scheduler.Step());
        }

        for (var i = 0; i < Requests; i++)
        {
            var alone = Alone.Run(model, prompts[i], SamplingOptions.Greedy with { MaxTokens = Tokens });
            CollectionAssert.AreEqual(alone, requests[i].Completion.Result.Tokens.ToArray(), $"request {i} ({prompts[i].Length} prompt tokens)");
        }

        Assert.AreEqual(blocks.TotalBlocks, blocks.FreeBlocks);
    }

    private void CheckCounters(BatchScheduler scheduler, List<ScheduledResult> results, bool speculative)
    {
        foreach (var r in results)
        {
            var c = r.Counters;
            Assert.AreEqual(r.Tokens.Count, c.GeneratedTokens);
            Assert.AreEqual(c.Steps + c.Accepted, c.GeneratedTokens, "tokens = steps + accepted");
            Assert.IsLessThanOrEqualTo(c.Drafted, c.Accepted);
        }

        var total = scheduler.Counters;
        Assert.AreEqual(results.Sum(r => r.Counters.Drafted), total.Drafted);
        Assert.AreEqual(results.Sum(r => r.Counters.Accepted), total.Accepted);
        Assert.AreEqual(total.Steps + total.Accepted, total.GeneratedTokens);
        if (speculative)
        {
            Assert.IsGreaterThan(0L, total.Drafted, "drafts were verified");
        }
        else
        {
            Assert.AreEqual(0L, total.Drafted);
        }

        TestContext.WriteLine($"{total.GeneratedTokens} tokens in {total.Steps} steps; drafted {total.Drafted}, accepted {total.Accepted} ({total.AcceptanceRate:P1})");
    }
}
