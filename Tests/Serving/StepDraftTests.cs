using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Inference;
using DeepSeekCuda.Model;
using DeepSeekCuda.Serving;
using DeepSeekCuda.Tests.Distributed;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Serving;

/// <summary>
/// MTP drafts made in the step that chose their tokens (<see cref="IStepRunner.ForwardChooseAndDraft"/>) on the CPU backend:
/// the drafts a request keeps equal those made apart after the step (<see cref="IStepRunner.DraftAndChoose"/>, the path
/// tested against the reference before), eagerly and in graphs; rows the host chooses fall back to drafting apart; the
/// scheduler drafts in its steps and its requests' tokens and draft counts are those of drafting apart; what a step's
/// drafts assume is checked when the slot is fed next.
/// </summary>
[TestClass]
public sealed class StepDraftTests
{
    private const int MaxLength = 256;
    private static SyntheticModel s_fixture = null!;
    private static DeepSeekModel s_tiny = null!;

    public TestContext TestContext { get; set; } = null!;

    [ClassInitialize]
    public static void Init(TestContext _)
    {
        s_fixture = SyntheticModel.Tiny("dscuda-step-drafts", seed: 29, MaxLength);
        s_tiny = s_fixture.Model;
    }

    [ClassCleanup]
    public static void Cleanup() => s_fixture.Dispose();

    /// <summary>
    /// Five requests (four drafting, one not) through a prefill and eleven steps of changing membership, on three runners:
    /// one that drafts apart after each step, one that drafts in the step, and one that drafts in the step with graphs. Each
    /// verify entry's draft is the main model's next token on even steps (worked out on a fourth runner before the step) and
    /// another token on odd ones, so drafts are accepted and rejected as the scheduler would find them; one request's first
    /// row is chosen on the host on odd steps, and one request verifies nothing every fifth step. The chosen ids are equal on
    /// every runner; the draft after the token each request keeps equals the one made apart; a request whose row the host
    /// chose got no draft in the step (every draft of its rows −1) and drafts apart as before. So with every row attending in
    /// the naive form (each slot's drafts a segment of its MTP cache; no graphs).
    /// </summary>
    [TestMethod]
    [DataRow(AttentionForm.Auto)]
    [DataRow(AttentionForm.Naive)]
    public void DraftsMadeInTheStepEqualDraftsMadeApart(AttentionForm form)
    {
        using var naive = form == AttentionForm.Naive ? s_fixture.Load(s_fixture.Backend, o => o with { Attention = form }) : null;
        var model = naive ?? s_tiny;
        var v = model.VocabSize;
        PagedStepRunner[] runners = [new(model), new(model), new(model) { DecodeGraphs = true }];
        var oracle = new PagedStepRunner(model);
        try
        {
            PagedStepRunner[] all = [.. runners, oracle];
            var managers = all.Select(r =>
            {
                var m = new KvBlockManager(48, 6, KvBlockManager.BlocksFor(MaxLength));
                r.Attach(m, 192);
                return m;
            }).ToArray();
            int[] lengths = [5, 30, 63, 12, 70];
            bool[] drafting = [true, true, false, true, true];
            const int HostChosen = 3, SometimesPlain = 1;
            var prompts = lengths.Select((n, i) => SyntheticPrompts.Make(v, n, 500 + i)).ToArray();
            var slots = new int[lengths.Length];
            for (var i = 0; i < lengths.Length; i++)
            {
                slots[i] = managers[0].Admit(lengths[i] + 40);
                for (var m = 1; m < managers.Length; m++)
                {
                    Assert.AreEqual(slots[i], managers[m].Admit(lengths[i] + 40));
                }

                foreach (var r in runners)
                {
                    r.Open(slots[i], drafting[i]);
                }

                oracle.Open(slots[i], drafts: false);
            }

            var fed = new int[lengths.Length];
            var next = new int[lengths.Length];
            var draft = new int?[lengths.Length];
            int[][] steps = [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [0, 3], [1, 2, 4], [4, 3, 2, 1, 0], [3, 4], [0, 1, 2, 3, 4], [2, 1, 0], [1, 3, 4], [0, 1, 2, 3, 4], [4, 1], [0, 1, 2, 3, 4]];
            int made = 0, apart = 0, accepted = 0, rejected = 0;
            for (var k = 0; k < steps.Length; k++)
            {
                var who = steps[k];
                var what = $"step {k} (entries {string.Join(",", who)})";

                // Row j of entry i: greedy for even i, else a seeded draw; the host's on odd steps for the first row of HostChosen.
                TokenChoice Choice(int i, int j) =>
                    i == HostChosen && j == 0 && k % 2 == 1 ? default
                    : i % 2 == 0 ? TokenChoice.Greedy(v) : new TokenChoice(v, 0.8f, 20, 0.9f, (ulong)(i + 1), (ulong)((k * 4) + j));

                // A verify entry's draft: the main model's choice after next (found on the oracle, which then forgets it) or another token.
                if (k > 0)
                {
                    if (k % 5 == 0)
                    {
                        draft[SometimesPlain] = null; // verifies nothing this step, as when the pool has no block for the draft
                    }

                    var probed = who.Where(i => draft[i] is not null).ToArray();
                    var probe = new int[probed.Length];
                    oracle.ForwardAndChoose([.. probed.Select(i => new StepSequence(slots[i], fed[i], new[] { next[i] }, 1))], [.. probed.Select(i => Choice(i, 0))], probe, new float[probed.Length * v]);
                    for (var j = 0; j < probed.Length; j++)
                    {
                        var i = probed[j];
                        oracle.Truncate(slots[i], fed[i]);
                        var right = probe[j] >= 0 ? probe[j] : Sampler.ArgMax(OracleLogits(oracle, slots[i], fed[i], next[i], v));
                        draft[i] = k % 2 == 0 ? right : (right + 1) % v;
                    }
                }

                int[][] tokens = [.. who.Select(i => k == 0 ? prompts[i] : draft[i] is { } d ? new[] { next[i], d } : new[] { next[i] })];
                StepSequence[] batch = [.. who.Select((i, j) => new StepSequence(slots[i], fed[i], tokens[j], k == 0 ? 1 : tokens[j].Length))];
                var rows = batch.Sum(e => e.LogitRows);
                TokenChoice[] choices = [.. who.SelectMany((i, j) => Enumerable.Range(0, batch[j].LogitRows).Select(r => Choice(i, r)))];
                bool[] marks = [.. who.Select(i => drafting[i])];
                for (var j = 0; j < who.Length; j++)
                {
                    foreach (var m in managers)
                    {
                        m.Reserve(slots[who[j]], fed[who[j]] + tokens[j].Length);
                    }
                }

                // Each runner's step: its ids (a row the host chooses: the largest logit) and, where drafted in the step, the drafts.
                var ids = new int[runners.Length][];
                var stepDrafts = new int[runners.Length][];
                for (var r = 0; r < runners.Length; r++)
                {
                    var logits = new float[rows * v];
                    ids[r] = new int[rows];
                    stepDrafts[r] = Enumerable.Repeat(-7, rows).ToArray();
                    if (r == 0)
                    {
                        runners[r].ForwardAndChoose(batch, choices, ids[r], logits);
                    }
                    else
                    {
                        runners[r].ForwardChooseAndDraft(batch, choices, ids[r], logits, marks, TokenChoice.Greedy(v), stepDrafts[r]);
                    }

                    for (var row = 0; row < rows; row++)
                    {
                        Assert.AreEqual(choices[row].OnDevice, ids[r][row] >= 0, $"{what}, runner {r}: row {row} chosen where its settings say");
                        ids[r][row] = ids[r][row] >= 0 ? ids[r][row] : Sampler.ArgMax(logits.AsSpan(row * v, v));
                    }

                    CollectionAssert.AreEqual(ids[0], ids[r], $"{what}: runner {r}'s ids");
                }

                {
                    var oracleIds = new int[rows];
                    oracle.ForwardAndChoose(batch, choices, oracleIds, new float[rows * v]);
                }

                // The scheduler's rule: a draft is kept when the main model chose it; a rejected one is dropped with its position.
                var keptRows = new int[who.Length];
                var row0 = 0;
                for (var j = 0; j < who.Length; j++)
                {
                    var i = who[j];
                    var n = batch[j].LogitRows;
                    var keep = n == 1 || ids[0][row0] == tokens[j][1];
                    if (n == 2)
                    {
                        accepted += keep ? 1 : 0;
                        rejected += keep ? 0 : 1;
                        if (!keep)
                        {
                            foreach (var r in all)
                            {
                                r.Truncate(slots[i], fed[i] + 1);
                            }
                        }
                    }

                    keptRows[j] = row0 + (keep ? n - 1 : 0);
                    next[i] = ids[0][keptRows[j]];
                    fed[i] += keep ? tokens[j].Length : 1;
                    row0 += n;
                }

                // Drafts apart on the first runner: the reference for the others' drafts of the token each request keeps.
                var draftingNow = who.Select((i, j) => (i, j)).Where(x => drafting[x.i]).ToArray();
                var reference = Draft(runners[0], draftingNow.Select(x => new DraftSequence(slots[x.i], next[x.i])).ToArray(), v);
                for (var r = 1; r < runners.Length; r++)
                {
                    var fallback = new List<(int I, int J)>();
                    foreach (var (i, j) in draftingNow)
                    {
                        var entryRows = Enumerable.Range(RowOf(batch, j), batch[j].LogitRows).ToArray();
                        var hostChosen = entryRows.Any(row => !choices[row].OnDevice);
                        Assert.AreEqual(hostChosen, stepDrafts[r][keptRows[j]] < 0, $"{what}, runner {r}: request {i} drafted in the step unless the host chose a row");
                        if (hostChosen)
                        {
                            CollectionAssert.AreEqual(Enumerable.Repeat(-1, entryRows.Length).ToArray(), entryRows.Select(row => stepDrafts[r][row]).ToArray(), $"{what}, runner {r}: no draft of request {i}'s rows");
                            fallback.Add((i, j));
                        }
                        else
                        {
                            Assert.AreEqual(reference[Array.IndexOf(draftingNow, (i, j))], stepDrafts[r][keptRows[j]], $"{what}, runner {r}: request {i}'s draft");
                            made += r == 1 ? 1 : 0;
                        }
                    }

                    var late = Draft(runners[r], [.. fallback.Select(x => new DraftSequence(slots[x.I], next[x.I]))], v);
                    for (var f = 0; f < fallback.Count; f++)
                    {
                        Assert.AreEqual(reference[Array.IndexOf(draftingNow, fallback[f])], late[f], $"{what}, runner {r}: request {fallback[f].I}'s draft made apart");
                        apart += r == 1 ? 1 : 0;
                    }

                    for (var row = 0; row < rows; row++)
                    {
                        if (!draftingNow.Any(x => RowOf(batch, x.j) <= row && row < RowOf(batch, x.j) + batch[x.j].LogitRows))
                        {
                            Assert.AreEqual(-1, stepDrafts[r][row], $"{what}, runner {r}: row {row} of a request that does not draft");
                        }
                    }
                }

                foreach (var (i, j) in draftingNow)
                {
                    draft[i] = reference[Array.IndexOf(draftingNow, (i, j))];
                }
            }

            TestContext.WriteLine($"drafts in the step {made}, apart {apart}; verified drafts accepted {accepted}, rejected {rejected}; draft graphs {runners[2].CapturedDraftGraphs}");
            Assert.IsGreaterThan(20, made, "drafts made in the step");
            Assert.AreEqual(steps.Where((w, k) => k % 2 == 1 && w.Contains(HostChosen)).Count(), apart, "only the request whose row the host chose drafts apart, on odd steps");
            Assert.IsGreaterThan(5, accepted);
            Assert.IsGreaterThan(5, rejected);
            Assert.AreEqual(form != AttentionForm.Naive, runners[2].CapturedDraftGraphs > 0, "graphs of drafts made in the step, where rows attend by their step rows");
        }
        finally
        {
            foreach (var r in runners)
            {
                r.Dispose();
            }

            oracle.Dispose();
        }
    }

    /// <summary>
    /// A step's drafts refuse, by name and before anything runs, flags that do not match the batch, a mark on a slot opened
    /// without drafting or on an entry that asks for no logits, and too few draft slots; after a step drafted, the slot's next
    /// step must feed the token the draft assumed, a rollback may drop only the position after the row the step chose, and
    /// the slot then runs on as if nothing had been refused.
    /// </summary>
    [TestMethod]
    public void RefusedDraftsNameTheProblemAndChangeNothing()
    {
        var model = s_tiny;
        var v = model.VocabSize;
        using var runner = new PagedStepRunner(model);
        var blocks = new KvBlockManager(8, 2, 4);
        runner.Attach(blocks, 32);
        var a = blocks.Admit(40);
        var b = blocks.Admit(20);
        runner.Open(a, drafts: true);
        runner.Open(b, drafts: false);
        var prompt = SyntheticPrompts.Make(v, 12, 77);
        StepSequence[] batch = [new(a, 0, prompt, 1), new(b, 0, prompt[..6], 1)];
        var tokens = new int[2];
        var drafts = new int[2];
        var logits = new float[2 * v];
        TokenChoice[] greedy = [TokenChoice.Greedy(v), TokenChoice.Greedy(v)];
        void Refused<T>(string expected, StepSequence[] steps, bool[] marks, int draftSlots = 2)
            where T : Exception
        {
            var e = Assert.ThrowsExactly<T>(() => runner.ForwardChooseAndDraft(steps, greedy.AsSpan(0, steps.Sum(s => s.LogitRows)), tokens, logits, marks, TokenChoice.Greedy(v), new int[draftSlots]));
            StringAssert.Contains(e.Message, expected);
        }

        Refused<ArgumentException>("1 drafting flags for 2 entries", batch, [true]);
        Refused<InvalidOperationException>($"slot {b} was opened without drafting", batch, [true, true]);
        Refused<ArgumentException>($"slot {a}: nothing to draft after", [batch[0] with { LogitRows = 0 }, batch[1]], [true, false]);
        Refused<ArgumentException>("1 draft slots for 2 logit rows", batch, [true, false], draftSlots: 1);

        runner.ForwardChooseAndDraft(batch, greedy, tokens, logits, [true, false], TokenChoice.Greedy(v), drafts);
        Assert.IsTrue(drafts[0] >= 0, "slot a drafted in the step");
        Assert.AreEqual(-1, drafts[1], "slot b does not draft");
        var wrong = (tokens[0] + 1) % v;
        var fed = Assert.ThrowsExactly<InvalidOperationException>(() => runner.Forward([new StepSequence(a, 12, new[] { wrong, drafts[0] }, 2)], logits));
        StringAssert.Contains(fed.Message, $"slot {a}: the MTP cache was made with token {tokens[0]} at position 12; the step feeds {wrong}");

        // The token chosen and its draft, verified: keep the first token only (a rejected draft), then a rollback past it is refused.
        int[] verify = [tokens[0], drafts[0]];
        runner.ForwardChooseAndDraft([new StepSequence(a, 12, verify, 2)], greedy, tokens, logits, [true], TokenChoice.Greedy(v), drafts);
        var second = tokens[0];
        runner.Truncate(a, 13);
        var below = Assert.ThrowsExactly<InvalidOperationException>(() => runner.Truncate(a, 12));
        StringAssert.Contains(below.Message, $"cannot truncate slot {a} to 12: the MTP cache already holds 13 positions");
        var after = Assert.ThrowsExactly<InvalidOperationException>(() => runner.Forward([new StepSequence(a, 13, new[] { drafts[1] == second ? (second + 1) % v : drafts[1] }, 1)], logits));
        StringAssert.Contains(after.Message, $"made with token {second} at position 13");

        // The slot runs on from the token the draft assumed: its token and draft equal those of a runner fed the same steps
        // that drafts apart.
        runner.ForwardChooseAndDraft([new StepSequence(a, 13, new[] { second }, 1)], greedy.AsSpan(0, 1), tokens, logits, [true], TokenChoice.Greedy(v), drafts);
        using var apart = new PagedStepRunner(model);
        var twin = new KvBlockManager(8, 2, 4);
        apart.Attach(twin, 32);
        Assert.AreEqual(a, twin.Admit(40));
        apart.Open(a, drafts: true);
        var ids = new int[2];
        apart.ForwardAndChoose([new StepSequence(a, 0, prompt, 1)], greedy.AsSpan(0, 1), ids, logits);
        Assert.AreEqual(verify[0], ids[0], "the prompt's token");
        apart.ForwardAndChoose([new StepSequence(a, 12, verify, 2)], greedy, ids, logits);
        Assert.AreEqual(second, ids[0], "the verify step's first token");
        apart.Truncate(a, 13);
        apart.ForwardAndChoose([new StepSequence(a, 13, new[] { second }, 1)], greedy.AsSpan(0, 1), ids, logits);
        Assert.AreEqual(ids[0], tokens[0], "the step's token");
        Assert.AreEqual(Draft(apart, [new DraftSequence(a, ids[0])], v)[0], drafts[0], "the draft after it");
    }

    /// <summary>
    /// The scheduler drafts in its steps: greedy requests, one of them chosen on the host (a constraint that only masks), run
    /// twice, drafting in the step and drafting apart after it (a runner that drafts nothing in the step). The synthetic MTP
    /// layer almost never guesses right, so at two of three positions each draft is replaced by the main model's greedy
    /// token (worked out alone), in either run, and drafts are accepted. Every request's tokens equal its request alone both
    /// times, and each request's drafts and acceptances are the same (the draft after the token kept, the same draft);
    /// drafting in the step, only the request the host chooses for drafts apart.
    /// </summary>
    [TestMethod]
    public void TheSchedulerDraftsInItsStepsAsItDidApart()
    {
        var model = s_tiny;
        var v = model.VocabSize;
        var prompts = new[] { 20, 7, 33, 50 }.Select((n, i) => SyntheticPrompts.Make(v, n, 900 + i)).ToArray();
        var greedy = SamplingOptions.Greedy with { MaxTokens = 20 };
        const int Constrained = 3;
        (ScheduledResult[] Results, WatchedRunner Runner) Run(bool inStep)
        {
            var runner = new WatchedRunner(new PagedStepRunner(model), model, inStep, length => length % 3 != 0);
            using var scheduler = new BatchScheduler(runner, new KvBlockManager(40, 4, KvBlockManager.BlocksFor(MaxLength)),
                new SchedulerOptions { MaxTokensPerStep = 32, EosId = model.Config.EosTokenId, SpeculativeDecoding = SpeculativeDecodingMode.On });
            var requests = prompts.Select((p, i) => scheduler.Submit(p, greedy, i == Constrained ? new AllowAll() : null)).ToArray();
            scheduler.Step();
            runner.HostChosenSlot = requests[Constrained].Slot;
            while (requests.Any(r => !r.Completion.IsCompleted))
            {
                scheduler.Step();
            }

            return ([.. requests.Select(r => r.Completion.Result)], runner);
        }

        var (inStep, inStepRunner) = Run(true);
        var (apart, apartRunner) = Run(false);
        using (inStepRunner)
        using (apartRunner)
        {
            for (var i = 0; i < prompts.Length; i++)
            {
                var alone = Alone.Run(model, prompts[i], greedy);
                CollectionAssert.AreEqual(alone, inStep[i].Tokens.ToArray(), $"request {i}, drafting in the step");
                CollectionAssert.AreEqual(alone, apart[i].Tokens.ToArray(), $"request {i}, drafting apart");
                Assert.AreEqual((apart[i].Counters.Drafted, apart[i].Counters.Accepted), (inStep[i].Counters.Drafted, inStep[i].Counters.Accepted), $"request {i}: drafts and acceptances");
                Assert.IsGreaterThan(0L, inStep[i].Counters.Accepted, $"request {i} had drafts accepted");
                Assert.IsLessThan(inStep[i].Counters.Drafted, inStep[i].Counters.Accepted, $"request {i} had drafts rejected");
            }

            TestContext.WriteLine($"in the step: {inStepRunner.DraftedInStep} drafts made in steps, {inStepRunner.DraftedApart} apart; apart: {apartRunner.DraftedApart}");
            Assert.IsGreaterThan(0, inStepRunner.DraftedInStep, "drafts made in the step");
            Assert.IsGreaterThan(0, inStepRunner.DraftedApart, "the request whose rows the host chooses drafts apart");
            Assert.AreEqual(0, inStepRunner.OthersDraftedApart, "no other request drafts apart");
            Assert.AreEqual(0, apartRunner.DraftedInStep);
        }
    }

    /// <summary>A constraint that masks on the host only: its request's rows are chosen there.</summary>
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
    /// With decode graphs, a verify step that drafts runs eagerly and is captured (the main pass and, apart, its drafts, whose
    /// tokens are the ids chosen in it), and later verify steps of the same buckets queue two operations, the main graph
    /// and the drafts' graph, and allocate nothing, as each request keeps the draft after the token it keeps (a rejected
    /// draft's rollback included); the drafts replayed equal those of the eager step.
    /// </summary>
    [TestMethod]
    public void ReplayedStepsThatDraftQueueTwoGraphs()
    {
        var counting = new RecordingBackend(new CpuBackend());
        using var model = s_fixture.Load(counting);
        var v = model.VocabSize;
        PagedStepRunner[] runners = [new(model) { DecodeGraphs = true }, new(model)];
        try
        {
            var managers = runners.Select(r =>
            {
                var m = new KvBlockManager(16, 4, KvBlockManager.BlocksFor(MaxLength));
                r.Attach(m, 64);
                return m;
            }).ToArray();
            int[] lengths = [4, 9, 20];
            var slots = lengths.Select(n => managers.Select(m => m.Admit(n + 20)).Distinct().Single()).ToArray();
            foreach (var r in runners)
            {
                foreach (var slot in slots)
                {
                    r.Open(slot, drafts: true);
                }
            }

            var fed = new int[lengths.Length];
            var next = new int[lengths.Length];
            var draft = new int[lengths.Length];
            var rejected = 0;

            // One step on both runners (graphs, eager): ids and drafts equal; then the scheduler's rule; returns the graph runner's operations.
            string[] Step(StepSequence[] batch)
            {
                var rows = batch.Sum(e => e.LogitRows);
                TokenChoice[] choices = [.. Enumerable.Repeat(TokenChoice.Greedy(v), rows)];
                var ids = new int[2][];
                var drafts = new int[2][];
                string[] ops = [];
                for (var r = 0; r < runners.Length; r++)
                {
                    foreach (var (e, m) in batch.Select(e => (e, managers[r])))
                    {
                        m.Reserve(e.Slot, e.Position + e.Tokens.Length);
                    }

                    var first = counting.Operations.Count;
                    (ids[r], drafts[r]) = (new int[rows], new int[rows]);
                    runners[r].ForwardChooseAndDraft(batch, choices, ids[r], new float[rows * v], [.. batch.Select(_ => true)], TokenChoice.Greedy(v), drafts[r]);
                    ops = r == 0 ? [.. counting.Operations.Skip(first)] : ops;
                }

                CollectionAssert.AreEqual(ids[1], ids[0], "ids");
                CollectionAssert.AreEqual(drafts[1], drafts[0], "drafts");
                var row = 0;
                for (var i = 0; i < batch.Length; i++)
                {
                    var n = batch[i].LogitRows;
                    var keep = n == 1 || ids[0][row] == batch[i].Tokens.Span[1];
                    if (!keep)
                    {
                        rejected++;
                        foreach (var r in runners)
                        {
                            r.Truncate(slots[i], fed[i] + 1);
                        }
                    }

                    var kept = row + (keep ? n - 1 : 0);
                    (next[i], draft[i]) = (ids[0][kept], drafts[0][kept]);
                    Assert.IsGreaterThanOrEqualTo(0, draft[i], $"entry {i} drafted in the step");
                    fed[i] += keep ? n : 1;
                    row += n;
                }

                return ops;
            }

            Step([.. slots.Select((s, i) => new StepSequence(s, 0, SyntheticPrompts.Make(v, lengths[i], 60 + i), 1))]);
            fed = [.. lengths];
            StepSequence[] Verify() => [.. slots.Select((s, i) => new StepSequence(s, fed[i], new[] { next[i], draft[i] }, 2))];
            var captured = Step(Verify());
            Assert.AreEqual((1, 2), (runners[0].CapturedGraphs, runners[0].CapturedDraftGraphs), "graphs of the verify step's 6 rows (bucket 8), of the prefill's 3 drafts (bucket 4) and of its 6 (bucket 8)");
            Assert.IsTrue(captured.Any(o => o.StartsWith("EmbeddingChosenRows(", StringComparison.Ordinal)), "its drafts embed the ids chosen in the step");
            var allocations = counting.Allocations;
            for (var k = 0; k < 4; k++)
            {
                var ops = Step(Verify());
                Assert.HasCount(2, ops, $"verify step {k}: {string.Join(" ", ops)}");
                Assert.IsTrue(ops.All(o => o.StartsWith("ReplayGraph(#", StringComparison.Ordinal)), $"verify step {k}: the main graph and the drafts' graph");
            }

            Assert.AreEqual(allocations, counting.Allocations, "no allocation after the captures");
            Assert.IsGreaterThan(0, rejected, "rejected drafts rolled back between replays");
        }
        finally
        {
            foreach (var r in runners)
            {
                r.Dispose();
            }
        }
    }

    /// <summary>The first logit row of entry <paramref name="j"/>.</summary>
    private static int RowOf(StepSequence[] batch, int j) => batch.Take(j).Sum(e => e.LogitRows);

    /// <summary>Drafts apart on <paramref name="runner"/>, greedy; a row it could not choose gives its largest logit, as the scheduler does.</summary>
    private static int[] Draft(PagedStepRunner runner, DraftSequence[] batch, int v)
    {
        var ids = new int[batch.Length];
        var logits = new float[batch.Length * v];
        if (batch.Length > 0)
        {
            runner.DraftAndChoose(batch, [.. batch.Select(_ => TokenChoice.Greedy(v))], ids, logits);
        }

        return [.. ids.Select((id, i) => id >= 0 ? id : Sampler.ArgMax(logits.AsSpan(i * v, v)))];
    }

    /// <summary>The oracle's logits of <paramref name="token"/> fed at <paramref name="position"/> of <paramref name="slot"/>, forgotten again.</summary>
    private static float[] OracleLogits(PagedStepRunner oracle, int slot, int position, int token, int v)
    {
        var logits = new float[v];
        oracle.Forward([new StepSequence(slot, position, new[] { token }, 1)], logits);
        oracle.Truncate(slot, position);
        return logits;
    }
}

/// <summary>
/// A paged runner that counts drafts made in the step (ids ≥ 0 out of <see cref="IStepRunner.ForwardChooseAndDraft"/>) and
/// apart (<see cref="IStepRunner.DraftAndChoose"/>'s entries, and those of any slot but <see cref="HostChosenSlot"/>), and
/// replaces each draft after a history of a length <paramref name="right"/> picks by the main model's greedy token after
/// it, worked out alone; without <paramref name="inStep"/> it drafts nothing in the step, as the interface's body.
/// </summary>
internal sealed class WatchedRunner(PagedStepRunner inner, DeepSeekModel model, bool inStep, Func<int, bool> right) : IStepRunner
{
    private readonly Dictionary<int, List<int>> _fed = [];

    public int DraftedInStep { get; private set; }

    public int DraftedApart { get; private set; }

    public int OthersDraftedApart { get; private set; }

    public int HostChosenSlot { get; set; } = -1;

    public int VocabSize => inner.VocabSize;

    public int MaxSequenceLength => inner.MaxSequenceLength;

    public bool CanDraft => inner.CanDraft;

    public void Attach(KvBlockManager blocks, int maxTokensPerStep) => inner.Attach(blocks, maxTokensPerStep);

    public void Open(int slot, bool drafts)
    {
        inner.Open(slot, drafts);
        _fed[slot] = [];
    }

    public void StopDrafting(int slot) => inner.StopDrafting(slot);

    public void Close(int slot)
    {
        inner.Close(slot);
        _fed.Remove(slot);
    }

    public void Truncate(int slot, int length)
    {
        inner.Truncate(slot, length);
        _fed[slot].RemoveRange(length, _fed[slot].Count - length);
    }

    public void Forward(ReadOnlySpan<StepSequence> batch, Span<float> logits)
    {
        inner.Forward(batch, logits);
        Fed(batch);
    }

    public void ForwardAndChoose(ReadOnlySpan<StepSequence> batch, ReadOnlySpan<TokenChoice> choices, Span<int> tokens, Span<float> logits)
    {
        inner.ForwardAndChoose(batch, choices, tokens, logits);
        Fed(batch);
    }

    public void ForwardChooseAndDraft(ReadOnlySpan<StepSequence> batch, ReadOnlySpan<TokenChoice> choices, Span<int> tokens, Span<float> logits,
        ReadOnlySpan<bool> drafting, TokenChoice draftChoice, Span<int> drafts)
    {
        var rows = IStepRunner.CheckDrafting(batch, drafting, drafts);
        if (!inStep)
        {
            ForwardAndChoose(batch, choices, tokens, logits);
            drafts[..rows].Fill(TokenSampling.NotChosen);
            return;
        }

        inner.ForwardChooseAndDraft(batch, choices, tokens, logits, drafting, draftChoice, drafts);
        Fed(batch);
        var row = 0;
        foreach (var e in batch)
        {
            for (var j = 0; j < e.LogitRows; j++, row++)
            {
                if (drafts[row] >= 0)
                {
                    // Logit row j is the entry's token at position p; its draft follows the history through p and the token chosen.
                    var p = e.Position + e.Tokens.Length - e.LogitRows + j;
                    DraftedInStep++;
                    drafts[row] = Forced([.. _fed[e.Slot].Take(p + 1), tokens[row]], drafts[row]);
                }
            }
        }
    }

    public void Draft(ReadOnlySpan<DraftSequence> batch, Span<float> logits) => inner.Draft(batch, logits);

    public void DraftAndChoose(ReadOnlySpan<DraftSequence> batch, ReadOnlySpan<TokenChoice> choices, Span<int> tokens, Span<float> logits)
    {
        inner.DraftAndChoose(batch, choices, tokens, logits);
        for (var i = 0; i < batch.Length; i++)
        {
            var e = batch[i];
            DraftedApart++;
            OthersDraftedApart += e.Slot == HostChosenSlot ? 0 : 1;
            Assert.IsGreaterThanOrEqualTo(0, tokens[i], "the tiny model's drafts are chosen where the logits are");
            tokens[i] = Forced([.. _fed[e.Slot], e.NextToken], tokens[i]);
        }
    }

    public void Dispose() => inner.Dispose();

    private void Fed(ReadOnlySpan<StepSequence> batch)
    {
        foreach (var e in batch)
        {
            _fed[e.Slot].AddRange(e.Tokens.ToArray());
        }
    }

    /// <summary>The main model's greedy token after <paramref name="history"/> where <c>right</c> picks its length, else <paramref name="draft"/>.</summary>
    private int Forced(int[] history, int draft)
    {
        if (!right(history.Length))
        {
            return draft;
        }

        using var session = model.CreateSession();
        var logits = new float[model.VocabSize];
        session.Forward(history, logits);
        return Sampler.ArgMax(logits);
    }
}
