using DeepSeekCuda.Backends.Cuda;
using DeepSeekCuda.Model;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Synthetic;

namespace DeepSeekCuda.Tests.Distributed;

/// <summary>Placement plans are pure: every tensor placed, bytes balanced, slices cover each tensor exactly, clear errors.</summary>
[TestClass]
public sealed class PlacementPlanTests
{
    public static IEnumerable<object[]> DeviceCounts => [[1], [2], [4], [8]];

    [TestMethod]
    [DynamicData(nameof(DeviceCounts))]
    public void PipelinePlacesEveryTensorOnceInBalancedContiguousStages(int n)
    {
        var config = ModelPresets.DeepSeekV3;
        var plan = PlacementPlan.Pipeline(config, n);
        AssertEveryTensorPlaced(plan);

        // Stages: contiguous, disjoint, covering 0..L-1 in order.
        var next = 0;
        foreach (var (start, count) in plan.Stages)
        {
            Assert.AreEqual(next, start);
            Assert.IsTrue(count >= 1);
            next = start + count;
        }

        Assert.AreEqual(config.NumHiddenLayers, next);

        // Main-layer tensors sit on exactly one device; only the boundary input norms are on two.
        var boundaryNorms = plan.Stages.Skip(1).Select(s => CheckpointLayout.Layer(config, s.Start).InputNorm).ToHashSet();
        foreach (var group in plan.Placements.GroupBy(p => p.Tensor))
        {
            Assert.AreEqual(boundaryNorms.Contains(group.Key) ? 2 : 1, group.Count(), group.Key);
            Assert.IsTrue(group.All(p => p.Slice is null), group.Key);
        }

        // Balanced: contiguous stages cannot beat the mean by less than one layer; the optimal partition is within that.
        var bytes = Enumerable.Range(0, n).Select(plan.BytesOn).ToArray();
        var maxLayer = Enumerable.Range(0, config.NumHiddenLayers).Max(i => LayerBytes(config, i));
        var head = 2L * config.VocabSize * config.HiddenSize;
        Assert.IsTrue(bytes.Max() <= bytes.Sum() / n + maxLayer + head, $"stage bytes {string.Join(", ", bytes)}");
        Assert.AreEqual(n - 1, plan.HeadDevice);
    }

    /// <summary>
    /// A pipeline's largest device holds no more than the best contiguous split of what the devices really hold: the
    /// embedding on the first, each stage's next input norm, the final norm and the head on the last (with a tied head, a
    /// second copy of the table there, as the backends upload it), found by trying every split (the stages' balance ignores
    /// the boundary norms: one norm of slack). A vocabulary of 8,000 makes the table and the head weigh about three layers each.
    /// </summary>
    [TestMethod]
    [DataRow(false, 2)]
    [DataRow(false, 4)]
    [DataRow(true, 2)]
    [DataRow(true, 4)]
    public void PipelineStagesAreTheBestSplitOfWhatEachDeviceHolds(bool tied, int n)
    {
        var config = ((tied ? DistributedModels.Tied8 : DistributedModels.Wide8) with { VocabSize = 8000 }).Validate();
        var plan = PlacementPlan.Pipeline(config, n);
        long table = 2L * config.VocabSize * config.HiddenSize, norm = 2L * config.HiddenSize;
        var layers = Enumerable.Range(0, config.NumHiddenLayers).Select(i => LayerBytes(config, i)).ToArray();
        long Held(int start, int count, int device) => layers.Skip(start).Take(count).Sum() + (device == 0 ? table : 0)
            + (device == n - 1 ? norm + table : norm);
        for (var d = 0; d < n; d++)
        {
            Assert.AreEqual(Held(plan.Stages[d].Start, plan.Stages[d].Count, d), plan.BytesOn(d), $"device {d}");
        }

        // Every split of the layers into n non-empty contiguous stages: cuts after layers c1 < c2 < ... < c(n-1).
        var best = long.MaxValue;
        foreach (var cuts in Cuts(config.NumHiddenLayers, n - 1, 1))
        {
            int[] bounds = [0, .. cuts, config.NumHiddenLayers];
            best = Math.Min(best, Enumerable.Range(0, n).Max(d => Held(bounds[d], bounds[d + 1] - bounds[d], d)));
        }

        Assert.IsLessThanOrEqualTo(best + norm, Enumerable.Range(0, n).Max(plan.BytesOn),
            $"stages {string.Join(", ", plan.Stages)}: {string.Join(", ", Enumerable.Range(0, n).Select(plan.BytesOn))}; best split's largest {best}");

        static IEnumerable<int[]> Cuts(int layers, int count, int from) => count == 0
            ? [[]]
            : Enumerable.Range(from, layers - from).SelectMany(c => Cuts(layers, count - 1, c + 1).Select(rest => (int[])[c, .. rest]));
    }

    [TestMethod]
    [DynamicData(nameof(DeviceCounts))]
    public void TensorExpertParallelSlicesTileEachTensorAndBalanceBytes(int n)
    {
        var config = ModelPresets.DeepSeekV3;
        var plan = PlacementPlan.TensorExpertParallel(config, n);
        AssertEveryTensorPlaced(plan);
        var expected = CheckpointLayout.Expected(config).ToDictionary(t => t.Name);

        foreach (var group in plan.Placements.GroupBy(p => p.Tensor))
        {
            var t = expected[group.Key];
            var devices = group.Select(p => p.Device).ToArray();
            Assert.AreEqual(devices.Length, devices.Distinct().Count(), $"{group.Key} placed twice on a device");
            if (group.All(p => p.Slice is null))
            {
                // Whole tensors: replicated on every device, or on one (lm_head, a routed expert).
                Assert.IsTrue(devices.Length == n || devices.Length == 1, $"{group.Key} on {devices.Length} devices");
                continue;
            }

            // Sliced weights tile the tensor exactly (scale grids cover it, overlapping only at partial blocks).
            Assert.AreEqual(n, devices.Length, group.Key);
            if (t.DType == DType.F32)
            {
                continue;
            }

            // Disjoint rectangles whose areas add up to the whole tensor tile it exactly.
            var slices = group.Select(p => p.Slice!).ToArray();
            Assert.AreEqual(t.Shape[0] * t.Shape[1], slices.Sum(s => (long)s.Rows * s.Cols), $"{group.Key}: slices do not add up");
            for (var i = 0; i < slices.Length; i++)
            {
                for (var j = i + 1; j < slices.Length; j++)
                {
                    TensorSlice a = slices[i], b = slices[j];
                    var overlap = a.RowStart < b.RowStart + b.Rows && b.RowStart < a.RowStart + a.Rows
                                  && a.ColStart < b.ColStart + b.Cols && b.ColStart < a.ColStart + a.Cols;
                    Assert.IsFalse(overlap, $"{group.Key}: {a} and {b} overlap");
                }
            }
        }

        // Every routed expert on exactly one device, e mod N.
        var n3 = CheckpointLayout.Layer(config, 3);
        for (var e = 0; e < config.NRoutedExperts; e++)
        {
            var on = plan.Placements.Where(p => p.Tensor == n3.Expert(e)[0].Weight).Select(p => p.Device).ToArray();
            CollectionAssert.AreEqual(new[] { e % n }, on);
        }

        // For V3 every slice is 128-aligned, so FP8 block scales split cleanly (a GPU keeps the codes as they are).
        foreach (var p in plan.Placements.Where(p => p.Slice is not null && expected[p.Tensor].DType == DType.F8_E4M3))
        {
            Assert.IsTrue(p.Slice!.RowStart % 128 == 0 && p.Slice.ColStart % 128 == 0 && p.Slice.Rows % 128 == 0 && p.Slice.Cols % 128 == 0, $"{p.Tensor} {p.Slice}");
        }

        // Balance: replicated embedding/norms/q_a/kv_a/router are equal everywhere; lm_head (1.85 GB) is the
        // only imbalance, under 5% of a device's ~85 GB at N = 8 and less at smaller N.
        var bytes = Enumerable.Range(0, n).Select(plan.BytesOn).ToArray();
        Assert.IsTrue(bytes.Max() <= bytes.Min() * 1.05, $"device bytes {string.Join(", ", bytes)}");
        Assert.AreEqual(n > 1 ? 2L * config.VocabSize * config.HiddenSize : 0, bytes[0] - bytes[^1]);
    }

    [TestMethod]
    public void ContiguousExpertsAndRaggedWidthsOnTinyPreset()
    {
        var config = ModelPresets.Tiny; // 3 heads, 12 experts, dense width 320, shared width 192
        var plan = PlacementPlan.TensorExpertParallel(config, 3, ExpertAssignment.Contiguous, includeMtp: true);
        AssertEveryTensorPlaced(plan);
        CollectionAssert.AreEqual(new[] { 4, 5, 6, 7 }, plan.Shard(1)!.Experts.ToArray());
        Assert.AreEqual(320, Enumerable.Range(0, 3).Sum(d => plan.Shard(d)!.Dense.Count));
        // With MTP placed, only its copies of the embedding and head are left out.
        var mtp = CheckpointLayout.Layer(config, config.NumHiddenLayers);
        CollectionAssert.AreEquivalent(new[] { mtp.MtpEmbedding, mtp.MtpHead }, plan.Skipped.Keys.ToArray());
    }

    /// <summary>
    /// Asked for, DeepSeek-V3's MTP layer is placed where the last main layer runs, but for its copies of the embedding and
    /// head, which stay skipped. On a pipeline's last device it is whole (each tensor once, unsliced), with a second copy of
    /// the main embedding when that device is not the first: the head device gains exactly those bytes. Under tensor/expert
    /// parallelism it is sharded as the main layer before it is (each of its decoder tensors on the same devices, the same
    /// slices), its input side (enorm, hnorm, eh_proj) on the head device alone, so that at N = 8 no device gains more than
    /// a sixth of the layer where it used to gain all of it. A config without an MTP layer places nothing more.
    /// </summary>
    [TestMethod]
    [DataRow(PlacementKind.Pipeline, 1)]
    [DataRow(PlacementKind.Pipeline, 8)]
    [DataRow(PlacementKind.TensorExpertParallel, 1)]
    [DataRow(PlacementKind.TensorExpertParallel, 8)]
    public void TheMtpLayerIsPlacedWhereTheLastLayerRuns(PlacementKind kind, int n)
    {
        var v3 = ModelPresets.DeepSeekV3;
        var with = SimulatedDevices.PlanOf(v3, kind, n, mtp: true);
        var without = SimulatedDevices.PlanOf(v3, kind, n);
        Assert.IsTrue(with.IncludesMtp);
        Assert.IsFalse(without.IncludesMtp);
        AssertEveryTensorPlaced(with);
        Assert.AreEqual(kind == PlacementKind.Pipeline ? n - 1 : 0, with.HeadDevice);
        var devices = kind == PlacementKind.Pipeline ? new[] { n - 1 } : [.. Enumerable.Range(0, n)];
        CollectionAssert.AreEqual(devices, with.MtpDevices.ToArray());
        Assert.IsEmpty(without.MtpDevices);

        var index = v3.NumHiddenLayers;
        var names = CheckpointLayout.Layer(v3, index);
        var layer = DistributedModels.MtpLayerTensors(v3);
        var prefix = CheckpointLayout.LayerPrefix(index);
        var placed = with.Placements.Where(p => p.Tensor.StartsWith(prefix, StringComparison.Ordinal)).ToList();
        CollectionAssert.AreEquivalent(layer.Select(t => t.Name).ToList(), placed.Select(p => p.Tensor).Distinct().ToList(), "the MTP layer's tensors, each placed");
        CollectionAssert.AreEquivalent(new[] { names.MtpEmbedding, names.MtpHead }, with.Skipped.Keys.ToArray());
        string[] input = [names.MtpEnorm, names.MtpHnorm, names.MtpEhProj];
        foreach (var name in input)
        {
            CollectionAssert.AreEqual(new[] { (with.HeadDevice, (TensorSlice?)null) }, placed.Where(p => p.Tensor == name).Select(p => (p.Device, p.Slice)).ToArray(),
                $"{name}: whole, on the head device alone");
        }

        var layerBytes = DistributedModels.StoredBytes(layer);
        var embedding = 2L * v3.VocabSize * v3.HiddenSize;
        var gained = Enumerable.Range(0, n).Select(d => with.BytesOn(d) - without.BytesOn(d)).ToArray();
        Assert.IsTrue(with.On(with.HeadDevice).Any(p => p.Tensor == CheckpointLayout.Embedding), "the head device embeds the MTP layer's tokens");
        if (kind == PlacementKind.Pipeline)
        {
            Assert.IsTrue(placed.All(p => p.Device == with.HeadDevice && p.Slice is null), "whole, on the head device");
            Assert.AreEqual(placed.Count, placed.Select(p => p.Tensor).Distinct().Count(), "each tensor once");
            var secondEmbedding = n > 1;
            Assert.AreEqual(secondEmbedding ? 2 : 1, with.Placements.Count(p => p.Tensor == CheckpointLayout.Embedding), "embedding placements");
            Assert.AreEqual(layerBytes + (secondEmbedding ? embedding : 0), gained.Sum());
            Assert.AreEqual(gained.Sum(), gained[with.HeadDevice]);
        }
        else
        {
            // Each decoder tensor where the main layer before keeps its counterpart: the same devices, the same slices.
            var last = CheckpointLayout.LayerPrefix(index - 1);
            foreach (var group in placed.Where(p => !input.Contains(p.Tensor) && p.Tensor != names.MtpHeadNorm).GroupBy(p => p.Tensor))
            {
                var main = last + group.Key[prefix.Length..];
                CollectionAssert.AreEqual(with.Placements.Where(p => p.Tensor == main).Select(p => (p.Device, p.Slice)).ToArray(),
                    group.Select(p => (p.Device, p.Slice)).ToArray(), $"{group.Key} is placed as {main}");
            }

            CollectionAssert.AreEqual(devices, placed.Where(p => p.Tensor == names.MtpHeadNorm).Select(p => p.Device).ToArray(), "the head norm on every device");
            Assert.AreEqual(n, with.Placements.Count(p => p.Tensor == CheckpointLayout.Embedding), "embedding placements");
            var inputBytes = DistributedModels.StoredBytes(layer.Where(t => input.Contains(t.Name)));
            for (var d = 1; d < n; d++)
            {
                Assert.AreEqual(gained[0] - inputBytes, gained[d], $"device {d} gains the head device's shard less the input side");
            }

            Console.WriteLine($"N={n}: the MTP layer's {layerBytes} bytes place [{string.Join(", ", gained)}] bytes on the devices");
            Assert.IsLessThan(layerBytes / (n == 1 ? 1 : 6) + 1, gained.Max(), $"the most one device gains, of {layerBytes} bytes");
            Assert.IsGreaterThanOrEqualTo(layerBytes, gained.Sum(), "replicated norms and projections come on top of the layer's bytes");
        }

        var none = DistributedModels.Wide8;
        Assert.IsFalse(SimulatedDevices.PlanOf(none, kind, n, mtp: true).IncludesMtp, "a config without an MTP layer");
        CollectionAssert.AreEqual(SimulatedDevices.PlanOf(none, kind, n).Placements.ToList(), SimulatedDevices.PlanOf(none, kind, n, mtp: true).Placements.ToList());
    }

    /// <summary>
    /// A checkpoint with a second MTP layer: the plan places the first alone (the engine drafts one token, with it), exactly
    /// as for a config with one, and skips every tensor of the second, saying why.
    /// </summary>
    [TestMethod]
    [DataRow(PlacementKind.Pipeline, 1)]
    [DataRow(PlacementKind.Pipeline, 8)]
    [DataRow(PlacementKind.TensorExpertParallel, 8)]
    public void OnlyTheFirstMtpLayerIsPlaced(PlacementKind kind, int n)
    {
        var one = ModelPresets.DeepSeekV3;
        var two = (one with { NumNextNPredictLayers = 2 }).Validate();
        var plan = SimulatedDevices.PlanOf(two, kind, n, mtp: true);
        AssertEveryTensorPlaced(plan);
        CollectionAssert.AreEqual(SimulatedDevices.PlanOf(one, kind, n, mtp: true).Placements.ToList(), plan.Placements.ToList(), "as with one MTP layer");
        var second = CheckpointLayout.Expected(two).Where(t => t.Layer == one.NumHiddenLayers + 1).Select(t => t.Name).ToList();
        Assert.IsNotEmpty(second);
        foreach (var name in second)
        {
            Assert.IsTrue(plan.Skipped.TryGetValue(name, out var why), $"{name} skipped");
            StringAssert.Contains(why, "after the first");
        }
    }

    [TestMethod]
    public void ImpossiblePlansNameTheNumbers()
    {
        var v3 = ModelPresets.DeepSeekV3;
        var heads = Assert.ThrowsExactly<PlacementException>(() => PlacementPlan.TensorExpertParallel(v3, 3));
        StringAssert.Contains(heads.Message, "128 attention heads");
        StringAssert.Contains(heads.Message, "3 devices");

        var layers = Assert.ThrowsExactly<PlacementException>(() => PlacementPlan.Pipeline(ModelPresets.Tiny, 4));
        StringAssert.Contains(layers.Message, "4 devices");
        StringAssert.Contains(layers.Message, "has 3");

        var experts = Assert.ThrowsExactly<PlacementException>(() => PlacementPlan.TensorExpertParallel(ModelPresets.Tiny with { NumAttentionHeads = 16 }, 16));
        StringAssert.Contains(experts.Message, "12 routed experts");

        // 671B does not fit on one 80 GB device, nor on two; the message gives the bytes needed.
        var memory = Assert.ThrowsExactly<PlacementException>(() => PlacementPlan.Choose(v3, 2, 80L << 30));
        StringAssert.Contains(memory.Message, "bytes on a device");
    }

    [TestMethod]
    public void PlannerPrefersTensorExpertParallelWhenItFits()
    {
        var v3 = ModelPresets.DeepSeekV3;
        Assert.AreEqual(PlacementKind.TensorExpertParallel, PlacementPlan.Choose(v3, 8, 141L << 30).Kind); // 8 × H200
        Assert.AreEqual(PlacementKind.Pipeline, PlacementPlan.Choose(ModelPresets.Tiny, 1, 1L << 30).Kind);
        // Heads 3 do not divide by 2: the planner falls back to a pipeline.
        Assert.AreEqual(PlacementKind.Pipeline, PlacementPlan.Choose(ModelPresets.Tiny, 2, 1L << 30).Kind);
    }

    [TestMethod]
    public void ExpertParallelDevicesHoldOnlyTheirOwnExperts()
    {
        // V3's routed expert, worked from the config: gate, up [2048, 7168] and down [7168, 2048] FP8 codes plus
        // their f32 block scales (16 x 56 blocks each); 58 MoE layers; 256 experts, 32 per device of 8.
        var v3 = ModelPresets.DeepSeekV3;
        const long expert = 3 * (2048L * 7168 + 16 * 56 * 4);
        const long moeLayers = 58;
        var tp = PlacementPlan.TensorExpertParallel(v3, 8);
        for (var d = 0; d < 8; d++)
        {
            var experts = tp.On(d).Where(p => p.Tensor.Contains(".mlp.experts.", StringComparison.Ordinal)).Sum(p => p.Bytes);
            Assert.AreEqual(32 * expert * moeLayers, experts, $"device {d}");

            // CudaBackend's compact stack of a layer holds exactly those bytes: the shard's experts, codes and scales.
            var layout = new ExpertStackLayout(tp.Shard(d)!.Experts.Count, 7168, 2048);
            Assert.AreEqual(32 * expert, layout.W13Length + layout.W2Length + (4 * (layout.W13ScaleLength + layout.W2ScaleLength)), $"device {d} stack");
        }

        // 86.5-88.4 GB per device: on 8 x H200 the planner takes tensor/expert parallelism, with room for the cache.
        Assert.IsLessThan(95L << 30, Enumerable.Range(0, 8).Max(tp.BytesOn));
        Assert.AreEqual(PlacementKind.TensorExpertParallel, PlacementPlan.Choose(v3, 8, 141L << 30).Kind);
    }

    [TestMethod]
    public void PartitionIsOptimalOnSmallCases()
    {
        // Brute force over all cut positions: the planner's largest stage equals the best possible.
        var rng = new Random(5);
        for (var trial = 0; trial < 200; trial++)
        {
            var count = rng.Next(1, 9);
            var parts = rng.Next(1, count + 1);
            var w = Enumerable.Range(0, count).Select(_ => (long)rng.Next(1, 100)).ToArray();
            var ranges = PlacementPlan.Partition(w, parts);
            Assert.AreEqual(parts, ranges.Length);
            Assert.AreEqual(count, ranges.Sum(r => r.Count));
            var got = ranges.Max(r => w.Skip(r.Start).Take(r.Count).Sum());
            Assert.AreEqual(BestMax(w, 0, parts), got, string.Join(",", w) + " / " + parts);
        }

        static long BestMax(long[] w, int from, int parts)
        {
            if (parts == 1)
            {
                return w.Skip(from).Sum();
            }

            var best = long.MaxValue;
            for (var end = from + 1; end <= w.Length - parts + 1; end++)
            {
                best = Math.Min(best, Math.Max(w[from..end].Sum(), BestMax(w, end, parts - 1)));
            }

            return best;
        }
    }

    [TestMethod]
    public void LoadOrderVisitsEachShardOnce()
    {
        var dir = Path.Combine(Path.GetTempPath(), "dscuda-plan-" + Guid.NewGuid().ToString("N"));
        try
        {
            SyntheticCheckpoint.Write(dir, ModelPresets.Tiny, 3, shards: 3);
            using var checkpoint = Checkpoint.Open(dir);
            var plan = PlacementPlan.TensorExpertParallel(ModelPresets.Tiny, 3);
            var order = plan.LoadOrder(checkpoint);
            Assert.AreEqual(order.Count, order.Select(o => o.Shard).Distinct().Count());
            CollectionAssert.AreEqual(checkpoint.ShardFiles.Where(f => order.Any(o => o.Shard == f)).ToArray(), order.Select(o => o.Shard).ToArray());
            Assert.AreEqual(plan.Placements.Count, order.Sum(o => o.Placements.Count));
            foreach (var (shard, placements) in order)
            {
                Assert.IsTrue(placements.All(p => checkpoint.Get(p.Tensor).FilePath == shard));

                // File order within the shard, then device order for a tensor placed on several devices.
                var keys = placements.Select(p => (checkpoint.Get(p.Tensor).Begin, p.Device)).ToArray();
                CollectionAssert.AreEqual(keys.Order().ToArray(), keys, $"{shard}: not in file order");
            }
        }
        finally
        {
            Directory.Delete(dir, true);
        }
    }

    private static void AssertEveryTensorPlaced(PlacementPlan plan)
    {
        var placed = plan.Placements.Select(p => p.Tensor).ToHashSet();
        foreach (var t in CheckpointLayout.Expected(plan.Config))
        {
            Assert.IsTrue(placed.Contains(t.Name) ^ plan.Skipped.ContainsKey(t.Name), $"{t.Name}: placed {placed.Contains(t.Name)}, skipped {plan.Skipped.ContainsKey(t.Name)}");
            if (t.Layer < plan.Config.NumHiddenLayers)
            {
                Assert.IsTrue(placed.Contains(t.Name), t.Name);
            }
        }

        Assert.IsTrue(plan.Placements.All(p => p.Device >= 0 && p.Device < plan.DeviceCount && p.Bytes > 0));
    }

    private static long LayerBytes(ModelConfig config, int layer) =>
        DistributedModels.StoredBytes(CheckpointLayout.Expected(config).Where(t => t.Layer == layer));
}
