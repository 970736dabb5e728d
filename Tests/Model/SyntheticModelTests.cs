using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Synthetic;
using DeepSeekCuda.Model;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Model;

/// <summary>
/// Generality: seeded synthetic checkpoints whose shapes differ from tiny-a in every direction the config
/// allows. No reference numbers exist for them, so the model is checked against itself along independent
/// paths: naive vs absorbed MLA, one prefill vs token by token, one prefill vs two chunks.
/// </summary>
[TestClass]
public sealed class SyntheticModelTests
{
    private const double MaxRel = 1e-4;
    private static readonly Dictionary<string, (Checkpoint Checkpoint, DeepSeekModel Naive, DeepSeekModel Absorbed)> s_models = [];
    private static readonly CpuBackend s_backend = new();
    private static string s_root = null!;

    public TestContext TestContext { get; set; } = null!;

    /// <summary>The configs under test, by name.</summary>
    private static IEnumerable<(string Name, ModelConfig Config)> Configs()
    {
        // Hidden 192, widths not multiples of 128, 12 experts in 3 groups, 2 shared, YaRN 8 over 128, θ 50000.
        yield return ("tiny", ModelPresets.Tiny);

        // q_proj instead of q_a/q_b, every layer MoE (first_k_dense_replace 0) but moe_layer_freq 2 makes
        // layer 1 dense, no shared experts, no renormalization, plain RoPE, tied head, ragged dims around 128.
        yield return ("qproj-plainrope", ModelPresets.Tiny with
        {
            VocabSize = 300,
            HiddenSize = 136,
            IntermediateSize = 200,
            MoeIntermediateSize = 72,
            NumHiddenLayers = 3,
            NumAttentionHeads = 2,
            NSharedExperts = 0,
            NRoutedExperts = 10,
            NGroup = 5,
            TopkGroup = 2,
            NumExpertsPerTok = 2,
            FirstKDenseReplace = 0,
            MoeLayerFreq = 2,
            NormTopkProb = false,
            RoutedScalingFactor = 1.0,
            QLoraRank = null,
            KvLoraRank = 136,
            QkNopeHeadDim = 24,
            QkRopeHeadDim = 8,
            VHeadDim = 20,
            RopeTheta = 10000,
            RopeScaling = null,
            TieWordEmbeddings = true,
            NumNextNPredictLayers = 0,
        });

        // Two dense layers first, one group (no group limit), top-3 of 8, YaRN factor 4 over 32 positions with
        // other betas and mscale_all_dim, θ 1e6, unquantized BF16 linears.
        yield return ("dense2-yarn4-bf16", ModelPresets.Tiny with
        {
            VocabSize = 260,
            HiddenSize = 160,
            IntermediateSize = 136,
            MoeIntermediateSize = 48,
            NumHiddenLayers = 4,
            NumAttentionHeads = 5,
            NSharedExperts = 1,
            NRoutedExperts = 8,
            NGroup = 1,
            TopkGroup = 1,
            NumExpertsPerTok = 3,
            FirstKDenseReplace = 2,
            MoeLayerFreq = 1,
            RoutedScalingFactor = 2.5,
            QLoraRank = 130,
            KvLoraRank = 64,
            QkNopeHeadDim = 16,
            QkRopeHeadDim = 12,
            VHeadDim = 16,
            RopeTheta = 1e6,
            RopeScaling = new RopeScaling(4, 32, 16, 2, 1.0, 0.707),
            MaxPositionEmbeddings = 256,
            Quantization = null,
        });
    }

    [ClassInitialize]
    public static void Init(TestContext _)
    {
        s_root = TempFolder.NewPath("dscuda-model");
        var seed = 11;
        foreach (var (name, config) in Configs())
        {
            var dir = Path.Combine(s_root, name);
            SyntheticCheckpoint.Write(dir, config.Validate(), seed++);
            var checkpoint = Checkpoint.Open(dir);
            s_models[name] = (checkpoint,
                DeepSeekModel.Load(checkpoint, s_backend, new ModelOptions { Attention = AttentionForm.Naive, MaxSequenceLength = 200 }),
                DeepSeekModel.Load(checkpoint, s_backend, new ModelOptions { Attention = AttentionForm.Absorbed, MaxSequenceLength = 200 }));
        }
    }

    [ClassCleanup]
    public static void Cleanup()
    {
        foreach (var (checkpoint, naive, absorbed) in s_models.Values)
        {
            naive.Dispose();
            absorbed.Dispose();
            checkpoint.Dispose();
        }

        s_backend.Dispose();
        TempFolder.DeleteBestEffort(s_root);
    }

    /// <summary>A prompt longer than the YaRN original length of each config, ids spread over the vocabulary.</summary>
    private static int[] Prompt(DeepSeekModel model, int length) =>
        [.. Enumerable.Range(0, length).Select(i => i == 0 ? model.Config.BosTokenId : (int)((i * 7919L + 13) % model.VocabSize))];

    [TestMethod]
    [DataRow("tiny")]
    [DataRow("qproj-plainrope")]
    [DataRow("dense2-yarn4-bf16")]
    public void NaiveAndAbsorbedAgree(string name)
    {
        var (_, naive, absorbed) = s_models[name];
        var ids = Prompt(naive, 150);
        var a = naive.ComputeLogits(ids);
        var b = absorbed.ComputeLogits(ids);
        Assert.IsTrue(a.All(float.IsFinite), "finite logits");
        var c = Tolerance.AssertMaxRel(b, a, MaxRel, $"{name}: absorbed vs naive");
        TestContext.WriteLine(Tolerance.Describe($"{name}: absorbed vs naive", c));
    }

    [TestMethod]
    [DataRow("tiny")]
    [DataRow("qproj-plainrope")]
    [DataRow("dense2-yarn4-bf16")]
    public void TokenByTokenEqualsPrefill(string name)
    {
        var (_, naive, absorbed) = s_models[name];
        var ids = Prompt(naive, 40);
        var prefill = naive.ComputeLogits(ids);
        var v = naive.VocabSize;
        using var session = absorbed.CreateSession();
        var row = new float[v];
        for (var t = 0; t < ids.Length; t++)
        {
            session.Forward(ids.AsSpan(t, 1), row);
            Tolerance.AssertMaxRel(row, prefill.AsSpan(t * v, v), MaxRel, $"{name}: position {t} token by token vs prefill");
        }
    }

    [TestMethod]
    [DataRow("tiny")]
    [DataRow("qproj-plainrope")]
    [DataRow("dense2-yarn4-bf16")]
    public void TwoChunksEqualOnePrefill(string name)
    {
        var (_, naive, _) = s_models[name];
        var ids = Prompt(naive, 90);
        var whole = naive.ComputeLogits(ids);
        using var session = naive.CreateSession();
        var first = session.ForwardAll(ids.AsSpan(0, 37));
        var second = session.ForwardAll(ids.AsSpan(37));
        Tolerance.AssertMaxRel([.. first, .. second], whole, MaxRel, $"{name}: chunks 37+53 vs one prefill");
    }

    [TestMethod]
    public void MtpPrefillEqualsStepwise()
    {
        var (_, naive, absorbed) = s_models["tiny"];
        Assert.IsTrue(naive.HasMtp);
        var ids = Prompt(naive, 20);
        float[] hiddens = [];
        naive.ComputeLogits(ids, x =>
        {
            if (x.Name == "final_norm")
            {
                hiddens = x.Values!;
            }
        });
        int d = naive.Config.HiddenSize, v = naive.VocabSize, n = ids.Length - 1;
        using var s1 = naive.CreateSession();
        var all = s1.MtpForward(hiddens.AsSpan(0, n * d), ids.AsSpan(1), 0);
        using var s2 = absorbed.CreateSession();
        for (var i = 0; i < n; i++)
        {
            Tolerance.AssertMaxRel(s2.MtpForward(hiddens.AsSpan(i * d, d), ids.AsSpan(i + 1, 1), i), all.AsSpan(i * v, v), MaxRel, $"MTP position {i}");
        }
    }

    [TestMethod]
    [DataRow("tiny")]
    [DataRow("qproj-plainrope")]
    public void GpuEmulationHandlesRaggedGroups(string name)
    {
        // Widths such as 136 and 72 leave a narrow last activation group; emulation must stay near float32.
        var (checkpoint, naive, _) = s_models[name];
        using var backend = new CpuBackend(CpuNumerics.GpuEmulation);
        using var emulated = DeepSeekModel.Load(checkpoint, backend, new ModelOptions { MaxSequenceLength = 64 });
        var ids = Prompt(naive, 30);
        var c = Tolerance.AssertRmsRel(emulated.ComputeLogits(ids), naive.ComputeLogits(ids), 0.15, $"{name}: gpu emulation vs float32");
        Assert.IsGreaterThan(1e-4, c.RmsRel, "emulation rounds");
        TestContext.WriteLine(Tolerance.Describe($"{name}: gpu emulation vs float32", c));
    }
}
