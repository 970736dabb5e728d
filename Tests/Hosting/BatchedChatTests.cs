using System.Diagnostics.Metrics;
using System.Text;
using DeepSeekCuda.Hosting;
using DeepSeekCuda.Inference;
using DeepSeekCuda.Serving;
using DeepSeekCuda.Tests.Inference;
using DeepSeekCuda.Tests.Serving;
using DeepSeekCuda.Tests.Support;
using DeepSeekCuda.Text;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;

namespace DeepSeekCuda.Tests.Hosting;

/// <summary>
/// Continuous batching through <see cref="DeepSeekChatClient"/>: concurrent requests share the scheduler's
/// steps, and each one's text is what it is alone. Concurrency is made certain, not hoped for: a
/// <see cref="GatedRunner"/> holds the first forward until every request has been submitted (submission
/// is synchronous in GetResponseAsync / the first MoveNextAsync), and records the largest batch it saw.
/// The demo checkpoint (the Tiny architecture with an MTP layer, random weights) is the real model here.
/// </summary>
[TestClass]
public sealed class BatchedChatTests
{
    private static readonly FakeTokenizer Tok = new();

    // Marks reasoning / answer pieces in the texts compared below (a control character no model here writes).
    private const string R = "\u0002r", A = "\u0002a";
    private static string s_dir = null!;
    private static LocalModel s_local = null!;

    [ClassInitialize]
    public static void Init(TestContext _)
    {
        s_dir = TempFolder.NewPath("dscuda-batched");
        DemoModel.WriteTo(s_dir);
        s_local = LocalModel.Load(s_dir);
    }

    [ClassCleanup]
    public static void Cleanup()
    {
        s_local.Dispose();
        TempFolder.DeleteBestEffort(s_dir);
    }

    private static readonly string[] Questions =
    [
        "Hello",
        "Why is the sky blue?",
        "Écris un poème sur la mer, s'il te plaît.",
        "1 + 1 = ?",
        "Tell me a long story about a dragon who learned to count to one hundred.",
    ];

    private static ChatMessage[] Ask(string q) => [new(ChatRole.User, q)];

    /// <summary>Reasoning and answer of a streamed response, tagged so that a moved boundary shows.</summary>
    private static async Task<string> StreamAsync(IChatClient client, IEnumerable<ChatMessage> messages, ChatOptions options, CancellationToken ct = default)
    {
        var text = new StringBuilder();
        await foreach (var u in client.GetStreamingResponseAsync(messages, options, ct))
        {
            foreach (var c in u.Contents)
            {
                text.Append(c switch { TextReasoningContent r => R + r.Text, TextContent t => A + t.Text, _ => "" });
            }
        }

        return Merge(text.ToString());
    }

    /// <summary>The same tagging for a whole response: reasoning first, then the answer.</summary>
    private static string Tagged(ChatResponse response)
    {
        var contents = response.Messages.SelectMany(m => m.Contents).ToList();
        var reasoning = string.Concat(contents.OfType<TextReasoningContent>().Select(r => r.Text));
        var answer = string.Concat(contents.OfType<TextContent>().Select(t => t.Text));
        return (reasoning.Length > 0 ? R + reasoning : "") + (answer.Length > 0 ? A + answer : "");
    }

    /// <summary>Streamed text comes in pieces: (R)a(R)b(A)c → (R)ab(A)c, and empty pieces vanish.</summary>
    private static string Merge(string tagged)
    {
        var parts = tagged.Split('\u0002', StringSplitOptions.RemoveEmptyEntries);
        var sb = new StringBuilder();
        string? kind = null;
        foreach (var p in parts)
        {
            var k = p[..1];
            var body = p[1..];
            if (body.Length == 0)
            {
                continue;
            }

            if (k != kind)
            {
                sb.Append('\u0002').Append(k);
                kind = k;
            }

            sb.Append(body);
        }

        return sb.ToString();
    }

    /// <summary>The reference: the same prompt through a generator with its own session (no scheduler).</summary>
    private static async Task<string> AloneAsync(ILanguageModel model, ITokenizer tokenizer, string question, SamplingOptions sampling)
    {
        var prompt = ChatTemplate.Render([ChatTurn.User(question)], new ChatTemplateOptions { Kind = ChatTemplateKind.R1 });
        var result = await new TextGenerator(model, tokenizer).GenerateTextAsync(tokenizer.Encode(prompt, addBos: false), sampling, ReasoningMode.StartInReasoning);
        return (result.Reasoning.Length > 0 ? R + result.Reasoning : "") + (result.Answer.Length > 0 ? A + result.Answer : "");
    }

    [TestMethod]
    [DataRow(SpeculativeDecodingMode.Auto, DisplayName = "speculative: auto (on at first: the demo has an MTP layer)")]
    [DataRow(SpeculativeDecodingMode.On, DisplayName = "speculative: on")]
    [DataRow(SpeculativeDecodingMode.Off, DisplayName = "speculative: off")]
    public async Task DemoModel_ConcurrentChats_EqualEachAlone_StreamingAndNot(SpeculativeDecodingMode speculative)
    {
        var runner = new GatedRunner(s_local.CreateStepRunner());
        using var client2 = new DeepSeekChatClient(s_local, s_local.Tokenizer, new DeepSeekChatClientOptions { MaxBatch = 16, SpeculativeDecoding = speculative }, stepRunner: runner);
        Assert.AreEqual(speculative != SpeculativeDecodingMode.Off, client2.Scheduler.SpeculativeDecoding);

        // Greedy for all; seeded sampling (each request its own seed) for a second round of the same prompts.
        ChatOptions Greedy() => new() { Temperature = 0, MaxOutputTokens = 14 };
        ChatOptions Seeded(int i) => new() { Temperature = 1, TopP = 1, Seed = 100 + i, MaxOutputTokens = 14 };
        var whole = Questions.Select(q => client2.GetResponseAsync(Ask(q), Greedy())).ToArray();
        var streamed = Questions.Select(q => StreamAsync(client2, Ask(q), Greedy())).ToArray();
        var sampled = Questions.Select((q, i) => StreamAsync(client2, Ask(q), Seeded(i))).ToArray();
        runner.Open();
        await Task.WhenAll(whole);
        await Task.WhenAll(streamed);
        await Task.WhenAll(sampled);

        // Every request was submitted before the first forward ended: the second step holds them all.
        Assert.AreEqual(3 * Questions.Length, runner.LargestBatch);
        for (var i = 0; i < Questions.Length; i++)
        {
            var alone = await AloneAsync(s_local, s_local.Tokenizer, Questions[i], SamplingOptions.Greedy with { MaxTokens = 14 });
            Assert.IsGreaterThan(0, alone.Length);
            Assert.AreEqual(alone, Tagged(whole[i].Result), $"request {i}, non-streaming");
            Assert.AreEqual(alone, streamed[i].Result, $"request {i}, streaming");
            var sampledAlone = await AloneAsync(s_local, s_local.Tokenizer, Questions[i], new SamplingOptions { Temperature = 1, TopP = 1, Seed = 100 + i, MaxTokens = 14 });
            Assert.AreEqual(sampledAlone, sampled[i].Result, $"request {i}, seeded sampling");
        }

        var counters = client2.Scheduler.Counters;
        Assert.AreEqual(speculative != SpeculativeDecodingMode.Off, counters.Drafted > 0, "drafts were verified exactly when speculative decoding is on");
        Assert.AreEqual(client2.Scheduler.Blocks.TotalBlocks, client2.Scheduler.Blocks.FreeBlocks);
        Assert.AreEqual(0, client2.Scheduler.RunningCount);
    }

    [TestMethod]
    public async Task CancelOneMidStream_OthersUndisturbed_AllBlocksReturn()
    {
        var model = FakeModel.Bigram(seed: 8, eosLogit: float.NegativeInfinity);
        var runner = new GatedRunner(new SessionStepRunner(model));
        var options = new DeepSeekChatClientOptions { ModelId = "fake", TemplateKind = ChatTemplateKind.V3, ParseReasoning = false };
        using var client = new DeepSeekChatClient(model, Tok, options, stepRunner: runner);
        ChatOptions Opts(int i) => new() { Temperature = 1, Seed = i, MaxOutputTokens = 40 };

        using var cts = new CancellationTokenSource();
        var cancelledAfter = 0;
        var runningWhenCancelled = -1;
        var disposedWhenCancelled = -1;
        async Task<bool> CancelAfterThree()
        {
            try
            {
                await foreach (var _ in client.GetStreamingResponseAsync(Ask("q0"), Opts(0), cts.Token))
                {
                    if (++cancelledAfter == 3)
                    {
                        await cts.CancelAsync();
                    }
                }
            }
            catch (OperationCanceledException)
            {
                // The request left the batch, and its session was closed, before the exception arrived.
                runningWhenCancelled = client.Scheduler.RunningCount;
                disposedWhenCancelled = model.SessionsDisposed;
                return true;
            }

            return false;
        }

        var cancelled = CancelAfterThree(); // submitted synchronously, before the others
        var others = Enumerable.Range(1, 3).Select(i => StreamAsync(client, Ask("q" + i), Opts(i))).ToArray();

        // The other three stay in the batch while the first is cancelled: each forward waits a little.
        model.OnForward = _ => Thread.Sleep(1);
        runner.Open();
        Assert.IsTrue(await cancelled, "the cancelled stream did not throw OperationCanceledException");
        var texts = await Task.WhenAll(others);

        Assert.AreEqual(3, cancelledAfter);
        Assert.IsLessThanOrEqualTo(3, runningWhenCancelled);
        Assert.IsGreaterThanOrEqualTo(1, disposedWhenCancelled);
        Assert.AreEqual(4, runner.LargestBatch);
        for (var i = 1; i <= 3; i++)
        {
            using var alone = new DeepSeekChatClient(FakeModel.Bigram(seed: 8, eosLogit: float.NegativeInfinity), Tok, options);
            var expected = await StreamAsync(alone, Ask("q" + i), Opts(i));
            Assert.AreEqual(A.Length + 40, expected.Length); // the answer mark and one ASCII character per token
            Assert.AreEqual(expected, texts[i - 1], $"request {i}");
        }

        var blocks = client.Scheduler.Blocks;
        Assert.AreEqual(blocks.TotalBlocks, blocks.FreeBlocks);
        Assert.AreEqual(blocks.MaxRequests, blocks.FreeSlots);
        Assert.AreEqual(4, model.SessionsCreated);
        Assert.AreEqual(4, model.SessionsDisposed);
    }

    [TestMethod]
    public async Task CancelWhileWaitingForASlot_NeverRuns_AndFreesNothingItDidNotTake()
    {
        var model = FakeModel.Bigram(seed: 9, eosLogit: float.NegativeInfinity);
        var runner = new GatedRunner(new SessionStepRunner(model));
        using var client = new DeepSeekChatClient(model, Tok, new DeepSeekChatClientOptions { ModelId = "fake", MaxBatch = 1 }, stepRunner: runner);
        var first = client.GetResponseAsync(Ask("a"), new ChatOptions { Seed = 1, MaxOutputTokens = 8 });
        using var cts = new CancellationTokenSource();
        var queued = client.GetResponseAsync(Ask("b"), new ChatOptions { Seed = 2, MaxOutputTokens = 8 }, cts.Token);
        await cts.CancelAsync();

        // The cancelled request leaves at the next step boundary (the first step is held by the gate).
        runner.Open();
        await Assert.ThrowsAsync<OperationCanceledException>(() => queued);
        Assert.AreEqual(ChatFinishReason.Length, (await first).FinishReason);
        Assert.AreEqual(1, model.SessionsCreated);
        Assert.AreEqual(client.Scheduler.Blocks.TotalBlocks, client.Scheduler.Blocks.FreeBlocks);
    }

    [TestMethod]
    public async Task StopSequencesAndReasoning_PerRequest_UnderBatching()
    {
        int[] prompt = [FakeTokenizer.Bos, FakeTokenizer.UserId, 'H', 'i', FakeTokenizer.AssistantId, FakeTokenizer.Think, '\n'];
        var model = FakeModel.Scripted(Tok.Encode("ponder</think>one two END three", false), prompt.Length);
        var runner = new GatedRunner(new SessionStepRunner(model));
        using var client = new DeepSeekChatClient(model, Tok, new DeepSeekChatClientOptions { ModelId = "fake" }, stepRunner: runner);
        (string[]? Stops, string Expected, bool Stream)[] cases =
        [
            (["END"], R + "ponder" + A + "one two ", false),
            (["two"], R + "ponder" + A + "one ", true),
            (null, R + "ponder" + A + "one two END three", false),
            (["der"], R + "pon", true), // a stop inside the reasoning ends everything there
            (["xyz", " th"], R + "ponder" + A + "one two END", false),
        ];
        var tasks = cases.Select(c =>
        {
            var o = new ChatOptions { StopSequences = c.Stops };
            return c.Stream ? StreamAsync(client, Ask("Hi"), o) : client.GetResponseAsync(Ask("Hi"), o).ContinueWith(t => Tagged(t.Result), TaskScheduler.Default);
        }).ToArray();
        runner.Open();
        var texts = await Task.WhenAll(tasks);
        Assert.AreEqual(cases.Length, runner.LargestBatch);
        for (var i = 0; i < cases.Length; i++)
        {
            Assert.AreEqual(cases[i].Expected, texts[i], $"case {i}");
        }

        // Requests ended by a stop sequence were cancelled in the scheduler: every session closed, every block back.
        Assert.AreEqual(cases.Length, model.SessionsDisposed);
        Assert.AreEqual(client.Scheduler.Blocks.TotalBlocks, client.Scheduler.Blocks.FreeBlocks);
    }

    /// <summary>The text path is one: a scheduled generator yields exactly the updates of the session loop.</summary>
    [TestMethod]
    [DataRow(ReasoningMode.None)]
    [DataRow(ReasoningMode.Detect)]
    public async Task ScheduledGenerator_YieldsTheSameUpdatesAsTheSessionLoop(ReasoningMode mode)
    {
        int[] prompt = [FakeTokenizer.Bos, 'q'];
        var model = FakeModel.Scripted(Tok.Encode("<think>é€ 😀</think>ok, STOP here", false), prompt.Length);
        using var runner = new SessionStepRunner(model);
        var blocks = new KvBlockManager(64, 4, 64);
        using var scheduler = new BatchScheduler(runner, blocks, TextGenerator.SchedulerOptionsFor(Tok));
        using var stop = new CancellationTokenSource();
        var loop = scheduler.RunAsync(stop.Token);
        foreach (var sampling in new[] { SamplingOptions.Greedy, SamplingOptions.Greedy with { StopSequences = ["STOP"] }, SamplingOptions.Greedy with { MaxTokens = 9 } })
        {
            var alone = new List<GenerationUpdate>();
            await foreach (var u in new TextGenerator(model, Tok).GenerateAsync(prompt, sampling, mode))
            {
                alone.Add(u);
            }

            var scheduled = new List<GenerationUpdate>();
            await foreach (var u in new TextGenerator(model, Tok, scheduler).GenerateAsync(prompt, sampling, mode))
            {
                scheduled.Add(u);
            }

            CollectionAssert.AreEqual(alone, scheduled);
            Assert.AreEqual(blocks.TotalBlocks, blocks.FreeBlocks);
        }

        await stop.CancelAsync();
        await loop;
    }

    [TestMethod]
    public void ScheduledGenerator_RejectsASchedulerThatDisagreesWithTheTokenizer()
    {
        var model = FakeModel.Bigram(1);
        using var runner = new SessionStepRunner(model);
        using var scheduler = new BatchScheduler(runner, new KvBlockManager(8, 2, 4), new SchedulerOptions { EosId = 5 });
        Assert.ThrowsExactly<ArgumentException>(() => new TextGenerator(model, Tok, scheduler));
    }

    [TestMethod]
    public async Task DependencyInjection_ModelFolder_UsesTheLocalModelRunnerAndTheBatchOptions()
    {
        var services = new ServiceCollection();
        services.AddDeepSeekCuda(o =>
        {
            o.ModelPath = s_dir;
            o.Chat.MaxBatch = 3;
            o.Chat.MaxTokensPerStep = 32;
        });
        await using var provider = services.BuildServiceProvider();
        var client = provider.GetRequiredService<IChatClient>();
        var scheduler = client.GetService<BatchScheduler>()!;
        Assert.AreEqual(3, scheduler.Options.MaxBatch);
        Assert.AreEqual(32, scheduler.Options.MaxTokensPerStep);
        Assert.IsTrue(scheduler.SpeculativeDecoding, "the LocalModel's runner drafts with the demo's MTP layer");
        var responses = await Task.WhenAll(Questions.Select(q => client.GetResponseAsync(Ask(q), new ChatOptions { Temperature = 0, MaxOutputTokens = 6 })));
        for (var i = 0; i < Questions.Length; i++)
        {
            var alone = await AloneAsync(s_local, s_local.Tokenizer, Questions[i], SamplingOptions.Greedy with { MaxTokens = 6 });
            Assert.AreEqual(alone, Tagged(responses[i]), $"request {i}");
        }
    }

    [TestMethod]
    public async Task Metrics_ObserveBatchSizeAndDrafts()
    {
        using var meters = new TestMeterFactory();
        var runner = new GatedRunner(s_local.CreateStepRunner());
        using var client = new DeepSeekChatClient(s_local, s_local.Tokenizer, new DeepSeekChatClientOptions(), meterFactory: meters, stepRunner: runner);
        var seen = new List<(string Name, double Value)>();
        using var listener = new MeterListener();
        listener.InstrumentPublished = (inst, l) =>
        {
            if (meters.Created.Contains(inst.Meter))
            {
                l.EnableMeasurementEvents(inst);
            }
        };
        listener.SetMeasurementEventCallback<int>((inst, v, _, _) => seen.Add((inst.Name, v)));
        listener.SetMeasurementEventCallback<long>((inst, v, _, _) => seen.Add((inst.Name, v)));
        listener.SetMeasurementEventCallback<double>((inst, v, _, _) => seen.Add((inst.Name, v)));
        listener.Start();

        var tasks = Questions.Take(3).Select(q => client.GetResponseAsync(Ask(q), new ChatOptions { Temperature = 0, MaxOutputTokens = 8 })).ToArray();
        Assert.IsTrue(runner.Entered.Wait(TimeSpan.FromSeconds(30)));
        listener.RecordObservableInstruments();
        // The gated first step holds the requests submitted before the scheduler woke: one to three.
        Assert.IsTrue(seen.Single(m => m.Name == DeepSeekCudaMetrics.RunningRequestsName).Value is >= 1 and <= 3);
        runner.Open();
        await Task.WhenAll(tasks);
        seen.Clear();
        listener.RecordObservableInstruments();
        var c = client.Scheduler.Counters;
        Assert.AreEqual(0.0, seen.Single(m => m.Name == DeepSeekCudaMetrics.RunningRequestsName).Value);
        Assert.AreEqual((double)c.Steps, seen.Single(m => m.Name == DeepSeekCudaMetrics.DecodeStepsName).Value);
        Assert.AreEqual((double)c.Drafted, seen.Single(m => m.Name == DeepSeekCudaMetrics.DraftedName).Value);
        Assert.AreEqual((double)c.Accepted, seen.Single(m => m.Name == DeepSeekCudaMetrics.AcceptedName).Value);
        Assert.AreEqual(c.AcceptanceRate, seen.Single(m => m.Name == DeepSeekCudaMetrics.AcceptanceRateName).Value);
        Assert.IsGreaterThan(0, c.Drafted);
        Assert.AreEqual(3, runner.LargestBatch);
    }

    /// <summary>
    /// Auto on the demo model, whose random MTP layer almost never guesses right: drafting stops after the
    /// first window of drafts, which is logged, and the output equals plain decoding (Off) token for token,
    /// both for the request that was drafting when the switch came and for one submitted afterwards.
    /// </summary>
    [TestMethod]
    public void DemoModel_AutoStopsDraftingAfterOneWindow_OutputUnchanged()
    {
        const int Window = 16;
        var prompt = s_local.Tokenizer.Encode(ChatTemplate.Render([ChatTurn.User("Why is the sky blue?")], new ChatTemplateOptions { Kind = ChatTemplateKind.R1 }), addBos: false);
        var sampling = SamplingOptions.Greedy with { MaxTokens = 48 };
        int[] Run(SpeculativeDecodingMode mode, ListLogger log, out BatchScheduler scheduler, out DecodeCounters first, out DecodeCounters second)
        {
            var runner = s_local.CreateStepRunner();
            var blocks = new KvBlockManager(8, 2, KvBlockManager.BlocksFor(runner.MaxSequenceLength));
            scheduler = new BatchScheduler(runner, blocks, new SchedulerOptions { SpeculativeDecoding = mode, AutoWindow = Window }, log);
            var a = scheduler.Submit(prompt, sampling);
            while (scheduler.Step())
            {
            }

            var b = scheduler.Submit(prompt, sampling);
            while (scheduler.Step())
            {
            }

            first = a.Completion.Result.Counters;
            second = b.Completion.Result.Counters;
            Assert.IsFalse(b.Speculative, "a request submitted after the switch does not draft");
            CollectionAssert.AreEqual(a.Completion.Result.Tokens.ToArray(), b.Completion.Result.Tokens.ToArray());
            var tokens = a.Completion.Result.Tokens.ToArray();
            scheduler.Dispose();
            runner.Dispose();
            return tokens;
        }

        var plainLog = new ListLogger();
        var plain = Run(SpeculativeDecodingMode.Off, plainLog, out _, out var plainCounters, out _);
        Assert.AreEqual(0L, plainCounters.Drafted);
        var log = new ListLogger();
        var auto = Run(SpeculativeDecodingMode.Auto, log, out var scheduler, out var firstCounters, out var secondCounters);

        Assert.AreEqual(48, plain.Length, "long enough to pass the window (no EOS before 48 tokens)");
        CollectionAssert.AreEqual(plain, auto, "auto gives plain decoding's greedy output");
        Assert.AreEqual((long)Window, firstCounters.Drafted, "exactly one window of drafts was verified, then none");
        Assert.IsLessThan(0.3 * Window, (double)firstCounters.Accepted, "the demo's MTP layer guesses badly");
        Assert.AreEqual(0L, secondCounters.Drafted);
        Assert.IsFalse(scheduler.SpeculativeDecoding);
        var switched = log.Entries.Single(e => e.Message.StartsWith("MTP drafting switched off", StringComparison.Ordinal));
        Assert.AreEqual(LogLevel.Information, switched.Level);
        StringAssert.Contains(switched.Message, $"{firstCounters.Accepted} of the last {Window} drafts accepted");
        Assert.IsFalse(plainLog.Entries.Any(e => e.Message.StartsWith("MTP drafting", StringComparison.Ordinal)));
    }

    /// <summary>
    /// Delegates to a real runner; the first <see cref="Forward"/> waits until <see cref="Open()"/> (so every
    /// request submitted meanwhile joins the second step), and the largest batch is recorded.
    /// </summary>
    private sealed class GatedRunner(IStepRunner inner) : DelegatingStepRunner(inner)
    {
        private readonly ManualResetEventSlim _gate = new(false);
        private int _largest;

        /// <summary>Set when the first forward starts (and waits for the gate).</summary>
        public ManualResetEventSlim Entered { get; } = new(false);

        public int LargestBatch => Volatile.Read(ref _largest);

        public void Open() => _gate.Set();

        public override void Forward(ReadOnlySpan<StepSequence> batch, Span<float> logits)
        {
            Entered.Set();

            // Bounded: a broken test fails on its assertions rather than hanging the run.
            _gate.Wait(TimeSpan.FromSeconds(30));
            Volatile.Write(ref _largest, Math.Max(_largest, batch.Length));
            Inner.Forward(batch, logits);
        }

        public override void Dispose()
        {
            Inner.Dispose();
            _gate.Dispose();
            Entered.Dispose();
        }
    }
}
