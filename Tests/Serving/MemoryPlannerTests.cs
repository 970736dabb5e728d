using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Synthetic;
using DeepSeekCuda.Model;
using DeepSeekCuda.Serving;
using DeepSeekCuda.Tests.Distributed;

namespace DeepSeekCuda.Tests.Serving;

/// <summary>
/// <see cref="MemoryPlanner"/> over placements (<see cref="PlacementPlan"/>: one device is the pipeline of one) and over
/// hand-made shares; weight bytes are checked against <see cref="CheckpointStats"/>, the rest against the documented arithmetic.
/// </summary>
[TestClass]
public sealed class MemoryPlannerTests
{
    // cuMemGetInfo's free bytes on an idle 80 GB H100 and a 141 GB H200 are a little under the nameplate.
    private const long H100Free = 79L * 1024 * 1024 * 1024;
    private const long H200Free = 139L * 1024 * 1024 * 1024;

    public TestContext TestContext { get; set; } = null!;

    private static MemoryPlan OnOne(ModelConfig config, long free, MemoryPlanOptions? options = null, bool mtp = false) =>
        MemoryPlanner.Plan(PlacementPlan.Pipeline(config, 1, mtp), [free], options);

    [TestMethod]
    public void KvCacheIs576Bf16ValuesPerTokenPerLayer()
    {
        Assert.AreEqual(576L * 2, MemoryPlanner.KvBytesPerTokenPerLayer(ModelPresets.DeepSeekV3));
        Assert.AreEqual((80L + 16) * 2, MemoryPlanner.KvBytesPerTokenPerLayer(ModelPresets.Tiny));
    }

    [TestMethod]
    public void ActivationBytesPerTokenOfV3FollowTheDocumentedFormula()
    {
        // Worked by hand for D 7168, H 128, q_lora 1536, kv_lora 512 + rope 64, v 128, I 18432, I_moe 2048, E 256, k 8:
        // stream 16·D = 114,688
        // MLA 2·1536 + 2·128·192 + 2·576 + 4·128·576 + 4·128·512 + 2·128·128 = 643,200
        // FFN max(dense 4·18432 = 73,728; MoE 4·256 + 8·8 + 8·(2·7168 + 4·2048 + 4·7168) + 4·2048 = 418,880)
        // quantization of the widest input (18432): (1 + 8)·(18432 + 4·144) = 171,072
        Assert.AreEqual(114_688L + 643_200 + 418_880 + 171_072, MemoryPlanner.ActivationBytesPerToken(ModelPresets.DeepSeekV3));
    }

    [TestMethod]
    public void FullV3DoesNotFitOne80GbGpu()
    {
        var e = Assert.ThrowsExactly<InsufficientDeviceMemoryException>(() => OnOne(ModelPresets.DeepSeekV3, H100Free));
        TestContext.WriteLine(e.Message);
        var s = e.Shortfalls.Single();
        Assert.AreEqual(0, s.Device);
        Assert.AreEqual(H100Free, s.FreeBytes);
        Assert.AreEqual("weights", s.Dominant);
        Assert.AreEqual(CheckpointStats.Compute(ModelPresets.DeepSeekV3).MainWeightBytes, s.WeightBytes, "one device holds every main tensor");
        Assert.AreEqual(s.WeightBytes + s.ActivationBytes + s.MinKvBytes + s.ReserveBytes, s.NeededBytes);
        StringAssert.Contains(e.Message, "device 0 needs");
        StringAssert.Contains(e.Message, "weights dominate");
    }

    [TestMethod]
    public void FullV3DoesNotFitEight80GbGpusButFitsEightH200()
    {
        // 671B FP8 is about 673 GB with scales: with each device's arena and reserve, more than 8 x 80 GB hold, well within
        // 8 x 141 GB. The pipeline balances stored bytes (about 92 GB a stage), so the stages are short of weights on 80 GB
        // but for the last (the remainder, with lm_head).
        var v3 = ModelPresets.DeepSeekV3;
        var e = Assert.ThrowsExactly<InsufficientDeviceMemoryException>(() => MemoryPlanner.Plan(PlacementPlan.Pipeline(v3, 8), Enumerable.Repeat(H100Free, 8).ToArray()));
        CollectionAssert.AreEqual(Enumerable.Range(0, 7).ToArray(), e.Shortfalls.Select(s => s.Device).ToArray(), e.Message);
        Assert.IsTrue(e.Shortfalls.All(s => s.Dominant == "weights"));

        var placement = PlacementPlan.Pipeline(v3, 8, includeMtp: true);
        var plan = MemoryPlanner.Plan(placement, Enumerable.Repeat(H200Free, 8).ToArray(), new MemoryPlanOptions { DraftTokens = 1 });
        Assert.AreEqual(61, plan.Devices.Sum(d => d.Layers));
        CollectionAssert.AreEqual(plan.Devices.Select(d => d.Layers + (d.Device == 7 ? 1 : 0)).ToArray(), plan.Devices.Select(d => d.CacheLayers).ToArray(),
            "the MTP layer's cache on the last device");
        CollectionAssert.AreEqual(plan.Devices.Select(d => d.FirstLayer).ToArray(), plan.Devices.Select(d => plan.Devices.Take(d.Device).Sum(p => p.Layers)).ToArray());
        var stats = CheckpointStats.Compute(v3);
        // The MTP layer's head copy is not loaded; its embedding copy is not either, but the last device holds a second
        // copy of the main embedding, as many bytes, to embed the MTP layer's tokens. Each stage but the last also holds the
        // next stage's first input norm (BF16).
        var headCopy = 1L * v3.VocabSize * v3.HiddenSize * 2;
        Assert.AreEqual(stats.WeightBytes - headCopy + 7L * v3.HiddenSize * 2, plan.Devices.Sum(d => d.WeightBytes));
        Assert.AreEqual(128, plan.LogitRows);
        Assert.IsGreaterThanOrEqualTo(plan.BlocksPerRequest, plan.KvBlocks);
        foreach (var d in plan.Devices)
        {
            Assert.IsLessThanOrEqualTo(d.FreeBytes, d.PlannedBytes, $"device {d.Device}");
            Assert.AreEqual(MemoryPlanner.ActivationArenaBytes(v3, 2048, d.Device == 7 ? 128 : 0, 128, 16), d.ActivationBytes, "logits only on the last device");
        }

        TestContext.WriteLine($"8 x H200: layers [{string.Join(", ", plan.Devices.Select(d => d.Layers))}], {plan.KvBlocks} blocks ({plan.KvTokens} tokens, {plan.FullLengthRequests} requests of 4096)");
    }

    [TestMethod]
    [DataRow(1)]
    [DataRow(4)]
    [DataRow(5)]
    public void SlicePresetsFitOne80GbGpu(int layers)
    {
        var config = ModelPresets.DeepSeekV3Slice(layers);
        var options = new MemoryPlanOptions { MaxBatch = 32, MaxSequenceLength = 8192, MaxTokensPerStep = 1024 };
        var plan = OnOne(config, H100Free, options);
        var d = plan.Devices.Single();
        Assert.AreEqual(CheckpointStats.Compute(config).MainWeightBytes, d.WeightBytes);
        Assert.AreEqual(layers, d.CacheLayers);

        // Blocks are what is left after weights, arena and reserve, in whole blocks of every layer.
        var reserve = Math.Max(options.MinReserveBytes, (long)(H100Free * options.ReserveFraction));
        Assert.AreEqual(reserve, d.ReserveBytes);
        var arena = MemoryPlanner.ActivationArenaBytes(config, 1024, 32, 32, options.AttentionSplits);
        Assert.AreEqual(arena, d.ActivationBytes);
        var perBlock = 64L * 1152 * layers;
        Assert.AreEqual((H100Free - d.WeightBytes - arena - reserve) / perBlock, plan.KvBlocks);
        Assert.AreEqual(128, plan.BlocksPerRequest);
        Assert.IsLessThan(perBlock, H100Free - d.PlannedBytes, "less than one more block is left over");
        TestContext.WriteLine($"slice{layers}: weights {d.WeightBytes / 1e9:F1} GB, arena {arena / 1e9:F2} GB, {plan.KvBlocks} blocks = {plan.KvTokens} tokens");
    }

    [TestMethod]
    public void AllSixtyOneLayersAtFullWidthDoNotFitOneGpu()
    {
        var e = Assert.ThrowsExactly<InsufficientDeviceMemoryException>(() => OnOne(ModelPresets.DeepSeekV3Slice(61), H100Free));
        Assert.AreEqual("weights", e.Shortfalls[0].Dominant);
    }

    [TestMethod]
    public void TinyPresetPlanMatchesTheArithmetic()
    {
        var config = ModelPresets.Tiny;
        const long free = 64L << 20;
        var options = new MemoryPlanOptions { MaxBatch = 4, MaxSequenceLength = 1000, MaxTokensPerStep = 100, MinReserveBytes = 0, ReserveFraction = 0.25 };
        var plan = OnOne(config, free, options, mtp: true);
        var d = plan.Devices.Single();
        var stats = CheckpointStats.Compute(config);
        Assert.AreEqual(stats.WeightBytes - 2L * config.VocabSize * config.HiddenSize * 2, d.WeightBytes);
        Assert.AreEqual(4, d.CacheLayers, "3 main layers and the MTP layer");
        Assert.AreEqual(16L << 20, d.ReserveBytes);
        Assert.AreEqual(16, plan.BlocksPerRequest);
        Assert.AreEqual(100, plan.TokensPerStep);
        Assert.AreEqual((free - d.WeightBytes - d.ActivationBytes - d.ReserveBytes) / (64L * 192 * 4), plan.KvBlocks);
    }

    [TestMethod]
    public void DecodeRowsSetTheArenaWhenTheyExceedThePrefillBudget()
    {
        var plan = OnOne(ModelPresets.Tiny, 1L << 30, new MemoryPlanOptions { MaxBatch = 300, DraftTokens = 1, MaxTokensPerStep = 256 });
        Assert.AreEqual(600, plan.TokensPerStep);
        Assert.AreEqual(600, plan.LogitRows);
    }

    [TestMethod]
    public void KvCacheCanDominateAShortfall()
    {
        // Weights of a few MB, but one request of a million tokens needs 3 layers x 192 B x 1M.
        var e = Assert.ThrowsExactly<InsufficientDeviceMemoryException>(() => OnOne(ModelPresets.Tiny, 256L << 20,
            new MemoryPlanOptions { MaxSequenceLength = 1 << 20, MinReserveBytes = 0, ReserveFraction = 0 }));
        var s = e.Shortfalls.Single();
        Assert.AreEqual("kv-cache", s.Dominant);
        Assert.AreEqual(3L * 192 * (1 << 20), s.MinKvBytes);
    }

    [TestMethod]
    public void ExactlyEnoughForOneFullLengthRequestFits()
    {
        var config = ModelPresets.Tiny;
        var options = new MemoryPlanOptions { MaxSequenceLength = 640, MinReserveBytes = 0, ReserveFraction = 0 };
        var big = OnOne(config, 1L << 30, options).Devices[0];
        var exact = big.WeightBytes + big.ActivationBytes + 10L * 64 * 192 * 3;
        var plan = OnOne(config, exact, options);
        Assert.AreEqual(10, plan.KvBlocks);
        Assert.AreEqual(1, plan.FullLengthRequests);
        Assert.ThrowsExactly<InsufficientDeviceMemoryException>(() => OnOne(config, exact - 1, options));
    }

    [TestMethod]
    public void PipelineStagesHoldTheirLayersTheEmbeddingFirstAndTheHeadLast()
    {
        var config = ModelPresets.DeepSeekV3Slice(4);
        var placement = PlacementPlan.Pipeline(config, 2);
        var plan = MemoryPlanner.Plan(placement, [H100Free, H100Free]);
        long table = (long)config.VocabSize * config.HiddenSize * 2, norm = config.HiddenSize * 2L;
        var layer = LayerBytes(config);
        var (first, count) = placement.Stages[1];
        Assert.AreEqual(4, first + count);
        Assert.AreEqual(table + layer.Take(first).Sum() + norm, plan.Devices[0].WeightBytes, "the embedding, its layers and the next stage's input norm");
        Assert.AreEqual(layer.Skip(first).Sum() + norm + table, plan.Devices[1].WeightBytes, "its layers, the final norm and lm_head");
        Assert.AreEqual(CheckpointStats.Compute(config).MainWeightBytes + norm, plan.Devices.Sum(d => d.WeightBytes));
        Assert.AreEqual(first, plan.Devices[1].FirstLayer);
        Assert.AreEqual(first, plan.Devices[0].CacheLayers);
        Assert.AreEqual(count, plan.Devices[1].CacheLayers);
        Assert.AreEqual(0, plan.Devices[0].ActivationBytes - MemoryPlanner.ActivationArenaBytes(config, 2048, 0, 64, 16), "no logits before the last device");
        // The pool is limited by the device with the most cache per block that has the least room.
        Assert.AreEqual(Math.Min((H100Free - plan.Devices[0].WeightBytes - plan.Devices[0].ActivationBytes - plan.Devices[0].ReserveBytes) / (64L * 1152 * first),
            (H100Free - plan.Devices[1].WeightBytes - plan.Devices[1].ActivationBytes - plan.Devices[1].ReserveBytes) / (64L * 1152 * count)), plan.KvBlocks);
    }

    /// <summary>
    /// A head tied to the embedding is held as a second table where lm_head runs (the backends upload the embedding and the
    /// head apart), on one device and on a tensor/expert parallel device 0: the plan counts both copies.
    /// </summary>
    [TestMethod]
    public void TiedHeadCountsAsTheSecondTableTheDeviceHolds()
    {
        var config = DistributedModels.Tied8;
        var table = (long)config.VocabSize * config.HiddenSize * 2;
        var main = CheckpointStats.Compute(config).MainWeightBytes; // one table: a tied checkpoint stores no lm_head
        Assert.AreEqual(main + table, OnOne(config, 1L << 30).Devices[0].WeightBytes);

        var untied = DistributedModels.Wide8;
        var tp = MemoryPlanner.Plan(PlacementPlan.TensorExpertParallel(config, 2), [1L << 30, 1L << 30]);
        var tpUntied = MemoryPlanner.Plan(PlacementPlan.TensorExpertParallel(untied, 2), [1L << 30, 1L << 30]);
        Assert.AreEqual(tpUntied.Devices[0].WeightBytes, tp.Devices[0].WeightBytes, "device 0: the tied head as many bytes as lm_head");
        Assert.AreEqual(tpUntied.Devices[1].WeightBytes, tp.Devices[1].WeightBytes, "device 1: no head");
        Assert.AreEqual(table, tp.Devices[0].WeightBytes - tp.Devices[1].WeightBytes);
    }

    /// <summary>Stored bytes of each main layer of <paramref name="config"/> (from the checkpoint's expected tensors).</summary>
    private static long[] LayerBytes(ModelConfig config)
    {
        var expected = CheckpointLayout.Expected(config);
        return [.. Enumerable.Range(0, config.NumHiddenLayers).Select(i => DistributedModels.StoredBytes(expected.Where(t => t.Layer == i)))];
    }

    [TestMethod]
    public void SharesPlanEachDeviceBesideItsOwnWeightsAndCaches()
    {
        // Two devices of a tensor-parallel split: each holds half the weights and every layer's cache; only device 0 computes logits.
        var config = ModelPresets.Tiny;
        var options = new MemoryPlanOptions { MaxBatch = 4, MaxSequenceLength = 640, MaxTokensPerStep = 256 };
        long free = 1L << 30, weights = 10L << 20;
        var plan = MemoryPlanner.Plan(config, [new DeviceShare(free, weights, 0, 3, 3, true), new DeviceShare(free, weights + (1 << 20), 0, 3, 3, false)], options);
        var block = MemoryPlanner.KvBytesPerTokenPerLayer(config) * KvBlockManager.BlockTokens;
        long Arena(int logitRows) => MemoryPlanner.ActivationArenaBytes(config, 256, logitRows, 4, options.AttentionSplits);
        var reserve = Math.Max(options.MinReserveBytes, (long)(free * options.ReserveFraction));
        var left0 = free - weights - Arena(4) - reserve;
        var left1 = free - weights - (1 << 20) - Arena(0) - reserve;
        Assert.AreEqual(Math.Min(left0, left1) / (3 * block), plan.KvBlocks);
        Assert.AreEqual(Arena(4), plan.Devices[0].ActivationBytes);
        Assert.AreEqual(Arena(0), plan.Devices[1].ActivationBytes);
        Assert.IsTrue(plan.Devices.All(d => d.CacheLayers == 3 && d.KvBytes == 3 * block * plan.KvBlocks));

        // The placement overload is this one over the shares the placement implies.
        var placed = MemoryPlanner.Plan(PlacementPlan.Pipeline(config, 2), [free, free], options);
        Assert.AreEqual(placed.KvBlocks, MemoryPlanner.Plan(config, [.. placed.Devices.Select((d, i) =>
            new DeviceShare(d.FreeBytes, d.WeightBytes, d.FirstLayer, d.Layers, d.CacheLayers, ComputesLogits: i == 1))], options).KvBlocks);

        var e = Assert.ThrowsExactly<InsufficientDeviceMemoryException>(() =>
            MemoryPlanner.Plan(config, [new DeviceShare(free, weights, 0, 3, 3, true), new DeviceShare(free, free, 0, 3, 3, false)], options));
        Assert.AreEqual(1, e.Shortfalls.Single().Device);
        Assert.AreEqual("weights", e.Shortfalls.Single().Dominant);
    }

    [TestMethod]
    public void BadArgumentsAreRejected()
    {
        var one = PlacementPlan.Pipeline(ModelPresets.Tiny, 1);
        var e = Assert.ThrowsExactly<ArgumentException>(() => MemoryPlanner.Plan(one, Array.Empty<long>()));
        StringAssert.Contains(e.Message, "0 free-byte counts for a placement over 1 devices");
        Assert.ThrowsExactly<ArgumentException>(() => MemoryPlanner.Plan(one, [1L << 30, 1L << 30]));
        Assert.AreEqual("freeBytes", Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => MemoryPlanner.Plan(one, [-1])).ParamName);
        Assert.ThrowsExactly<ArgumentException>(() => MemoryPlanner.Plan(ModelPresets.Tiny, Array.Empty<DeviceShare>()));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => MemoryPlanner.Plan(one, [1L << 30], new MemoryPlanOptions { ReserveFraction = 1 }));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => MemoryPlanner.Plan(one, [1L << 30], new MemoryPlanOptions { MaxBatch = 0 }));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => MemoryPlanner.Plan(one, [1L << 30], new MemoryPlanOptions { MaxSequenceLength = 0 }));
        Assert.ThrowsExactly<InsufficientDeviceMemoryException>(() => MemoryPlanner.Plan(one, [0]));
    }
}
