using System.Text.Json.Nodes;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Loader;

[TestClass]
public sealed class ModelConfigTests
{
    private const string Path = "/configs/test/config.json";

    private static JsonObject Base() => JsonNode.Parse(File.ReadAllText(System.IO.Path.Combine(SharedData.TinyAModel, "config.json")))!.AsObject();

    private static ModelConfigException Fails(Action<JsonObject> mutate, string field, string problem)
    {
        var json = Base();
        mutate(json);
        var e = Assert.ThrowsExactly<ModelConfigException>(() => ModelConfig.Parse(json.ToJsonString(), Path));
        Assert.AreEqual(field, e.Field, e.Message);
        Assert.AreEqual(Path, e.FilePath);
        Assert.Contains(Path, e.Message);
        Assert.Contains($"field '{field}'", e.Message);
        Assert.Contains(problem, e.Message);
        return e;
    }

    [TestMethod]
    public void TinyAConfigParses()
    {
        var c = ModelConfig.Parse(Base().ToJsonString(), Path);
        Assert.AreEqual(1024, c.VocabSize);
        Assert.AreEqual(192, c.QLoraRank);
        Assert.AreEqual(new RopeScaling(40, 64, 32, 1, 1, 1), c.RopeScaling);
        Assert.AreEqual(new Fp8Quantization(128, 128, "dynamic"), c.Quantization);
        Assert.AreEqual(4, c.ExpertsPerGroup);
    }

    [TestMethod]
    public void InvariantsNameTheirField()
    {
        Fails(j => j["vocab_size"] = 0, "vocab_size", "must be positive, is 0");
        Fails(j => j["vocab_size"] = -5, "vocab_size", "must be positive, is -5");
        Fails(j => j["num_experts_per_tok"] = 17, "num_experts_per_tok", "17 exceeds n_routed_experts 16");
        Fails(j => j["n_group"] = 3, "n_group", "3 does not divide n_routed_experts 16");
        Fails(j => j["topk_group"] = 5, "topk_group", "5 exceeds n_group 4");
        Fails(j => { j["topk_group"] = 1; j["num_experts_per_tok"] = 5; }, "topk_group", "hold fewer than num_experts_per_tok 5");
        Fails(j => j["first_k_dense_replace"] = 4, "first_k_dense_replace", "outside 0..num_hidden_layers (3)");
        Fails(j => j["qk_rope_head_dim"] = 63, "qk_rope_head_dim", "must be even");
        Fails(j => j["eos_token_id"] = 1024, "eos_token_id", "outside the vocabulary");
        Fails(j => j["rms_norm_eps"] = 0, "rms_norm_eps", "must be in (0, 1]");
        Fails(j => j["num_attention_heads"] = 100_000_000, "num_attention_heads", "overflow a 32-bit width");
    }

    [TestMethod]
    public void RopeScalingProblems()
    {
        Fails(j => j["rope_scaling"]!["type"] = "linear", "rope_scaling.type", "'linear' is not supported (only 'yarn')");
        Fails(j => j["rope_scaling"]!.AsObject().Remove("type"), "rope_scaling.type", "missing");
        Fails(j => j["rope_scaling"]!["factor"] = 0.5, "rope_scaling.factor", "must be at least 1");
        Fails(j => j["rope_scaling"]!.AsObject().Remove("original_max_position_embeddings"), "rope_scaling.original_max_position_embeddings", "missing");
        Fails(j => j["rope_scaling"] = "yarn", "rope_scaling", "is not an object");
    }

    [TestMethod]
    public void RopeTypeAliasIsAccepted()
    {
        var json = Base();
        var rope = json["rope_scaling"]!.AsObject();
        rope.Remove("type");
        rope["rope_type"] = "yarn";
        var c = ModelConfig.Parse(json.ToJsonString(), Path);
        Assert.AreEqual(40.0, c.RopeScaling!.Factor);
        Assert.AreEqual(64, c.RopeScaling.OriginalMaxPositionEmbeddings);
    }

    [TestMethod]
    public void WeightBlockSizeProblems()
    {
        Fails(j => j["quantization_config"]!["weight_block_size"] = new JsonArray(128), "quantization_config.weight_block_size", "has 1 entries, needs 2");
        Fails(j => j["quantization_config"]!["weight_block_size"] = new JsonArray(128, 0), "quantization_config.weight_block_size", "[128, 0] must be two positive integers");
        Fails(j => j["quantization_config"]!["weight_block_size"] = new JsonArray(128, 12.5), "quantization_config.weight_block_size", "entry 1 (12.5) is not an integer");
        Fails(j => j["quantization_config"]!["weight_block_size"] = 128, "quantization_config.weight_block_size", "missing or not an array");
        Fails(j => j["quantization_config"]!["quant_method"] = "int4", "quantization_config.quant_method", "'int4' is not supported");
        Fails(j => j["quantization_config"]!["fmt"] = "e5m2", "quantization_config.fmt", "'e5m2' is not supported");
    }

    [TestMethod]
    public void MissingOrMistypedFields()
    {
        Fails(j => j.Remove("hidden_size"), "hidden_size", "missing");
        Fails(j => j["hidden_size"] = null, "hidden_size", "is null");
        Fails(j => j["hidden_size"] = "256", "hidden_size", "\"256\" is not a 32-bit integer");
        Fails(j => j["hidden_size"] = 256.5, "hidden_size", "256.5 is not a 32-bit integer");
        Fails(j => j["hidden_size"] = 3e10, "hidden_size", "is not a 32-bit integer");
        Fails(j => j["rope_theta"] = "10000", "rope_theta", "is not a number");
        Fails(j => j["norm_topk_prob"] = 1, "norm_topk_prob", "is not a boolean");
        Fails(j => j["rope_theta"] = 1, "rope_theta", "must be above 1 in float32 and finite there, is 1");
    }

    [TestMethod]
    public void UnsupportedMethods()
    {
        Fails(j => j["topk_method"] = "greedy", "topk_method", "'greedy': only bias-corrected group-limited routing (noaux_tc) is supported");
        Fails(j => j["scoring_func"] = "softmax", "scoring_func", "'softmax': only sigmoid gating is supported");
        Fails(j => j["hidden_act"] = "gelu", "hidden_act", "'gelu': only SiLU MLPs are supported");
    }

    [TestMethod]
    public void IntegersParseWrittenEitherWay()
    {
        var json = Base();
        json["hidden_size"] = 256.0;
        json["num_hidden_layers"] = JsonNode.Parse("3.0");
        json["rope_theta"] = 10000.0;
        json["rope_scaling"]!["factor"] = 40.0;
        var fromDoubles = ModelConfig.Parse(json.ToJsonString(), Path);
        Assert.Contains("\"num_hidden_layers\":3.0", json.ToJsonString());
        Assert.AreEqual(ModelConfig.Parse(Base().ToJsonString(), Path), fromDoubles);
        Assert.AreEqual(256, fromDoubles.HiddenSize);
        Assert.AreEqual(3, fromDoubles.NumHiddenLayers);
    }

    [TestMethod]
    public void NotJsonDuplicateKeysAndInvalidStringsAreConfigErrors()
    {
        // Duplicates made JsonObject throw ArgumentException and lone surrogates InvalidOperationException.
        var text = Base().ToJsonString();
        var dup = Assert.ThrowsExactly<ModelConfigException>(() => ModelConfig.Parse(text.Replace("{\"architectures\"", "{\"vocab_size\":5,\"architectures\"", StringComparison.Ordinal), Path));
        Assert.AreEqual("(root)", dup.Field);
        Assert.Contains("vocab_size", dup.Message);
        var surrogate = Assert.ThrowsExactly<ModelConfigException>(() => ModelConfig.Parse(text.Replace("\"silu\"", "\"\\ud800\"", StringComparison.Ordinal), Path));
        Assert.Contains("not valid UTF-16", surrogate.Message);
        Assert.AreEqual("(root)", Assert.ThrowsExactly<ModelConfigException>(() => ModelConfig.Parse("{\"vocab_size\": ", Path)).Field);
        Assert.Contains("not a JSON object", Assert.ThrowsExactly<ModelConfigException>(() => ModelConfig.Parse("[1]", Path)).Message);
    }

    [TestMethod]
    public void ALoneSurrogateInAnyKeyOrStringOfTheConfig_IsAConfigError()
    {
        // Every key, and every string value, of the real config in turn: an escape JSON allows and UTF-16 does not.
        var text = Base().ToJsonString();
        var strings = System.Text.RegularExpressions.Regex.Matches(text, "\"[^\"]*\"").Select(m => m.Index).Distinct().ToList();
        Assert.IsGreaterThan(40, strings.Count);
        var refusedOrIgnored = 0;
        foreach (var at in strings)
        {
            foreach (var escape in new[] { "\\ud800", "\\udfff", "\\ud800\\u0041" })
            {
                // A key, or a value the config reads, is refused; a value nothing reads (architectures) may pass.
                var bad = text.Insert(at + 1, escape);
                var isKey = text[(at + 1)..].IndexOf('"', StringComparison.Ordinal) is var end && text[at + 1 + end + 1] == ':';
                try
                {
                    ModelConfig.Parse(bad, Path);
                    Assert.IsFalse(isKey, bad);
                    refusedOrIgnored++;
                }
                catch (ModelConfigException e)
                {
                    Assert.Contains(Path, e.Message);
                    refusedOrIgnored++;
                }
            }
        }

        Assert.AreEqual(strings.Count * 3, refusedOrIgnored);
    }

    [TestMethod]
    public void LoadReportsAMissingFile()
    {
        var e = Assert.ThrowsExactly<CheckpointException>(() => ModelConfig.Load("/no/such/dir/config.json"));
        Assert.Contains("/no/such/dir/config.json", e.Message);
    }
}
