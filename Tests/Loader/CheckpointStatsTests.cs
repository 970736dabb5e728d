using DeepSeekCuda.Loader;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Loader;

[TestClass]
public sealed class CheckpointStatsTests
{
    [TestMethod]
    public void FullDeepSeekV3MatchesThePublishedParameterCounts()
    {
        // The DeepSeek-V3 report and model card: 671B total parameters in the main model, 37B activated
        // per token, plus 14B of MTP module (685B on the hub). Our count comes from the tensor list alone.
        var text = File.ReadAllText(Path.Combine(SharedData.TinyAModel, "config.json"));
        var node = System.Text.Json.Nodes.JsonNode.Parse(text)!.AsObject();
        foreach (var (k, v) in new Dictionary<string, int>
                 {
                     ["vocab_size"] = 129280, ["hidden_size"] = 7168, ["intermediate_size"] = 18432,
                     ["moe_intermediate_size"] = 2048, ["num_hidden_layers"] = 61, ["num_attention_heads"] = 128,
                     ["num_key_value_heads"] = 128, ["n_routed_experts"] = 256, ["kv_lora_rank"] = 512, ["q_lora_rank"] = 1536,
                     ["qk_rope_head_dim"] = 64, ["qk_nope_head_dim"] = 128, ["v_head_dim"] = 128, ["n_group"] = 8,
                     ["topk_group"] = 4, ["num_experts_per_tok"] = 8, ["first_k_dense_replace"] = 3,
                     ["max_position_embeddings"] = 163840,
                 })
        {
            node[k] = v;
        }

        var stats = CheckpointStats.Compute(ModelConfig.Parse(node.ToJsonString()));
        Assert.IsTrue(stats.MainParameters is > 670_500_000_000 and < 671_500_000_000, $"main {stats.MainParameters}");
        Assert.IsTrue(stats.ActiveParameters is > 36_500_000_000 and < 38_000_000_000, $"active {stats.ActiveParameters}");
        Assert.IsTrue(stats.MainParameters + stats.MtpParameters is > 684_000_000_000 and < 686_000_000_000, $"with MTP {stats.MainParameters + stats.MtpParameters}");
        // 61 layers x 576 BF16 values per token.
        Assert.AreEqual(61L * 576 * 2, stats.KvCacheBytesPerToken);
    }

    [TestMethod]
    public void TinyAStoredBytesEqualItsShards()
    {
        using var checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        var stats = CheckpointStats.Compute(checkpoint.Config);
        Assert.AreEqual(checkpoint.TotalTensorBytes, stats.WeightBytes);
    }
}
