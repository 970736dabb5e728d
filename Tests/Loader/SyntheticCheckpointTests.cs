using System.Security.Cryptography;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Numerics;
using DeepSeekCuda.Loader.Synthetic;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Loader;

[TestClass]
public sealed class SyntheticCheckpointTests
{
    private const int Seed = 1234;

    [TestMethod]
    public void TinyPresetOpensAndValidatesInTheReleaseLayout()
    {
        using var dir = new TempDir();
        var fractions = new List<double>();
        SyntheticCheckpoint.Write(dir.Path, ModelPresets.Tiny, Seed, shards: 2, new SyncProgress(fractions.Add));

        CollectionAssert.AreEquivalent(
            new[] { "config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors" },
            Directory.GetFiles(dir.Path).Select(Path.GetFileName).ToArray());
        using var checkpoint = Checkpoint.Open(dir.Path);
        Assert.AreEqual(ModelPresets.Tiny, checkpoint.Config);
        Assert.AreEqual(CheckpointLayout.Expected(ModelPresets.Tiny).Count, checkpoint.Tensors.Count);
        Assert.IsTrue(checkpoint.Contains("model.layers.3.eh_proj.weight"), "the MTP layer is written");
        Assert.IsTrue(checkpoint.Contains("model.layers.3.mlp.experts.11.down_proj.weight_scale_inv"));
        Assert.AreEqual(1.0, fractions[^1]);
        Assert.IsTrue(fractions.Zip(fractions.Skip(1)).All(p => p.First <= p.Second), "progress never goes back");

        var index = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(dir.File("model.safetensors.index.json")))!;
        Assert.AreEqual(checkpoint.TotalTensorBytes, index["metadata"]!["total_size"]!.GetValue<long>());
    }

    [TestMethod]
    public void SameConfigAndSeedGiveByteIdenticalFilesAndAnotherSeedDoesNot()
    {
        using var a = new TempDir();
        using var b = new TempDir();
        using var c = new TempDir();
        SyntheticCheckpoint.Write(a.Path, ModelPresets.Tiny, Seed);
        SyntheticCheckpoint.Write(b.Path, ModelPresets.Tiny, Seed);
        SyntheticCheckpoint.Write(c.Path, ModelPresets.Tiny, Seed + 1);
        foreach (var file in Directory.GetFiles(a.Path).Select(Path.GetFileName))
        {
            var hashA = SHA256.HashData(File.ReadAllBytes(Path.Combine(a.Path, file!)));
            CollectionAssert.AreEqual(hashA, SHA256.HashData(File.ReadAllBytes(Path.Combine(b.Path, file!))), file);
            if (file!.EndsWith(".safetensors", StringComparison.Ordinal))
            {
                CollectionAssert.AreNotEqual(hashA, SHA256.HashData(File.ReadAllBytes(Path.Combine(c.Path, file))), file);
            }
        }
    }

    [TestMethod]
    public void SomeWeightLivesInAnotherShardThanItsScale()
    {
        using var dir = new TempDir();
        SyntheticCheckpoint.Write(dir.Path, ModelPresets.Tiny, Seed, shards: 3);
        using var checkpoint = Checkpoint.Open(dir.Path);
        Assert.HasCount(3, checkpoint.ShardFiles.ToList());
        var split = checkpoint.Tensors.Values
            .Where(t => t.DType == DType.F8_E4M3)
            .Where(t => checkpoint.Get(LinearSpec.ScaleName(t.Name)).FilePath != t.FilePath)
            .Select(t => t.Name)
            .ToList();
        Assert.HasCount(2, split, "each of the two cuts falls between a weight and its scale");
        var values = checkpoint.ReadFloat32(split[0]);
        Assert.IsTrue(values.All(float.IsFinite) && values.Any(v => v != 0));
    }

    [TestMethod]
    public void DequantizedWeightsMatchTheDrawnWeightsWithinHalfAnE4M3Step()
    {
        using var dir = new TempDir();
        var config = ModelPresets.Tiny;
        SyntheticCheckpoint.Write(dir.Path, config, Seed);
        using var checkpoint = Checkpoint.Open(dir.Path);
        var checkedWeights = 0;
        foreach (var name in checkpoint.Tensors.Values.Where(t => t.DType == DType.F8_E4M3).Select(t => t.Name).Order(StringComparer.Ordinal).Take(40))
        {
            var info = checkpoint.Get(name);
            var (rows, cols) = ((int)info.Shape[0], (int)info.Shape[1]);
            var drawn = SyntheticCheckpoint.DrawFloat(config, Seed, name);
            var dequantized = checkpoint.ReadFloat32(name);
            var scales = checkpoint.ReadFloat32(LinearSpec.ScaleName(name));
            var gridCols = (cols + 127) / 128;
            Assert.HasCount(rows * cols, drawn);
            for (var r = 0; r < rows; r++)
            {
                for (var c = 0; c < cols; c++)
                {
                    var i = r * cols + c;
                    double w = drawn[i], s = scales[r / 128 * gridCols + c / 128];
                    // In units of the block scale, |w/s| <= 448. e4m3 spacing there: 2^-9 below 2^-6
                    // (subnormals), else 2^(floor(log2|w/s|) - 3); RNE errs by at most half of it. The
                    // float32 division and product add a few 2^-24 relative.
                    var x = Math.Abs(w / s);
                    var spacing = x < 1.0 / 64 ? Math.Pow(2, -9) : Math.Pow(2, Math.Floor(Math.Log2(x)) - 3);
                    var bound = 0.5 * spacing * s + 4 * Math.Pow(2, -24) * Math.Abs(w);
                    if (Math.Abs(dequantized[i] - w) > bound)
                    {
                        Assert.Fail($"{name}[{r}, {c}]: dequantized {dequantized[i]:R} vs drawn {w:R} (scale {s:R}) differ by more than {bound:R}");
                    }
                }
            }

            // The scale is the block amax / 448: some element of every block lands on ±448 exactly.
            var amax = new float[scales.Length];
            for (var i = 0; i < drawn.Length; i++)
            {
                var b = i / cols / 128 * gridCols + i % cols / 128;
                amax[b] = Math.Max(amax[b], Math.Abs(drawn[i]));
            }

            for (var b = 0; b < scales.Length; b++)
            {
                Assert.AreEqual(amax[b] / 448f, scales[b], $"{name} block {b}");
            }

            checkedWeights++;
        }

        Assert.AreEqual(40, checkedWeights);
    }

    [TestMethod]
    public void UnquantizedTensorsHoldTheDrawnValuesRoundedToBf16AndMtpCopies()
    {
        using var dir = new TempDir();
        var config = ModelPresets.Tiny;
        SyntheticCheckpoint.Write(dir.Path, config, Seed);
        using var checkpoint = Checkpoint.Open(dir.Path);
        foreach (var name in new[] { CheckpointLayout.Embedding, CheckpointLayout.LmHead, "model.layers.1.mlp.gate.weight", "model.layers.2.input_layernorm.weight", "model.layers.3.eh_proj.weight" })
        {
            var drawn = SyntheticCheckpoint.DrawFloat(config, Seed, name);
            var stored = checkpoint.ReadFloat32(name);
            CollectionAssert.AreEqual(drawn.Select(v => BFloat16.ToFloat(BFloat16.FromFloat(v))).ToArray(), stored, name);
        }

        var bias = checkpoint.ReadFloat32("model.layers.1.mlp.gate.e_score_correction_bias");
        CollectionAssert.AreEqual(SyntheticCheckpoint.DrawFloat(config, Seed, "model.layers.1.mlp.gate.e_score_correction_bias"), bias);

        var norm = checkpoint.ReadFloat32("model.layers.0.input_layernorm.weight");
        // BF16 spacing near 1 is 2^-7, so 192 draws of 1 + 0.1·N(0,1) give a few dozen distinct values.
        Assert.IsTrue(norm.All(v => v is > 0.5f and < 1.5f) && norm.Distinct().Count() > 20, "norm weights are 1 + 0.1·N(0,1), not ones");
        CollectionAssert.AreEqual(checkpoint.GetBytes(CheckpointLayout.Embedding).ToArray(), checkpoint.GetBytes("model.layers.3.embed_tokens.weight").ToArray());
        CollectionAssert.AreEqual(checkpoint.GetBytes(CheckpointLayout.LmHead).ToArray(), checkpoint.GetBytes("model.layers.3.shared_head.head.weight").ToArray());

        var embedding = checkpoint.ReadFloat32(CheckpointLayout.Embedding);
        var std = Math.Sqrt(embedding.Select(v => (double)v * v).Average());
        Assert.AreEqual(1.0, std, 0.02, "embedding ~ N(0, 1)");
    }

    [TestMethod]
    public void ConfigJsonRoundTripsForEveryPreset()
    {
        using var dir = new TempDir();
        foreach (var preset in new[] { ModelPresets.Tiny, ModelPresets.DeepSeekV3, ModelPresets.DeepSeekV3Slice(4), ModelPresets.Tiny with { QLoraRank = null, RopeScaling = null, Quantization = null, RmsNormEps = 1e-5, TieWordEmbeddings = true } })
        {
            var path = dir.File("config.json");
            File.WriteAllText(path, SyntheticCheckpoint.ConfigJson(preset));
            Assert.AreEqual(preset, ModelConfig.Load(path));
        }

        var json = System.Text.Json.Nodes.JsonNode.Parse(SyntheticCheckpoint.ConfigJson(ModelPresets.DeepSeekV3))!;
        Assert.AreEqual("deepseek_v3", json["model_type"]!.GetValue<string>());
        Assert.AreEqual("DeepseekV3ForCausalLM", json["architectures"]![0]!.GetValue<string>());
        Assert.AreEqual(128, json["num_key_value_heads"]!.GetValue<int>());
        Assert.AreEqual("bfloat16", json["torch_dtype"]!.GetValue<string>());
        Assert.AreEqual(128, json["quantization_config"]!["weight_block_size"]![1]!.GetValue<int>());
        Assert.AreEqual("40", json["rope_scaling"]!["factor"]!.ToJsonString(), "integral factors are written as JSON integers, as in the release");
    }

    [TestMethod]
    public void UnquantizedAndSingleShardVariantsOpen()
    {
        using var dir = new TempDir();
        var config = ModelPresets.Tiny with { Quantization = null, QLoraRank = null, NumNextNPredictLayers = 0 };
        SyntheticCheckpoint.Write(dir.Path, config, Seed, shards: 1);
        using var checkpoint = Checkpoint.Open(dir.Path);
        Assert.AreEqual(DType.BF16, checkpoint.Get("model.layers.0.self_attn.q_proj.weight").DType);
        Assert.IsFalse(checkpoint.Tensors.Keys.Any(n => n.EndsWith("_scale_inv", StringComparison.Ordinal)));
        Assert.HasCount(1, checkpoint.ShardFiles.ToList());
    }

    [TestMethod]
    public void PresetsHaveTheDocumentedShapes()
    {
        var v3 = ModelPresets.DeepSeekV3;
        Assert.AreEqual(7168, v3.HiddenSize);
        Assert.AreEqual(129280, v3.VocabSize);
        Assert.AreEqual(0.1352338, v3.SoftmaxScale, 1e-7, "MODEL.md §3");
        var expected = CheckpointLayout.Expected(v3);
        Assert.AreEqual(1, expected.Count(t => t.Name == "model.layers.61.mlp.experts.255.down_proj.weight_scale_inv"));
        var kvA = expected.Single(t => t.Name == "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv");
        CollectionAssert.AreEqual(new long[] { 5, 56 }, kvA.Shape.ToArray(), "MODEL.md §2");

        var slice = ModelPresets.DeepSeekV3Slice(4);
        Assert.AreEqual(4, slice.NumHiddenLayers);
        Assert.IsFalse(slice.IsMoeLayer(0));
        Assert.IsTrue(slice.IsMoeLayer(1) && slice.IsMoeLayer(3));
        Assert.AreEqual(slice, ModelPresets.ByName("DeepSeek-V3-Slice4"));
        Assert.AreSame(ModelPresets.Tiny, ModelPresets.ByName("tiny"));
        Assert.AreEqual(v3, ModelPresets.ByName("deepseek-v3"));

        var tiny = ModelPresets.Tiny;
        Assert.AreNotEqual(0, tiny.HiddenSize % 128, "the tiny preset exercises partial scale blocks");
        Assert.AreEqual(4, tiny.StoredLayerCount);

        var unknown = Assert.ThrowsExactly<ArgumentException>(() => ModelPresets.ByName("deepseek-v4"));
        Assert.Contains("'deepseek-v4'", unknown.Message);
        Assert.Contains("tiny", unknown.Message);
        Assert.Contains("deepseek-v3-sliceN", unknown.Message);
        Assert.ThrowsExactly<ArgumentException>(() => ModelPresets.ByName("deepseek-v3-slice0"));
    }

    [TestMethod]
    public void RefusesImpossibleShardCountsAndUnknownTensorsWithoutWritingShards()
    {
        using var dir = new TempDir();
        var tooMany = Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => SyntheticCheckpoint.Write(dir.Path, ModelPresets.Tiny, Seed, shards: 10_000));
        Assert.AreEqual("shards", tooMany.ParamName);
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => SyntheticCheckpoint.Write(dir.Path, ModelPresets.Tiny, Seed, shards: 0));
        Assert.IsEmpty(Directory.GetFileSystemEntries(dir.Path));

        Assert.Contains("'model.layers.0.mlp.gate.weight'",
            Assert.ThrowsExactly<ArgumentException>(() => SyntheticCheckpoint.DrawFloat(ModelPresets.Tiny, Seed, "model.layers.0.mlp.gate.weight")).Message,
            "layer 0 is dense: it has no router");
        Assert.ThrowsExactly<ArgumentException>(() => SyntheticCheckpoint.DrawFloat(ModelPresets.Tiny, Seed, "model.layers.0.self_attn.o_proj.weight_scale_inv"));
        Assert.AreEqual("model-00007-of-00163.safetensors", SyntheticCheckpoint.ShardFileName(7, 163));
    }

    [TestMethod]
    public void InvalidConfigIsRefusedBeforeAnythingIsWritten()
    {
        using var dir = new TempDir();
        var e = Assert.ThrowsExactly<ModelConfigException>(() => SyntheticCheckpoint.Write(dir.Path, ModelPresets.Tiny with { NGroup = 5 }, Seed));
        Assert.AreEqual("n_group", e.Field);
        Assert.IsEmpty(Directory.GetFileSystemEntries(dir.Path));
    }
}
