using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Inference;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Synthetic;
using DeepSeekCuda.Model;
using DeepSeekCuda.Serving;
using DeepSeekCuda.Tests.Distributed;
using DeepSeekCuda.Tests.Inference;
using DeepSeekCuda.Tests.Model;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Serving;

/// <summary>
/// <see cref="PagedStepRunner"/> on the CPU backend: the official reference through batched, paged steps; seeded
/// sampling, preemption and cancellation under the scheduler against each request alone (a <see cref="DeepSeekSession"/>);
/// no backend allocation in a step after warm-up; refused steps that change nothing.
/// </summary>
[TestClass]
public sealed class PagedStepRunnerTests
{
    private const int MaxLength = 256;
    private static SyntheticModel s_fixture = null!;
    private static DeepSeekModel s_tiny = null!;

    public TestContext TestContext { get; set; } = null!;

    [ClassInitialize]
    public static void Init(TestContext _)
    {
        s_fixture = SyntheticModel.Tiny("dscuda-paged", seed: 29, MaxLength);
        s_tiny = s_fixture.Model;
    }

    [ClassCleanup]
    public static void Cleanup() => s_fixture.Dispose();

    /// <summary>The synthetic model on a backend that counts its calls (<see cref="RecordingBackend"/> over a CPU backend of its own).</summary>
    // The constrained-request tests' two kinds of request: greedy, and a seeded draw.
    private static readonly SamplingOptions Greedy12 = SamplingOptions.Greedy with { MaxTokens = 12 };
    private static readonly SamplingOptions Seeded12 = new() { Temperature = 0.9f, TopK = 20, TopP = 0.9f, Seed = 5, MaxTokens = 12 };

    private static DeepSeekModel CountingModel(out RecordingBackend counting)
    {
        counting = new RecordingBackend(new CpuBackend());
        return s_fixture.Load(counting);
    }

    /// <summary>A scheduler over <paramref name="runner"/> with 4 slots in 40 blocks and 32 tokens a step, drafting or not.</summary>
    private static BatchScheduler Scheduler(PagedStepRunner runner, DeepSeekModel model, SpeculativeDecodingMode drafts) =>
        new(runner, new KvBlockManager(40, 4, KvBlockManager.BlocksFor(MaxLength)),
            new SchedulerOptions { MaxTokensPerStep = 32, EosId = model.Config.EosTokenId, SpeculativeDecoding = drafts });

    /// <summary>Steps <paramref name="scheduler"/> until each of <paramref name="requests"/> is complete.</summary>
    internal static void StepUntilDone(BatchScheduler scheduler, params ScheduledRequest[] requests)
    {
        while (requests.Any(r => !r.Completion.IsCompleted))
        {
            scheduler.Step();
        }
    }

    /// <summary>
    /// tiny-a's three reference prompts in one batch, two tokens per entry per step with both logit rows: every
    /// position's logits against the official reference (tolerance (i)); then their greedy continuations decoded
    /// together, ids exact and step logits within the same tolerance.
    /// </summary>
    [TestMethod]
    [DataRow(AttentionForm.Auto)]
    [DataRow(AttentionForm.Absorbed)]
    [DataRow(AttentionForm.Naive)]
    public void TinyAReferenceThroughBatchedPagedSteps(AttentionForm form)
    {
        using var checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        using var reference = new TinyAReference();
        using var backend = new CpuBackend();
        using var model = DeepSeekModel.Load(checkpoint, backend, new ModelOptions { Attention = form, MaxSequenceLength = MaxLength });
        var v = model.VocabSize;
        var prompts = TinyAReference.Prompts.ToArray();
        var ids = prompts.Select(reference.Ids).ToArray();
        var blocks = new KvBlockManager(32, 4, KvBlockManager.BlocksFor(MaxLength));
        using var runner = new PagedStepRunner(model);
        runner.Attach(blocks, 16);
        blocks.Admit(1); // slot 0 holds another request: the ones under test use later slots and interleaved blocks
        var slots = new int[prompts.Length];
        var got = new float[prompts.Length][];
        for (var i = 0; i < prompts.Length; i++)
        {
            slots[i] = blocks.Admit(1);
            runner.Open(slots[i], drafts: false);
            got[i] = new float[ids[i].Length * v];
        }

        var fed = new int[prompts.Length];
        var logits = new float[2 * prompts.Length * v];
        while (fed.Select((f, i) => f < ids[i].Length).Any(x => x))
        {
            var batch = new List<StepSequence>();
            var owners = new List<int>();
            for (var i = 0; i < prompts.Length; i++)
            {
                var n = Math.Min(2, ids[i].Length - fed[i]);
                if (n > 0)
                {
                    blocks.Reserve(slots[i], fed[i] + n);
                    batch.Add(new StepSequence(slots[i], fed[i], ids[i][fed[i]..(fed[i] + n)], n));
                    owners.Add(i);
                }
            }

            runner.Forward(batch.ToArray(), logits);
            var offset = 0;
            for (var k = 0; k < batch.Count; k++)
            {
                var i = owners[k];
                var n = batch[k].Tokens.Length;
                logits.AsSpan(offset, n * v).CopyTo(got[i].AsSpan(fed[i] * v));
                offset += n * v;
                fed[i] += n;
            }
        }

        for (var i = 0; i < prompts.Length; i++)
        {
            var c = Tolerance.AssertMaxRel(got[i], reference.F32(prompts[i] + ".logits"), 1e-4, $"{prompts[i]}.logits, batched paged steps ({form})");
            TestContext.WriteLine(Tolerance.Describe($"{prompts[i]}.logits ({form})", c));
        }

        // Greedy continuations together: step j feeds each prompt's greedy token j - 1.
        var greedy = prompts.Select(reference.Greedy).ToArray();
        var steps = new float[prompts.Length][];
        for (var i = 0; i < prompts.Length; i++)
        {
            steps[i] = new float[greedy[i].Length * v];
            got[i].AsSpan((ids[i].Length - 1) * v, v).CopyTo(steps[i]);
            Assert.AreEqual(greedy[i][0], Sampler.ArgMax(steps[i].AsSpan(0, v)), $"{prompts[i]} greedy id 0");
        }

        for (var j = 1; j < greedy.Max(g => g.Length); j++)
        {
            var owners = Enumerable.Range(0, prompts.Length).Where(i => j < greedy[i].Length).ToArray();
            foreach (var i in owners)
            {
                blocks.Reserve(slots[i], fed[i] + 1);
            }

            runner.Forward([.. owners.Select(i => new StepSequence(slots[i], fed[i]++, new[] { greedy[i][j - 1] }, 1))], logits);
            for (var k = 0; k < owners.Length; k++)
            {
                var i = owners[k];
                logits.AsSpan(k * v, v).CopyTo(steps[i].AsSpan(j * v));
                Assert.AreEqual(greedy[i][j], Sampler.ArgMax(steps[i].AsSpan(j * v, v)), $"{prompts[i]} greedy id {j}");
            }
        }

        for (var i = 0; i < prompts.Length; i++)
        {
            Tolerance.AssertMaxRel(steps[i], reference.F32(prompts[i] + ".step_logits"), 1e-4, $"{prompts[i]}.step_logits, decoded together ({form})");
        }
    }

    private static List<ScheduledResult> Run(IStepRunner runner, KvBlockManager blocks, SchedulerOptions options, (int[] Prompt, SamplingOptions Sampling)[] requests,
        out BatchScheduler scheduler, Action<BatchScheduler, List<ScheduledRequest>, int>? eachStep = null)
    {
        scheduler = new BatchScheduler(runner, blocks, options);
        var submitted = new List<ScheduledRequest>();
        var step = 0;
        foreach (var (prompt, sampling) in requests)
        {
            submitted.Add(scheduler.Submit(prompt, sampling));
            scheduler.Step(); // staggered: each arrives while the earlier ones are mid-prefill or decoding
            eachStep?.Invoke(scheduler, submitted, step++);
        }

        while (submitted.Any(r => !r.Completion.IsCompleted))
        {
            scheduler.Step();
            eachStep?.Invoke(scheduler, submitted, step++);
        }

        return [.. submitted.Select(r => r.Completion.IsCompletedSuccessfully ? r.Completion.Result : null!)];
    }

    /// <summary>
    /// Seeded sampling and greedy requests on a pool too small for all of them: growth preempts requests, which
    /// prefill again later; every output equals its request alone, and every block comes back. So it does with
    /// speculative decoding (verify steps and drafts), with decode graphs, and with both.
    /// </summary>
    [TestMethod]
    [DataRow(false, false)]
    [DataRow(true, false)]
    [DataRow(false, true)]
    [DataRow(true, true)]
    public void SeededSamplingUnderPreemptionEqualsEachRequestAlone(bool speculative, bool graphs)
    {
        var model = s_tiny;
        var requests = SyntheticPrompts.Mixed(model.VocabSize, seed: 5, salt: 100, temperature: 0.8f, topP: 0.95f, samplingSeed: 17);
        var blocks = new KvBlockManager(7, 6, KvBlockManager.BlocksFor(MaxLength));
        using var runner = new PagedStepRunner(model) { DecodeGraphs = graphs };
        var results = Run(runner, blocks, new SchedulerOptions
        {
            MaxTokensPerStep = 24,
            EosId = model.Config.EosTokenId,
            SpeculativeDecoding = speculative ? SpeculativeDecodingMode.On : SpeculativeDecodingMode.Off,
        }, requests, out var scheduler);
        using (scheduler)
        {
            for (var i = 0; i < requests.Length; i++)
            {
                CollectionAssert.AreEqual(Alone.Run(model, requests[i].Prompt, requests[i].Sampling), results[i].Tokens.ToArray(), $"request {i}");
            }

            Assert.IsGreaterThan(0L, scheduler.Preemptions, "the pool is too small for every request at once");
            Assert.AreEqual(blocks.TotalBlocks, blocks.FreeBlocks);
            Assert.AreEqual(blocks.MaxRequests, blocks.FreeSlots);
            Assert.AreEqual(speculative, scheduler.Counters.Drafted > 0, $"{scheduler.Counters.Drafted} drafts");
            Assert.AreEqual(graphs, runner.CapturedGraphs > 0, $"{runner.CapturedGraphs} decode graphs");
            TestContext.WriteLine($"preemptions {scheduler.Preemptions}, drafted {scheduler.Counters.Drafted}, accepted {scheduler.Counters.Accepted}, " +
                                  $"graphs {runner.CapturedGraphs}");
        }
    }

    /// <summary>Requests cancelled mid-prefill, mid-decode and while waiting: their blocks come back, and the others' outputs are their alone outputs.</summary>
    [TestMethod]
    public void CancellationReturnsEveryBlockAndLeavesTheOthersExact()
    {
        var model = s_tiny;
        var requests = new[] { 70, 12, 40, 9 }.Select((n, i) => (SyntheticPrompts.Make(model.VocabSize, n, 200 + i), SamplingOptions.Greedy with { MaxTokens = 40 })).ToArray();
        var blocks = new KvBlockManager(40, 3, KvBlockManager.BlocksFor(MaxLength));
        using var runner = new PagedStepRunner(model);
        var cancelled = new HashSet<int>();
        List<ScheduledRequest> all = [];
        var results = Run(runner, blocks, new SchedulerOptions { MaxBatch = 3, MaxTokensPerStep = 16, EosId = model.Config.EosTokenId }, requests, out var scheduler,
            (s, submitted, step) =>
            {
                all = submitted;
                if (step == 1)
                {
                    submitted[0].Cancel(); // its 70-token prompt is still being prefilled in 16-token chunks
                    cancelled.Add(0);
                }

                if (step == 4)
                {
                    Assert.IsGreaterThan(0, submitted[1].Generated, "request 1 is decoding");
                    submitted[1].Cancel();
                    cancelled.Add(1);
                }

                if (step == 5 && submitted.Count == 4 && !submitted[3].Completion.IsCompleted)
                {
                    submitted[3].Cancel();
                    cancelled.Add(3);
                }
            });
        using (scheduler)
        {
            for (var i = 0; i < requests.Length; i++)
            {
                if (!cancelled.Contains(i))
                {
                    CollectionAssert.AreEqual(Alone.Run(model, requests[i].Item1, requests[i].Item2), results[i].Tokens.ToArray(), $"request {i}");
                }
            }

            foreach (var i in cancelled)
            {
                Assert.IsTrue(all[i].Completion.IsCanceled, $"request {i} ends cancelled");
            }

            Assert.AreEqual(blocks.TotalBlocks, blocks.FreeBlocks);
            Assert.AreEqual(blocks.MaxRequests, blocks.FreeSlots);
        }
    }

    /// <summary>
    /// The allocation-counting double: once the scheduler has attached the runner, no step allocates on the backend, from
    /// the first one (a staggered batch with chunked prefill, decode, drafts, verification and preemption); the step
    /// buffers planned from the config are exactly those the steps use; the block table is copied only when it changed.
    /// </summary>
    [TestMethod]
    public void StepsAllocateNothingOnTheBackend()
    {
        using var model = CountingModel(out var counting);
        var loaded = counting.Allocations;
        var blocks = new KvBlockManager(5, 4, KvBlockManager.BlocksFor(MaxLength));
        using var runner = new PagedStepRunner(model);
        var options = new SchedulerOptions { MaxTokensPerStep = 32, EosId = model.Config.EosTokenId, SpeculativeDecoding = SpeculativeDecodingMode.On };
        using var scheduler = new BatchScheduler(runner, blocks, options);
        var attached = counting.Allocations;
        Assert.IsGreaterThan(loaded, attached, "attaching allocates the pools, the table and the step buffers");

        var requests = new[] { 60, 3, 33, 90, 17 }.Select((n, i) => scheduler.Submit(SyntheticPrompts.Make(model.VocabSize, n, 300 + i), SamplingOptions.Greedy with { MaxTokens = 30 })).ToList();
        var steps = 0;
        while (requests.Any(r => !r.Completion.IsCompleted))
        {
            scheduler.Step();
            steps++;
            Assert.AreEqual(attached, counting.Allocations, $"step {steps} allocated on the backend");
        }

        CollectionAssert.AreEqual(Array.Empty<string>(), runner.UnusedStepBuffers.ToArray(), "planned step buffers that no step used");
        Assert.IsLessThan(steps, counting.TableUploads, "steps whose table did not change do not copy it");
        Assert.IsGreaterThan(0L, scheduler.Preemptions, "the pool is too small for every request at once");
        Assert.IsGreaterThan(0L, scheduler.Counters.Drafted);
        Assert.AreEqual(blocks.TotalBlocks, blocks.FreeBlocks);
        TestContext.WriteLine($"{steps} steps, {counting.TableUploads} table copies, {attached - loaded} allocations at attach");
    }

    /// <summary>
    /// Tokens are chosen where the logits are: steps of greedy and seeded requests, drafts included, bring back ids and no logits; a
    /// constrained request's rows (here a constraint that allows everything) come back as logits and are sampled on the
    /// host under the same rule and draw counter, so its tokens equal the unconstrained request's alone.
    /// </summary>
    [TestMethod]
    public void OnlyIdsComeBackUnlessTheHostMustSeeTheRow()
    {
        using var model = CountingModel(out var counting);
        var v = model.VocabSize;
        using var runner = new PagedStepRunner(model);
        using var scheduler = Scheduler(runner, model, SpeculativeDecodingMode.On);
        var prompts = new[] { 20, 7, 33 }.Select((n, i) => SyntheticPrompts.Make(v, n, 400 + i)).ToArray();
        SamplingOptions[] sampling = [Greedy12, Seeded12];
        var free = new[] { scheduler.Submit(prompts[0], sampling[0]), scheduler.Submit(prompts[1], sampling[1]) };
        StepUntilDone(scheduler, free);

        Assert.AreEqual(0L, counting.DownloadedValues, "no logits came back for unconstrained requests, drafts included");
        Assert.IsGreaterThan(0L, scheduler.Counters.Drafted);
        Assert.AreEqual(counting.Choices.Rows, counting.Choices.Chosen, "every row was chosen on the backend");
        for (var i = 0; i < free.Length; i++)
        {
            CollectionAssert.AreEqual(Alone.Run(model, prompts[i], sampling[i]), free[i].Completion.Result.Tokens.ToArray(), $"request {i}");
        }

        // The references above ran sessions on the same backend: count from here.
        var (downloaded, choices) = (counting.DownloadedValues, counting.Choices);
        var constrained = scheduler.Submit(prompts[2], sampling[1], new AllowAll());
        var alongside = scheduler.Submit(prompts[0], sampling[0]);
        StepUntilDone(scheduler, constrained, alongside);

        var hostRows = counting.Choices.Rows - choices.Rows - (counting.Choices.Chosen - choices.Chosen);
        Assert.AreEqual(hostRows * v, counting.DownloadedValues - downloaded, "exactly the rows not chosen on the backend came back");
        Assert.IsGreaterThanOrEqualTo(constrained.Completion.Result.Tokens.Count, hostRows, "each of the constrained request's tokens came from a row on the host");
        CollectionAssert.AreEqual(Alone.Run(model, prompts[2], sampling[1]), constrained.Completion.Result.Tokens.ToArray(), "sampled on the host, the same tokens");
        CollectionAssert.AreEqual(Alone.Run(model, prompts[0], sampling[0]), alongside.Completion.Result.Tokens.ToArray(), "its neighbour");
    }

    /// <summary>After n tokens, only ids i with (i + n) mod 3 = 0, none past the tokenizer's <paramref name="limit"/>.</summary>
    private sealed class EveryThirdId(int limit, bool hostOnly = false) : PredicateConstraint(hostOnly)
    {
        private int _steps;

        public override bool Allows(int id) => id < limit && (id + _steps) % 3 == 0;

        protected override void Moved(int tokenId) => _steps++;
    }

    /// <summary>
    /// A constrained request whose constraint writes its allowed ids is chosen on the backend among them, like a free one:
    /// without drafts no logits come back at all, and its tokens equal the request alone with each row masked on the host;
    /// so they do where decode steps replay graphs (the masks set before each replay, the choice inside it).
    /// </summary>
    [TestMethod]
    [DataRow(false)]
    [DataRow(true)]
    public void AConstraintsAllowedIdsAreChosenOnTheBackendAndOnlyIdsComeBack(bool graphs)
    {
        using var model = CountingModel(out var counting);
        var v = model.VocabSize;
        using var runner = new PagedStepRunner(model) { DecodeGraphs = graphs };
        using var scheduler = Scheduler(runner, model, SpeculativeDecodingMode.Off);
        var prompts = new[] { 20, 7, 33 }.Select((n, i) => SyntheticPrompts.Make(v, n, 700 + i)).ToArray();
        SamplingOptions[] sampling = [Greedy12, Seeded12, Greedy12];
        var constraints = new[] { new EveryThirdId(v - 5), new EveryThirdId(v - 5), null };
        var requests = Enumerable.Range(0, 3).Select(i => scheduler.Submit(prompts[i], sampling[i], constraints[i])).ToArray();
        StepUntilDone(scheduler, requests);

        Assert.AreEqual(0L, counting.DownloadedValues, "no logits came back, the constrained requests' included");
        Assert.AreEqual(counting.Choices.Rows, counting.Choices.Chosen, "every row was chosen on the backend");
        Assert.AreEqual(0, constraints[0]!.Masks + constraints[1]!.Masks, "no row was masked on the host");
        Assert.AreEqual(graphs, counting.Operations.Any(o => o.StartsWith("ReplayGraph(", StringComparison.Ordinal)), "decode steps replayed graphs");
        for (var i = 0; i < requests.Length; i++)
        {
            var hostMasked = constraints[i] is null ? null : new EveryThirdId(v - 5, hostOnly: true);
            var want = Alone.Run(model, prompts[i], sampling[i], hostMasked);
            CollectionAssert.AreEqual(want, requests[i].Completion.Result.Tokens.ToArray(), $"request {i}");
            Assert.AreEqual(hostMasked is null ? 0 : want.Count, hostMasked?.Masks ?? 0, "the reference masked every row on the host");
        }
    }

    private sealed class AllowAll : ITokenConstraint
    {
        public void Mask(Span<float> logits)
        {
        }

        public void Advance(int tokenId)
        {
        }
    }

    /// <summary>
    /// A step whose prefill chunk is listed first and whose decode entries (a token; a token and its draft) come after: RoPE and
    /// the latent append run once per layer over every row, the decode rows attend in one call per layer and the chunk in one
    /// of its own, nothing per entry; the logits come back in batch order and equal each sequence's session fed the same.
    /// </summary>
    [TestMethod]
    public void DecodeRowsAttendInOneCallPerLayerAndLogitsKeepBatchOrder()
    {
        using var model = CountingModel(out var counting);
        var v = model.VocabSize;
        var layers = model.Config.NumHiddenLayers;
        var blocks = new KvBlockManager(16, 4, KvBlockManager.BlocksFor(MaxLength));
        using var runner = new PagedStepRunner(model);
        runner.Attach(blocks, 96);
        var prompts = new[] { 9, 70, 6, 11 }.Select((n, i) => SyntheticPrompts.Make(v, n, 500 + i)).ToArray();
        int[] history = [0, 68, 5, 9]; // fed before the step under test; the step feeds the rest (11, 2, 1, 2 tokens)
        var slots = new int[prompts.Length];
        for (var i = 0; i < prompts.Length; i++)
        {
            slots[i] = blocks.Admit(prompts[i].Length);
            runner.Open(slots[i], drafts: false);
        }

        var warm = Enumerable.Range(1, 3).Select(i => new StepSequence(slots[i], 0, prompts[i][..history[i]], 0)).ToArray();
        runner.Forward(warm, []);

        // Batch order: the prefill chunk (slot 0, 9 tokens), then a verify pair, a single token, another pair; logits for
        // the chunk's last row and every decode row.
        StepSequence[] batch = [.. Enumerable.Range(0, prompts.Length).Select(i =>
            new StepSequence(slots[i], history[i], prompts[i][history[i]..], i == 0 ? 1 : prompts[i].Length - history[i]))];
        var first = counting.Operations.Count;
        var logits = new float[batch.Sum(e => e.LogitRows) * v];
        runner.Forward(batch, logits);
        string[] attention = ["ApplyRope", "ApplyRopeRows", "AppendLatent", "AppendLatentRows", "MlaAttentionNaive", "MlaAttentionAbsorbed", "MlaAttentionRows"];
        var step = counting.Calls(first).Where(c => attention.Contains(c.Key)).ToDictionary();
        var expected = new Dictionary<string, int>
        {
            ["ApplyRopeRows"] = layers, ["AppendLatentRows"] = layers, ["MlaAttentionRows"] = layers, ["MlaAttentionNaive"] = layers,
        };
        CollectionAssert.AreEquivalent(expected.ToList(), step.Where(c => c.Value != 0).ToList(),
            $"calls in the step: {string.Join(", ", step.Where(c => c.Value != 0).Select(c => $"{c.Key} {c.Value}"))}");

        var row = 0;
        for (var i = 0; i < prompts.Length; i++)
        {
            using var session = model.CreateSession();
            var wanted = batch[i].LogitRows;
            if (history[i] > 0)
            {
                session.Forward(prompts[i][..history[i]], new float[v]);
            }

            var reference = session.Forward(prompts[i][history[i]..], wanted, default);
            var c = Tolerance.AssertMaxRel(logits.AsSpan(row * v, wanted * v), reference, 1e-5, $"entry {i} (slot {slots[i]}, {wanted} logit rows)");
            TestContext.WriteLine(Tolerance.Describe($"entry {i}", c));
            row += wanted;
        }
    }

    /// <summary>
    /// A request's numbers do not depend on how its prompt and the tokens after it are cut into steps. tiny-a's weights on the
    /// CPU's GpuEmulation (where the naive and absorbed forms round differently): a 25-token prompt fed whole, as 24 + 1 (the
    /// scheduler feeds a prompt's last token alone when that is all that is left), as 3 + 20 + 2 and as 1 + 1 + 23, each then
    /// decoding two tokens one at a time; and the 27 tokens fed again as a preempted request is, at once or as 20 + 7 (a chunk
    /// across the prompt's end). The last prompt row's logits and the two decode rows' are bitwise equal in every cut. Told
    /// nothing of the prompt (−1), the 24 + 1 cut attends its last row absorbed, and its logits differ: the difference guarded.
    /// </summary>
    [TestMethod]
    public void ARequestsNumbersDoNotDependOnHowItIsCutIntoSteps()
    {
        using var checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        using var backend = new CpuBackend(CpuNumerics.GpuEmulation);
        using var model = DeepSeekModel.Load(checkpoint, backend, new ModelOptions { MaxSequenceLength = MaxLength });
        var v = model.VocabSize;
        var prompt = SyntheticPrompts.Make(v, 25, 41);
        int[] decoded = [7, 300];
        int[] all = [.. prompt, .. decoded];
        var blocks = new KvBlockManager(8, 2, KvBlockManager.BlocksFor(MaxLength));
        using var runner = new PagedStepRunner(model);
        runner.Attach(blocks, 32);

        // The logits of rows 24, 25 and 26 (the prompt's last token, then each decoded one): the entries cut the 27 tokens as
        // given, each asking for its rows among those three.
        float[] Run(int[] cuts, int promptLength)
        {
            var slot = blocks.Admit(all.Length);
            runner.Open(slot, drafts: false);
            var logits = new float[3 * v];
            var fed = 0;
            foreach (var cut in cuts)
            {
                var wanted = Math.Clamp(fed + cut - (prompt.Length - 1), 0, cut);
                var step = new float[wanted * v];
                runner.Forward([new StepSequence(slot, fed, all[fed..(fed + cut)], wanted, promptLength)], step);
                step.CopyTo(logits.AsSpan(Math.Max(0, fed + cut - wanted - (prompt.Length - 1)) * v));
                fed += cut;
            }

            runner.Close(slot);
            blocks.Free(slot);
            return logits;
        }

        var whole = Run([25, 1, 1], prompt.Length);
        foreach (var cuts in new[] { new[] { 24, 1, 1, 1 }, [3, 20, 2, 1, 1], [1, 1, 23, 1, 1], [27], [20, 7] })
        {
            var got = Run(cuts, prompt.Length);
            for (var i = 0; i < got.Length; i++)
            {
                Assert.AreEqual(BitConverter.SingleToInt32Bits(whole[i]), BitConverter.SingleToInt32Bits(got[i]),
                    $"cut {string.Join(" + ", cuts)}: row {24 + i / v}, id {i % v}: {got[i]:R} against {whole[i]:R} fed whole");
            }
        }

        var unknown = Run([24, 1, 1, 1], -1);
        Assert.IsFalse(unknown.AsSpan(0, v).SequenceEqual(whole.AsSpan(0, v)), "the prompt's last row alone, told nothing of the prompt, attends absorbed");
    }

    /// <summary>
    /// Decode and verify steps of one row count queue the same operations with the same host values whatever tokens, slots,
    /// positions and entries their rows hold (other tokens, another order, a slot crossing a block boundary, another slot
    /// joining, an entry of a token and a draft in place of two entries): after the step's uploads its work depends on its
    /// row count only, as one CUDA graph per row bucket needs. The embedding reads the tokens from the step rows, never as
    /// host ids.
    /// </summary>
    [TestMethod]
    public void DecodeStepsOfOneSizeQueueTheSameOperationsWhateverTheirRows()
    {
        using var model = CountingModel(out var counting);
        var v = model.VocabSize;
        var blocks = new KvBlockManager(16, 4, KvBlockManager.BlocksFor(MaxLength));
        using var runner = new PagedStepRunner(model);
        runner.Attach(blocks, 128);
        int[] fed = [5, 63, 20, 9]; // slot 1's first decode writes the last position of its first block
        var slots = new int[fed.Length];
        for (var i = 0; i < fed.Length; i++)
        {
            slots[i] = blocks.Admit(fed[i]);
            runner.Open(slots[i], drafts: false);
        }

        runner.Forward([.. Enumerable.Range(0, fed.Length).Select(i => new StepSequence(slots[i], 0, SyntheticPrompts.Make(v, fed[i], 40 + i), 0))], []);
        var r = new Random(77);
        // Entry i feeds one token, or two (a token and a draft, both verified) where i is in verifying.
        string[] Step(int[] entries, params int[] verifying)
        {
            var first = counting.Operations.Count;
            var counts = entries.Select(i => verifying.Contains(i) ? 2 : 1).ToArray();
            var batch = entries.Select((i, j) => new StepSequence(slots[i], fed[i], Enumerable.Range(0, counts[j]).Select(_ => r.Next(v)).ToArray(), counts[j])).ToArray();
            for (var j = 0; j < entries.Length; j++)
            {
                blocks.Reserve(slots[entries[j]], fed[entries[j]] += counts[j]);
            }

            var rows = counts.Sum();
            var tokens = new int[rows];
            runner.ForwardAndChoose(batch, [.. Enumerable.Repeat(TokenChoice.Greedy(v), rows)], tokens, new float[rows * v]);
            return [.. counting.Operations.Skip(first)];
        }

        string[] Decode(params int[] entries) => Step(entries);

        void Same(string[] want, string[] got, string what)
        {
            var i = Enumerable.Range(0, Math.Min(want.Length, got.Length)).FirstOrDefault(k => want[k] != got[k], Math.Min(want.Length, got.Length));
            Assert.IsTrue(want.Length == got.Length && i == want.Length,
                $"{what}: {want.Length} and {got.Length} operations; the first difference, at {i}: {want.ElementAtOrDefault(i)} vs {got.ElementAtOrDefault(i)}");
        }

        var a = Decode(0, 1, 2);
        Same(a, Decode(2, 1, 3), "slots 2, 1, 3 (slot 1 into its second block, slot 3 joining)");
        Same(a, Decode(3, 0, 1), "slots 3, 0, 1");
        Same(a, Step([2, 0], 2), "slot 2 verifying a draft, then slot 0");
        Same(a, Step([3, 1], 1), "slot 3, then slot 1 verifying a draft");
        Assert.AreEqual(1, a.Count(o => o.StartsWith("EmbeddingRows(", StringComparison.Ordinal)), "one embedding of the step rows' tokens");
        Assert.IsFalse(a.Any(o => o.StartsWith("Embedding(", StringComparison.Ordinal)), "no embedding of host ids");
        Assert.IsFalse(a.Any(o => o.StartsWith("CopyRows(", StringComparison.Ordinal)), "the head reads the decode rows where they are");
        var two = Decode(0, 2);
        Assert.IsFalse(two.SequenceEqual(a), "a step of another size queues other shapes");
        TestContext.WriteLine($"a decode step of 3 rows: {a.Length} operations, the first {a[0]}");
    }

    /// <summary>
    /// Decode and verify steps as graphs (<see cref="PagedStepRunner.DecodeGraphs"/>) against the same calls on a runner that
    /// runs them eagerly: six requests (two drafting) prefilled, then 14 steps whose batches take 1 to 6 slots in changing
    /// order, a drafting slot feeding its last draft after its token (8 rows at most: row buckets 1, 2, 4 and 8, each run
    /// eagerly and captured on first use, replayed after; padding rows where a step is smaller than its bucket), the draft
    /// kept on even steps and rejected (truncated) on odd ones, greedy and seeded choices, some steps' logits downloaded,
    /// and a draft after each step for the drafting slots in it: the chosen ids, the downloaded logits and the draft logits
    /// are bitwise equal.
    /// </summary>
    [TestMethod]
    public void DecodeGraphStepsEqualEagerSteps()
    {
        var model = s_tiny;
        var v = model.VocabSize;
        PagedStepRunner[] runners = [new(model) { DecodeGraphs = true }, new(model)];
        try
        {
            var managers = runners.Select(r =>
            {
                var m = new KvBlockManager(48, 6, KvBlockManager.BlocksFor(MaxLength));
                r.Attach(m, 192);
                return m;
            }).ToArray();
            int[] lengths = [5, 30, 63, 12, 70, 9];
            bool[] drafts = [false, true, false, false, true, false];
            Assert.IsTrue(runners[0].CanDraft, "the synthetic model has an MTP module");
            var prompts = lengths.Select((n, i) => SyntheticPrompts.Make(v, n, 300 + i)).ToArray();
            var slots = new int[lengths.Length];
            var fed = (int[])lengths.Clone();
            for (var i = 0; i < lengths.Length; i++)
            {
                slots[i] = managers[0].Admit(lengths[i] + 16);
                Assert.AreEqual(slots[i], managers[1].Admit(lengths[i] + 16));
                foreach (var r in runners)
                {
                    r.Open(slots[i], drafts[i]);
                }
            }

            var next = new int[lengths.Length];
            float[] Both(Func<PagedStepRunner, float[]> run, string what)
            {
                var (graphed, eager) = (run(runners[0]), run(runners[1]));
                CollectionAssert.AreEqual(eager, graphed, what);
                return eager;
            }

            var prefill = Both(r =>
            {
                var l = new float[lengths.Length * v];
                r.Forward([.. Enumerable.Range(0, lengths.Length).Select(i => new StepSequence(slots[i], 0, prompts[i], 1))], l);
                return l;
            }, "prefill logits");
            for (var i = 0; i < lengths.Length; i++)
            {
                next[i] = Sampler.ArgMax(prefill.AsSpan(i * v, v));
            }

            int[][] steps =
            [
                [0], [3, 1], [2, 0, 5], [0, 1, 2, 3, 4, 5], [4], [5, 3, 1, 0], [1, 2], [0, 1, 2, 3, 4], [2], [3, 4, 5], [5, 4, 3, 2, 1, 0],
                [1, 0], [0, 2, 4], [0, 1, 2, 3, 4, 5],
            ];
            var drafted = new int?[lengths.Length];
            int verified = 0, accepted = 0;
            for (var k = 0; k < steps.Length; k++)
            {
                var who = steps[k];
                int[][] fedTokens = [.. who.Select(i => drafted[i] is { } d ? new[] { next[i], d } : new[] { next[i] })];
                var rows = fedTokens.Sum(t => t.Length);
                foreach (var m in managers)
                {
                    for (var j = 0; j < who.Length; j++)
                    {
                        m.Reserve(slots[who[j]], fed[who[j]] + fedTokens[j].Length);
                    }
                }

                StepSequence[] batch = [.. who.Select((i, j) => new StepSequence(slots[i], fed[i], fedTokens[j], fedTokens[j].Length))];
                var what = $"step {k} (entries {string.Join(",", who)}, {rows} rows)";
                var ids = new int[rows];
                if (k % 3 == 2)
                {
                    var l = Both(r =>
                    {
                        var l = new float[rows * v];
                        r.Forward(batch, l);
                        return l;
                    }, $"{what}: logits");
                    for (var j = 0; j < rows; j++)
                    {
                        ids[j] = Sampler.ArgMax(l.AsSpan(j * v, v));
                    }
                }
                else
                {
                    var rowOwners = who.SelectMany((i, j) => Enumerable.Repeat(i, fedTokens[j].Length)).ToArray();
                    TokenChoice[] choices = [.. rowOwners.Select((i, row) => i % 2 == 0 ? TokenChoice.Greedy(v) : new TokenChoice(v, 0.8f, 20, 0.9f, (ulong)(i + 1), (ulong)(k * 4 + row)))];
                    var chosen = Both(r =>
                    {
                        var t = new int[rows];
                        r.ForwardAndChoose(batch, choices, t, new float[rows * v]);
                        return [.. t.Select(x => (float)x)];
                    }, $"{what}: chosen ids");
                    for (var j = 0; j < rows; j++)
                    {
                        Assert.IsTrue(chosen[j] >= 0, $"{what}: row {j} chosen on the backend");
                        ids[j] = (int)chosen[j];
                    }
                }

                // A verified draft is kept on even steps (as if the model had chosen it) and rejected on odd ones: the
                // slot is truncated to its first fed token, and the next token is the one chosen after it.
                var row = 0;
                for (var j = 0; j < who.Length; j++)
                {
                    var i = who[j];
                    var keep = fedTokens[j].Length == 1 || k % 2 == 0;
                    if (fedTokens[j].Length == 2)
                    {
                        verified++;
                        accepted += keep ? 1 : 0;
                        if (!keep)
                        {
                            foreach (var r in runners)
                            {
                                r.Truncate(slots[i], fed[i] + 1);
                            }
                        }
                    }

                    var kept = keep ? fedTokens[j].Length : 1;
                    next[i] = ids[row + kept - 1];
                    fed[i] += kept;
                    row += fedTokens[j].Length;
                    drafted[i] = null;
                }

                DraftSequence[] draft = [.. who.Where(i => drafts[i]).Select(i => new DraftSequence(slots[i], next[i]))];
                if (draft.Length > 0)
                {
                    var l = Both(r =>
                    {
                        var l = new float[draft.Length * v];
                        r.Draft(draft, l);
                        return l;
                    }, $"{what}: draft logits");
                    for (var j = 0; j < draft.Length; j++)
                    {
                        drafted[who.Where(i => drafts[i]).ElementAt(j)] = Sampler.ArgMax(l.AsSpan(j * v, v));
                    }
                }
            }

            Assert.AreEqual(13, verified, "verify entries in the run");
            Assert.IsTrue(accepted > 0 && accepted < verified, $"{accepted} of {verified} drafts kept");
            Assert.AreEqual(4, runners[0].CapturedGraphs, "one graph per row bucket used (1, 2, 4, 8)");
            Assert.AreEqual(0, runners[1].CapturedGraphs);
        }
        finally
        {
            foreach (var r in runners)
            {
                r.Dispose();
            }
        }
    }

    /// <summary>
    /// A replayed decode step queues its graph (the token choice inside), nothing else, and allocates nothing: the first step of a bucket
    /// runs eagerly and captures (the step-rows embedding among its operations), a later one of the same bucket in another
    /// order replays, a smaller bucket captures a graph of its own, and the first bucket replays again; so do verify steps
    /// (an entry of a token and its draft) of those row counts.
    /// </summary>
    [TestMethod]
    public void ReplayedDecodeStepsQueueOnlyTheirGraph()
    {
        using var model = CountingModel(out var counting);
        var v = model.VocabSize;
        int[] fed = [4, 9, 20];
        using var runner = GraphRunner(model, fed, drafts: false, out var slots);
        // Entry i feeds one token, or two (a token and a draft, both verified) where i is in verifying.
        string[] Step(int[] who, params int[] verifying)
        {
            var first = counting.Operations.Count;
            var batch = who.Select(i => new StepSequence(slots[i], fed[i], verifying.Contains(i) ? new[] { 7 + i, 9 + i } : new[] { 7 + i }, 0))
                .Select(e => e with { LogitRows = e.Tokens.Length }).ToArray();
            foreach (var e in batch)
            {
                fed[Array.IndexOf(slots, e.Slot)] += e.Tokens.Length;
            }

            var rows = batch.Sum(e => e.LogitRows);
            var tokens = new int[rows];
            runner.ForwardAndChoose(batch, [.. Enumerable.Repeat(TokenChoice.Greedy(v), rows)], tokens, new float[rows * v]);
            Assert.IsTrue(tokens.All(t => t >= 0), "every row chosen");
            return [.. counting.Operations.Skip(first)];
        }

        string[] Decode(params int[] who) => Step(who);

        var captured = Decode(0, 1, 2);
        Assert.AreEqual(1, runner.CapturedGraphs, "the first step of bucket 4 is captured");
        Assert.IsTrue(captured.Any(o => o.StartsWith("EmbeddingRows(", StringComparison.Ordinal)), "it ran eagerly first");
        var allocations = counting.Allocations;
        Replayed(Decode(2, 0, 1), "the same bucket, another order");
        Assert.AreEqual(2, Decode(1, 0).Count(o => o.StartsWith("ReplayGraph(", StringComparison.Ordinal)) + runner.CapturedGraphs, "bucket 2: captured, not replayed");
        Replayed(Decode(0, 2, 1), "bucket 4 again");
        Replayed(Decode(1, 2), "bucket 2 again");
        Replayed(Step([2, 1], 1), "bucket 4 from a verify step (slot 1 a token and its draft)");
        Replayed(Step([0], 0), "bucket 2 from one verify entry");
        Assert.AreEqual(allocations, counting.Allocations, "no allocation after the captures");
    }

    /// <summary>
    /// With drafting slots, a replayed verify step queues its graph (the main pass, the ring's writes, the logits and the
    /// choice), and a replayed draft its own graph (the gather from the ring, the MTP layer, the logits and the choice),
    /// nothing else, and nothing is allocated after the captures: drafts of 3 rows (one pending row per slot), 6 (two) and
    /// 5 (after a rollback) rows, verify steps of 6 rows and a decode step of 3.
    /// </summary>
    [TestMethod]
    public void ReplayedSpeculativeStepsQueueOnlyTheirGraphs()
    {
        using var model = CountingModel(out var counting);
        var v = model.VocabSize;
        int[] fed = [4, 9, 20];
        using var runner = GraphRunner(model, fed, drafts: true, out var slots);
        string[] Ops(Action<int[]> run, int rows)
        {
            var first = counting.Operations.Count;
            var tokens = new int[rows];
            run(tokens);
            Assert.IsTrue(tokens.All(t => t >= 0), "every row chosen");
            return [.. counting.Operations.Skip(first)];
        }

        string[] Draft() => Ops(t => runner.DraftAndChoose([.. slots.Select((s, i) => new DraftSequence(s, 7 + i))], [.. slots.Select(_ => TokenChoice.Greedy(v))],
            t, new float[slots.Length * v]), slots.Length);
        string[] Step(int tokens)
        {
            var batch = slots.Select((s, i) => new StepSequence(s, fed[i], Enumerable.Range(0, tokens).Select(k => 7 + i + k).ToArray(), tokens)).ToArray();
            for (var i = 0; i < fed.Length; i++)
            {
                fed[i] += tokens;
            }

            return Ops(t => runner.ForwardAndChoose(batch, [.. Enumerable.Repeat(TokenChoice.Greedy(v), t.Length)], t, new float[t.Length * v]), tokens * slots.Length);
        }

        Assert.IsTrue(Draft().Any(o => o.StartsWith("GatherRows(", StringComparison.Ordinal)), "a draft of 3 rows runs eagerly, then is captured");
        Assert.IsTrue(Step(2).Any(o => o.StartsWith("ScatterRows(", StringComparison.Ordinal)), "a verify step of 6 rows runs eagerly, then is captured");
        Draft();
        Assert.AreEqual((1, 2), (runner.CapturedGraphs, runner.CapturedDraftGraphs), "graphs of the main pass (8 rows) and of drafts (4 and 8 rows)");
        var allocations = counting.Allocations;
        Replayed(Step(2), "a verify step of 6 rows");
        runner.Truncate(slots[1], --fed[1]); // slot 1's draft rejected
        Replayed(Draft(), "a draft of 5 rows (bucket 8)");
        Assert.AreEqual(2, Step(1).Count(o => o.StartsWith("ReplayGraph(", StringComparison.Ordinal)) + runner.CapturedGraphs, "a decode step of 3 rows: captured");
        Replayed(Draft(), "a draft of 3 rows (bucket 4)");
        Assert.AreEqual(allocations, counting.Allocations, "no allocation after the captures");
    }

    /// <summary>
    /// A runner with decode graphs on over <paramref name="model"/>, attached for 64 rows, with a request per entry of
    /// <paramref name="fed"/> opened (room for 16 more tokens each) and prefilled to that length, its last logit row asked for
    /// where it drafts.
    /// </summary>
    private static PagedStepRunner GraphRunner(DeepSeekModel model, int[] fed, bool drafts, out int[] slots)
    {
        var v = model.VocabSize;
        var blocks = new KvBlockManager(16, 4, KvBlockManager.BlocksFor(MaxLength));
        var runner = new PagedStepRunner(model) { DecodeGraphs = true };
        runner.Attach(blocks, 64);
        slots = new int[fed.Length];
        for (var i = 0; i < fed.Length; i++)
        {
            slots[i] = blocks.Admit(fed[i] + 16);
            runner.Open(slots[i], drafts);
        }

        var logitRows = drafts ? 1 : 0;
        var prompts = fed.Select((n, i) => SyntheticPrompts.Make(v, n, 60 + i)).ToArray();
        runner.Forward([.. slots.Select((s, i) => new StepSequence(s, 0, prompts[i], logitRows))], new float[logitRows * fed.Length * v]);
        return runner;
    }

    /// <summary>What a replayed step or draft queues: its graph, the choice inside.</summary>
    private static void Replayed(string[] ops, string what)
    {
        Assert.HasCount(1, ops, $"{what}: {string.Join(" ", ops)}");
        StringAssert.StartsWith(ops[0], "ReplayGraph(#", what);
    }

    /// <summary>A refused step names what is wrong and changes nothing: the same slot then runs as if it had not come.</summary>
    [TestMethod]
    public void RefusedStepsNameTheProblemAndChangeNothing()
    {
        var model = s_tiny;
        var v = model.VocabSize;
        var prompt = SyntheticPrompts.Make(v, 20, 9);
        using var runner = new PagedStepRunner(model);
        var logits = new float[4 * v];
        var early = Assert.ThrowsExactly<InvalidOperationException>(() => runner.Open(0, drafts: false));
        StringAssert.Contains(early.Message, "not attached");

        var blocks = new KvBlockManager(8, 2, 4);
        runner.Attach(blocks, 16);
        Assert.ThrowsExactly<InvalidOperationException>(() => runner.Attach(blocks, 16));
        var a = blocks.Admit(20);
        var b = blocks.Admit(5);
        runner.Open(a, drafts: true);
        runner.Open(b, drafts: false);

        void Refused<T>(string expected, StepSequence[] batch)
            where T : Exception
        {
            var e = Assert.ThrowsExactly<T>(() => runner.Forward(batch, logits));
            StringAssert.Contains(e.Message, expected);
        }

        Refused<InvalidOperationException>("feeds position 3", [new StepSequence(a, 3, prompt[..4], 1)]);
        Refused<ArgumentException>("appears twice", [new StepSequence(a, 0, prompt[..4], 1), new StepSequence(a, 0, prompt[..4], 1)]);
        Refused<ArgumentException>("outside the vocabulary", [new StepSequence(a, 0, new[] { 1, v }, 1)]);
        Refused<ArgumentException>("5 logit rows for 4 tokens", [new StepSequence(a, 0, prompt[..4], 5)]);
        Refused<ArgumentException>("a drafting slot verifies at most one draft", [new StepSequence(a, 0, prompt[..4], 3)]);
        Refused<InvalidOperationException>("cache blocks for 5 tokens", [new StepSequence(b, 0, prompt[..6], 1)]);
        Refused<ArgumentException>("at most 16", [new StepSequence(a, 0, prompt[..17], 1)]);
        Refused<InvalidOperationException>("slot 5 is not open", [new StepSequence(5, 0, prompt[..2], 1)]);
        Assert.ThrowsExactly<InvalidOperationException>(() => runner.Draft([new DraftSequence(b, 1)], logits), "a slot opened without drafting");
        Assert.ThrowsExactly<InvalidOperationException>(() => runner.Draft([new DraftSequence(a, 1)], logits), "nothing fed yet");

        // After all of that, the slots run as fresh ones: the logits equal a session's.
        runner.Forward([new StepSequence(a, 0, prompt[..10], 1), new StepSequence(b, 0, prompt[..5], 1)], logits);
        runner.Forward([new StepSequence(a, 10, prompt[10..], 1)], logits.AsSpan(2 * v));
        using var alone = model.CreateSession();
        var expected = new float[v];
        alone.Forward(prompt[..5], expected);
        Tolerance.AssertMaxRel(logits.AsSpan(v, v), expected, 1e-5, "slot b after the refusals");
        using var whole = model.CreateSession();
        whole.Forward(prompt, expected);
        Tolerance.AssertMaxRel(logits.AsSpan(2 * v, v), expected, 1e-5, "slot a after the refusals");

        runner.Truncate(a, 20);
        var below = Assert.ThrowsExactly<InvalidOperationException>(() => runner.Truncate(a, 10));
        StringAssert.Contains(below.Message, "MTP cache already holds 19 positions");
    }

    /// <summary>DeepSeek-V3's step buffers, by hand from config.json's numbers: what each arena allocates per row.</summary>
    [TestMethod]
    public void ArenaPlansOfDeepSeekV3()
    {
        var c = ModelPresets.DeepSeekV3;
        static string[] Names(ArenaPlan p) =>
            [.. p.Tensors.Select(t => $"{t.Which} {t.Cols}").Order(StringComparer.Ordinal), .. p.Routings.Select(r => $"routing {r.Experts}x{r.TopK}")];

        // 3 dense layers then MoE: both FFN kinds; q through q_lora (1536); 128 heads of 192 (q) and 128 (v).
        CollectionAssert.AreEqual(new[]
        {
            "AttentionOutput 16384", "AttentionProjection 7168", "FfnInput 7168", "FfnOutput 7168", "KeyValue 576", "MlpGate 18432", "MlpUp 18432",
            "NormedEven 7168", "NormedOdd 7168", "Query 24576", "QueryLatent 1536", "Residual 7168", "routing 256x8",
        }, Names(ArenaPlan.Main(c)));

        // The MTP layer (index 61) is a MoE layer: no dense MLP buffers.
        CollectionAssert.AreEqual(new[]
        {
            "AttentionOutput 16384", "AttentionProjection 7168", "FfnInput 7168", "FfnOutput 7168", "KeyValue 576", "MtpConcat 14336", "MtpEmbedding 7168",
            "MtpHidden 7168", "MtpInput 7168", "MtpNormed 7168", "MtpOutput 7168", "MtpResidual 7168", "Query 24576", "QueryLatent 1536", "routing 256x8",
        }, Names(ArenaPlan.Mtp(c)));

        CollectionAssert.AreEqual(new[] { "HeadInput 7168", "Logits 129280" }, Names(ArenaPlan.Head(c)));
        CollectionAssert.AreEqual(new[] { "DraftLogits 129280", "HeadInput 7168", "Logits 129280" }, Names(ArenaPlan.Head(c, drafts: true)), "a drafting model's drafts' logits apart");
    }

    [TestMethod]
    public void StepBoundCoversDecodeRowsAndPromptChunks()
    {
        var blocks = new KvBlockManager(8, 4, 4);
        Assert.AreEqual(512, BatchScheduler.MaxTokensPerStep(new SchedulerOptions(), blocks, drafting: true), "the budget when it is larger");
        Assert.AreEqual(8, BatchScheduler.MaxTokensPerStep(new SchedulerOptions { MaxTokensPerStep = 3 }, blocks, drafting: true), "4 slots, a token and a draft each");
        Assert.AreEqual(4, BatchScheduler.MaxTokensPerStep(new SchedulerOptions { MaxTokensPerStep = 3 }, blocks, drafting: false));
        Assert.AreEqual(6, BatchScheduler.MaxTokensPerStep(new SchedulerOptions { MaxTokensPerStep = 3, MaxBatch = 3 }, blocks, drafting: true), "MaxBatch below the slots");
    }
}
