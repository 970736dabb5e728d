using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Hosting;
using DeepSeekCuda.Inference;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Model;
using DeepSeekCuda.Serving;
using DeepSeekCuda.Tests.Inference;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Serving;

/// <summary>
/// Sessions of a <see cref="BatchScheduler"/> (<see cref="BatchScheduler.CreateSession"/>) on tiny-a through the paged runner:
/// each call's logits against a <see cref="DeepSeekSession"/> fed the same calls (its own caches, no scheduler), bit for bit,
/// while requests run in the same steps and keep their outputs alone; the pool shared with requests (a session's growth
/// preempts a request, a request's growth never takes a session's blocks); calls refused or failed leave the session as it
/// was, or say it is lost.
/// </summary>
[TestClass]
public sealed class ScheduledSessionTests
{
    private const int MaxLength = 256;

    private static readonly List<IDisposable> s_owned = [];
    private static DeepSeekModel s_float32 = null!;
    private static DeepSeekModel s_emulation = null!;

    public TestContext TestContext { get; set; } = null!;

    /// <summary>tiny-a on a CPU backend of each numerics (float32, GPU emulation).</summary>
    [ClassInitialize]
    public static void Init(TestContext _)
    {
        using var checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        DeepSeekModel Load(CpuNumerics numerics)
        {
            var backend = new CpuBackend(numerics);
            s_owned.Add(backend);
            var model = DeepSeekModel.Load(checkpoint, backend, new ModelOptions { MaxSequenceLength = MaxLength });
            s_owned.Insert(0, model);
            return model;
        }

        s_float32 = Load(CpuNumerics.Float32);
        s_emulation = Load(CpuNumerics.GpuEmulation);
    }

    [ClassCleanup]
    public static void Cleanup() => s_owned.ForEach(o => o.Dispose());

    private static DeepSeekModel Model(CpuNumerics numerics) => numerics == CpuNumerics.Float32 ? s_float32 : s_emulation;

    private static BatchScheduler Scheduler(IStepRunner runner, DeepSeekModel model, int blocks, int maxBatch, int budget = 32) =>
        new(runner, new KvBlockManager(blocks, maxBatch, KvBlockManager.BlocksFor(MaxLength)),
            new SchedulerOptions { MaxBatch = maxBatch, MaxTokensPerStep = budget, EosId = model.Config.EosTokenId, SpeculativeDecoding = SpeculativeDecodingMode.Off });

    /// <summary>
    /// Runs <paramref name="call"/> of <paramref name="session"/> on another thread and, once it is under way, steps
    /// <paramref name="scheduler"/> here until it returns (or throws).
    /// </summary>
    private static void StepThrough(BatchScheduler scheduler, ScheduledSession session, Action call)
    {
        var task = Task.Run(call);
        SpinWait.SpinUntil(() => session.IsRunningCall || task.IsCompleted);
        var time = System.Diagnostics.Stopwatch.StartNew();
        while (!task.IsCompleted)
        {
            Assert.IsLessThan(60.0, time.Elapsed.TotalSeconds, "the call did not return");
            scheduler.Step();
        }

        task.GetAwaiter().GetResult();
    }

    /// <summary>The exception <paramref name="call"/> ended with, waiting at most a minute for it.</summary>
    private static Exception Failure(Task call)
    {
        Task.WhenAny(call, Task.Delay(TimeSpan.FromMinutes(1))).Wait();
        Assert.IsTrue(call.IsFaulted || call.IsCanceled, $"the call did not fail: {call.Status}");
        try
        {
            call.GetAwaiter().GetResult();
        }
        catch (Exception e)
        {
            return e;
        }

        throw new AssertFailedException("unreachable: a failed task rethrows");
    }

    /// <summary>Asserts that <paramref name="got"/> equals <paramref name="expected"/> bit for bit.</summary>
    private static void AssertBits(float[] expected, float[] got, string what)
    {
        for (var i = 0; i < expected.Length; i++)
        {
            Assert.AreEqual(BitConverter.SingleToInt32Bits(expected[i]), BitConverter.SingleToInt32Bits(got[i]), $"{what}: id {i}: {got[i]:R} against {expected[i]:R}");
        }
    }

    /// <summary>
    /// A session's calls (25 tokens, 1, 2, 40 cut by the step budget, 3, 1) on a running scheduler, two greedy requests decoding
    /// in the same steps: each call's last logits equal a <see cref="DeepSeekSession"/>'s fed the same calls, bit for bit (both
    /// numerics); the requests' outputs equal each alone; some step held the session and a request together. Idle, the session
    /// holds the blocks of its length; disposed, the pool is whole again.
    /// </summary>
    [TestMethod]
    [DataRow(CpuNumerics.Float32)]
    [DataRow(CpuNumerics.GpuEmulation)]
    public void ASessionsCallsEqualItsOwnCachesBitForBitBesideRequests(CpuNumerics numerics)
    {
        var model = Model(numerics);
        var v = model.VocabSize;
        var mixed = new MixedSteps(new PagedStepRunner(model));
        using var scheduler = Scheduler(mixed, model, blocks: 40, maxBatch: 4);
        using var stop = new CancellationTokenSource();
        var loop = scheduler.RunAsync(stop.Token);
        var greedy = SamplingOptions.Greedy with { MaxTokens = 120 };
        int[][] prompts = [SyntheticPrompts.Make(v, 30, 3), SyntheticPrompts.Make(v, 70, 4)];
        var requests = prompts.Select(p => scheduler.Submit(p, greedy)).ToArray();

        using var alone = model.CreateSession();
        var session = scheduler.CreateSession();
        mixed.SessionSlot = () => session.Participant.Slot;
        var fed = 0;
        foreach (var (n, salt) in new[] { (25, 10), (1, 11), (2, 12), (40, 13), (3, 14), (1, 15) })
        {
            var tokens = SyntheticPrompts.Make(v, n, salt);
            var expected = new float[v];
            alone.Forward(tokens, expected);
            var got = new float[v];
            session.Forward(tokens, got);
            fed += n;
            Assert.AreEqual(fed, session.Length);
            AssertBits(expected, got, $"the call of {n} tokens ending at {fed}");
        }

        Task.WaitAll([.. requests.Select(r => r.Completion)], TestContext.CancellationToken);
        for (var i = 0; i < prompts.Length; i++)
        {
            CollectionAssert.AreEqual(Alone.Run(model, prompts[i], greedy), requests[i].Completion.Result.Tokens.ToList(), $"request {i}");
        }

        Assert.IsTrue(mixed.Mixed, "no step held the session's call and a request together");
        Assert.IsTrue(SpinWait.SpinUntil(() => scheduler.RunningCount == 1, 10_000), "the requests did not leave");
        Assert.AreEqual(scheduler.Blocks.TotalBlocks - KvBlockManager.BlocksFor(fed), scheduler.Blocks.FreeBlocks, "an idle session holds the blocks of its length");
        session.Dispose();
        Assert.IsTrue(SpinWait.SpinUntil(() => scheduler.RunningCount == 0, 10_000), "the disposed session kept its slot");
        stop.Cancel();
        loop.Wait(TestContext.CancellationToken);
        Assert.AreEqual(scheduler.Blocks.TotalBlocks, scheduler.Blocks.FreeBlocks, "a disposed session returns its blocks");
        Assert.AreEqual(0L, scheduler.Counters.GeneratedTokens - requests.Sum(r => r.Completion.Result.Tokens.Count), "a session's calls are not counted as generated tokens");
    }

    /// <summary>
    /// A pool of 7 blocks: two requests of 100-token prompts (2 blocks each) decoding, a session of 60 tokens (1 block), then
    /// its call of 180 more (4 blocks: 3 more, 2 free): the newest request is preempted, and resumes when the older one ends;
    /// both outputs equal each alone, and the session's logits equal its own caches'.
    /// </summary>
    [TestMethod]
    public void ASessionsGrowthPreemptsTheNewestRequest()
    {
        var model = Model(CpuNumerics.GpuEmulation);
        var v = model.VocabSize;
        using var scheduler = Scheduler(new PagedStepRunner(model), model, blocks: 7, maxBatch: 3, budget: 256);
        var greedy = SamplingOptions.Greedy with { MaxTokens = 20 };
        int[][] prompts = [SyntheticPrompts.Make(v, 100, 5), SyntheticPrompts.Make(v, 100, 6)];
        var requests = prompts.Select(p => scheduler.Submit(p, greedy)).ToArray();
        scheduler.Step();
        scheduler.Step();
        Assert.AreEqual(3, scheduler.Blocks.FreeBlocks);

        using var alone = model.CreateSession();
        using var session = scheduler.CreateSession();
        foreach (var (n, salt) in new[] { (60, 20), (180, 21) })
        {
            var tokens = SyntheticPrompts.Make(v, n, salt);
            var expected = new float[v];
            alone.Forward(tokens, expected);
            var got = new float[v];
            StepThrough(scheduler, session, () => session.Forward(tokens, got));
            AssertBits(expected, got, $"the call of {n}");
        }

        Assert.AreEqual(1L, scheduler.Preemptions, "the session's growth preempted one request");
        Assert.IsFalse(requests[0].Completion.IsCompleted, "the older request ran on");
        PagedStepRunnerTests.StepUntilDone(scheduler, requests);

        for (var i = 0; i < prompts.Length; i++)
        {
            CollectionAssert.AreEqual(Alone.Run(model, prompts[i], greedy), requests[i].Completion.Result.Tokens.ToList(), $"request {i}");
        }
    }

    /// <summary>
    /// A pool of 3 blocks: a session of 100 tokens holds 2; a request of 60 tokens takes the third and cannot grow past 64 (only
    /// the session holds blocks): it ends with <see cref="KvCacheFullException"/>, and the session's next call is as exact as before.
    /// A second session whose first call needs 2 blocks is refused (sessions hold the rest) and stays empty; then a call that
    /// fits runs. The first session's call that needs one more block is refused and keeps its length; once the second session
    /// is disposed, the same call runs, exact.
    /// </summary>
    [TestMethod]
    public void NoRequestTakesASessionsBlocksAndARefusedCallLeavesTheSessionAsItWas()
    {
        var model = Model(CpuNumerics.GpuEmulation);
        var v = model.VocabSize;
        using var scheduler = Scheduler(new PagedStepRunner(model), model, blocks: 3, maxBatch: 3, budget: 256);
        using var alone = model.CreateSession();
        using var first = scheduler.CreateSession();
        var logits = new float[v];
        void Call(ScheduledSession session, IModelSession? reference, int n, int salt)
        {
            var tokens = SyntheticPrompts.Make(v, n, salt);
            StepThrough(scheduler, session, () => session.Forward(tokens, logits));
            if (reference is not null)
            {
                var expected = new float[v];
                reference.Forward(tokens, expected);
                AssertBits(expected, logits, $"{n} tokens at {session.Length - n}");
            }
        }

        Call(first, alone, 100, 30);
        var request = scheduler.Submit(SyntheticPrompts.Make(v, 60, 31), SamplingOptions.Greedy with { MaxTokens = 10 });
        PagedStepRunnerTests.StepUntilDone(scheduler, request);

        var full = Assert.ThrowsExactly<AggregateException>(() => request.Completion.Wait(TestContext.CancellationToken)).InnerException;
        Assert.IsInstanceOfType<KvCacheFullException>(full, "the request could not grow into the session's blocks");
        Assert.AreEqual(0L, scheduler.Preemptions, "no session was preempted");
        Call(first, alone, 1, 32);

        using var second = scheduler.CreateSession();
        var refused = Assert.ThrowsExactly<KvCacheFullException>(() => Call(second, null, 100, 33));
        StringAssert.Contains(refused.Message, "1 open sessions hold the rest until disposed");
        Assert.AreEqual(0, second.Length);
        using (var secondAlone = model.CreateSession())
        {
            Call(second, secondAlone, 30, 34);
        }

        Assert.AreEqual(0, scheduler.Blocks.FreeBlocks);
        var grow = Assert.ThrowsExactly<KvCacheFullException>(() => Call(first, null, 40, 35));
        StringAssert.Contains(grow.Message, "cannot grow to 141 tokens");
        Assert.AreEqual(101, first.Length, "a refused call feeds nothing");
        second.Dispose();
        Call(first, alone, 40, 35);
        Assert.AreEqual(141, first.Length);
    }

    /// <summary>
    /// What a session refuses before anything runs (no tokens, an id outside the vocabulary, past the context, a short logits
    /// buffer: named, and nothing fed; a second call while one runs); a disposed session; a call pending when the scheduler is
    /// disposed fails, and the session then says its scheduler is gone; a session disposed while its call waits for a slot.
    /// </summary>
    [TestMethod]
    public void RefusedCallsNameTheProblemAndDisposalEndsTheSession()
    {
        var model = Model(CpuNumerics.Float32);
        var v = model.VocabSize;
        var scheduler = Scheduler(new PagedStepRunner(model), model, blocks: 8, maxBatch: 2);
        var session = scheduler.CreateSession();
        var logits = new float[v];
        Assert.ThrowsExactly<ArgumentException>(() => session.Forward([], logits));
        StringAssert.Contains(Assert.ThrowsExactly<ArgumentException>(() => session.Forward([v], logits)).Message, $"token id {v} is outside the vocabulary");
        StringAssert.Contains(Assert.ThrowsExactly<ArgumentException>(() => session.Forward(new int[MaxLength + 1], logits)).Message, $"exceed the maximum sequence length {MaxLength}");
        StringAssert.Contains(Assert.ThrowsExactly<ArgumentException>(() => session.Forward([1], new float[v - 1])).Message, "lastLogits holds");
        Assert.AreEqual(0, session.Length);

        // No thread steps the scheduler: the first call waits, and a second one is refused meanwhile.
        var pending = Task.Run(() => session.Forward([2, 3, 4], new float[v]));
        Assert.IsTrue(SpinWait.SpinUntil(() => session.IsRunningCall, 10_000));
        StringAssert.Contains(Assert.ThrowsExactly<InvalidOperationException>(() => session.Forward([5], logits)).Message, "one call at a time");
        scheduler.Dispose();
        Assert.IsInstanceOfType<ObjectDisposedException>(Failure(pending));
        StringAssert.Contains(Assert.ThrowsExactly<ObjectDisposedException>(() => session.Forward([5], logits)).Message, nameof(BatchScheduler));
        Assert.ThrowsExactly<ObjectDisposedException>(() => scheduler.CreateSession());
        session.Dispose();
        Assert.ThrowsExactly<ObjectDisposedException>(() => session.Forward([5], logits));

        // Disposed from another thread while its first call waits for the slot a request holds: the call fails, the request goes on.
        using var busy = Scheduler(new PagedStepRunner(model), model, blocks: 8, maxBatch: 1);
        var request = busy.Submit(SyntheticPrompts.Make(v, 10, 40), SamplingOptions.Greedy with { MaxTokens = 8 });
        busy.Step();
        var waiting = busy.CreateSession();
        var call = Task.Run(() => waiting.Forward([2, 3], new float[v]));
        while (waiting.Participant.Tokens.Count == 0)
        {
            busy.Step(); // until a step has taken the call, which waits for the slot
        }

        waiting.Dispose();
        busy.Step();
        var disposed = Failure(call);
        Assert.IsInstanceOfType<ObjectDisposedException>(disposed);
        StringAssert.Contains(disposed.Message, "was disposed");
        PagedStepRunnerTests.StepUntilDone(busy, request);

        CollectionAssert.AreEqual(Alone.Run(model, SyntheticPrompts.Make(v, 10, 40), SamplingOptions.Greedy with { MaxTokens = 8 }), request.Completion.Result.Tokens.ToList());
    }

    /// <summary>
    /// A call cancelled part way (200 tokens under a 32-token budget, cancelled after two steps fed 64 of them): its task ends
    /// cancelled, the session keeps its length, its fed positions and the blocks of them, and its next call is exact. A call
    /// cancelled before it starts, and a session's first call cancelled while it waits for a slot, change nothing. On a runner
    /// that cannot drop positions, a call cancelled part way loses the session.
    /// </summary>
    [TestMethod]
    public async Task ACancelledCallLeavesTheSessionAsItWas()
    {
        var model = Model(CpuNumerics.GpuEmulation);
        var v = model.VocabSize;
        using var scheduler = Scheduler(new PagedStepRunner(model), model, blocks: 8, maxBatch: 2);
        using var alone = model.CreateSession();
        using var session = scheduler.CreateSession();
        var logits = new float[v];
        var first = SyntheticPrompts.Make(v, 10, 60);
        alone.Forward(first, new float[v]);
        StepThrough(scheduler, session, () => session.Forward(first, logits));

        using (var cancel = new CancellationTokenSource())
        {
            var call = session.ForwardAsync(SyntheticPrompts.Make(v, 200, 61), logits, cancel.Token);
            scheduler.Step();
            scheduler.Step();
            Assert.AreEqual(74, session.Participant.Fed, "two steps fed 64 of the call's tokens");
            Assert.AreEqual(8 - KvBlockManager.BlocksFor(210), scheduler.Blocks.FreeBlocks, "the call's blocks are reserved");
            cancel.Cancel();
            scheduler.Step();
            Assert.IsInstanceOfType<OperationCanceledException>(Failure(call));
        }

        Assert.AreEqual((10, 10, 10), (session.Length, session.Participant.Fed, session.Participant.Tokens.Count));
        Assert.AreEqual(7, scheduler.Blocks.FreeBlocks, "the cancelled call's blocks went back");
        var next = SyntheticPrompts.Make(v, 5, 62);
        var expected = new float[v];
        alone.Forward(next, expected);
        StepThrough(scheduler, session, () => session.Forward(next, logits));
        AssertBits(expected, logits, "the call after the cancelled one");

        await Assert.ThrowsAsync<OperationCanceledException>(() => session.ForwardAsync(next, logits, new CancellationToken(canceled: true)));
        Assert.AreEqual(15, session.Length);

        var request = scheduler.Submit(SyntheticPrompts.Make(v, 10, 63), SamplingOptions.Greedy with { MaxTokens = 50 });
        scheduler.Step();
        using var second = scheduler.CreateSession();
        using (var cancel = new CancellationTokenSource())
        {
            var waiting = second.ForwardAsync(next, new float[v], cancel.Token);
            scheduler.Step(); // the call waits: the session and the request hold both slots
            Assert.AreEqual(5, second.Participant.Tokens.Count);
            cancel.Cancel();
            scheduler.Step();
            Assert.IsInstanceOfType<OperationCanceledException>(Failure(waiting));
        }

        Assert.AreEqual((0, 0), (second.Length, second.Participant.Tokens.Count));
        request.Cancel();
        scheduler.Step();

        // A runner without Truncate: the session is lost, and says so.
        var bigram = FakeModel.Bigram(seed: 4);
        using var sessions = new BatchScheduler(new SessionStepRunner(bigram), new KvBlockManager(8, 2, 4), new SchedulerOptions { MaxTokensPerStep = 16 });
        using var fake = sessions.CreateSession();
        using (var cancel = new CancellationTokenSource())
        {
            var call = fake.ForwardAsync(Enumerable.Range(65, 40).ToArray(), new float[bigram.VocabSize], cancel.Token);
            sessions.Step();
            cancel.Cancel();
            sessions.Step();
            var lost = Failure(call);
            Assert.IsInstanceOfType<InvalidOperationException>(lost);
            StringAssert.Contains(lost.Message, "cannot drop positions");
        }

        StringAssert.Contains(Assert.ThrowsExactly<InvalidOperationException>(() => fake.Forward([65], new float[bigram.VocabSize])).Message, "lost its cache");
    }

    /// <summary>A step that fails ends its session's call with the failure; the session's next call says its cache is lost.</summary>
    [TestMethod]
    public void AFailedStepLosesTheSessionsCache()
    {
        var model = Model(CpuNumerics.Float32);
        var v = model.VocabSize;
        var failing = new FailingSteps(new PagedStepRunner(model));
        using var scheduler = Scheduler(failing, model, blocks: 8, maxBatch: 2);
        using var session = scheduler.CreateSession();
        var logits = new float[v];
        StepThrough(scheduler, session, () => session.Forward([2, 3, 4], logits));
        failing.Fail = true;
        var task = Task.Run(() => session.Forward([5], logits));
        var time = System.Diagnostics.Stopwatch.StartNew();
        while (!task.IsCompleted && time.Elapsed < TimeSpan.FromMinutes(1))
        {
            try
            {
                scheduler.Step();
            }
            catch (InvalidDataException)
            {
                // The step's failure, rethrown to its caller after it ended the session's call.
            }
        }

        var failed = Failure(task);
        Assert.IsInstanceOfType<InvalidDataException>(failed);
        Assert.AreEqual("step failed", failed.Message);
        Assert.AreEqual(3, session.Length);
        Assert.AreEqual(scheduler.Blocks.TotalBlocks, scheduler.Blocks.FreeBlocks, "the lost session's blocks went back");
        failing.Fail = false;
        var lost = Assert.ThrowsExactly<InvalidOperationException>(() => session.Forward([5], logits));
        StringAssert.Contains(lost.Message, "lost its cache");
        Assert.IsInstanceOfType<InvalidDataException>(lost.InnerException);
    }

    /// <summary>
    /// A chat client's session runs in its scheduler's pool (awaited, on the client's running scheduler): its logits equal the
    /// model's own session's, it holds a slot and the blocks of its length until disposed; disposing the client ends it.
    /// </summary>
    [TestMethod]
    public async Task AChatClientsSessionRunsInItsPool()
    {
        var model = FakeModel.Bigram(seed: 3);
        var client = new DeepSeekChatClient(model, new FakeTokenizer(), new DeepSeekChatClientOptions { ModelId = "fake", MaxBatch = 2, KvCacheBlocks = 8 });
        var session = client.CreateSession();
        using var alone = model.CreateSession();
        int[] tokens = [.. Enumerable.Range(65, 70)];
        var expected = new float[model.VocabSize];
        alone.Forward(tokens, expected);
        var got = new float[model.VocabSize];
        await session.ForwardAsync(tokens, got, TestContext.CancellationToken);
        CollectionAssert.AreEqual(expected, got);
        Assert.AreEqual(1, client.Scheduler.RunningCount);
        Assert.AreEqual(6, client.Scheduler.Blocks.FreeBlocks, "70 tokens hold 2 blocks");
        session.Dispose();
        Assert.IsTrue(SpinWait.SpinUntil(() => client.Scheduler.RunningCount == 0, 10_000), "the disposed session kept its slot");
        var other = client.CreateSession();
        client.Dispose();
        Assert.ThrowsExactly<ObjectDisposedException>(() => other.Forward([65], got));
        Assert.ThrowsExactly<ObjectDisposedException>(() => client.CreateSession());
    }

    /// <summary>Notes whether a step held the session's slot beside another; the steps run as the scheduler calls them (tokens chosen in the runner).</summary>
    private sealed class MixedSteps(IStepRunner inner) : DelegatingStepRunner(inner), IStepRunner
    {
        public Func<int> SessionSlot { get; set; } = () => -1;

        public volatile bool Mixed;

        void IStepRunner.ForwardChooseAndDraft(ReadOnlySpan<StepSequence> batch, ReadOnlySpan<TokenChoice> choices, Span<int> tokens, Span<float> logits,
            ReadOnlySpan<bool> drafting, TokenChoice draftChoice, Span<int> drafts)
        {
            var slot = SessionSlot();
            var session = false;
            foreach (var e in batch)
            {
                session |= e.Slot == slot;
            }

            Mixed |= session && batch.Length > 1;
            Inner.ForwardChooseAndDraft(batch, choices, tokens, logits, drafting, draftChoice, drafts);
        }
    }

    /// <summary>Fails every step while <see cref="Fail"/> is set.</summary>
    private sealed class FailingSteps(IStepRunner inner) : DelegatingStepRunner(inner)
    {
        public volatile bool Fail;

        public override void Forward(ReadOnlySpan<StepSequence> batch, Span<float> logits)
        {
            if (Fail)
            {
                throw new InvalidDataException("step failed");
            }

            base.Forward(batch, logits);
        }
    }
}
