using DeepSeekCuda.Loader.Synthetic;
using DeepSeekCuda.Serving;

namespace DeepSeekCuda.Tests.Serving;

/// <summary>
/// The bandwidth floor and FLOP count of <see cref="StepCost"/> and the projection of <see cref="DecodeProjection"/>
/// against values computed by hand (in the comments) from the tiny preset's and DeepSeek-V3's shapes.
/// FP8 linear [out, in] = out·in bytes + ⌈out/128⌉·⌈in/128⌉·4 bytes of scales.
/// </summary>
[TestClass]
public sealed class StepCostTests
{
    // Tiny: D 192, V 500, I 320, moe_I 96, H 3, 2 shared (width 192), E 12, k 3, kv_lora 80, q_lora 96, rope 16, nope 32, v 40.
    // Attention: norms 2·384 + q_a 18440 + q_a_norm 192 + q_b [144,96] 13832 + kv_a [96,192] 18440 + kv_a_norm 160
    //            + kv_b [216,80] 17288 + o [192,120] 23048 = 92168.
    // Dense layer: + 3 · 61464 ([320,192] and [192,320]: 61440 + 24) = 276560.
    // MoE layer fixed: + gate 4608 + bias 48 + shared 3 · 36880 = 207464; one expert 3 · 18440 = 55320.
    // Head: final norm 384 + lm_head 192000 = 192384. Cache: 96 · 2 = 192 bytes per position and layer.
    private const long TinyDense = 276560, TinyMoeFixed = 207464, TinyExpert = 55320, TinyHead = 192384;

    [TestMethod]
    public void TinyLayerBytesMatchTheHandCount()
    {
        var layers = StepCost.Layers(ModelPresets.Tiny);
        Assert.HasCount(3, layers);
        Assert.AreEqual(new LayerBytes(0, false, TinyDense, 0), layers[0]);
        Assert.AreEqual(new LayerBytes(1, true, TinyMoeFixed, TinyExpert), layers[1]);
        Assert.AreEqual(new LayerBytes(2, true, TinyMoeFixed, TinyExpert), layers[2]);
        Assert.AreEqual(TinyHead, StepCost.HeadBytes(ModelPresets.Tiny));
        Assert.AreEqual(192, StepCost.CacheBytesPerPosition(ModelPresets.Tiny));
    }

    [TestMethod]
    public void DeepSeekV3ExpertIsThreeFp8MatricesWithScales()
    {
        // [2048, 7168] and [7168, 2048]: 14680064 codes + 16·56·4 = 3584 scale bytes each; 256 of them ≈ 11.28 GB per MoE layer.
        var layers = StepCost.Layers(ModelPresets.DeepSeekV3);
        Assert.HasCount(61, layers);
        Assert.AreEqual(3 * (14680064L + 3584), layers[3].ExpertBytes);
        Assert.IsFalse(layers[2].IsMoe);
        Assert.IsTrue(layers[60].IsMoe);
        // lm_head 129280 · 7168 · 2 + final norm 7168 · 2.
        Assert.AreEqual(129280L * 7168 * 2 + 7168 * 2, StepCost.HeadBytes(ModelPresets.DeepSeekV3));
    }

    [TestMethod]
    public void ExpectedDistinctExpertsUnderUniformRouting()
    {
        Assert.AreEqual(3.0, StepCost.ExpectedDistinctExperts(12, 3, 1), 1e-12);
        Assert.AreEqual(5.25, StepCost.ExpectedDistinctExperts(12, 3, 2), 1e-12); // 12 · (1 − 0.75²)
        Assert.AreEqual(8.0, StepCost.ExpectedDistinctExperts(256, 8, 1), 1e-12);
        Assert.AreEqual(0.0, StepCost.ExpectedDistinctExperts(256, 8, 0), 1e-12);
        Assert.AreEqual(256.0, StepCost.ExpectedDistinctExperts(256, 8, 100000), 1e-6);
    }

    [TestMethod]
    public void DecodeBytesOfTinyByHand()
    {
        // Batch 1, context 100: 276560 + 2·(207464 + 3·55320) = 1023408 weights; 1·3·101·192 = 58176 cache;
        // 384 embedding row; 192384 head: 1274352.
        Assert.AreEqual(1274352.0, StepCost.DecodeBytes(ModelPresets.Tiny, 1, 100), 1e-6);
        // Batch 2, context 0: 276560 + 2·(207464 + 5.25·55320) = 1272348; cache 2·3·1·192 = 1152; rows 768; head: 1466652.
        Assert.AreEqual(1466652.0, StepCost.DecodeBytes(ModelPresets.Tiny, 2, 0), 1e-6);
    }

    [TestMethod]
    public void PrefillBytesAndFlopsOfTinyByHand()
    {
        // 4 tokens: U = 12·(1 − 0.75⁴) = 8.203125; 276560 + 2·(207464 + 8.203125·55320) = 1599081.75;
        // cache written 4·3·192 = 2304; rows 1536; head 192384.
        Assert.AreEqual(1795305.75, StepCost.PrefillBytes(ModelPresets.Tiny, 4), 1e-6);
        // 2 tokens. Per token: attention linears 18432 + 13824 + 18432 + 17280 + 23040 = 91008;
        // dense layer + 3·320·192 = 275328; MoE layer + router 2304 + shared 110592 + 3 experts 165888 = 369792.
        // Linears 2·2·(275328 + 2·369792) = 4059648; attention 3 layers · 2·3·(2·3/2)·(48 + 40) = 4752; logits 2·500·192 = 192000.
        Assert.AreEqual(4256400.0, StepCost.PrefillFlops(ModelPresets.Tiny, 2), 1e-6);
    }

    [TestMethod]
    public void ProjectionDividesGpuTimeAndAddsHostAndAllReduces()
    {
        var measured = new LayerStepTimes(DenseGpuUs: 100, DenseHostUs: 10, MoeGpuUs: 200, MoeHostUs: 20, OuterGpuUs: 80, OuterHostUs: 30);
        // GPU (3·100 + 58·200 + 80) / 8 = 1497.5; host 3·10 + 58·20 + 30 = 1220; all-reduce 61·2·20 = 2440.
        var p = DecodeProjection.Project(measured, new DeploymentPlan());
        Assert.AreEqual(1497.5, p.GpuUs, 1e-9);
        Assert.AreEqual(1220.0, p.HostUs, 1e-9);
        Assert.AreEqual(2440.0, p.CommUs, 1e-9);
        Assert.AreEqual(5157.5, p.StepUs, 1e-9);

        // One GPU: no division, no all-reduce.
        Assert.AreEqual(11980.0 + 1220.0, DecodeProjection.Project(measured, new DeploymentPlan(Gpus: 1)).StepUs, 1e-9);
        // Half efficiency doubles the GPU part only.
        Assert.AreEqual(2995.0, DecodeProjection.Project(measured, new DeploymentPlan(ParallelEfficiency: 0.5)).GpuUs, 1e-9);
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => DecodeProjection.Project(measured, new DeploymentPlan(ParallelEfficiency: 0)));
        Assert.IsTrue(new DeploymentPlan().Assumptions.Count >= 4);
    }
}
