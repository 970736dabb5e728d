using DeepSeekCuda.Loader;

namespace DeepSeekCuda.Serving;

/// <summary>Bytes of one main layer's weights as stored in the checkpoint, split by what a token touches.</summary>
/// <param name="Layer">Main layer index.</param>
/// <param name="IsMoe">Whether the feed-forward is MoE.</param>
/// <param name="FixedBytes">Read by every step whatever the routing: norms, attention linears with their block scales,
/// the dense MLP or the router, its bias and the shared expert.</param>
/// <param name="ExpertBytes">One routed expert (gate, up, down and their scales); 0 for a dense layer.</param>
internal sealed record LayerBytes(int Layer, bool IsMoe, long FixedBytes, long ExpertBytes);

/// <summary>
/// The memory-bandwidth floor and the arithmetic of a forward step of a DeepSeek-V3-architecture model, from
/// its config only (tensor shapes and dtypes of <see cref="CheckpointLayout.Expected(ModelConfig)"/>, main layers only, no MTP).
/// Decode step of B sequences, each with C cached positions, under uniform routing:
/// <code>
/// bytes(B, C) = Σ_layers [ fixed_l + expert_l · U(B) ]           (U(B) = 0 for a dense layer)
///             + B · L · (C + 1) · (kv_lora_rank + qk_rope_head_dim) · 2   (BF16 latent cache, the new position included)
///             + B · D · 2                                              (embedding rows, BF16)
///             + final_norm + lm_head                                   (BF16 [V, D]; tied: the embedding, same size)
/// U(B)        = E · (1 − (1 − k/E)^B)    expected distinct routed experts hit by B tokens, k of E each
/// </code>
/// Weights count at their checkpoint size (FP8 codes + fp32 block scales, BF16 elsewhere): the floor belongs to the
/// model, not to an implementation (CudaBackend's BF16 copy of kv_b, for instance, reads more than this).
/// A prefill of T tokens is the same formula with U(T) and the latent cache written, not read:
/// T · L · (kv_lora_rank + qk_rope_head_dim) · 2, and one logits row (lm_head read once).
/// </summary>
internal static class StepCost
{
    /// <summary>The main layers' weight bytes.</summary>
    public static IReadOnlyList<LayerBytes> Layers(ModelConfig config)
    {
        ArgumentNullException.ThrowIfNull(config);
        var fixedBytes = new long[config.NumHiddenLayers];
        var routed = new long[config.NumHiddenLayers];
        foreach (var t in CheckpointLayout.Expected(config))
        {
            if (t.Layer < 0 || t.Layer >= config.NumHiddenLayers)
            {
                continue;
            }

            if (t.Name.StartsWith(CheckpointLayout.LayerPrefix(t.Layer) + "mlp.experts.", StringComparison.Ordinal))
            {
                routed[t.Layer] += Bytes(t);
            }
            else
            {
                fixedBytes[t.Layer] += Bytes(t);
            }
        }

        return [.. Enumerable.Range(0, config.NumHiddenLayers).Select(l =>
        {
            var moe = config.IsMoeLayer(l);
            return new LayerBytes(l, moe, fixedBytes[l], moe ? routed[l] / config.NRoutedExperts : 0);
        })];
    }

    /// <summary>Bytes read outside the layers once per step: final norm and the output head (BF16).</summary>
    public static long HeadBytes(ModelConfig config)
    {
        ArgumentNullException.ThrowIfNull(config);
        return (long)config.HiddenSize * 2 + (long)config.VocabSize * config.HiddenSize * 2;
    }

    /// <summary>Bytes of one position of one layer's latent cache (BF16 latent and rope key).</summary>
    public static long CacheBytesPerPosition(ModelConfig config)
    {
        ArgumentNullException.ThrowIfNull(config);
        return (long)(config.KvLoraRank + config.QkRopeHeadDim) * 2;
    }

    /// <summary>E · (1 − (1 − k/E)^tokens): distinct routed experts <paramref name="tokens"/> tokens hit on average when each picks k of E uniformly.</summary>
    public static double ExpectedDistinctExperts(int experts, int topK, int tokens)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(experts);
        ArgumentOutOfRangeException.ThrowIfNegative(topK);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(topK, experts);
        ArgumentOutOfRangeException.ThrowIfNegative(tokens);
        return experts * (1 - Math.Pow(1 - (double)topK / experts, tokens));
    }

    /// <summary>The floor's bytes of one decode step of <paramref name="batch"/> sequences, each with <paramref name="context"/> cached positions (class formula).</summary>
    public static double DecodeBytes(ModelConfig config, int batch, int context)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(batch);
        ArgumentOutOfRangeException.ThrowIfNegative(context);
        return WeightBytes(config, batch)
            + (double)batch * config.NumHiddenLayers * (context + 1) * CacheBytesPerPosition(config)
            + (double)batch * config.HiddenSize * 2
            + HeadBytes(config);
    }

    /// <summary>The floor's bytes of a prefill of <paramref name="tokens"/> tokens from an empty cache (class formula).</summary>
    public static double PrefillBytes(ModelConfig config, int tokens)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(tokens);
        return WeightBytes(config, tokens)
            + (double)tokens * config.NumHiddenLayers * CacheBytesPerPosition(config)
            + (double)tokens * config.HiddenSize * 2
            + HeadBytes(config);
    }

    /// <summary>
    /// Multiply-adds × 2 of a prefill of <paramref name="tokens"/> tokens from position 0 in the naive MLA form:
    /// per token and layer the attention linears (q_a, q_b, kv_a, kv_b, o), the dense MLP or router + shared + k routed
    /// experts; causal attention H · T(T+1)/2 · (qk_head + v_head) per layer; one logits row V · D. Norms, RoPE and
    /// softmax are left out (a few percent at most).
    /// </summary>
    public static double PrefillFlops(ModelConfig config, int tokens)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(tokens);
        double total = 0;
        for (var l = 0; l < config.NumHiddenLayers; l++)
        {
            var n = CheckpointLayout.Layer(config, l);
            double perToken = 0;
            var linears = new List<LinearSpec> { n.QB, n.KvA, n.KvB, n.O };
            if (n.QA is { } qa)
            {
                linears.Add(qa);
            }

            if (n.IsMoe)
            {
                perToken += (double)config.NRoutedExperts * config.HiddenSize;
                linears.AddRange(n.SharedExpert);
                for (var j = 0; j < config.NumExpertsPerTok; j++)
                {
                    linears.AddRange(n.Expert(j));
                }
            }
            else
            {
                linears.AddRange(n.DenseMlp);
            }

            perToken += linears.Sum(s => (double)s.Out * s.In);
            total += 2 * perToken * tokens;
            total += 2.0 * config.NumAttentionHeads * tokens * (tokens + 1.0) / 2 * (config.QkHeadDim + config.VHeadDim);
        }

        return total + 2.0 * config.VocabSize * config.HiddenSize;
    }

    private static double WeightBytes(ModelConfig config, int tokens) =>
        Layers(config).Sum(l => l.FixedBytes + (l.IsMoe ? l.ExpertBytes * ExpectedDistinctExperts(config.NRoutedExperts, config.NumExpertsPerTok, tokens) : 0));

    private static long Bytes(ExpectedTensor t) => t.Shape.Aggregate((long)DTypes.SizeOf(t.DType), (a, b) => a * b);
}
