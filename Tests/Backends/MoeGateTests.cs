using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Tests.Model;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Backends;

/// <summary>The MoE gate as a unit: fed the reference's own gate inputs, it must pick exactly the reference's experts.</summary>
[TestClass]
public sealed class MoeGateTests
{
    [TestMethod]
    public void GateFromReferenceInputsChoosesTheReferenceExperts()
    {
        using var checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        using var reference = new TinyAReference();
        using var backend = new CpuBackend();
        var config = checkpoint.Config;
        var options = new GateOptions(config.NRoutedExperts, config.NGroup, config.TopkGroup, config.NumExpertsPerTok,
            config.NormTopkProb, (float)config.RoutedScalingFactor);
        var checkedLayers = 0;
        for (var i = 0; i < config.NumHiddenLayers; i++)
        {
            if (!config.IsMoeLayer(i))
            {
                continue;
            }

            var names = CheckpointLayout.Layer(config, i);
            var gate = backend.UploadGate(checkpoint, names.Gate, names.GateBias, config.HiddenSize, options);
            var gateIn = reference.F32($"p1.layer{i}.gate_in");
            var tokens = gateIn.Length / config.HiddenSize;
            using var x = backend.Upload(gateIn, tokens, config.HiddenSize);
            var routing = backend.AllocateRouting(tokens, options.Experts, options.TopK);
            backend.MoeGate(x, gate, routing);
            var scores = new float[tokens * options.Experts];
            var idx = new int[tokens * options.TopK];
            var w = new float[tokens * options.TopK];
            backend.DownloadRouting(routing, scores, idx, w);
            Tolerance.AssertClose(scores, reference.F32($"p1.layer{i}.gate_scores"), 1e-5, 0, $"layer{i}.gate_scores");
            RoutingAssert.SameExpertsAndWeights(idx, w, reference.I64($"p1.layer{i}.topk_idx"), reference.F32($"p1.layer{i}.topk_weight"),
                options.TopK, 1e-5, $"layer{i} gate from reference gate_in");
            checkedLayers++;
        }

        Assert.IsGreaterThan(0, checkedLayers, "tiny-a has MoE layers");
    }

    [TestMethod]
    public void TiesGoToTheLowerIndex()
    {
        Span<int> result = stackalloc int[3];
        Router.TopK([1f, 3f, 3f, 2f, 3f], result);
        CollectionAssert.AreEqual(new[] { 1, 2, 4 }, result.ToArray());
        Router.TopK([float.NegativeInfinity, float.NegativeInfinity, 0f], result);
        CollectionAssert.AreEqual(new[] { 2, 0, 1 }, result.ToArray());
    }

    [TestMethod]
    public void GroupLimitBiasAndScalingFollowTheSpec()
    {
        // 4 experts in 2 groups, keep 1 group, top-2. Expert 0 has the largest score but its group
        // loses on the sum of its two biased scores; the bias steers selection, the weights stay unbiased.
        var options = new GateOptions(4, 2, 1, 2, Normalize: true, ScalingFactor: 2.5f);
        float[] logits = [3f, -3f, 1f, 0.5f];
        float[] bias = [0f, 0f, 0f, 0.2f];
        var x = new float[] { 1f };
        var weight = logits; // D = 1: the logit equals the weight
        var scores = new float[4];
        var idx = new int[2];
        var w = new float[2];
        Router.Route(x, weight, bias, options, scores, idx, w);
        static float Sig(float z) => 1f / (1f + MathF.Exp(-z));
        // Group 0: σ(3)+σ(−3) = 1.0; group 1: σ(1) + σ(0.5)+0.2 ≈ 1.553 → group 1 kept.
        // Biased: expert 3 = σ(0.5)+0.2 ≈ 0.822 > expert 2 = σ(1) ≈ 0.731.
        CollectionAssert.AreEqual(new[] { 3, 2 }, idx);
        var sum = Sig(0.5f) + Sig(1f);
        Assert.AreEqual(Sig(0.5f) / sum * 2.5f, w[0], 1e-6f);
        Assert.AreEqual(Sig(1f) / sum * 2.5f, w[1], 1e-6f);
        Assert.AreEqual(Sig(3f), scores[0], 1e-7f);
    }
}
