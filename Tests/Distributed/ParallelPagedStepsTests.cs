using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Backends;
using DeepSeekCuda.Distributed;
using DeepSeekCuda.Inference;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Synthetic;
using DeepSeekCuda.Model;
using DeepSeekCuda.Serving;
using DeepSeekCuda.Tests.Serving;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Distributed;

/// <summary>
/// The multi-device model served batched and paged: <see cref="StepRunners.For"/> gives a <see cref="DeepSeekModel"/> the
/// same <see cref="PagedStepRunner"/> as one device, run here on N simulated devices (one float32 <see cref="CpuBackend"/>
/// each). Its step logits are held to the single-device runner's on the same steps (a pipeline bit for bit; tensor/expert
/// parallelism within max_rel 1e-5, as <see cref="ParallelModelTests"/> explains), each step makes exactly one pass's
/// traffic, scheduled requests equal each request alone on a session of the spread model, and no step allocates on any device.
/// </summary>
[TestClass]
public sealed class ParallelPagedStepsTests
{
    private const int MaxLength = 160;
    private static readonly Dictionary<string, (Checkpoint Checkpoint, DeepSeekModel Single)> s_models = [];
    private static readonly CpuBackend s_backend = new();
    private static string s_root = null!;

    public TestContext TestContext { get; set; } = null!;

    public static IEnumerable<object[]> Cases =>
    [
        ["tiny-a", PlacementKind.Pipeline, 3], ["tiny-a", PlacementKind.TensorExpertParallel, 2],
        ["wide8", PlacementKind.Pipeline, 4], ["wide8", PlacementKind.TensorExpertParallel, 4], ["wide8", PlacementKind.TensorExpertParallel, 8],
    ];

    [ClassInitialize]
    public static void Init(TestContext _)
    {
        s_root = TempFolder.NewPath("dscuda-parallel-paged");
        SyntheticCheckpoint.Write(Path.Combine(s_root, "wide8"), DistributedModels.Wide8, 31);
        foreach (var (name, dir) in new[] { ("tiny-a", SharedData.TinyAModel), ("wide8", Path.Combine(s_root, "wide8")) })
        {
            var checkpoint = Checkpoint.Open(dir);
            s_models[name] = (checkpoint, DeepSeekModel.Load(checkpoint, s_backend, Options));
        }
    }

    [ClassCleanup]
    public static void Cleanup()
    {
        foreach (var (checkpoint, single) in s_models.Values)
        {
            single.Dispose();
            checkpoint.Dispose();
        }

        s_backend.Dispose();
        TempFolder.DeleteBestEffort(s_root);
    }

    private static ModelOptions Options => new() { MaxSequenceLength = MaxLength, LoadMtp = false };

    /// <summary>
    /// The parallel model's runner and the single-device runner through the same batched, paged steps (<see cref="SideBySide"/>:
    /// chunked prefill of three requests together, then decoding them together): the same logits (exactly for a pipeline) and
    /// greedy tokens, and each step one forward pass's traffic: 2 copies per stage boundary, or 2 all-reduces per layer.
    /// </summary>
    [TestMethod]
    [DynamicData(nameof(Cases))]
    public void StepLogitsMatchTheSingleDeviceRunner(string model, PlacementKind kind, int n)
    {
        var (checkpoint, single) = s_models[model];
        using var run = SimulatedDevices.Load(checkpoint, kind, n, Options);
        using var parallel = StepRunners.For(run.Model);
        Assert.IsInstanceOfType<PagedStepRunner>(parallel);
        using var alone = new PagedStepRunner(single);
        var expected = SideBySide.Run(alone);
        var actual = SideBySide.Run(parallel, follow: expected);
        SideBySide.Compare(expected, actual, (want, got, what) =>
            DistributedModels.AssertLikeOneDevice(kind == PlacementKind.Pipeline, got, want, $"{model} {kind} N={n} {what} logits"));

        var stats = run.Communicator.Stats;
        var steps = actual.Steps.Count;
        Assert.AreEqual(kind == PlacementKind.Pipeline ? 2L * (n - 1) * steps : 0, stats.Copies, "copies: two per stage boundary per step");
        Assert.AreEqual(kind == PlacementKind.TensorExpertParallel ? 2L * checkpoint.Config.NumHiddenLayers * steps : 0, stats.AllReduces, "all-reduces: two per layer per step");
    }

    /// <summary>
    /// Decode steps as graphs over every device (<see cref="ICommunicator.CaptureGraph"/>, the devices plain CPU backends of a
    /// host communicator; a pipeline's, a graph per stage on its device with the hand-overs between): the script's decode
    /// steps (three rows, padded to the bucket of four) and its last prefill step (one row) give the logits of eager steps
    /// bit for bit, teacher-forced on the eager run's tokens, with the first step of a bucket run eagerly and captured and
    /// the others replayed, each replay doing its all-reduces or its hand-overs' copies.
    /// </summary>
    [TestMethod]
    [DataRow("tiny-a", PlacementKind.TensorExpertParallel, 2)]
    [DataRow("wide8", PlacementKind.TensorExpertParallel, 4)]
    [DataRow("wide8", PlacementKind.Pipeline, 2)]
    public void DecodeGraphsOverEveryDeviceGiveTheLogitsOfEagerSteps(string model, PlacementKind kind, int n)
    {
        var (checkpoint, _) = s_models[model];
        var devices = Enumerable.Range(0, n).Select(_ => new CpuBackend(maxDegreeOfParallelism: 2)).ToArray();
        try
        {
            using var comm = new HostCommunicator(devices);
            using var parallel = DeepSeekModel.Load(checkpoint, SimulatedDevices.PlanOf(checkpoint.Config, kind, n), comm, Options);
            SideBySide.Trace eager;
            CommunicatorStats eagerTraffic;
            using (var runner = new PagedStepRunner(parallel.Layout))
            {
                eager = SideBySide.Run(runner);
                eagerTraffic = comm.Stats;
            }

            using var graphed = new PagedStepRunner(parallel.Layout) { DecodeGraphs = true };
            var trace = SideBySide.Run(graphed, follow: eager);
            SideBySide.Compare(eager, trace, (want, got, step) => CollectionAssert.AreEqual(want, got, $"{model} {kind} N={n} {step}: graph vs eager logits"));
            // The last prefill step (one prompt's last token) runs in the bucket of one row, the decode steps in that of four.
            Assert.AreEqual(2, graphed.CapturedGraphs, "graphs captured: buckets 1 and 4");
            Assert.AreEqual(eagerTraffic.AllReduces * 2, comm.Stats.AllReduces, "each replay makes its steps' all-reduces");
            Assert.AreEqual(eagerTraffic.Copies * 2, comm.Stats.Copies);
        }
        finally
        {
            foreach (var d in devices)
            {
                d.Dispose();
            }
        }
    }

    /// <summary>
    /// A pipeline's decode steps as graphs on devices whose communicator cannot record collectives (recording devices, which a
    /// host communicator's graph cannot hold; a pipeline needs none): each stage is a graph on its device, so a replayed
    /// decode step queues exactly one operation on each device, its stage's graph, and the communicator makes the two
    /// copies of each hand-over between them; nothing is allocated after the captures, and the logits are the eager
    /// steps' bit for bit.
    /// </summary>
    [TestMethod]
    [DataRow("wide8", 4)]
    [DataRow("tiny-a", 3)]
    public void APipelinesReplayedStepQueuesEachStagesGraphAndItsHandOvers(string model, int n)
    {
        var (checkpoint, _) = s_models[model];
        using var run = SimulatedDevices.Load(checkpoint, PlacementKind.Pipeline, n, Options, uncountedCollectives: true);
        var layout = run.Model.Layout;
        Assert.IsFalse(layout.Communicator!.CanCaptureGraphs, "the collectives cannot be recorded");
        SideBySide.Trace eager;
        using (var runner = new PagedStepRunner(layout))
        {
            eager = SideBySide.Run(runner);
        }

        using var graphed = new PagedStepRunner(layout) { DecodeGraphs = true };
        var ops = run.Devices.Select(d => d.Operations.Count).ToArray();
        var copies = run.Communicator.Stats.Copies;
        var allocations = new int[n];
        var replayed = 0;
        var trace = SideBySide.Run(graphed, follow: eager, stepped: step =>
        {
            var queued = run.Devices.Select((d, r) => d.Operations.Skip(ops[r]).ToArray()).ToArray();
            var copied = run.Communicator.Stats.Copies - copies;
            ops = [.. run.Devices.Select(d => d.Operations.Count)];
            copies = run.Communicator.Stats.Copies;
            if (step == "decode step 0")
            {
                Assert.IsTrue(queued[0].Any(o => o.StartsWith("EmbeddingRows(", StringComparison.Ordinal)), "bucket 4's first step runs eagerly, then is captured");
                allocations = [.. run.Devices.Select(d => d.Allocations)];
            }
            else if (step.StartsWith("decode step", StringComparison.Ordinal))
            {
                replayed++;
                for (var r = 0; r < n; r++)
                {
                    CollectionAssert.AreEqual(new[] { "ReplayGraph" }, queued[r].Select(o => o[..o.IndexOf('(')]).ToArray(), $"{step}: device {r} queues its stage's graph only");
                    Assert.AreEqual(allocations[r], run.Devices[r].Allocations, $"{step}: device {r} allocated");
                }

                Assert.AreEqual(2L * (n - 1), copied, $"{step}: two copies per hand-over");
            }
        });
        SideBySide.Compare(eager, trace, (want, got, step) => CollectionAssert.AreEqual(want, got, $"{model} pipeline N={n} {step}: graph vs eager logits"));
        Assert.AreEqual(5, replayed);
        Assert.AreEqual(2, graphed.CapturedGraphs, "buckets 1 and 4");
    }

    /// <summary>
    /// Greedy and seeded-sampling requests arriving while others prefill in chunks or decode, on a pool too small for all of
    /// them (growth preempts): each output equals its request alone on a session of the same parallel model, and every block
    /// and slot comes back.
    /// </summary>
    [TestMethod]
    [DataRow("wide8", PlacementKind.TensorExpertParallel, 4)]
    [DataRow("wide8", PlacementKind.Pipeline, 3)]
    [DataRow("tiny-a", PlacementKind.TensorExpertParallel, 2)]
    public void ScheduledRequestsEqualEachRequestAlone(string model, PlacementKind kind, int n)
    {
        var (checkpoint, _) = s_models[model];
        using var run = SimulatedDevices.Load(checkpoint, kind, n, Options);
        var parallel = run.Model;
        var eos = checkpoint.Config.EosTokenId;
        var requests = SyntheticPrompts.Mixed(parallel.VocabSize, seed: 11, salt: 400, temperature: 0.9f, topP: 0.9f, samplingSeed: 5);
        var blocks = new KvBlockManager(5, 5, KvBlockManager.BlocksFor(MaxLength));
        using var runner = StepRunners.For(parallel);
        using var scheduler = new BatchScheduler(runner, blocks, new SchedulerOptions { MaxTokensPerStep = 24, EosId = eos });
        var submitted = new List<ScheduledRequest>();
        foreach (var (prompt, sampling) in requests)
        {
            submitted.Add(scheduler.Submit(prompt, sampling));
            scheduler.Step();
        }

        while (submitted.Any(r => !r.Completion.IsCompleted))
        {
            Assert.IsTrue(scheduler.Step());
        }

        for (var i = 0; i < requests.Length; i++)
        {
            CollectionAssert.AreEqual(Alone.Run(parallel, eos, requests[i].Prompt, requests[i].Sampling), submitted[i].Completion.Result.Tokens.ToArray(),
                $"{model} {kind} N={n}: request {i}");
        }

        Assert.IsGreaterThan(0L, scheduler.Preemptions, "the pool is too small for every request at once");
        Assert.AreEqual(blocks.TotalBlocks, blocks.FreeBlocks);
        Assert.AreEqual(blocks.MaxRequests, blocks.FreeSlots);
        TestContext.WriteLine($"{model} {kind} N={n}: preemptions {scheduler.Preemptions}");
    }

    /// <summary>
    /// Once attached, no step allocates on any device: the step buffers planned per device (its layers, its shard's heads
    /// and MLP columns; with MTP drafting, the MTP layer's where it runs, its input side's on the head device) are exactly
    /// those the steps use, and each device's block table is copied only when it changed. The simulated all-reduce and
    /// copies stage through host memory on the devices' inner backends, outside the count.
    /// </summary>
    [TestMethod]
    [DataRow(PlacementKind.TensorExpertParallel, 4, "wide8", false)]
    [DataRow(PlacementKind.Pipeline, 3, "wide8", false)]
    [DataRow(PlacementKind.TensorExpertParallel, 2, "tiny-a", true)]
    [DataRow(PlacementKind.Pipeline, 3, "tiny-a", true)]
    public void StepsAllocateNothingOnAnyDevice(PlacementKind kind, int n, string model, bool mtp)
    {
        var (checkpoint, _) = s_models[model];
        using var run = SimulatedDevices.Load(checkpoint, kind, n, Options with { LoadMtp = mtp }, uncountedCollectives: true, mtp: mtp);
        var blocks = new KvBlockManager(5, 4, KvBlockManager.BlocksFor(MaxLength));
        using var runner = StepRunners.For(run.Model);
        Assert.AreEqual(mtp, runner.CanDraft);
        using var scheduler = new BatchScheduler(runner, blocks, new SchedulerOptions
        {
            MaxTokensPerStep = 24, EosId = checkpoint.Config.EosTokenId,
            SpeculativeDecoding = mtp ? SpeculativeDecodingMode.On : SpeculativeDecodingMode.Off,
        });
        var attached = run.Devices.Select(d => d.Allocations).ToArray();
        var requests = new[] { 50, 3, 33, 70, 17 }.Select((len, i) =>
            scheduler.Submit(SyntheticPrompts.Make(run.Model.VocabSize, len, 500 + i), SamplingOptions.Greedy with { MaxTokens = 30 })).ToList();
        var steps = 0;
        while (requests.Any(r => !r.Completion.IsCompleted))
        {
            scheduler.Step();
            steps++;
            for (var d = 0; d < n; d++)
            {
                Assert.AreEqual(attached[d], run.Devices[d].Allocations, $"step {steps} allocated on device {d}");
            }
        }

        CollectionAssert.AreEqual(Array.Empty<string>(), ((PagedStepRunner)runner).UnusedStepBuffers.ToArray(), "planned step buffers that no step used");
        Assert.AreEqual(mtp, scheduler.Counters.Drafted > 0, "drafted");
        for (var d = 0; d < n; d++)
        {
            Assert.IsLessThan(steps, run.Devices[d].TableUploads, $"device {d}: steps whose table did not change do not copy it");
            Assert.IsGreaterThan(0, run.Devices[d].TableUploads, $"device {d} received the table");
        }

        Assert.IsGreaterThan(0L, scheduler.Preemptions, "the pool is too small for every request at once");
        Assert.AreEqual(blocks.TotalBlocks, blocks.FreeBlocks);
    }

    /// <summary>DeepSeek-V3's step buffers on one device of 8 under tensor/expert parallelism, and on a pipeline stage of MoE layers only, by hand from config.json's numbers.</summary>
    [TestMethod]
    public void ArenaPlansOfDeepSeekV3OnADeviceOfEight()
    {
        var c = ModelPresets.DeepSeekV3;
        static string[] Names(ArenaPlan p) =>
            [.. p.Tensors.Select(t => $"{t.Which} {t.Cols}").Order(StringComparer.Ordinal), .. p.Routings.Select(r => $"routing {r.Experts}x{r.TopK}")];

        // 128 heads / 8 = 16 of 192 (q) and 128 (v); the dense MLP's 18432 columns / 8 = 2304; the router is replicated.
        var shard = PlacementPlan.TensorExpertParallel(c, 8).Shard(3);
        CollectionAssert.AreEqual(new[]
        {
            "AttentionOutput 2048", "AttentionProjection 7168", "FfnInput 7168", "FfnOutput 7168", "KeyValue 576", "MlpGate 2304", "MlpUp 2304",
            "NormedEven 7168", "NormedOdd 7168", "Query 3072", "QueryLatent 1536", "Residual 7168", "routing 256x8",
        }, Names(ArenaPlan.Main(c, null, shard)));

        // A stage of layers 40..47 (all MoE): whole heads, no dense MLP buffers.
        CollectionAssert.AreEqual(new[]
        {
            "AttentionOutput 16384", "AttentionProjection 7168", "FfnInput 7168", "FfnOutput 7168", "KeyValue 576",
            "NormedEven 7168", "NormedOdd 7168", "Query 24576", "QueryLatent 1536", "Residual 7168", "routing 256x8",
        }, Names(ArenaPlan.Main(c, Enumerable.Range(40, 8))));
    }
}
