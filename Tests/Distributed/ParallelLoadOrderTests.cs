using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Distributed;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Synthetic;
using DeepSeekCuda.Model;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Distributed;

/// <summary>
/// A <see cref="DeepSeekModel"/>'s load over several devices and over one (N = 0 below: through the same planned
/// load as a pipeline of one) follow <see cref="PlacementPlan.LoadOrder"/>: every read of checkpoint bytes
/// (recorded by <see cref="Checkpoint.ReadObserver"/>, the scale grid of an FP8 weight included) is attributed to its
/// load unit (a layer, or the embedding, final norm, lm_head), and the trace must visit each unit in one contiguous
/// run (all its devices back to back: a re-read of a tensor by another device comes right after the first read, so
/// from the page cache), units in shard order and file order of their first tensor, and every tensor the plan places
/// must be read, and nothing else. Progress after each upload is the bytes the devices have received over the bytes the plan
/// places, each placement counted once, ending at exactly 1. Logits must match the single-device model as in
/// <see cref="ParallelModelTests"/>.
/// Models: tiny-a (2 shards, 3 layers, one MTP layer), a synthetic 4-shard model with 8 layers and a tied head, and the same
/// with two MTP layers (the plan places and the load reads the first alone), loaded with and without the MTP module.
/// </summary>
[TestClass]
public sealed class ParallelLoadOrderTests
{
    private static readonly int[] s_prompt = [0, 17, 42, 99, 7, 230, 5, 11];
    private static string s_root = null!;
    private static readonly Dictionary<string, string> s_dirs = [];

    public static IEnumerable<object[]> Cases =>
    [
        ["tiny-a", PlacementKind.Pipeline, 0], ["tiny-a", PlacementKind.Pipeline, 1], ["tiny-a", PlacementKind.Pipeline, 2], ["tiny-a", PlacementKind.Pipeline, 3],
        ["tiny-a", PlacementKind.TensorExpertParallel, 1], ["tiny-a", PlacementKind.TensorExpertParallel, 2], ["tiny-a", PlacementKind.TensorExpertParallel, 4],
        ["tied8x4", PlacementKind.Pipeline, 0], ["tied8x4", PlacementKind.Pipeline, 1], ["tied8x4", PlacementKind.Pipeline, 2], ["tied8x4", PlacementKind.Pipeline, 4],
        ["tied8x4", PlacementKind.TensorExpertParallel, 1], ["tied8x4", PlacementKind.TensorExpertParallel, 2], ["tied8x4", PlacementKind.TensorExpertParallel, 4],
        ["tiny-a+mtp", PlacementKind.Pipeline, 0], ["tiny-a+mtp", PlacementKind.Pipeline, 2], ["tiny-a+mtp", PlacementKind.TensorExpertParallel, 2],
        ["tied8x4+mtp2", PlacementKind.Pipeline, 0], ["tied8x4+mtp2", PlacementKind.Pipeline, 2], ["tied8x4+mtp2", PlacementKind.TensorExpertParallel, 4],
    ];

    [ClassInitialize]
    public static void Init(TestContext _)
    {
        s_root = Path.Combine(Path.GetTempPath(), "dscuda-loadorder-" + Guid.NewGuid().ToString("N"));
        SyntheticCheckpoint.Write(Path.Combine(s_root, "tied8x4"), DistributedModels.Tied8, 23, shards: 4);
        SyntheticCheckpoint.Write(Path.Combine(s_root, "tied8x4+mtp2"), DistributedModels.Tied8 with { NumNextNPredictLayers = 2 }, 29, shards: 4);
        s_dirs["tiny-a"] = s_dirs["tiny-a+mtp"] = SharedData.TinyAModel;
        s_dirs["tied8x4"] = Path.Combine(s_root, "tied8x4");
        s_dirs["tied8x4+mtp2"] = Path.Combine(s_root, "tied8x4+mtp2");
    }

    [ClassCleanup]
    public static void Cleanup() => Directory.Delete(s_root, true);

    private static ModelOptions Options => new() { MaxSequenceLength = 64, LoadMtp = false };

    [TestMethod]
    [DynamicData(nameof(Cases))]
    public void LoadWalksShardsInOrderAndReadsEachUnitOnce(string model, PlacementKind kind, int n)
    {
        // A checkpoint of its own: the observer must see this load's reads only.
        using var checkpoint = Checkpoint.Open(s_dirs[model]);
        var mtp = model.EndsWith("mtp", StringComparison.Ordinal) || model.EndsWith("mtp2", StringComparison.Ordinal);
        var options = Options with { LoadMtp = mtp };
        var shardIndex = checkpoint.ShardFiles.Select((f, i) => (f, i)).ToDictionary(x => x.f, x => x.i);
        Assert.AreEqual(model.StartsWith("tiny-a", StringComparison.Ordinal) ? 2 : 4, shardIndex.Count, "shards");
        var reads = new List<(TensorInfo Tensor, long Start, long Length)>();
        checkpoint.ReadObserver = (t, start, length) =>
        {
            // The CPU backend dequantizes a layer's experts on several threads.
            lock (reads)
            {
                reads.Add((t, start, length));
            }
        };
        var devices = Enumerable.Range(0, Math.Max(1, n)).Select(_ => new RecordingBackend(new CpuBackend(maxDegreeOfParallelism: 2))).ToArray();
        var comm = new HostCommunicator(devices);
        var plan = SimulatedDevices.PlanOf(checkpoint.Config, kind, Math.Max(1, n), mtp);
        Assert.AreEqual(mtp, plan.IncludesMtp, "the plan places the MTP layer");

        // What a device holds after receiving a weight: its placement's bytes, with its scale grid's (which comes with it).
        var onDevice = Enumerable.Range(0, plan.DeviceCount).Select(d => plan.On(d).ToLookup(p => (p.Tensor, p.Slice))).ToArray();
        long Held(int device, string tensor, TensorSlice? slice) =>
            onDevice[device][(tensor, slice)].First().Bytes + onDevice[device].Where(g => g.Key.Tensor == tensor + "_scale_inv").Sum(g => g.First().Bytes);
        var planned = Enumerable.Range(0, plan.DeviceCount).Sum(plan.BytesOn);
        var progress = new List<double>();
        var received = new List<double>();
        var report = new SyncProgress(fraction =>
        {
            progress.Add(fraction);
            received.Add((double)Enumerable.Range(0, devices.Length).Sum(d => devices[d].Received.Sum(r => Held(d, r.Tensor, r.Slice))) / planned);
        });
        IDisposable? loaded = null;
        try
        {
            Func<int[], float[]> logits;
            bool hasMtp;
            if (n == 0)
            {
                var one = DeepSeekModel.Load(checkpoint, devices[0], options, report);
                (loaded, logits, hasMtp) = (one, t => one.ComputeLogits(t), one.HasMtp);
                Assert.AreEqual((PlacementKind.Pipeline, 1), (one.Plan.Kind, one.Plan.DeviceCount), "one device: a pipeline of one");
                Assert.IsNull(one.Communicator);
                Assert.AreSame(devices[0], one.Backend);
            }
            else
            {
                var parallel = DeepSeekModel.Load(checkpoint, plan, comm, options, report);
                (loaded, logits, hasMtp) = (parallel, t => parallel.ComputeLogits(t), parallel.HasMtp);
                Assert.AreSame(plan, parallel.Plan);
                Assert.AreSame(comm, parallel.Communicator);
                Assert.AreSame(devices[plan.HeadDevice], parallel.Backend, "the head device's backend");
            }

            checkpoint.ReadObserver = null;
            var what = n == 0 ? $"{model} DeepSeekModel" : $"{model} {kind} N={n}";
            Assert.AreEqual(mtp, hasMtp, $"{what}: the MTP module loaded");

            // Runs of consecutive reads of one unit: each unit exactly once.
            var runs = new List<(string Unit, List<TensorInfo> Tensors)>();
            foreach (var (t, _, _) in reads)
            {
                var unit = PlannedLoad.LoadUnit(t.Name);
                if (runs.Count == 0 || runs[^1].Unit != unit)
                {
                    runs.Add((unit, []));
                }

                runs[^1].Tensors.Add(t);
            }

            var repeated = runs.GroupBy(r => r.Unit).Where(g => g.Count() > 1).Select(g => g.Key).ToArray();
            Assert.IsEmpty(repeated, $"{what}: units read in more than one run: {string.Join(", ", repeated)}");

            // Units in file order: (shard, first byte) of each run's first tensor in the file strictly increases,
            // so the shards are visited in order, each in one stretch.
            var starts = runs.Select(r => r.Tensors.Select(t => (Shard: shardIndex[t.FilePath], t.Begin)).Min()).ToArray();
            for (var k = 1; k < starts.Length; k++)
            {
                Assert.IsTrue(starts[k].CompareTo(starts[k - 1]) > 0,
                    $"{what}: unit {runs[k].Unit} starts at {starts[k]}, before {runs[k - 1].Unit} at {starts[k - 1]}");
            }

            var shardsVisited = starts.Select(s => s.Shard).Distinct().ToArray();
            CollectionAssert.AreEqual(shardsVisited.Order().ToArray(), shardsVisited, $"{what}: shards out of order");

            // Every tensor the plan places is read (scales with their FP8 weights), and nothing else.
            var placed = plan.Placements.Select(p => p.Tensor).ToHashSet();
            var read = reads.Select(r => r.Tensor.Name).ToHashSet();
            Assert.IsTrue(placed.SetEquals(read),
                $"{what}: placed but not read: {string.Join(", ", placed.Except(read).Take(5))}; read but not placed: {string.Join(", ", read.Except(placed).Take(5))}");

            // Each device received exactly its placements, as many times as the plan lists them (as ParallelModelTests checks
            // for the old order), so the plan's bytes per device are what the device holds.
            DistributedModels.AssertEachDeviceReceivedItsPlacements(plan, devices, what);

            // What a byte read once means here: re-reads by other devices stay inside the unit's run. Report the
            // page-cache window this needs (the largest unit) against the bytes handed out.
            var window = runs.Max(r => r.Tensors.DistinctBy(t => t.Name).Sum(t => t.ByteLength));
            var distinct = reads.DistinctBy(r => r.Tensor.Name).Sum(r => r.Tensor.ByteLength);
            Console.WriteLine($"{what}: {runs.Count} units over {shardsVisited.Length} shards; {reads.Sum(r => r.Length)} bytes handed out, "
                + $"{distinct} distinct; largest unit {window} bytes");

            // Progress: a report after each upload (a unit on a device; at least one per unit read) and a last one, rising with
            // the bytes uploaded to exactly 1.
            Assert.IsGreaterThanOrEqualTo(runs.Count + 1, progress.Count, $"{what}: progress reports");
            Assert.IsGreaterThan(0.0, progress[0], $"{what}: the first report");
            Assert.AreEqual(1.0, progress[^1], $"{what}: the last report");
            for (var k = 1; k < progress.Count - 1; k++)
            {
                Assert.IsGreaterThan(progress[k - 1], progress[k], $"{what}: report {k}");
            }

            // Each report is what the devices had received by then over what the plan places (a tied head's copy of the table
            // is one upload, counted once).
            for (var k = 0; k < progress.Count; k++)
            {
                Assert.AreEqual(received[k], progress[k], 1e-12, $"{what}: report {k} against the bytes received");
            }

            // Logits as before: the single-device model, exact for a pipeline (same operations in the same
            // order), within DistributedModels.TensorParallelMaxRel for tensor/expert parallelism (regrouped partial sums).
            using var single = DeepSeekModel.Load(checkpoint, new CpuBackend(), Options);
            var expected = single.ComputeLogits(s_prompt);
            var actual = logits(s_prompt);
            DistributedModels.AssertLikeOneDevice(kind == PlacementKind.Pipeline || n == 1, actual, expected, $"{what} logits");
        }
        finally
        {
            loaded?.Dispose();
            comm.Dispose();
            foreach (var d in devices)
            {
                d.Dispose();
            }
        }
    }
}
