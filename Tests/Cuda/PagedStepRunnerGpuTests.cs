using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Backends.Cuda;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Inference;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Model;
using DeepSeekCuda.Serving;
using DeepSeekCuda.Tests.Distributed;
using DeepSeekCuda.Tests.Model;
using DeepSeekCuda.Tests.Serving;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>
/// <see cref="PagedStepRunner"/> on <see cref="CudaBackend"/> with tiny-a under <see cref="BatchScheduler"/>: 1, 8 and 64
/// concurrent greedy requests of different lengths, prompts prefilled in chunks (a small step budget), give each request
/// the ids it gets alone through the same runner type on the same backend, and the ids plain session decoding on the CPU
/// backend in <see cref="CpuNumerics.GpuEmulation"/> gives it (no runner, no scheduler, no paging); every block is back
/// afterwards. Graph steps give the ids of eager steps, and a warm runner asks the driver for no memory.
/// </summary>
[TestClass]
[TestCategory("Gpu")]
public sealed class PagedStepRunnerGpuTests
{
    private const int MaxLength = 256;
    private const int MaxTokens = 12;
    private const int StepBudget = 24;

    public TestContext TestContext { get; set; } = null!;

    [TestInitialize]
    public void RequireDevice() => GpuGuard.Require();

    [TestCleanup]
    public void CheckContext() => GpuGuard.After(TestContext);

    /// <summary>
    /// A paged runner (decode steps as graphs when <paramref name="graphs"/>) under a scheduler with a slot for each of
    /// <paramref name="requests"/> requests and a step budget of 24 tokens, or, past 8 requests, room for every decode row
    /// beside a 24-token chunk; drafting with the MTP module when <paramref name="speculative"/>.
    /// </summary>
    private static (PagedStepRunner Runner, BatchScheduler Scheduler, KvBlockManager Blocks) Serve(DeepSeekModel model, int requests, bool graphs,
        bool speculative)
    {
        var slots = Math.Max(8, requests);
        var blocks = new KvBlockManager(slots * KvBlockManager.BlocksFor(MaxLength), slots, KvBlockManager.BlocksFor(MaxLength));
        var runner = new PagedStepRunner(model) { DecodeGraphs = graphs };
        var scheduler = new BatchScheduler(runner, blocks, new SchedulerOptions
        {
            MaxTokensPerStep = requests <= 8 ? StepBudget : requests + StepBudget,
            EosId = model.Config.EosTokenId,
            // Plain decoding unless asked: what is compared is the paged batch, not the drafts.
            SpeculativeDecoding = speculative ? SpeculativeDecodingMode.On : SpeculativeDecodingMode.Off,
        });
        return (runner, scheduler, blocks);
    }

    /// <summary>Submits <paramref name="prompts"/> together (before the first step) and steps until every one is done; every block comes back.</summary>
    private static int[][] Drain(BatchScheduler scheduler, KvBlockManager blocks, int[][] prompts, string what, int maxTokens = MaxTokens)
    {
        var requests = prompts.Select(p => scheduler.Submit(p, SamplingOptions.Greedy with { MaxTokens = maxTokens })).ToList();
        var steps = 0;
        while (requests.Any(r => !r.Completion.IsCompleted))
        {
            Assert.IsTrue(scheduler.Step(), $"{what}: work remains while a request is open");
            Assert.IsLessThan(10_000, ++steps, $"{what}: the run ends");
        }

        Assert.IsFalse(scheduler.Step(), $"{what}: idle after the run");
        Assert.AreEqual(blocks.TotalBlocks, blocks.FreeBlocks, $"{what}: every block is back");
        Assert.AreEqual(blocks.MaxRequests, blocks.FreeSlots, $"{what}: every slot is back");
        return [.. requests.Select(r => r.Completion.Result.Tokens.ToArray())];
    }

    /// <summary>Runs <paramref name="prompts"/> concurrently through a fresh paged runner (see <see cref="Serve"/>) and returns their ids.</summary>
    private static int[][] Run(DeepSeekModel model, int[][] prompts, string what, bool graphs = false, bool speculative = false)
    {
        var (runner, scheduler, blocks) = Serve(model, prompts.Length, graphs, speculative);
        using (runner)
        using (scheduler)
        {
            var ids = Drain(scheduler, blocks, prompts, what);
            Assert.AreEqual(graphs, runner.CapturedGraphs > 0, $"{what}: {runner.CapturedGraphs} decode graphs captured");
            return ids;
        }
    }

    [TestMethod]
    [DataRow(1, false)]
    [DataRow(8, false)]
    [DataRow(64, false)]
    [DataRow(8, true)]
    public void ConcurrentGreedyRequestsEqualEachAloneAndTheEmulation(int count, bool bf16Activations)
    {
        using var checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        using var cuda = new CudaBackend(new CudaBackendOptions { Bf16Activations = bf16Activations });
        using var cpu = new CpuBackend(CpuNumerics.GpuEmulation);
        var options = new ModelOptions { MaxSequenceLength = MaxLength };
        using var model = DeepSeekModel.Load(checkpoint, cuda, options);
        using var emulated = DeepSeekModel.Load(checkpoint, cpu, options);
        var prompts = SyntheticPrompts.Staggered(model.VocabSize, count);

        var batch = Run(model, prompts, "cuda batch");
        var alone = prompts.Select((p, i) => Run(model, [p], $"cuda alone {i}")[0]).ToArray();
        var emulation = prompts.Select(p => Alone.Run(emulated, p, SamplingOptions.Greedy with { MaxTokens = MaxTokens }).ToArray()).ToArray();
        for (var i = 0; i < prompts.Length; i++)
        {
            TestContext.WriteLine($"request {i} ({prompts[i].Length} tokens): batch [{string.Join(",", batch[i])}] alone [{string.Join(",", alone[i])}] " +
                                  $"emulation [{string.Join(",", emulation[i])}]");
        }

        for (var i = 0; i < prompts.Length; i++)
        {
            Assert.IsNotEmpty(alone[i], $"request {i} generates");
            CollectionAssert.AreEqual(alone[i], batch[i], $"request {i} ({prompts[i].Length} prompt tokens) of {count}: batched vs alone on CUDA");
            CollectionAssert.AreEqual(emulation[i], alone[i], $"request {i} ({prompts[i].Length} prompt tokens): CUDA paged runner vs CPU emulation session");
        }
    }

    /// <summary>
    /// The eight requests with decode steps as CUDA graphs (each bucket's first step run eagerly and captured, later
    /// ones replayed after the rows' upload, steps padded to their row bucket): the ids of eager steps. With speculative
    /// decoding the graphs run the verify steps (each drafting entry a token and its draft) and the MTP passes follow them; and so with
    /// activations in BF16 storage.
    /// </summary>
    [TestMethod]
    [DataRow(false, false)]
    [DataRow(true, false)]
    [DataRow(true, true)]
    public void DecodeGraphStepsGiveTheIdsOfEagerSteps(bool speculative, bool bf16Activations)
    {
        using var checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        using var cuda = new CudaBackend(new CudaBackendOptions { Bf16Activations = bf16Activations });
        using var model = DeepSeekModel.Load(checkpoint, cuda, new ModelOptions { MaxSequenceLength = MaxLength });
        var prompts = SyntheticPrompts.Staggered(model.VocabSize, 8);
        var eager = Run(model, prompts, "eager", speculative: speculative);
        var graphed = Run(model, prompts, "graphs", graphs: true, speculative: speculative);
        for (var i = 0; i < prompts.Length; i++)
        {
            TestContext.WriteLine($"request {i}: eager [{string.Join(",", eager[i])}] graphs [{string.Join(",", graphed[i])}]");
            CollectionAssert.AreEqual(eager[i], graphed[i], $"request {i} ({prompts[i].Length} prompt tokens): graph steps vs eager steps");
        }
    }

    /// <summary>
    /// Drafts made in the step on CUDA (the MTP pass after the step's choice, fed the ids chosen on the device, eagerly and
    /// in graphs) are the drafts made apart after it: the eight requests, speculative, through a runner that drafts in its
    /// steps and through one that drafts apart (<see cref="WatchedRunner"/> without drafts in the step) give the same ids and
    /// the same drafts and acceptances per request, and the same ids as plain decoding.
    /// </summary>
    [TestMethod]
    [DataRow(false)]
    [DataRow(true)]
    public void DraftsMadeInTheStepAreTheDraftsMadeApart(bool graphs)
    {
        using var checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        using var cuda = new CudaBackend();
        using var model = DeepSeekModel.Load(checkpoint, cuda, new ModelOptions { MaxSequenceLength = MaxLength });
        var prompts = SyntheticPrompts.Staggered(model.VocabSize, 8);
        var plain = Run(model, prompts, "plain");
        ScheduledResult[] Speculative(bool inStep)
        {
            var blocks = new KvBlockManager(8 * KvBlockManager.BlocksFor(MaxLength), 8, KvBlockManager.BlocksFor(MaxLength));
            var runner = new WatchedRunner(new PagedStepRunner(model) { DecodeGraphs = graphs }, model, inStep, _ => false);
            using (runner)
            using (var scheduler = new BatchScheduler(runner, blocks, new SchedulerOptions
            {
                MaxTokensPerStep = StepBudget, EosId = model.Config.EosTokenId, SpeculativeDecoding = SpeculativeDecodingMode.On,
            }))
            {
                var requests = prompts.Select(p => scheduler.Submit(p, SamplingOptions.Greedy with { MaxTokens = MaxTokens })).ToList();
                while (requests.Any(r => !r.Completion.IsCompleted))
                {
                    scheduler.Step();
                }

                Assert.AreEqual(inStep, runner.DraftedInStep > 0, $"{runner.DraftedInStep} drafts made in steps, {runner.DraftedApart} apart");
                return [.. requests.Select(r => r.Completion.Result)];
            }
        }

        var inStep = Speculative(true);
        var apart = Speculative(false);
        for (var i = 0; i < prompts.Length; i++)
        {
            TestContext.WriteLine($"request {i}: in the step {inStep[i].Counters}, apart {apart[i].Counters}");
            CollectionAssert.AreEqual(plain[i], inStep[i].Tokens.ToArray(), $"request {i}: drafting in the step vs plain decoding");
            CollectionAssert.AreEqual(apart[i].Tokens.ToArray(), inStep[i].Tokens.ToArray(), $"request {i}: drafting in the step vs apart");
            Assert.AreEqual((apart[i].Counters.Drafted, apart[i].Counters.Accepted), (inStep[i].Counters.Drafted, inStep[i].Counters.Accepted), $"request {i}: the same drafts");
        }
    }

    /// <summary>
    /// A warm runner asks the driver for no memory: the eight requests run once through a runner (every kernel loaded, every
    /// scratch buffer grown, every graph bucket captured), then again through the same runner and scheduler, with decode
    /// positions running on past two 64-position blocks; not one <c>cuMemAlloc</c> or <c>cuMemHostAlloc</c> happens in the
    /// second run's steps, and it gives the first run's ids. The first run's allocations are reported.
    /// </summary>
    [TestMethod]
    [DataRow(false, false)]
    [DataRow(true, false)]
    [DataRow(true, true)]
    public void AWarmRunnerAllocatesNoDriverMemory(bool graphs, bool speculative)
    {
        const int LongRun = 100;
        using var checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        using var cuda = new CudaBackend();
        using var model = DeepSeekModel.Load(checkpoint, cuda, new ModelOptions { MaxSequenceLength = MaxLength });
        var prompts = SyntheticPrompts.Staggered(model.VocabSize, 8);
        var (runner, scheduler, blocks) = Serve(model, prompts.Length, graphs, speculative);
        using (runner)
        using (scheduler)
        {
            var attached = DriverAllocations.Snapshot();
            var first = Drain(scheduler, blocks, prompts, "warm-up run", LongRun);
            var warm = DriverAllocations.Snapshot();
            TestContext.WriteLine($"warm-up run: {warm.Device - attached.Device} cuMemAlloc, {warm.Pinned - attached.Pinned} cuMemHostAlloc, " +
                                  $"{warm.Bytes - attached.Bytes} bytes; {runner.CapturedGraphs} graphs");
            var second = Drain(scheduler, blocks, prompts, "warm run", LongRun);
            var after = DriverAllocations.Snapshot();
            Assert.AreEqual((0L, 0L, 0L), (after.Device - warm.Device, after.Pinned - warm.Pinned, after.Bytes - warm.Bytes),
                "driver allocations (device, pinned, bytes) in the warm run's steps");
            for (var i = 0; i < prompts.Length; i++)
            {
                Assert.IsGreaterThan(MaxTokens, second[i].Length, $"request {i} decodes past its first block");
                CollectionAssert.AreEqual(first[i], second[i], $"request {i}: the warm run gives the warm-up run's ids");
            }
        }
    }

    /// <summary>
    /// A scheduler's session on CUDA (<see cref="BatchScheduler.CreateSession"/>), its calls (25 tokens, 1, 2, 40 cut by the
    /// step budget, 1) run in the pool beside eight greedy requests decoding: each call's last logits against a CUDA session of
    /// its own fed the same calls (rms_rel 0.02, the chunked-prefill bound, and the same argmax); the requests give the ids they
    /// give alone; disposed, the session returns its blocks.
    /// </summary>
    [TestMethod]
    public void AScheduledSessionGivesTheLogitsOfASessionOfItsOwn()
    {
        using var checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        using var cuda = new CudaBackend();
        using var model = DeepSeekModel.Load(checkpoint, cuda, new ModelOptions { MaxSequenceLength = MaxLength });
        var v = model.VocabSize;
        var prompts = SyntheticPrompts.Staggered(v, 8);
        var alone = prompts.Select((p, i) => Run(model, [p], $"alone {i}")[0]).ToArray();
        var (runner, scheduler, blocks) = Serve(model, prompts.Length, graphs: false, speculative: false);
        using (runner)
        using (scheduler)
        using (var stop = new CancellationTokenSource())
        {
            var loop = scheduler.RunAsync(stop.Token);
            var requests = prompts.Select(p => scheduler.Submit(p, SamplingOptions.Greedy with { MaxTokens = MaxTokens })).ToArray();
            using var own = model.CreateSession();
            var session = scheduler.CreateSession();
            foreach (var (n, salt) in new[] { (25, 50), (1, 51), (2, 52), (40, 53), (1, 54) })
            {
                var tokens = SyntheticPrompts.Make(v, n, salt);
                var expected = new float[v];
                own.Forward(tokens, expected);
                var got = new float[v];
                session.Forward(tokens, got);
                var c = Tolerance.AssertRmsRel(got, expected, 0.02, $"the call of {n} tokens ending at {session.Length}: scheduler session vs a session of its own");
                TestContext.WriteLine(Tolerance.Describe($"call of {n} ending at {session.Length}", c));
                Assert.AreEqual(TinyAReference.ArgMax(expected), TinyAReference.ArgMax(got), $"the call of {n} tokens ending at {session.Length}: next token");
            }

            Task.WaitAll([.. requests.Select(r => r.Completion)], TestContext.CancellationToken);
            for (var i = 0; i < prompts.Length; i++)
            {
                CollectionAssert.AreEqual(alone[i], requests[i].Completion.Result.Tokens.ToArray(), $"request {i} beside the session vs alone");
            }

            session.Dispose();
            Assert.IsTrue(SpinWait.SpinUntil(() => scheduler.RunningCount == 0, 10_000), "the disposed session kept its slot");
            stop.Cancel();
            loop.Wait(TestContext.CancellationToken);
            Assert.AreEqual(blocks.TotalBlocks, blocks.FreeBlocks, "every block is back");
        }
    }

    /// <summary>
    /// A pool made to shrink to fit (a chat client's default) takes what the GPU has left beside the weights and the step
    /// buffers, down to the reserve: after the attach the device's free memory covers the reserve, and one block more on every
    /// pool would not have (up to the driver's 2 MiB granularity, per pool); requests then run in it, the kernel modules and
    /// workspaces they load coming out of the reserve.
    /// </summary>
    [TestMethod]
    public void APoolThatShrinksToFitFillsTheGpuDownToTheReserve()
    {
        const int Cap = 10_000_000;
        using var checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        using var cuda = new CudaBackend();
        using var model = DeepSeekModel.Load(checkpoint, cuda, new ModelOptions { MaxSequenceLength = MaxLength });
        var c = model.Config;
        var pools = c.NumHiddenLayers + (model.HasMtp ? 1 : 0);
        var perBlock = SimulatedGpu.BlockBytes(c, pools);
        var total = cuda.Device.MemoryInfo().Total;
        var reserve = SimulatedGpu.Reserve(total);
        var blocks = new KvBlockManager(Cap, 8, KvBlockManager.BlocksFor(MaxLength)) { ShrinkToFit = true };
        using var runner = new PagedStepRunner(model);
        using var scheduler = new BatchScheduler(runner, blocks, new SchedulerOptions
        {
            MaxTokensPerStep = StepBudget,
            EosId = c.EosTokenId,
            SpeculativeDecoding = SpeculativeDecodingMode.Off,
        });
        cuda.Synchronize();
        var free = cuda.Device.MemoryInfo().Free;
        TestContext.WriteLine($"pool {blocks.TotalBlocks} blocks of {perBlock} bytes over {pools} pools; free {free} of {total}, reserve {reserve}");
        Assert.IsLessThan(Cap, blocks.TotalBlocks, "the pool shrank to the device");
        Assert.IsGreaterThanOrEqualTo(reserve, free, "the reserve is left");
        Assert.IsLessThan(reserve + perBlock + pools * (2L << 20), free, "no block more would have fit");
        var prompts = SyntheticPrompts.Staggered(model.VocabSize, 8);
        var ids = Drain(scheduler, blocks, prompts, "in the fitted pool");
        Assert.IsTrue(ids.All(i => i.Length > 0), "every request decodes");
    }
}
