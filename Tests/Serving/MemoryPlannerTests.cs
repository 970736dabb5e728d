using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Synthetic;
using DeepSeekCuda.Serving;

namespace DeepSeekCuda.Tests.Serving;

[TestClass]
public sealed class MemoryPlannerTests
{
    // cuMemGetInfo's free bytes on an idle 80 GB H100 and a 141 GB H200 are a little under the nameplate.
    private const long H100Free = 79L * 1024 * 1024 * 1024;
    private const long H200Free = 139L * 1024 * 1024 * 1024;

    public TestContext TestContext { get; set; } = null!;

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
        var e = Assert.ThrowsExactly<InsufficientDeviceMemoryException>(() => MemoryPlanner.Plan(ModelPresets.DeepSeekV3, [H100Free]));
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
        // 671B FP8 is about 690 GB with scales: more than 8 x 80 GB, well within 8 x 141 GB.
        var e = Assert.ThrowsExactly<InsufficientDeviceMemoryException>(() => MemoryPlanner.Plan(ModelPresets.DeepSeekV3, Enumerable.Repeat(H100Free, 8).ToArray()));
        // Device 0 holds the three small dense layers and just fits; every other one is short of weights.
        CollectionAssert.AreEqual(new[] { 1, 2, 3, 4, 5, 6, 7 }, e.Shortfalls.Select(s => s.Device).ToArray(), e.Message);
        Assert.IsTrue(e.Shortfalls.All(s => s.Dominant == "weights"));

        var plan = MemoryPlanner.Plan(ModelPresets.DeepSeekV3, Enumerable.Repeat(H200Free, 8).ToArray(), new MemoryPlanOptions { IncludeMtp = true, DraftTokens = 1 });
        CollectionAssert.AreEqual(new[] { 8, 8, 8, 8, 8, 7, 7, 7 }, plan.Devices.Select(d => d.Layers).ToArray());
        CollectionAssert.AreEqual(new[] { 8, 8, 8, 8, 8, 7, 7, 8 }, plan.Devices.Select(d => d.CacheLayers).ToArray(), "the MTP layer's cache on the last device");
        var stats = CheckpointStats.Compute(ModelPresets.DeepSeekV3);
        var v3 = ModelPresets.DeepSeekV3;
        // The MTP layer's head copy is not loaded; its embedding copy is not either, but the last device holds a second
        // copy of the main embedding, as many bytes, to embed the MTP layer's tokens.
        var headCopy = 1L * v3.VocabSize * v3.HiddenSize * 2;
        Assert.AreEqual(stats.WeightBytes - headCopy, plan.Devices.Sum(d => d.WeightBytes));
        Assert.AreEqual(128, plan.LogitRows);
        Assert.IsGreaterThanOrEqualTo(plan.BlocksPerRequest, plan.KvBlocks);
        foreach (var d in plan.Devices)
        {
            Assert.IsLessThanOrEqualTo(d.FreeBytes, d.PlannedBytes, $"device {d.Device}");
        }

        TestContext.WriteLine($"8 x H200: {plan.KvBlocks} blocks ({plan.KvTokens} tokens, {plan.FullLengthRequests} requests of 4096)");
    }

    [TestMethod]
    [DataRow(1)]
    [DataRow(4)]
    [DataRow(5)]
    public void SlicePresetsFitOne80GbGpu(int layers)
    {
        var config = ModelPresets.DeepSeekV3Slice(layers);
        var options = new MemoryPlanOptions { MaxBatch = 32, MaxSequenceLength = 8192, MaxTokensPerStep = 1024 };
        var plan = MemoryPlanner.Plan(config, [H100Free], options);
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
        var e = Assert.ThrowsExactly<InsufficientDeviceMemoryException>(() => MemoryPlanner.Plan(ModelPresets.DeepSeekV3Slice(61), [H100Free]));
        Assert.AreEqual("weights", e.Shortfalls[0].Dominant);
    }

    [TestMethod]
    public void TinyPresetPlanMatchesTheArithmetic()
    {
        var config = ModelPresets.Tiny;
        const long free = 64L << 20;
        var options = new MemoryPlanOptions { MaxBatch = 4, MaxSequenceLength = 1000, MaxTokensPerStep = 100, MinReserveBytes = 0, ReserveFraction = 0.25, IncludeMtp = true };
        var plan = MemoryPlanner.Plan(config, [free], options);
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
        var plan = MemoryPlanner.Plan(ModelPresets.Tiny, [1L << 30], new MemoryPlanOptions { MaxBatch = 300, DraftTokens = 1, MaxTokensPerStep = 256 });
        Assert.AreEqual(600, plan.TokensPerStep);
        Assert.AreEqual(600, plan.LogitRows);
    }

    [TestMethod]
    public void KvCacheCanDominateAShortfall()
    {
        // Weights of a few MB, but one request of a million tokens needs 3 layers x 192 B x 1M.
        var e = Assert.ThrowsExactly<InsufficientDeviceMemoryException>(() => MemoryPlanner.Plan(ModelPresets.Tiny, [256L << 20],
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
        var big = MemoryPlanner.Plan(config, [1L << 30], options).Devices[0];
        var exact = big.WeightBytes + big.ActivationBytes + 10L * 64 * 192 * 3;
        var plan = MemoryPlanner.Plan(config, [exact], options);
        Assert.AreEqual(10, plan.KvBlocks);
        Assert.AreEqual(1, plan.FullLengthRequests);
        Assert.ThrowsExactly<InsufficientDeviceMemoryException>(() => MemoryPlanner.Plan(config, [exact - 1], options));
    }

    [TestMethod]
    public void PipelineSplitPutsEmbeddingFirstAndHeadLast()
    {
        var config = ModelPresets.DeepSeekV3Slice(4);
        var plan = MemoryPlanner.Plan(config, [H100Free, H100Free], new MemoryPlanOptions { LayersPerDevice = [1, 3] });
        long table = (long)config.VocabSize * config.HiddenSize * 2;
        var layers = MemoryPlanner.LayerWeightBytes(config, out var embed, out var tail);
        Assert.AreEqual(table, embed);
        Assert.AreEqual(table + config.HiddenSize * 2, tail, "lm_head and the final norm");
        Assert.AreEqual(embed + layers[0], plan.Devices[0].WeightBytes);
        Assert.AreEqual(layers[1] + layers[2] + layers[3] + tail, plan.Devices[1].WeightBytes);
        Assert.AreEqual(1, plan.Devices[1].FirstLayer);
        Assert.AreEqual(0, plan.Devices[0].ActivationBytes - MemoryPlanner.ActivationArenaBytes(config, 2048, 0, 64, 16), "no logits before the last device");
        // The pool is limited by the device with the most cache per block that has the least room.
        Assert.AreEqual(Math.Min((H100Free - plan.Devices[0].WeightBytes - plan.Devices[0].ActivationBytes - plan.Devices[0].ReserveBytes) / (64L * 1152),
            (H100Free - plan.Devices[1].WeightBytes - plan.Devices[1].ActivationBytes - plan.Devices[1].ReserveBytes) / (64L * 1152 * 3)), plan.KvBlocks);
    }

    [TestMethod]
    public void TiedHeadIsCountedOnceOnOneDevice()
    {
        var config = ModelPresets.Tiny with { TieWordEmbeddings = true, NumNextNPredictLayers = 0 };
        var plan = MemoryPlanner.Plan(config, [1L << 30]);
        Assert.AreEqual(CheckpointStats.Compute(config).MainWeightBytes, plan.Devices[0].WeightBytes);
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

        // The pipeline overload is this one over the shares its split implies.
        var split = MemoryPlanner.Plan(config, [free, free], options with { LayersPerDevice = [1, 2] });
        Assert.AreEqual(split.KvBlocks, MemoryPlanner.Plan(config, [.. split.Devices.Select((d, i) =>
            new DeviceShare(d.FreeBytes, d.WeightBytes, d.FirstLayer, d.Layers, d.CacheLayers, ComputesLogits: i == 1))], options).KvBlocks);

        var e = Assert.ThrowsExactly<InsufficientDeviceMemoryException>(() =>
            MemoryPlanner.Plan(config, [new DeviceShare(free, weights, 0, 3, 3, true), new DeviceShare(free, free, 0, 3, 3, false)], options));
        Assert.AreEqual(1, e.Shortfalls.Single().Device);
        Assert.AreEqual("weights", e.Shortfalls.Single().Dominant);
    }

    [TestMethod]
    public void BadArgumentsAreRejected()
    {
        var tiny = ModelPresets.Tiny;
        Assert.ThrowsExactly<ArgumentException>(() => MemoryPlanner.Plan(tiny, Array.Empty<long>()));
        Assert.ThrowsExactly<ArgumentException>(() => MemoryPlanner.Plan(tiny, [1L << 30, 1L << 30, 1L << 30, 1L << 30]), "more devices than layers");
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => MemoryPlanner.Plan(tiny, [-1]));
        Assert.ThrowsExactly<ArgumentException>(() => MemoryPlanner.Plan(tiny, [1L << 30, 1L << 30], new MemoryPlanOptions { LayersPerDevice = [1, 1] }));
        Assert.ThrowsExactly<ArgumentException>(() => MemoryPlanner.Plan(tiny, [1L << 30, 1L << 30], new MemoryPlanOptions { LayersPerDevice = [3, 0] }));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => MemoryPlanner.Plan(tiny, [1L << 30], new MemoryPlanOptions { ReserveFraction = 1 }));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => MemoryPlanner.Plan(tiny, [1L << 30], new MemoryPlanOptions { MaxBatch = 0 }));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => MemoryPlanner.Plan(tiny, [1L << 30], new MemoryPlanOptions { MaxSequenceLength = 0 }));
        Assert.ThrowsExactly<InsufficientDeviceMemoryException>(() => MemoryPlanner.Plan(tiny, [0]));
    }

    [TestMethod]
    public void EvenSplitGivesTheRemainderToEarlierDevices()
    {
        CollectionAssert.AreEqual(new[] { 8, 8, 8, 8, 8, 7, 7, 7 }, MemoryPlanner.EvenSplit(61, 8));
        CollectionAssert.AreEqual(new[] { 3 }, MemoryPlanner.EvenSplit(3, 1));
    }
}
