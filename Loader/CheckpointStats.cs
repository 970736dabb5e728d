namespace DeepSeekCuda.Loader;

/// <summary>
/// Parameter and memory arithmetic for a config, from the tensor list it implies: what <c>dscuda inspect</c>
/// prints and what the memory planner starts from.
/// </summary>
/// <param name="MainParameters">Weights of the main model (embedding, layers, norm, lm_head), scales excluded.</param>
/// <param name="MtpParameters">Weights of the MTP layers, including their stored embedding and head copies.</param>
/// <param name="ActiveParameters">Weights one token touches in the main model: everything but the unchosen routed experts.</param>
/// <param name="WeightBytes">Stored bytes of every tensor (scales included), main and MTP.</param>
/// <param name="MainWeightBytes">Stored bytes of the main model's tensors.</param>
/// <param name="KvCacheBytesPerToken">Latent KV cache per token over the main layers (BF16 latent + rotated key).</param>
public sealed record CheckpointStats(
    long MainParameters,
    long MtpParameters,
    long ActiveParameters,
    long WeightBytes,
    long MainWeightBytes,
    long KvCacheBytesPerToken)
{
    /// <summary>Bytes per cached value: the latent cache is BF16.</summary>
    public const int KvCacheElementBytes = 2;

    /// <summary>Computes the statistics of <paramref name="config"/>.</summary>
    public static CheckpointStats Compute(ModelConfig config)
    {
        long main = 0, mtp = 0, routed = 0, bytes = 0, mainBytes = 0;
        foreach (var t in CheckpointLayout.Expected(config))
        {
            var elements = t.Shape.Aggregate(1L, (a, b) => a * b);
            var size = elements * DTypes.SizeOf(t.DType);
            bytes += size;
            var isMtp = t.Layer >= config.NumHiddenLayers;
            if (!isMtp)
            {
                mainBytes += size;
            }

            if (t.Name.EndsWith("_scale_inv", StringComparison.Ordinal))
            {
                continue;
            }

            if (isMtp)
            {
                mtp += elements;
            }
            else
            {
                main += elements;
                if (t.Name.Contains(".mlp.experts.", StringComparison.Ordinal))
                {
                    routed += elements;
                }
            }
        }

        // Every routed expert has the same size; a token uses k of them per MoE layer.
        var moeLayers = Enumerable.Range(0, config.NumHiddenLayers).Count(config.IsMoeLayer);
        var perExpert = moeLayers == 0 ? 0 : routed / ((long)moeLayers * config.NRoutedExperts);
        var active = main - routed + perExpert * moeLayers * config.NumExpertsPerTok;
        var kvPerToken = (long)config.NumHiddenLayers * config.KvCacheDim * KvCacheElementBytes;
        return new CheckpointStats(main, mtp, active, bytes, mainBytes, kvPerToken);
    }
}
