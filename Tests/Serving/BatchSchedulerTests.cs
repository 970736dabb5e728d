using DeepSeekCuda.Inference;
using DeepSeekCuda.Serving;
using DeepSeekCuda.Tests.Inference;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Serving;

/// <summary>
/// The scheduler over fake models whose logits are a pure function of the history, so every request's
/// output can be recomputed alone (<see cref="Alone.Run(FakeModel, int[], SamplingOptions, int, Func{int, bool}?, Action{int}?)"/>) and compared token for token.
/// </summary>
[TestClass]
public sealed class BatchSchedulerTests
{
    private const int Eos = FakeTokenizer.Eos;

    public TestContext TestContext { get; set; } = null!;

    private static int[] Printable(Random rng, int length) => [.. Enumerable.Range(0, length).Select(_ => rng.Next(32, 127))];

    private static List<int> Drain(BatchScheduler scheduler, ScheduledRequest request)
    {
        while (!request.Completion.IsCompleted)
        {
            Assert.IsTrue(scheduler.Step(), "work remains while a request is open");
        }

        return [.. request.Completion.Result.Tokens];
    }

    [TestMethod]
    public void StaggeredArrivalsGiveEachRequestItsAloneOutput()
    {
        var model = FakeModel.Bigram(5, maxSequenceLength: 400, eosLogit: 3.5f);
        var blocks = new KvBlockManager(64, 8, 7);
        using var runner = new SessionStepRunner(model);
        using var scheduler = new BatchScheduler(runner, blocks, new SchedulerOptions { MaxTokensPerStep = 40, EosId = Eos });
        var rng = new Random(1);
        var prompts = new[] { 3, 17, 64, 65, 90, 1, 130 }.Select(n => Printable(rng, n)).ToArray();
        var options = prompts.Select((_, i) => i % 2 == 0
            ? new SamplingOptions { Temperature = 0, MaxTokens = 30 + i }
            : new SamplingOptions { Temperature = 0.9f, TopK = 20, TopP = 0.9f, Seed = 100 + i, MaxTokens = 40 }).ToArray();
        var requests = new List<ScheduledRequest>();
        for (var i = 0; i < prompts.Length; i++)
        {
            requests.Add(scheduler.Submit(prompts[i], options[i]));
            for (var s = 0; s < i % 3; s++)
            {
                scheduler.Step();
            }
        }

        while (requests.Any(r => !r.Completion.IsCompleted))
        {
            Assert.IsTrue(scheduler.Step());
        }

        for (var i = 0; i < prompts.Length; i++)
        {
            CollectionAssert.AreEqual(Alone.Run(model, prompts[i], options[i], Eos), requests[i].Completion.Result.Tokens.ToArray(), $"request {i}");
            var c = requests[i].Completion.Result.Counters;
            Assert.AreEqual(c.Steps, c.GeneratedTokens, "one token per step without drafts");
        }

        Assert.AreEqual(blocks.TotalBlocks, blocks.FreeBlocks);
        Assert.AreEqual(blocks.MaxRequests, blocks.FreeSlots);
        Assert.AreEqual(model.SessionsCreated, model.SessionsDisposed);
        Assert.IsFalse(scheduler.Step(), "idle");
    }

    [TestMethod]
    public void StreamedTokensEqualTheResult()
    {
        var model = FakeModel.Bigram(2, eosLogit: 3f);
        using var runner = new SessionStepRunner(model);
        using var scheduler = new BatchScheduler(runner, new KvBlockManager(16, 2, 8), new SchedulerOptions { EosId = Eos });
        var r = scheduler.Submit([72, 105], SamplingOptions.Greedy with { MaxTokens = 50 });
        var tokens = Drain(scheduler, r);
        CollectionAssert.AreEqual(tokens, r.Output.ReadAllAsync().ToBlockingEnumerable().ToArray());
        Assert.IsTrue(r.Output.Completion.IsCompleted);
    }

    [TestMethod]
    public void CancellationReturnsEveryBlock()
    {
        var model = FakeModel.Bigram(3); // EOS logit -1 never wins under greedy: requests run until cancelled
        var blocks = new KvBlockManager(40, 4, 16);
        using var runner = new SessionStepRunner(model);
        using var scheduler = new BatchScheduler(runner, blocks, new SchedulerOptions { MaxBatch = 3, MaxTokensPerStep = 64, EosId = Eos });
        var rng = new Random(2);
        var requests = Enumerable.Range(0, 5).Select(i => scheduler.Submit(Printable(rng, 30 + 20 * i), SamplingOptions.Greedy)).ToList();
        for (var s = 0; s < 70; s++)
        {
            scheduler.Step();
        }

        Assert.AreEqual(3, scheduler.RunningCount, "MaxBatch running, two waiting");
        Assert.IsLessThan(blocks.TotalBlocks, blocks.FreeBlocks, "the running requests hold blocks");

        requests[1].Cancel(); // running, mid-generation
        requests[4].Cancel(); // waiting, never admitted
        scheduler.Step();
        foreach (var i in new[] { 1, 4 })
        {
            Assert.IsTrue(requests[i].Completion.IsCanceled, $"request {i}");
            while (requests[i].Output.TryRead(out _))
            {
            }

            Assert.IsTrue(requests[i].Output.Completion.IsCanceled, "the token stream ends cancelled");
        }

        Assert.AreEqual(3, scheduler.RunningCount, "request 3 took the freed slot");
        var held = Enumerable.Range(0, blocks.MaxRequests).Where(blocks.IsActive).Sum(s => blocks.Blocks(s).Length);
        Assert.AreEqual(blocks.TotalBlocks - held, blocks.FreeBlocks);

        foreach (var r in requests)
        {
            r.Cancel();
        }

        Assert.IsFalse(scheduler.Step(), "nothing left to run");
        Assert.AreEqual(blocks.TotalBlocks, blocks.FreeBlocks);
        Assert.AreEqual(blocks.MaxRequests, blocks.FreeSlots);
        Assert.IsTrue(requests.All(r => r.Completion.IsCanceled));
        Assert.AreEqual(model.SessionsCreated, model.SessionsDisposed, "every session closed");
    }

    /// <summary>
    /// Many requests from many threads on a pool too small for all of them at once: growth preempts the
    /// newest request, which later prefills again; every output still equals its alone run.
    /// </summary>
    [TestMethod]
    [DataRow(false)]
    [DataRow(true)]
    public async Task ManyConcurrentRequestsWithPreemption(bool speculative)
    {
        var model = FakeModel.Bigram(7, maxSequenceLength: 300, eosLogit: 2.5f);
        var blocks = new KvBlockManager(24, 16, 5);
        IStepRunner runner = speculative
            ? new OracleStepRunner(model, blocks, length => length % 3 != 0)
            : new SessionStepRunner(model);
        using var scheduler = new BatchScheduler(runner, blocks, new SchedulerOptions { MaxBatch = 16, MaxTokensPerStep = 96, EosId = Eos, SpeculativeDecoding = speculative ? SpeculativeDecodingMode.On : SpeculativeDecodingMode.Off });
        using var stop = new CancellationTokenSource();
        var loop = scheduler.RunAsync(stop.Token);
        var cases = Enumerable.Range(0, 64).Select(i =>
        {
            var rng = new Random(1000 + i);
            var prompt = Printable(rng, rng.Next(20, 101));
            var options = i % 2 == 0
                ? new SamplingOptions { Temperature = 0, MaxTokens = rng.Next(30, 151) }
                : new SamplingOptions { Temperature = 0.7f, TopP = 0.95f, Seed = i, MaxTokens = rng.Next(30, 151) };
            return (prompt, options);
        }).ToArray();

        var results = await Task.WhenAll(cases.Select(c => Task.Run(async () =>
        {
            var r = scheduler.Submit(c.prompt, c.options);
            var streamed = new List<int>();
            await foreach (var t in r.Output.ReadAllAsync())
            {
                streamed.Add(t);
            }

            var result = await r.Completion;
            CollectionAssert.AreEqual(result.Tokens.ToArray(), streamed.ToArray());
            return result;
        })));
        await stop.CancelAsync();
        await loop;

        for (var i = 0; i < cases.Length; i++)
        {
            CollectionAssert.AreEqual(Alone.Run(model, cases[i].prompt, cases[i].options, Eos), results[i].Tokens.ToArray(), $"request {i}");
            var c = results[i].Counters;
            Assert.AreEqual(c.Steps + c.Accepted, c.GeneratedTokens, $"request {i}: tokens = steps + accepted");
            Assert.IsLessThanOrEqualTo(c.Drafted, c.Accepted);
        }

        var total = scheduler.Counters;
        Assert.AreEqual(results.Sum(r => (long)r.Tokens.Count), total.GeneratedTokens);
        Assert.AreEqual(total.Steps + total.Accepted, total.GeneratedTokens);
        Assert.IsGreaterThan(0L, scheduler.Preemptions, "the pool is too small for every request at once");
        Assert.AreEqual(blocks.TotalBlocks, blocks.FreeBlocks);
        Assert.AreEqual(blocks.MaxRequests, blocks.FreeSlots);
        if (speculative)
        {
            Assert.IsGreaterThan(0L, total.Accepted);
            Assert.IsLessThan(total.Drafted, total.Accepted, "some drafts were wrong");
            Assert.IsGreaterThan(1, ((OracleStepRunner)runner).LargestBatch);
            Assert.IsGreaterThan(0, ((OracleStepRunner)runner).Truncations);
        }
        else
        {
            Assert.AreEqual(0L, total.Drafted);
            Assert.AreEqual(model.SessionsCreated, model.SessionsDisposed);
        }

        TestContext.WriteLine($"steps {total.Steps}, tokens {total.GeneratedTokens}, drafted {total.Drafted}, accepted {total.Accepted} ({total.AcceptanceRate:P1}), preemptions {scheduler.Preemptions}");
        runner.Dispose();
    }

    [TestMethod]
    public void OracleDraftsAreAcceptedAndRejectedWithoutChangingTheOutput()
    {
        var model = FakeModel.Bigram(11, eosLogit: 3f);
        var blocks = new KvBlockManager(32, 4, 8);
        var runner = new OracleStepRunner(model, blocks, length => length % 3 != 0);
        var log = new ListLogger();
        var scheduler = new BatchScheduler(runner, blocks, new SchedulerOptions { EosId = Eos }, log);
        Assert.IsTrue(scheduler.SpeculativeDecoding, "on by default when the runner can draft");
        var prompt = Printable(new Random(3), 70);
        foreach (var options in new[] { SamplingOptions.Greedy with { MaxTokens = 120 }, new SamplingOptions { Seed = 9, MaxTokens = 120 } })
        {
            var r = scheduler.Submit(prompt, options);
            var tokens = Drain(scheduler, r);
            CollectionAssert.AreEqual(Alone.Run(model, prompt, options, Eos), tokens);
            var c = r.Completion.Result.Counters;
            Assert.AreEqual(c.Steps + c.Accepted, c.GeneratedTokens);
            Assert.IsGreaterThan(0L, c.Accepted);
            Assert.IsLessThan(c.Drafted, c.Accepted);
            Assert.IsLessThan(c.GeneratedTokens, c.Steps, "accepted drafts save steps");
            Assert.IsTrue(log.Entries.Any(e => e.Message.StartsWith($"Request {r.Id} finished", StringComparison.Ordinal)), "each request's acceptance is logged");
        }

        Assert.AreEqual(blocks.TotalBlocks, blocks.FreeBlocks);
        var total = scheduler.Counters;
        scheduler.Dispose();
        var summary = log.Entries.Last().Message;
        StringAssert.StartsWith(summary, $"Speculative decoding: {total.GeneratedTokens} tokens in {total.Steps} steps, MTP drafts {total.Drafted}, accepted {total.Accepted}");
        TestContext.WriteLine(summary);
    }

    /// <summary>
    /// Auto with drafts that are never right: after exactly one window of verified drafts drafting stops
    /// (logged once, the runner told for the running slot), and a later request does not draft. Outputs
    /// equal plain decoding throughout.
    /// </summary>
    [TestMethod]
    public void AutoStopsDraftingAfterAWindowBelowTheThreshold()
    {
        var model = FakeModel.Bigram(13);
        var blocks = new KvBlockManager(32, 4, 8);
        var runner = new OracleStepRunner(model, blocks, _ => false);
        var log = new ListLogger();
        using var scheduler = new BatchScheduler(runner, blocks, new SchedulerOptions { AutoWindow = 8, AutoMinAcceptanceRate = 0.3 }, log);
        Assert.IsTrue(scheduler.SpeculativeDecoding, "auto starts drafting when the runner can");
        var prompt = Printable(new Random(5), 30);
        var options = SamplingOptions.Greedy with { MaxTokens = 60 };
        var first = scheduler.Submit(prompt, options);
        var tokens = Drain(scheduler, first);
        CollectionAssert.AreEqual(Alone.Run(model, prompt, options, Eos), tokens);
        Assert.AreEqual(60, tokens.Count, "long enough for several windows");
        var c = first.Completion.Result.Counters;
        Assert.AreEqual(8L, c.Drafted, "one window, then no more drafts");
        Assert.AreEqual(0L, c.Accepted);
        Assert.AreEqual(8, runner.Truncations, "each rejected draft rolled back once");
        Assert.IsFalse(scheduler.SpeculativeDecoding);
        Assert.HasCount(1, runner.StoppedDrafting, "the running request's slot was told once");
        StringAssert.StartsWith(log.Entries.Single(e => e.Message.StartsWith("MTP drafting", StringComparison.Ordinal)).Message,
            "MTP drafting switched off (speculative decoding auto): 0 of the last 8 drafts accepted");

        var second = scheduler.Submit(prompt, options);
        Assert.IsFalse(second.Speculative);
        CollectionAssert.AreEqual(tokens, Drain(scheduler, second));
        Assert.AreEqual(0L, second.Completion.Result.Counters.Drafted);
    }

    /// <summary>
    /// Auto with drafts right at two positions of three (a rate of about 0.67, above 0.3): every window
    /// keeps drafting to the end, nothing is logged about a switch, and the output equals plain decoding.
    /// Off with the same runner never drafts.
    /// </summary>
    [TestMethod]
    public void AutoKeepsDraftingWhileDraftsAreAccepted()
    {
        var model = FakeModel.Bigram(13);
        var prompt = Printable(new Random(5), 30);
        var options = SamplingOptions.Greedy with { MaxTokens = 120 };
        var expected = Alone.Run(model, prompt, options, Eos);
        foreach (var mode in new[] { SpeculativeDecodingMode.Auto, SpeculativeDecodingMode.Off })
        {
            var blocks = new KvBlockManager(32, 4, 8);
            var runner = new OracleStepRunner(model, blocks, length => length % 3 != 0);
            var log = new ListLogger();
            using var scheduler = new BatchScheduler(runner, blocks, new SchedulerOptions { SpeculativeDecoding = mode, AutoWindow = 8 }, log);
            var r = scheduler.Submit(prompt, options);
            CollectionAssert.AreEqual(expected, Drain(scheduler, r), mode.ToString());
            var c = r.Completion.Result.Counters;
            if (mode == SpeculativeDecodingMode.Auto)
            {
                Assert.IsTrue(scheduler.SpeculativeDecoding);
                Assert.IsGreaterThan(3 * 8L, c.Drafted, "drafting went on past several windows");
                Assert.IsGreaterThan(0.3, c.AcceptanceRate);
                // A verify step yields at most two tokens and the last one or two steps cannot draft.
                Assert.IsGreaterThanOrEqualTo(c.Steps - 3, c.Drafted, "every step but the first and the last few verified a draft");
                Assert.IsEmpty(runner.StoppedDrafting);
                Assert.IsFalse(log.Entries.Any(e => e.Message.StartsWith("MTP drafting", StringComparison.Ordinal)));
            }
            else
            {
                Assert.IsFalse(scheduler.SpeculativeDecoding);
                Assert.AreEqual(0L, c.Drafted);
            }
        }
    }

    [TestMethod]
    public void AWaitingRequestCanceledBeforeAdmissionNeverRuns()
    {
        var model = FakeModel.Bigram(1);
        using var runner = new SessionStepRunner(model);
        using var scheduler = new BatchScheduler(runner, new KvBlockManager(8, 2, 4), new SchedulerOptions { EosId = Eos });
        var r = scheduler.Submit([65, 66], SamplingOptions.Greedy);
        r.Cancel();
        Assert.IsFalse(scheduler.Step());
        Assert.IsTrue(r.Completion.IsCanceled);
        Assert.AreEqual(0, model.SessionsCreated);
    }

    [TestMethod]
    public void APromptLargerThanThePoolFailsWithKvCacheFull()
    {
        var model = FakeModel.Bigram(1);
        using var runner = new SessionStepRunner(model);
        using var scheduler = new BatchScheduler(runner, new KvBlockManager(2, 2, 4), new SchedulerOptions { EosId = Eos });
        var r = scheduler.Submit(Printable(new Random(1), 200), SamplingOptions.Greedy);
        scheduler.Step();
        var e = Assert.ThrowsExactly<AggregateException>(() => r.Completion.Wait());
        Assert.IsInstanceOfType<KvCacheFullException>(e.InnerException);
    }

    [TestMethod]
    public void ContextLimitEndsARequestAsPlainDecodingDoes()
    {
        var model = FakeModel.Bigram(4, maxSequenceLength: 70);
        using var runner = new SessionStepRunner(model);
        var blocks = new KvBlockManager(8, 2, 2);
        using var scheduler = new BatchScheduler(runner, blocks, new SchedulerOptions { EosId = Eos });
        var prompt = Printable(new Random(5), 60);
        var r = scheduler.Submit(prompt, SamplingOptions.Greedy);
        var tokens = Drain(scheduler, r);
        Assert.AreEqual(FinishReason.Length, r.Completion.Result.FinishReason);
        CollectionAssert.AreEqual(Alone.Run(model, prompt, SamplingOptions.Greedy, Eos), tokens);
        Assert.AreEqual(11, tokens.Count, "the 70th position is fed; the token sampled there is the last");
    }

    [TestMethod]
    public void BadRequestsAndOptionsAreRejected()
    {
        var model = FakeModel.Bigram(1, maxSequenceLength: 100);
        using var runner = new SessionStepRunner(model);
        using var scheduler = new BatchScheduler(runner, new KvBlockManager(8, 2, 4), new SchedulerOptions());
        Assert.ThrowsExactly<ArgumentException>(() => scheduler.Submit([]));
        Assert.ThrowsExactly<ArgumentException>(() => scheduler.Submit(new int[101]), "longer than the context");
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => scheduler.Submit([1], new SamplingOptions { Temperature = -1 }));
        Assert.IsFalse(scheduler.SpeculativeDecoding, "a plain model cannot draft");
        Assert.ThrowsExactly<ArgumentException>(() => new BatchScheduler(runner, new KvBlockManager(8, 2, 4), new SchedulerOptions { SpeculativeDecoding = SpeculativeDecodingMode.On }));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => new BatchScheduler(runner, new KvBlockManager(8, 2, 4), new SchedulerOptions { MaxTokensPerStep = 0 }));
        scheduler.Dispose();
        Assert.ThrowsExactly<ObjectDisposedException>(() => scheduler.Submit([1]));
    }

    [TestMethod]
    [DataRow(false)]
    [DataRow(true)]
    public void PoisonRequestsEndAlone_AndTheOtherRequestsAreUnchanged(bool speculative)
    {
        // Two prompt markers (ids below the printable range, valid model inputs) make the logits NaN:
        // at once, or after the request has produced a few tokens.
        const int PoisonAtOnce = 7, PoisonLater = 8, LaterAt = 25;
        var clean = FakeModel.Bigram(21, eosLogit: 2f);
        var model = new FakeModel(clean.VocabSize, clean.MaxSequenceLength, (h, logits) =>
        {
            clean.LogitsOf(h, logits);
            if (h[0] == PoisonAtOnce || (h[0] == PoisonLater && h.Count >= LaterAt))
            {
                logits[40] = float.NaN;
            }
        });
        var blocks = new KvBlockManager(80, 64, 2);
        using IStepRunner runner = speculative ? new OracleStepRunner(model, blocks, length => length % 2 == 0) : new SessionStepRunner(model);
        using var scheduler = new BatchScheduler(runner, blocks, new SchedulerOptions { EosId = Eos, MaxBatch = 64, MaxTokensPerStep = 256 });
        var rng = new Random(17);
        var poisoned = new Dictionary<int, int> { [5] = PoisonAtOnce, [33] = PoisonLater, [62] = PoisonAtOnce };
        var prompts = Enumerable.Range(0, 64).Select(i =>
        {
            var p = Printable(rng, 20);
            if (poisoned.TryGetValue(i, out var marker))
            {
                p[0] = marker;
            }

            return p;
        }).ToArray();

        // A temperature that underflows 1/T in float is greedy now, never an error.
        var options = Enumerable.Range(0, 64).Select(i => (i % 4) switch
        {
            0 => SamplingOptions.Greedy with { MaxTokens = 30 },
            1 => new SamplingOptions { Temperature = 1e-39f, TopP = 0.95f, Seed = i, MaxTokens = 30 },
            2 => new SamplingOptions { Temperature = 1e-39f, TopP = 1f, Seed = i, MaxTokens = 30 },
            _ => new SamplingOptions { Temperature = 0.8f, TopP = 0.9f, Seed = i, MaxTokens = 30 },
        }).ToArray();

        // Ids outside the vocabulary are refused at the door; nothing of them reaches a step.
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => scheduler.Submit([65, model.VocabSize]));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => scheduler.Submit([-1, 65]));
        var requests = prompts.Select((p, i) => scheduler.Submit(p, options[i])).ToArray();
        var steps = 0;
        while (requests.Any(r => !r.Completion.IsCompleted))
        {
            Assert.IsTrue(scheduler.Step());
            Assert.IsLessThan(1000, ++steps);
        }

        for (var i = 0; i < requests.Length; i++)
        {
            var completion = requests[i].Completion;
            if (poisoned.ContainsKey(i))
            {
                Assert.IsTrue(completion.IsFaulted, $"request {i} is poisoned");
                Assert.IsInstanceOfType<NonFiniteLogitsException>(completion.Exception!.InnerException, $"request {i}");
                var streamed = new List<int>();
                while (requests[i].Output.TryRead(out var t))
                {
                    streamed.Add(t);
                }

                var expected = poisoned[i] == PoisonAtOnce ? 0 : LaterAt - 20;
                Assert.AreEqual(expected, streamed.Count, $"request {i} streams its good tokens, then ends");
                continue;
            }

            var reference = (i % 4) is 1 or 2 ? SamplingOptions.Greedy with { MaxTokens = 30 } : options[i];
            CollectionAssert.AreEqual(Alone.Run(model, prompts[i], reference, Eos), completion.Result.Tokens.ToArray(), $"request {i}");
        }

        Assert.AreEqual(blocks.TotalBlocks, blocks.FreeBlocks, "every block back");
        Assert.AreEqual(blocks.MaxRequests, blocks.FreeSlots, "every slot back");
        Assert.AreEqual(0, scheduler.RunningCount);
        Assert.IsFalse(scheduler.Step(), "idle");
        if (!speculative)
        {
            Assert.AreEqual(model.SessionsCreated, model.SessionsDisposed);
        }
    }

    [TestMethod]
    public void MaxTokensZero_FinishesAtOnce_WithoutTakingASlot()
    {
        var model = FakeModel.Bigram(1);
        using var runner = new SessionStepRunner(model);
        using var scheduler = new BatchScheduler(runner, new KvBlockManager(8, 2, 4), new SchedulerOptions { EosId = Eos });
        var r = scheduler.Submit([65, 66], SamplingOptions.Greedy with { MaxTokens = 0 });
        Assert.IsTrue(r.Completion.IsCompletedSuccessfully);
        Assert.AreEqual(0, r.Completion.Result.Tokens.Count);
        Assert.AreEqual(FinishReason.Length, r.Completion.Result.FinishReason);
        Assert.IsFalse(scheduler.Step(), "nothing was queued");
        Assert.AreEqual(0, model.SessionsCreated);
    }
}
