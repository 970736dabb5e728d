using DeepSeekCuda.Model;
using DeepSeekCuda.Hosting;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Synthetic;
using DeepSeekCuda.Serving;
using DeepSeekCuda.Tests.Distributed;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Hosting;

/// <summary>The default context length rule (<see cref="ContextSize"/>) on made-up memory sizes, and its use by <see cref="LocalModel.Load"/>.</summary>
[TestClass]
public sealed class ContextSizeTests
{
    public TestContext TestContext { get; set; } = null!;

    // The demo's shape (3 layers + 1 MTP layer, kv_lora_rank 80 + qk_rope_head_dim 16) with R1's 163840 positions.
    private static readonly ModelConfig Long = DemoModel.Config with { MaxPositionEmbeddings = 163840 };

    // Worked out by hand from the config: 4 caches x 96 values x 4 bytes.
    private const long PerTokenPerSession = 4 * 96 * 4;

    private static long Weights => ContextSize.CpuWeightBytes(Long, mtp: true);

    [TestMethod]
    public void CpuBytesPerTokenIsEveryLayersFloat32LatentAndRotatedKey()
    {
        Assert.AreEqual(PerTokenPerSession, ContextSize.CpuBytesPerToken(Long, mtp: true));
        Assert.AreEqual(3 * 96 * 4L, ContextSize.CpuBytesPerToken(Long, mtp: false));
        var stats = CheckpointStats.Compute(Long);
        Assert.AreEqual(4 * (stats.MainParameters + stats.MtpParameters), Weights);
    }

    [TestMethod]
    public void CpuPlentyOfMemoryGivesMaxPositionEmbeddings()
    {
        var choice = ContextSize.ChooseForCpu(Long, 1L << 40, sessions: 16, mtp: true);
        Assert.AreEqual(163840, choice.Tokens);
        StringAssert.StartsWith(choice.Reason, "max_position_embeddings 163840");
    }

    [TestMethod]
    public void CpuMemoryBoundIsHalfOfWhatTheWeightsLeaveSplitOverSessionsInWholeBlocks()
    {
        // Half of what is left beside the weights holds 4 sessions of exactly 1000 tokens: 960 in 64-token blocks.
        var available = Weights + 2 * (4 * PerTokenPerSession * 1000) + 1;
        var choice = ContextSize.ChooseForCpu(Long, available, sessions: 4, mtp: true);
        Assert.AreEqual(960, choice.Tokens);
        Assert.AreEqual(960, choice.Limit);
        StringAssert.StartsWith(choice.Reason, "memory: 4 concurrent session(s) x 1536 bytes per token");

        // One session in the same memory: four times the tokens (4000 -> 3968).
        Assert.AreEqual(3968, ContextSize.ChooseForCpu(Long, available, sessions: 1, mtp: true).Tokens);

        // A model whose positions are fewer than memory allows keeps its own maximum.
        Assert.AreEqual(512, ContextSize.ChooseForCpu(Long with { MaxPositionEmbeddings = 512 }, available, 4, true).Tokens);
    }

    [TestMethod]
    public void CpuTooLittleMemoryFallsBackToTheMinimumAndSaysSo()
    {
        var choice = ContextSize.ChooseForCpu(Long, Weights / 2, sessions: 16, mtp: true);
        Assert.AreEqual(ContextSize.MinimumTokens, choice.Tokens);
        Assert.AreEqual(0, choice.Limit);
        StringAssert.Contains(choice.Reason, "expect to run out of memory");
    }

    [TestMethod]
    public void ExplicitLengthsAboveALimitAreRefusedNamingIt()
    {
        var available = Weights + 2 * (4 * PerTokenPerSession * 1000) + 1;
        Assert.AreEqual(900, ContextSize.ChooseForCpu(Long, available, 4, true, requested: 900).Tokens);
        var memory = Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => ContextSize.ChooseForCpu(Long, available, 4, true, requested: 1024));
        Assert.AreEqual("MaxSequenceLength", memory.ParamName);
        StringAssert.Contains(memory.Message, "the limit is 960");
        var positions = Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => ContextSize.ChooseForCpu(Long, 1L << 40, 4, true, requested: 163841));
        StringAssert.Contains(positions.Message, "1..163840 (max_position_embeddings)");
    }

    /// <summary>
    /// On the GPU the planner is the reference: the pool is the blocks it fits beside the step buffers of every session, and the
    /// length is the longest one request the pool holds (the planner accepts one request of it, not of one block more), up to the
    /// positions. The sessions share the pool; they do not divide the length between them.
    /// </summary>
    [TestMethod]
    [DataRow(600L << 20, 1, true)]
    [DataRow(600L << 20, 16, true)]
    [DataRow(1L << 30, 7, false)]
    public void GpuPoolIsWhatThePlannerFitsAndOneRequestMayFillIt(long free, int sessions, bool memoryBound)
    {
        var one = PlacementPlan.Pipeline(Long, 1, includeMtp: true);
        var choice = ContextSize.ChooseForDevices(one, [free], sessions);
        MemoryPlan? Plan(int tokens)
        {
            try
            {
                return MemoryPlanner.Plan(one, [free], new MemoryPlanOptions { MaxBatch = sessions, MaxSequenceLength = tokens, MaxTokensPerStep = 512, DraftTokens = 1 });
            }
            catch (InsufficientDeviceMemoryException)
            {
                return null; // not even one request of that length
            }
        }

        var plan = Plan(choice.Tokens);
        Assert.IsNotNull(plan, "one request of the chosen length fits");
        Assert.AreEqual(plan.KvBlocks, choice.CacheBlocks);
        Assert.AreEqual(0, choice.Tokens % KvBlockManager.BlockTokens);
        StringAssert.Contains(choice.Reason, $"one request may fill the {plan.KvBlocks} cache blocks of 64 tokens that {sessions} concurrent session(s) share");
        StringAssert.Contains(choice.Reason, $"fits in {ContextSize.Gib(free)} GiB free on the device beside {ContextSize.Gib(one.BytesOn(0))} GiB of weights");
        TestContext.WriteLine($"{choice.Tokens} tokens, {choice.CacheBlocks} blocks: {choice.Reason}");
        if (memoryBound)
        {
            Assert.IsLessThan(Long.MaxPositionEmbeddings, choice.Tokens);
            Assert.IsNull(Plan(choice.Tokens + KvBlockManager.BlockTokens), "one block more does not fit");
            // One session alone gets a larger pool only by the step buffers of the others: the length is not divided.
            var alone = ContextSize.ChooseForDevices(one, [free], 1);
            Assert.IsGreaterThanOrEqualTo(choice.Tokens, alone.Tokens);
            Assert.IsGreaterThan(alone.Tokens / 2, choice.Tokens);
        }
        else
        {
            Assert.AreEqual(Long.MaxPositionEmbeddings, choice.Tokens);
            Assert.IsGreaterThan(Long.MaxPositionEmbeddings / KvBlockManager.BlockTokens, choice.CacheBlocks!.Value, "the pool holds more than one request");
            StringAssert.StartsWith(choice.Reason, "max_position_embeddings 163840; memory would allow");
        }
    }

    /// <summary>
    /// A device whose pool holds three blocks: too few for one request of the minimum (256 tokens), so the planner refuses it;
    /// asked for a shorter length, the pool of three blocks is the limit.
    /// </summary>
    [TestMethod]
    public void GpuPoolBelowTheMinimumServesOnlyAShorterRequestedLength()
    {
        var one = PlacementPlan.Pipeline(Long, 1, includeMtp: true);
        var options = new MemoryPlanOptions { MaxBatch = 2, MaxSequenceLength = 64, MaxTokensPerStep = 512, DraftTokens = 1 };
        var roomy = MemoryPlanner.Plan(one, [1L << 30], options).Devices[0];
        var perBlock = MemoryPlanner.KvBytesPerTokenPerLayer(Long) * KvBlockManager.BlockTokens * 4; // 3 layers and the MTP layer
        var free = roomy.WeightBytes + roomy.ActivationBytes + options.MinReserveBytes + 3 * perBlock + perBlock / 2;
        Assert.AreEqual(3, MemoryPlanner.Plan(one, [free], options).KvBlocks, "the set-up: three blocks");

        var e = Assert.ThrowsExactly<InsufficientDeviceMemoryException>(() => ContextSize.ChooseForDevices(one, [free], 2));
        Assert.AreEqual(4 * perBlock, e.Shortfalls.Single().MinKvBytes, "one request of 256 tokens");
        var shorter = ContextSize.ChooseForDevices(one, [free], 2, requested: 150);
        Assert.AreEqual(150, shorter.Tokens);
        Assert.AreEqual(192, shorter.Limit);
        Assert.AreEqual(3, shorter.CacheBlocks);
        var tooLong = Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => ContextSize.ChooseForDevices(one, [free], 2, requested: 193));
        Assert.AreEqual("MaxSequenceLength", tooLong.ParamName);
        StringAssert.Contains(tooLong.Message, "the limit is 192");
    }

    /// <summary>
    /// Over several devices the planner runs on each device's share of the placement, the tightest device bounds the pool, and
    /// one request may fill it up to the positions.
    /// </summary>
    [TestMethod]
    public void SeveralDevicesShareThePoolTheTightestDeviceHolds()
    {
        var v3 = ModelPresets.DeepSeekV3;
        var plan = PlacementPlan.Pipeline(v3, 8);
        var even = Enumerable.Repeat(139L << 30, 8).ToArray();
        var free = even.ToArray();
        free[5] = 100L << 30; // another process holds memory on one GPU
        var choice = ContextSize.ChooseForDevices(plan, free, sessions: 16);
        int Pool(DeviceShare[] shares) => MemoryPlanner.Plan(v3, shares,
            new MemoryPlanOptions { MaxBatch = 16, MaxSequenceLength = ContextSize.MinimumTokens, MaxTokensPerStep = 512 }).KvBlocks;
        var pool = Pool([.. Enumerable.Range(0, 8).Select(d => new DeviceShare(free[d], plan.BytesOn(d), plan.Stages[d].Start, plan.Stages[d].Count,
            plan.Stages[d].Count, d == 7))]);
        Assert.AreEqual(pool, choice.CacheBlocks);
        Assert.AreEqual((int)Math.Min(v3.MaxPositionEmbeddings, (long)pool * KvBlockManager.BlockTokens), choice.Tokens);
        StringAssert.Contains(choice.Reason, "fits on each of 8 devices (pipeline); the tightest, device 5, has 100.00 GiB free");
        Assert.IsGreaterThan(pool, ContextSize.ChooseForDevices(plan, even, sessions: 16).CacheBlocks!.Value, "device 5 bounds the pool");

        // Tensor/expert parallel: every device holds every layer's cache; device 0 computes the logits.
        var tp = PlacementPlan.TensorExpertParallel(v3, 8);
        var tpChoice = ContextSize.ChooseForDevices(tp, free, sessions: 16);
        var tpPool = Pool([.. Enumerable.Range(0, 8).Select(d => new DeviceShare(free[d], tp.BytesOn(d), 0, 61, 61, d == 0))]);
        Assert.AreEqual(tpPool, tpChoice.CacheBlocks);
        Assert.AreEqual((int)Math.Min(v3.MaxPositionEmbeddings, (long)tpPool * KvBlockManager.BlockTokens), tpChoice.Tokens);
        StringAssert.Contains(tpChoice.Reason, "(tensor/expert parallel); the tightest, device 5");
        TestContext.WriteLine($"pipeline: {choice.Tokens} tokens, {pool} blocks; tensor/expert parallel: {tpChoice.Tokens} tokens, {tpPool} blocks");

        // A pipeline stage holds a few layers' caches, a tensor-parallel device all of them (the latent cache is not split).
        Assert.IsLessThan(pool, tpPool);
        Assert.ThrowsExactly<ArgumentException>(() => ContextSize.ChooseForDevices(tp, free[..4], 16));
    }

    /// <summary>
    /// With the MTP layer placed (tensor/expert parallel over 8: a shard of it on every device, its input side on device 0),
    /// every device holds its shard's weights and the layer's cache beside every main layer's, and each request a draft row:
    /// the pool is what the planner fits with those shares, device 0 (lm_head, eh_proj) is the tightest, and the pool is
    /// smaller than without the MTP layer but larger than with the whole layer on device 0 (as it was placed before: about
    /// 11.5 GB more there, which sized the shared pool).
    /// </summary>
    [TestMethod]
    public void TheShardedMtpLayerCountsItsWeightsCacheAndDraftRowsOnEveryDevice()
    {
        var v3 = ModelPresets.DeepSeekV3;
        var tp = PlacementPlan.TensorExpertParallel(v3, 8, includeMtp: true);
        var plain = PlacementPlan.TensorExpertParallel(v3, 8);
        var free = Enumerable.Repeat(139L << 30, 8).ToArray();
        var choice = ContextSize.ChooseForDevices(tp, free, sessions: 16);
        var shares = Enumerable.Range(0, 8).Select(d => new DeviceShare(free[d], tp.BytesOn(d), 0, 61, 62, d == 0)).ToArray();
        var options = new MemoryPlanOptions { MaxBatch = 16, MaxTokensPerStep = 512, DraftTokens = 1, MaxSequenceLength = ContextSize.MinimumTokens };
        Assert.AreEqual(MemoryPlanner.Plan(v3, shares, options).KvBlocks, choice.CacheBlocks);
        StringAssert.Contains(choice.Reason, "the tightest, device 0");
        StringAssert.Contains(choice.Reason, "62 layers' caches");
        Assert.IsLessThan(ContextSize.ChooseForDevices(plain, free, sessions: 16).CacheBlocks!.Value, choice.CacheBlocks!.Value);

        var whole = DistributedModels.StoredBytes(DistributedModels.MtpLayerTensors(v3));
        var before = Enumerable.Range(0, 8).Select(d => new DeviceShare(free[d], plain.BytesOn(d) + (d == 0 ? whole : 0), 0, 61, d == 0 ? 62 : 61, d == 0)).ToArray();
        var planned = MemoryPlanner.Plan(v3, shares, options);
        var wholeOnDevice0 = MemoryPlanner.Plan(v3, before, options);
        Assert.IsGreaterThan(wholeOnDevice0.KvBlocks, planned.KvBlocks, "cache blocks: sharded, against the whole layer on device 0");
        TestContext.WriteLine($"cache blocks: {planned.KvBlocks} sharded, {wholeOnDevice0.KvBlocks} with the whole MTP layer on device 0");
    }

    [TestMethod]
    public void GpuWithoutRoomForTheWeightsIsThePlannersError()
    {
        Assert.ThrowsExactly<InsufficientDeviceMemoryException>(() => ContextSize.ChooseForDevices(PlacementPlan.Pipeline(DemoModel.Config, 1, includeMtp: true), [1L << 10], 1));
    }

    [TestMethod]
    public void LocalModelSizesTheContextAndLogsWhy()
    {
        var dir = DemoModel.Ensure(out _);
        var log = new ListLogger();
        using (var local = LocalModel.Load(dir, new LocalModelOptions { Device = ComputeDevice.Cpu }, logger: log))
        {
            // The demo has 1024 positions; this machine's memory holds far more than 16 demo sessions of them.
            Assert.AreEqual(1024, local.MaxSequenceLength);
        }

        var line = log.Entries.Single(e => e.Message.StartsWith("Context length", StringComparison.Ordinal));
        StringAssert.StartsWith(line.Message, "Context length 1024 tokens per request: max_position_embeddings 1024; memory would allow ");
        using (var shorter = LocalModel.Load(dir, new LocalModelOptions { Device = ComputeDevice.Cpu, MaxSequenceLength = 300 }))
        {
            Assert.AreEqual(300, shorter.MaxSequenceLength);
        }

        var e = Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => LocalModel.Load(dir, new LocalModelOptions { Device = ComputeDevice.Cpu, MaxSequenceLength = 1025 }));
        Assert.AreEqual("MaxSequenceLength", e.ParamName);
    }
}
