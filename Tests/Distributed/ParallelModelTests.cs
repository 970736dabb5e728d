using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Distributed;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Synthetic;
using DeepSeekCuda.Model;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Distributed;

/// <summary>
/// Both placement plans run on N simulated devices (one float32 <see cref="CpuBackend"/> each) against the
/// single-device <see cref="DeepSeekModel"/>: a pipeline performs the very same float operations in the
/// same order, so its logits are bit-identical; tensor/expert parallelism regroups the sums of o_proj, the
/// dense/shared MLP's down projection and the expert combine into per-device partials added in device
/// order, which moves float32 results by a few ulps per layer: logits within max_rel 1e-5 (measured
/// about 1e-7 … 1e-6), greedy ids identical.
/// </summary>
[TestClass]
public sealed class ParallelModelTests
{
    private static readonly int[] s_prompt = [0, 17, 42, 99, 7, 230, 5, 11];
    private static readonly Dictionary<string, (Checkpoint Checkpoint, DeepSeekModel Single)> s_models = [];
    private static string s_root = null!;

    public static IEnumerable<object[]> Cases =>
    [
        ["tiny-a", PlacementKind.Pipeline, 1], ["tiny-a", PlacementKind.Pipeline, 2], ["tiny-a", PlacementKind.Pipeline, 3],
        ["tiny-a", PlacementKind.TensorExpertParallel, 1], ["tiny-a", PlacementKind.TensorExpertParallel, 2], ["tiny-a", PlacementKind.TensorExpertParallel, 4],
        ["wide8", PlacementKind.Pipeline, 2], ["wide8", PlacementKind.Pipeline, 4], ["wide8", PlacementKind.Pipeline, 8],
        ["wide8", PlacementKind.TensorExpertParallel, 2], ["wide8", PlacementKind.TensorExpertParallel, 4], ["wide8", PlacementKind.TensorExpertParallel, 8],
    ];

    [ClassInitialize]
    public static void Init(TestContext _)
    {
        s_root = Path.Combine(Path.GetTempPath(), "dscuda-parallel-" + Guid.NewGuid().ToString("N"));
        SyntheticCheckpoint.Write(Path.Combine(s_root, "wide8"), DistributedModels.Wide8, 21);
        foreach (var (name, dir) in new[] { ("tiny-a", SharedData.TinyAModel), ("wide8", Path.Combine(s_root, "wide8")) })
        {
            var checkpoint = Checkpoint.Open(dir);
            s_models[name] = (checkpoint, DeepSeekModel.Load(checkpoint, new CpuBackend(), Options));
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

        Directory.Delete(s_root, true);
    }

    private static ModelOptions Options => new() { MaxSequenceLength = 64, LoadMtp = false };

    [TestMethod]
    [DynamicData(nameof(Cases))]
    public void LogitsMatchTheSingleDeviceModel(string model, PlacementKind kind, int n)
    {
        var (checkpoint, single) = s_models[model];
        using var run = SimulatedDevices.Load(checkpoint, kind, n, Options);
        var expected = single.ComputeLogits(s_prompt);
        var actual = run.Model.ComputeLogits(s_prompt);
        DistributedModels.AssertLikeOneDevice(kind == PlacementKind.Pipeline || n == 1, actual, expected, $"{model} {kind} N={n} logits");

        DistributedModels.AssertTraffic(run.Communicator.Stats, kind, n, checkpoint.Config.NumHiddenLayers);
    }

    [TestMethod]
    [DynamicData(nameof(Cases))]
    public void GreedyDecodeIsIdentical(string model, PlacementKind kind, int n)
    {
        var (checkpoint, single) = s_models[model];
        using var run = SimulatedDevices.Load(checkpoint, kind, n, Options);
        using var a = single.CreateSession();
        using var b = run.Model.CreateSession();
        var la = new float[single.VocabSize];
        var lb = new float[single.VocabSize];
        a.Forward(s_prompt, la);
        b.Forward(s_prompt, lb);
        for (var step = 0; step < 6; step++)
        {
            int ta = ArgMax(la), tb = ArgMax(lb);
            Assert.AreEqual(ta, tb, $"{model} {kind} N={n}: greedy token {step} differs");
            a.Forward([ta], la);
            b.Forward([tb], lb);
        }

        Assert.AreEqual(a.Length, b.Length);
    }

    [TestMethod]
    [DynamicData(nameof(Cases))]
    public void EachDeviceReceivesExactlyWhatThePlanPlaces(string model, PlacementKind kind, int n)
    {
        var (checkpoint, _) = s_models[model];
        using var run = SimulatedDevices.Load(checkpoint, kind, n, Options);
        DistributedModels.AssertEachDeviceReceivedItsPlacements(run.Plan, run.Devices, $"{model} {kind}");
    }

    /// <summary>
    /// A plan that places the MTP layer loads it where the last layer runs (each device receives exactly its placements): whole
    /// on a pipeline's last device, with the embedding there, or a shard of it on every device under tensor/expert
    /// parallelism, the input side (enorm, hnorm, eh_proj) on the head device alone; the layout runs it on those devices. With
    /// <see cref="ModelOptions.LoadMtp"/> off, or a plan without it, no device receives any of the MTP layer.
    /// </summary>
    [TestMethod]
    [DataRow(PlacementKind.Pipeline, 1)]
    [DataRow(PlacementKind.Pipeline, 3)]
    [DataRow(PlacementKind.TensorExpertParallel, 2)]
    [DataRow(PlacementKind.TensorExpertParallel, 4)]
    public void TheMtpModuleLoadsWhereTheLastLayerRunsAsPlanned(PlacementKind kind, int n)
    {
        var (checkpoint, _) = s_models["tiny-a"];
        var c = checkpoint.Config;
        var mtpPrefix = CheckpointLayout.LayerPrefix(c.NumHiddenLayers);
        using (var run = SimulatedDevices.Load(checkpoint, kind, n, Options with { LoadMtp = true }, mtp: true))
        {
            Assert.IsTrue(run.Model.HasMtp);
            DistributedModels.AssertEachDeviceReceivedItsPlacements(run.Plan, run.Devices, $"{kind} with MTP");
            var head = run.Plan.HeadDevice;
            var layout = run.Model.Layout;
            var expected = kind == PlacementKind.Pipeline ? new[] { head } : [.. Enumerable.Range(0, n)];
            CollectionAssert.AreEqual(expected, run.Plan.MtpDevices.ToArray(), "the plan's MTP devices");
            CollectionAssert.AreEqual(expected, layout.MtpRunners, "the layout's MTP runners");
            var names = CheckpointLayout.Layer(c, c.NumHiddenLayers);
            for (var r = 0; r < n; r++)
            {
                var received = run.Devices[r].Received.Where(x => x.Tensor.StartsWith(mtpPrefix, StringComparison.Ordinal)).Select(x => x.Tensor).ToList();
                Assert.AreEqual(expected.Contains(r), received.Count > 0, $"device {r} holds (a shard of) the MTP layer");
                Assert.AreEqual(r == head, received.Contains(names.MtpEhProj), $"device {r}: eh_proj on the head device alone");
                Assert.AreEqual(r == head, layout.Devices[r].Mtp?.HasInput ?? false, $"device {r}: the input side");
                Assert.AreEqual(expected.Contains(r), layout.Devices[r].Mtp is not null, $"device {r}: the MTP weights");
            }
        }

        foreach (var (loadMtp, placed) in new[] { (false, true), (true, false) })
        {
            using var run = SimulatedDevices.Load(checkpoint, kind, n, Options with { LoadMtp = loadMtp }, mtp: placed);
            Assert.IsFalse(run.Model.HasMtp, $"LoadMtp {loadMtp}, placed {placed}");
            Assert.IsEmpty(run.Model.Layout.MtpRunners);
            Assert.IsFalse(run.Devices.Any(d => d.Received.Any(r => r.Tensor.StartsWith(mtpPrefix, StringComparison.Ordinal))), $"LoadMtp {loadMtp}, placed {placed}");
            for (var r = 0; r < n; r++)
            {
                // The embedding where the first layer runs (every device under tensor/expert parallelism), not the copy a
                // pipeline's last device holds for the MTP layer alone.
                var embeddings = (kind == PlacementKind.TensorExpertParallel || r == 0 ? 1 : 0) + (c.TieWordEmbeddings && r == run.Plan.HeadDevice ? 1 : 0);
                Assert.AreEqual(embeddings, run.Devices[r].Received.Count(x => x.Tensor == CheckpointLayout.Embedding), $"LoadMtp {loadMtp}, placed {placed}: embeddings on device {r}");
            }
        }
    }

    /// <summary>
    /// The layout's stages are the plan's: a pipeline's, one per device in device order with the plan's layers; tensor/expert
    /// parallelism's, one over every layer on every device.
    /// </summary>
    [TestMethod]
    [DynamicData(nameof(Cases))]
    public void TheLayoutsStagesAreThePlans(string model, PlacementKind kind, int n)
    {
        var (checkpoint, _) = s_models[model];
        using var run = SimulatedDevices.Load(checkpoint, kind, n, Options);
        var layers = checkpoint.Config.NumHiddenLayers;
        var expected = kind == PlacementKind.Pipeline
            ? run.Plan.Stages.Select((s, d) => $"{s.Start}..{s.Start + s.Count} on [{d}]")
            : [$"0..{layers} on [{string.Join(",", Enumerable.Range(0, n))}]"];
        var actual = run.Model.Layout.Stages.Select(s => $"{s.First}..{s.End} on [{string.Join(",", s.Devices)}]");
        CollectionAssert.AreEqual(expected.ToArray(), actual.ToArray(), $"{model} {kind} N={n}");
    }

    /// <summary>
    /// A layout whose layers change from two devices to a third is refused by name when it is made: a pipeline hands the
    /// stream from one device to one device (the devices here hold a 2-way tensor-parallel model's first layer and the
    /// single-device model's others, none of them owned).
    /// </summary>
    [TestMethod]
    public void ALayoutThatHandsTheStreamFromTwoDevicesToOneIsRefused()
    {
        var (checkpoint, single) = s_models["wide8"];
        using var run = SimulatedDevices.Load(checkpoint, PlacementKind.TensorExpertParallel, 2, Options);
        var sharded = run.Model.Layout;
        var whole = single.Layout.Devices[0];
        var layers = checkpoint.Config.NumHiddenLayers;
        var devices = new DeviceWeights[3];
        for (var d = 0; d < 3; d++)
        {
            var from = d < 2 ? sharded.Devices[d] : whole;
            devices[d] = new DeviceWeights(from.Backend, layers) { Rope = from.Rope, Context = from.Context, Shard = from.Shard };
        }

        for (var d = 0; d < 2; d++)
        {
            devices[d].Layers[0] = sharded.Devices[d].Layers[0];
        }

        for (var i = 1; i < layers; i++)
        {
            devices[2].Layers[i] = whole.Layers[i];
        }

        devices[2].FinalNorm = whole.FinalNorm;
        devices[2].Head = whole.Head;
        var e = Assert.ThrowsExactly<ArgumentException>(() => new DeviceLayout(checkpoint.Config, 64, devices, 2, sharded.Communicator));
        StringAssert.Contains(e.Message, "layer 1 changes from devices [0,1] to [2]");
    }

    /// <summary>
    /// A layout whose MTP layer does not run where its last layer runs, or whose MTP input side is not on the head device
    /// alone, is refused by name when it is made (devices copied from a 2-way tensor-parallel model with its MTP shards, and
    /// the single-device model's whole MTP module, none of them owned).
    /// </summary>
    [TestMethod]
    public void ALayoutWithTheMtpLayerElsewhereOrItsInputTwiceIsRefused()
    {
        var (checkpoint, _) = s_models["tiny-a"];
        var options = Options with { LoadMtp = true };
        using var single = DeepSeekModel.Load(checkpoint, new CpuBackend(), options);
        using var run = SimulatedDevices.Load(checkpoint, PlacementKind.TensorExpertParallel, 2, options, mtp: true);
        var sharded = run.Model.Layout;
        var whole = single.Layout.Devices[0].Mtp!;
        DeviceLayout With(MtpWeights? on0, MtpWeights? on1)
        {
            var devices = new DeviceWeights[2];
            for (var d = 0; d < 2; d++)
            {
                var from = sharded.Devices[d];
                devices[d] = new DeviceWeights(from.Backend, from.Layers.Length)
                {
                    Rope = from.Rope, Context = from.Context, Shard = from.Shard, Embed = from.Embed, FinalNorm = from.FinalNorm, Head = from.Head,
                    Mtp = d == 0 ? on0 : on1,
                };
                from.Layers.CopyTo(devices[d].Layers, 0);
            }

            return new DeviceLayout(checkpoint.Config, 64, devices, 0, sharded.Communicator);
        }

        var (head, other) = (sharded.Devices[0].Mtp!, sharded.Devices[1].Mtp!);
        CollectionAssert.AreEqual(new[] { 0, 1 }, With(head, other).MtpRunners, "as loaded");
        var alone = Assert.ThrowsExactly<ArgumentException>(() => With(whole, null));
        StringAssert.Contains(alone.Message, "the MTP layer is on devices [0]; it runs where the last layer runs, [0,1]");
        var twice = Assert.ThrowsExactly<ArgumentException>(() => With(head, whole));
        StringAssert.Contains(twice.Message, "must be on the head device 0 alone; the input side is on [0,1]");
        var elsewhere = Assert.ThrowsExactly<ArgumentException>(() => With(other, whole));
        StringAssert.Contains(elsewhere.Message, "the input side is on [1]");
    }

    [TestMethod]
    public void ChunkedPrefillAndTruncateFollowTheSingleDeviceSession()
    {
        var (checkpoint, single) = s_models["wide8"];
        using var run = SimulatedDevices.Load(checkpoint, PlacementKind.TensorExpertParallel, 4, Options);
        using var b = run.Model.CreateSession();
        b.ForwardAll(s_prompt.AsSpan(0, 3));
        var rest = b.ForwardAll(s_prompt.AsSpan(3));
        var all = single.ComputeLogits(s_prompt);
        Tolerance.AssertMaxRel(rest, all.AsSpan(3 * single.VocabSize).ToArray(), DistributedModels.TensorParallelMaxRel, "chunked prefill");

        b.Truncate(5);
        var again = b.ForwardAll(s_prompt.AsSpan(5));
        // Not bit-identical: an expert GEMM over one token takes another dot-product path than over several.
        Tolerance.AssertMaxRel(again, rest.AsSpan(2 * single.VocabSize).ToArray(), DistributedModels.TensorParallelMaxRel, "after truncation");
    }

    [TestMethod]
    public void LoadRejectsAMismatchedPlan()
    {
        var (checkpoint, _) = s_models["tiny-a"];
        var devices = Enumerable.Range(0, 2).Select(_ => (IBackend)new CpuBackend()).ToArray();
        using var comm = new HostCommunicator(devices);
        var plan = PlacementPlan.Pipeline(checkpoint.Config, 3);
        var e = Assert.ThrowsExactly<ArgumentException>(() => DeepSeekModel.Load(checkpoint, plan, comm, Options));
        StringAssert.Contains(e.Message, "3 devices");
    }

    [TestMethod]
    public void HostAllReduceSumsInDeviceOrderIdenticallyEverywhere()
    {
        var devices = Enumerable.Range(0, 3).Select(_ => (IBackend)new CpuBackend()).ToArray();
        using var comm = new HostCommunicator(devices);
        var rng = new Random(3);
        var values = Enumerable.Range(0, 3).Select(_ => Enumerable.Range(0, 10).Select(_ => (float)(rng.NextDouble() * 2e3 - 1e3)).ToArray()).ToArray();
        var tensors = Enumerable.Range(0, 3).Select(d => devices[d].Upload(values[d], 2, 5)).ToArray();
        comm.AllReduceSum(tensors);
        for (var d = 0; d < 3; d++)
        {
            var got = new float[10];
            devices[d].Download(tensors[d], got);
            for (var i = 0; i < 10; i++)
            {
                Assert.AreEqual(values[0][i] + values[1][i] + values[2][i], got[i], 0f, $"device {d} element {i}");
            }

            tensors[d].Dispose();
        }
    }

    /// <summary>
    /// A spread model's session runs the MTP module where its last layer runs: fed the same hiddens and next tokens, in two
    /// calls and again after a rollback, its drafts are the single device's, bit for bit on a pipeline's last device (with no
    /// traffic between the devices) and within the main pass's tolerance under tensor/expert parallelism, where each call
    /// makes three all-reduces: the layer input's broadcast from the head device, and the sharded layer's two.
    /// </summary>
    [TestMethod]
    [DataRow(PlacementKind.Pipeline, 3)]
    [DataRow(PlacementKind.TensorExpertParallel, 2)]
    [DataRow(PlacementKind.TensorExpertParallel, 4)]
    public void ASpreadSessionDraftsAsOneDeviceDoes(PlacementKind kind, int n)
    {
        var (checkpoint, _) = s_models["tiny-a"];
        var options = Options with { LoadMtp = true };
        using var single = DeepSeekModel.Load(checkpoint, new CpuBackend(), options);
        using var run = SimulatedDevices.Load(checkpoint, kind, n, options, mtp: true);
        Assert.IsTrue(run.Model.HasMtp);
        using var a = single.CreateSession();
        using var b = run.Model.CreateSession();
        var (t, d) = (s_prompt.Length, checkpoint.Config.HiddenSize);
        var (ha, hb) = (new float[t * d], new float[t * d]);
        var la = a.Forward(s_prompt, 2, ha);
        var lb = b.Forward(s_prompt, 2, hb);
        var exact = kind == PlacementKind.Pipeline;
        DistributedModels.AssertLikeOneDevice(exact, lb, la, "verify logits");
        DistributedModels.AssertLikeOneDevice(exact, hb, ha, "final hiddens");
        CollectionAssert.AreEqual(hb[^d..], b.GetLastHidden(), "the last hidden");
        var traffic = run.Communicator.Stats;

        int[] next = s_prompt[1..];
        float[] Drafts(DeepSeekSession s, int from, int to) => s.MtpForward(ha.AsSpan(from * d, (to - from) * d), next.AsSpan(from, to - from), from);
        DistributedModels.AssertLikeOneDevice(exact, Drafts(b, 0, 5), Drafts(a, 0, 5), $"{kind} N={n}: drafts of positions 0..4");
        DistributedModels.AssertLikeOneDevice(exact, Drafts(b, 5, t - 1), Drafts(a, 5, t - 1), $"{kind} N={n}: drafts of positions 5..");
        Assert.AreEqual(t - 1, b.MtpLength);
        a.Truncate(3);
        b.Truncate(3);
        Assert.AreEqual(3, b.MtpLength);
        DistributedModels.AssertLikeOneDevice(exact, Drafts(b, 3, t - 1), Drafts(a, 3, t - 1), $"{kind} N={n}: drafts after the rollback");
        var mtp = run.Communicator.Stats;
        Assert.AreEqual(traffic.Copies, mtp.Copies, "the MTP calls copy nothing");
        Assert.AreEqual(traffic.AllReduces + (exact ? 0 : 3 * 3), mtp.AllReduces, "all-reduces of three MTP calls");
    }

    /// <summary>The layouts whose failures part way are tested: <see cref="DeepSeekModel"/> on one device (N = 0), a pipeline over 3, tensor/expert parallelism over 2.</summary>
    public static IEnumerable<object[]> FailureCases => [[PlacementKind.Pipeline, 0], [PlacementKind.Pipeline, 3], [PlacementKind.TensorExpertParallel, 2]];

    /// <summary>
    /// A load that fails part way (on any device, at any of its weight uploads: inside a main layer, inside the MTP layer or
    /// its input side, the embedding, norms, head and rotary table) throws and leaves no weight uploaded on any device:
    /// a <see cref="DeepSeekModel"/> on one device, and over a pipeline's and tensor/expert parallel
    /// devices, where the MTP layer is on each device that runs the last layer and eh_proj on the head device alone.
    /// </summary>
    [TestMethod]
    [DynamicData(nameof(FailureCases))]
    public void ALoadThatFailsAtAnyWeightReleasesEveryWeight(PlacementKind kind, int n)
    {
        var (checkpoint, _) = s_models["tiny-a"];
        var c = checkpoint.Config;
        var options = Options with { LoadMtp = true };
        var plan = n == 0 ? null : SimulatedDevices.PlanOf(c, kind, n, mtp: true);
        var count = Math.Max(1, n);
        IDisposable Load(RecordingBackend[] devices)
        {
            if (plan is null)
            {
                return DeepSeekModel.Load(checkpoint, devices[0], options);
            }

            var comm = new HostCommunicator(devices);
            try
            {
                return DeepSeekModel.Load(checkpoint, plan, comm, options);
            }
            finally
            {
                comm.Dispose(); // the model does not own it, and the recording devices outlive it here
            }
        }

        RecordingBackend[] Devices() => [.. Enumerable.Range(0, count).Select(_ => new RecordingBackend(new CpuBackend()))];
        void Dispose(RecordingBackend[] devices)
        {
            foreach (var d in devices)
            {
                d.Dispose();
            }
        }

        var good = Devices();
        var mtpLayer = CheckpointLayout.Layer(c, c.NumHiddenLayers);
        var prefix = CheckpointLayout.LayerPrefix(c.NumHiddenLayers);
        Load(good).Dispose();
        var uploads = good.Select(d => d.Weights.Count).ToArray();
        for (var r = 0; r < count; r++)
        {
            var mtp = good[r].WeightNames.Where(x => x.StartsWith(prefix, StringComparison.Ordinal)).ToList();
            Assert.AreEqual(plan?.MtpDevices.Contains(r) ?? true, mtp.Count > 0, $"device {r} uploads the MTP layer");
            Assert.AreEqual(r == (plan?.HeadDevice ?? 0), mtp.Contains(mtpLayer.MtpEhProj), $"device {r}: eh_proj");
        }

        Dispose(good);
        for (var r = 0; r < count; r++)
        {
            for (var k = 1; k <= uploads[r]; k++)
            {
                var devices = Devices();
                try
                {
                    devices[r].FailAtWeight = k;
                    var e = Assert.ThrowsExactly<InvalidOperationException>(() => Load(devices));
                    StringAssert.Contains(e.Message, "simulated out of memory");
                    var kept = devices.SelectMany(d => d.Weights.Zip(d.WeightNames)).Where(w => !w.First.IsDisposed).Select(w => w.Second).ToList();
                    Assert.IsEmpty(kept, $"device {r}, weight {k} failed; kept: {string.Join(", ", kept)}");
                }
                finally
                {
                    Dispose(devices);
                }
            }
        }
    }

    /// <summary>
    /// A session holds caches for what it has used: creating one allocates the last hidden on the head device and no cache;
    /// its first call a latent cache of whole blocks for each layer on each device that runs it (its first MTP call, the MTP
    /// layer's, where that runs); a call past them grows every cache to twice its length at least, the positions held copied.
    /// A growth that cannot allocate part way (on any device, at any of its allocations) throws, releases what it had
    /// allocated on every device and leaves the session as it was: the same call then gives what it gives in a session where
    /// nothing failed, bit for bit.
    /// </summary>
    [TestMethod]
    [DynamicData(nameof(FailureCases))]
    public void ASessionThatCannotGrowItsCachesStaysAsItWas(PlacementKind kind, int n)
    {
        var (checkpoint, _) = s_models["tiny-a"];
        var options = Options with { LoadMtp = true, MaxSequenceLength = 256 };
        using var one = n == 0 ? new RecordingBackend(new CpuBackend()) : null;
        using var single = one is null ? null : DeepSeekModel.Load(checkpoint, one, options);
        using var run = n == 0 ? null : SimulatedDevices.Load(checkpoint, kind, n, options, mtp: true);
        var devices = run?.Devices ?? [one!];
        Func<DeepSeekSession> create = single is null ? run!.Model.CreateSession : single.CreateSession;
        var layout = single?.Layout ?? run!.Model.Layout;
        var prompt = Enumerable.Range(0, 100).Select(i => i * 37 % checkpoint.Config.VocabSize).ToArray();
        var d = checkpoint.Config.HiddenSize;
        var hiddens = Enumerable.Range(0, 100 * d).Select(i => MathF.Sin(i * 0.37f)).ToArray();
        var next = prompt[1..].Append(3).ToArray();
        const int First = 30; // one block; the rest of the prompt grows the caches to two

        float[] Rest(DeepSeekSession s) => s.ForwardAll(prompt.AsSpan(First));
        float[] MtpRest(DeepSeekSession s) => s.MtpForward(hiddens.AsSpan(First * d), next.AsSpan(First), First);
        float[] expected, expectedMtp;
        using (var s = create())
        {
            s.ForwardAll(prompt.AsSpan(0, First));
            s.MtpForward(hiddens.AsSpan(0, First * d), next.AsSpan(0, First), 0);
            expected = Rest(s);
            expectedMtp = MtpRest(s);
        }

        var allocated = devices.Select(_ => new List<BackendResource>()).ToArray();
        int[] Caches() => [.. allocated.Select(a => a.OfType<LatentCache>().Count())];
        int[] Layers(bool mtp) => [.. devices.Select((_, r) => mtp ? (layout.MtpRunners.Contains(r) ? 1 : 0) : layout.Runners.Count(runners => runners.Contains(r)))];
        void Clear()
        {
            foreach (var a in allocated)
            {
                a.Clear();
            }
        }

        for (var r = 0; r < devices.Length; r++)
        {
            devices[r].Allocated = allocated[r];
        }

        try
        {
            using var session = create();
            CollectionAssert.AreEqual(devices.Select((_, r) => r == layout.HeadDevice ? 1 : 0).ToArray(), allocated.Select(a => a.Count).ToArray(),
                "a new session: the last hidden, no cache");
            Clear();
            session.ForwardAll(prompt.AsSpan(0, First));
            CollectionAssert.AreEqual(Layers(false), Caches(), "the first call: a cache per layer");
            Assert.IsTrue(allocated.SelectMany(a => a).OfType<LatentCache>().All(c => c.Capacity == 64), "the first caches hold one block");
            Clear();
            session.MtpForward(hiddens.AsSpan(0, First * d), next.AsSpan(0, First), 0);
            CollectionAssert.AreEqual(Layers(true), Caches(), "the first MTP call: the MTP layer's cache");
            Assert.IsTrue(allocated.SelectMany(a => a).OfType<LatentCache>().All(c => c.Capacity == 64), "the first MTP cache holds one block");

            foreach (var (mtp, call, want) in new[] { (false, (Func<DeepSeekSession, float[]>)Rest, expected), (true, MtpRest, expectedMtp) })
            {
                var layers = Layers(mtp);
                for (var r = 0; r < devices.Length; r++)
                {
                    for (var k = 1; k <= layers[r]; k++)
                    {
                        Clear();
                        devices[r].FailAtAllocation = devices[r].Allocations + k;
                        try
                        {
                            var e = Assert.ThrowsExactly<InvalidOperationException>(() => call(session));
                            StringAssert.Contains(e.Message, "simulated out of memory");
                        }
                        finally
                        {
                            devices[r].FailAtAllocation = 0;
                        }

                        var all = allocated.SelectMany(a => a).ToList();
                        Assert.AreEqual(layers.Take(r).Sum() + k - 1, all.Count, $"device {r}, allocation {k}: the caches allocated before it");
                        var kept = all.Where(x => !x.IsDisposed).ToList();
                        Assert.IsEmpty(kept, $"device {r}, allocation {k} failed: {kept.Count} of {all.Count} allocations kept");
                        Assert.AreEqual(First, mtp ? session.MtpLength : session.Length, "the session's length");
                    }
                }

                Clear();
                CollectionAssert.AreEqual(want, call(session), $"{(mtp ? "the MTP layer" : "the layers")} after the failures");
                CollectionAssert.AreEqual(layers, Caches(), "the growth: a cache per layer");
                Assert.IsTrue(allocated.SelectMany(a => a).OfType<LatentCache>().All(c => c.Capacity == 128 && !c.IsDisposed), "grown to two blocks");
            }
        }
        finally
        {
            foreach (var x in devices)
            {
                x.Allocated = null;
            }
        }
    }

    private static int ArgMax(float[] x)
    {
        var best = 0;
        for (var i = 1; i < x.Length; i++)
        {
            if (x[i] > x[best])
            {
                best = i;
            }
        }

        return best;
    }
}
