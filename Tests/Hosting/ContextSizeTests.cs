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

    /// <summary>On the GPU the planner is the reference: the chosen length fits every session at full length, one block more does not.</summary>
    [TestMethod]
    [DataRow(600L << 20, 1)]
    [DataRow(600L << 20, 16)]
    [DataRow(700L << 20, 7)]
    public void GpuChoiceIsTheLargestTheMemoryPlannerFitsForEverySession(long free, int sessions)
    {
        var one = PlacementPlan.Pipeline(Long, 1, includeMtp: true);
        var choice = ContextSize.ChooseForDevices(one, [free], sessions);
        Assert.AreEqual(0, choice.Tokens % KvBlockManager.BlockTokens);
        Assert.IsLessThan(Long.MaxPositionEmbeddings, choice.Tokens, "memory, not the positions, bounds these");
        int FullLengthRequests(int tokens)
        {
            try
            {
                return MemoryPlanner.Plan(one, [free], new MemoryPlanOptions
                {
                    MaxBatch = sessions, MaxSequenceLength = tokens, MaxTokensPerStep = 512, DraftTokens = 1,
                }).FullLengthRequests;
            }
            catch (InsufficientDeviceMemoryException)
            {
                return 0; // not even one request of that length
            }
        }

        Assert.IsGreaterThanOrEqualTo(sessions, FullLengthRequests(choice.Tokens));
        Assert.IsLessThan(sessions, FullLengthRequests(choice.Tokens + KvBlockManager.BlockTokens));
        StringAssert.Contains(choice.Reason, $"fits in {ContextSize.Gib(free)} GiB free on the device beside {ContextSize.Gib(one.BytesOn(0))} GiB of weights");
    }

    /// <summary>Over several devices the planner runs on each device's share of the placement, and the tightest device bounds the pool.</summary>
    [TestMethod]
    public void SeveralDevicesGiveTheLargestLengthTheTightestDeviceHoldsForEverySession()
    {
        var v3 = ModelPresets.DeepSeekV3;
        var plan = PlacementPlan.Pipeline(v3, 8);
        var free = Enumerable.Repeat(139L << 30, 8).ToArray();
        free[5] = 100L << 30; // another process holds memory on one GPU
        var choice = ContextSize.ChooseForDevices(plan, free, sessions: 16);
        var shares = Enumerable.Range(0, 8).Select(d => new DeviceShare(free[d], plan.BytesOn(d), plan.Stages[d].Start, plan.Stages[d].Count,
            plan.Stages[d].Count, d == 7)).ToArray();
        int FullLengthRequests(int tokens) => MemoryPlanner.Plan(v3, shares,
            new MemoryPlanOptions { MaxBatch = 16, MaxSequenceLength = tokens, MaxTokensPerStep = 512 }).FullLengthRequests;
        Assert.AreEqual(0, choice.Tokens % KvBlockManager.BlockTokens);
        Assert.IsGreaterThanOrEqualTo(16, FullLengthRequests(choice.Tokens));
        Assert.IsLessThan(16, FullLengthRequests(choice.Tokens + KvBlockManager.BlockTokens));
        StringAssert.Contains(choice.Reason, "fits on each of 8 devices (pipeline); the tightest, device 5, has 100.00 GiB free");

        // Tensor/expert parallel: every device holds every layer's cache; device 0 computes the logits.
        var tp = PlacementPlan.TensorExpertParallel(v3, 8);
        var tpChoice = ContextSize.ChooseForDevices(tp, free, sessions: 16);
        var tpShares = Enumerable.Range(0, 8).Select(d => new DeviceShare(free[d], tp.BytesOn(d), 0, 61, 61, d == 0)).ToArray();
        int TpFullLengthRequests(int tokens) => MemoryPlanner.Plan(v3, tpShares,
            new MemoryPlanOptions { MaxBatch = 16, MaxSequenceLength = tokens, MaxTokensPerStep = 512 }).FullLengthRequests;
        Assert.IsGreaterThanOrEqualTo(16, TpFullLengthRequests(tpChoice.Tokens));
        Assert.IsLessThan(16, TpFullLengthRequests(tpChoice.Tokens + KvBlockManager.BlockTokens));
        StringAssert.Contains(tpChoice.Reason, "(tensor/expert parallel); the tightest, device 5");

        // A pipeline stage holds a few layers' caches, a tensor-parallel device all of them (the latent cache is not split).
        Assert.IsLessThan(choice.Tokens, tpChoice.Tokens);
        Assert.ThrowsExactly<ArgumentException>(() => ContextSize.ChooseForDevices(tp, free[..4], 16));
    }

    /// <summary>
    /// With the MTP layer placed (tensor/expert parallel over 8: a shard of it on every device, its input side on device 0),
    /// every device holds its shard's weights and the layer's cache beside every main layer's, and each request a draft row:
    /// the length is the largest that the planner fits every session in with those shares, device 0 (lm_head, eh_proj) is
    /// the tightest, and it is shorter than without the MTP layer but longer than with the whole layer on device 0 (as it
    /// was placed before: about 11.5 GB more there, which sized the shared pool).
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
        var options = new MemoryPlanOptions { MaxBatch = 16, MaxTokensPerStep = 512, DraftTokens = 1 };
        int FullLengthRequests(DeviceShare[] s, int tokens) => MemoryPlanner.Plan(v3, s, options with { MaxSequenceLength = tokens }).FullLengthRequests;
        Assert.IsGreaterThanOrEqualTo(16, FullLengthRequests(shares, choice.Tokens));
        Assert.IsLessThan(16, FullLengthRequests(shares, choice.Tokens + KvBlockManager.BlockTokens));
        StringAssert.Contains(choice.Reason, "the tightest, device 0");
        StringAssert.Contains(choice.Reason, "62 layers' caches");
        Assert.IsLessThan(ContextSize.ChooseForDevices(plain, free, sessions: 16).Tokens, choice.Tokens);

        var whole = DistributedModels.StoredBytes(DistributedModels.MtpLayerTensors(v3));
        var before = Enumerable.Range(0, 8).Select(d => new DeviceShare(free[d], plain.BytesOn(d) + (d == 0 ? whole : 0), 0, 61, d == 0 ? 62 : 61, d == 0)).ToArray();
        var planned = MemoryPlanner.Plan(v3, shares, options with { MaxSequenceLength = KvBlockManager.BlockTokens * 16 });
        var wholeOnDevice0 = MemoryPlanner.Plan(v3, before, options with { MaxSequenceLength = KvBlockManager.BlockTokens * 16 });
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
