using DeepSeekCuda.Backends;
using DeepSeekCuda.Loader;

namespace DeepSeekCuda.Model;

/// <summary>One decoder layer's weights (main or MTP): MLA plus a dense MLP or a MoE.</summary>
internal sealed class DecoderLayer : IDisposable
{
    public required int Index { get; init; }
    public required NormWeight InputNorm { get; init; }
    public required NormWeight PostAttentionNorm { get; init; }

    /// <summary>q_a_proj, or null when q_b is a full-width q_proj.</summary>
    public required LinearWeight? QA { get; init; }
    public required NormWeight? QANorm { get; init; }
    public required LinearWeight QB { get; init; }
    public required LinearWeight KvA { get; init; }
    public required NormWeight KvANorm { get; init; }
    public required LinearWeight KvB { get; init; }
    public required LinearWeight O { get; init; }

    /// <summary>Dense MLP [gate, up, down], or null for MoE layers.</summary>
    public required LinearWeight[]? Dense { get; init; }
    public required GateWeight? Gate { get; init; }
    public required ExpertWeights? Experts { get; init; }

    /// <summary>
    /// Uploads layer <paramref name="index"/>, or only <paramref name="shard"/>'s part of it (tensor/expert parallelism); a
    /// failed upload releases what it had uploaded.
    /// </summary>
    public static DecoderLayer Load(Checkpoint checkpoint, IBackend backend, ModelConfig config, int index, LayerShard? shard = null)
    {
        var n = CheckpointLayout.Layer(config, index);
        var eps = (float)config.RmsNormEps;
        var loaded = new List<IDisposable>();
        NormWeight Norm(string name, int width) => loaded.Track(backend.UploadNorm(checkpoint, name, width, eps));
        LinearWeight Lin(LinearSpec spec) => loaded.Track(backend.UploadLinear(checkpoint, spec));

        var attention = shard is null ? (n.QB, n.KvB, n.O) : shard.Attention(config, n);
        var gateOptions = new GateOptions(config.NRoutedExperts, config.NGroup, config.TopkGroup, config.NumExpertsPerTok,
            config.NormTopkProb, (float)config.RoutedScalingFactor);
        try
        {
            return Upload();
        }
        catch
        {
            loaded.Release();
            throw;
        }

        DecoderLayer Upload() => new()
        {
            Index = index,
            InputNorm = Norm(n.InputNorm, config.HiddenSize),
            PostAttentionNorm = Norm(n.PostAttentionNorm, config.HiddenSize),
            QA = n.QA is { } qa ? Lin(qa) : null,
            QANorm = n.QANorm is { } qn ? Norm(qn, config.QLoraRank!.Value) : null,
            QB = Lin(attention.QB),
            KvA = Lin(n.KvA),
            KvANorm = Norm(n.KvANorm, config.KvLoraRank),
            KvB = Lin(attention.KvB),
            O = Lin(attention.O),
            Dense = n.IsMoe ? null : [.. (shard is null ? n.DenseMlp : LayerShard.SliceMlp(n.DenseMlp, shard.Dense)).Select(Lin)],
            Gate = n.IsMoe ? loaded.Track(backend.UploadGate(checkpoint, n.Gate, n.GateBias, config.HiddenSize, gateOptions)) : null,
            Experts = n.IsMoe
                ? loaded.Track(backend.UploadExperts(checkpoint,
                    [.. Enumerable.Range(0, config.NRoutedExperts).Select(e => shard is null || shard.HoldsExpert(e) ? n.Expert(e) : [])],
                    config.NSharedExperts == 0 ? null
                    : shard is null ? n.SharedExpert
                    : shard.Shared.Count > 0 ? LayerShard.SliceMlp(n.SharedExpert, shard.Shared) : null))
                : null,
        };
    }

    public void Dispose()
    {
        BackendResource?[] all = [InputNorm, PostAttentionNorm, QA, QANorm, QB, KvA, KvANorm, KvB, O, Gate, Experts, .. Dense ?? []];
        foreach (var r in all)
        {
            r?.Dispose();
        }
    }
}
