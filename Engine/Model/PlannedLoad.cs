using DeepSeekCuda.Backends;
using DeepSeekCuda.Loader;

namespace DeepSeekCuda.Model;

/// <summary>
/// The one way weights reach devices: what a <see cref="PlacementPlan"/> places on each device is uploaded to that device's
/// backend, for <see cref="DeepSeekModel"/> (a pipeline of one device) and for a model spread over several. The plan's uploads
/// (<see cref="PlacementPlan.Uploads"/>: which weight of which device, and the placements it reads) are what is loaded; which
/// device holds the embedding, the head or a norm is decided by the plan alone, not again here. Load units (a
/// layer, or the embedding, final norm or lm_head; see <see cref="LoadUnit"/>) go in shard order and file order of their first
/// tensor (<see cref="PlacementPlan.LoadOrder"/>), each unit to all its devices back to back, so the mapped shards are walked
/// forward once at unit granularity, and a tensor several devices need is read from disk once and from the page cache for the
/// others (each device's backend still reads and converts its own copy; there is no device-to-device fan-out here).
/// </summary>
internal static class PlannedLoad
{
    /// <summary>
    /// Uploads to <paramref name="devices"/>[d] what <paramref name="plan"/> places on device d, with the rotary table on every
    /// device. A failure or cancellation part way releases every upload on every device before it propagates.
    /// </summary>
    /// <param name="checkpoint">The opened, validated checkpoint (the plan's config).</param>
    /// <param name="plan">What goes where.</param>
    /// <param name="devices">One backend per planned device (the caller checks the count).</param>
    /// <param name="options">Attention form, context length, and whether to load the MTP layer where the plan places it (a plan
    /// without it loads none, whatever <see cref="ModelOptions.LoadMtp"/> says).</param>
    /// <param name="progress">Receives the fraction of the bytes to load uploaded, from 0 to 1, after each upload: each placement counts
    /// its bytes once (the MTP module's are left out of both when it is not loaded).</param>
    /// <param name="cancellationToken">Checked before each upload (a unit on one device).</param>
    /// <returns>Each device's weights, and the context length the rotary table covers.</returns>
    /// <exception cref="NotSupportedException">The config asks for something the engine does not implement.</exception>
    /// <exception cref="ArgumentOutOfRangeException">The context length is outside 1..max_position_embeddings.</exception>
    public static (DeviceWeights[] Devices, int MaxLength) Load(Checkpoint checkpoint, PlacementPlan plan, IReadOnlyList<IBackend> devices,
        ModelOptions options, IProgress<double>? progress, CancellationToken cancellationToken)
    {
        var config = checkpoint.Config;
        CheckSupported(config);
        var maxLength = options.MaxSequenceLength ?? Math.Min(config.MaxPositionEmbeddings, ModelOptions.DefaultMaxSequenceLength);
        if (maxLength < 1 || maxLength > config.MaxPositionEmbeddings)
        {
            throw new ArgumentOutOfRangeException(nameof(options), maxLength, $"MaxSequenceLength must be within 1..max_position_embeddings ({config.MaxPositionEmbeddings})");
        }

        cancellationToken.ThrowIfCancellationRequested();
        var (cos, sin) = YarnRope.Table(config, maxLength);
        var dims = new MlaDims(config.NumAttentionHeads, config.QkNopeHeadDim, config.QkRopeHeadDim, config.VHeadDim, config.KvLoraRank);
        var weights = new DeviceWeights[plan.DeviceCount];
        var mtp = options.LoadMtp && plan.IncludesMtp;
        try
        {
            for (var r = 0; r < weights.Length; r++)
            {
                cancellationToken.ThrowIfCancellationRequested();
                var b = devices[r];
                var shard = plan.Shard(r);
                var rope = b.UploadRope(cos, sin, maxLength, config.QkRopeHeadDim / 2);
                weights[r] = new DeviceWeights(b, config.NumHiddenLayers)
                {
                    Rope = rope,
                    Context = new LayerContext(b, config, rope, shard is null ? dims : dims with { Heads = shard.Heads }, (float)config.SoftmaxScale,
                        options.Attention),
                    Shard = shard,
                };
            }

            // Unit-major, device-minor (see LoadUnit): OrderBy is stable, so a unit's uploads keep the plan's (device) order.
            var rank = UnitRanks(checkpoint, plan);
            var uploads = plan.Uploads.Where(u => mtp || !u.ForMtp).OrderBy(u => rank[LoadUnit(u.Placements[0].Tensor)]).ToList();
            var total = Math.Max(1, uploads.Sum(u => u.Bytes));
            long done = 0;
            foreach (var upload in uploads)
            {
                cancellationToken.ThrowIfCancellationRequested();
                Upload(checkpoint, weights[upload.Device], upload);
                done += upload.Bytes;
                progress?.Report((double)done / total);
            }

            cancellationToken.ThrowIfCancellationRequested();
            progress?.Report(1.0);
            return (weights, maxLength);
        }
        catch
        {
            foreach (var w in weights)
            {
                w?.Dispose();
            }

            throw;
        }
    }

    /// <summary>Uploads <paramref name="upload"/> to its device and puts it where its kind says.</summary>
    private static void Upload(Checkpoint checkpoint, DeviceWeights w, PlannedUpload upload)
    {
        var config = checkpoint.Config;
        var b = w.Backend;
        var eps = (float)config.RmsNormEps;
        var d = config.HiddenSize;
        switch (upload.Kind)
        {
            case UploadKind.Embedding or UploadKind.MtpEmbedding:
                w.Embed = b.UploadEmbedding(checkpoint, CheckpointLayout.Embedding, config.VocabSize, d);
                break;
            case UploadKind.FinalNorm:
                w.FinalNorm = b.UploadNorm(checkpoint, CheckpointLayout.FinalNorm, d, eps);
                break;
            case UploadKind.Head:
                // lm_head, or the embedding as a tied head (the plan names which).
                w.Head = b.UploadHead(checkpoint, upload.Placements[0].Tensor, config.VocabSize, d);
                break;
            case UploadKind.Layer:
                w.Layers[upload.Layer] = DecoderLayer.Load(checkpoint, b, config, upload.Layer, w.Shard);
                break;
            case UploadKind.NextStageNorm:
                w.NextStageNorm = b.UploadNorm(checkpoint, CheckpointLayout.Layer(config, upload.Layer).InputNorm, d, eps);
                break;
            case UploadKind.Mtp:
                w.Mtp = MtpWeights.Load(checkpoint, b, config, upload.Layer, w.Shard, upload.MtpInput);
                break;
            default:
                throw new InvalidOperationException($"upload kind {upload.Kind} has no weight");
        }
    }

    /// <summary>Refuses a config whose features the engine does not implement.</summary>
    /// <exception cref="NotSupportedException">Named: the field and its value.</exception>
    private static void CheckSupported(ModelConfig config)
    {
        if (config.NRoutedExperts % config.NGroup != 0)
        {
            throw new NotSupportedException($"n_group {config.NGroup} does not divide n_routed_experts {config.NRoutedExperts}");
        }

        if (config.QkRopeHeadDim % 2 != 0)
        {
            throw new NotSupportedException($"qk_rope_head_dim {config.QkRopeHeadDim} is odd; RoPE rotates pairs");
        }

        if (config.Quantization is { } q && (q.BlockRows <= 0 || q.BlockCols <= 0))
        {
            throw new NotSupportedException($"weight_block_size [{q.BlockRows}, {q.BlockCols}] is not supported");
        }
    }

    /// <summary>
    /// The load unit of checkpoint tensor <paramref name="tensor"/>: its layer (<see cref="CheckpointLayout.LayerPrefix"/>,
    /// scales included) or, outside the layers, the tensor itself (the embedding, also when it serves as the tied head;
    /// the final norm; lm_head). <see cref="Load"/> uploads unit by unit, in file order of each unit's first tensor
    /// (<see cref="PlacementPlan.LoadOrder"/>), and within a unit to every device that needs it back to back, so a
    /// byte that several devices read is faulted in from disk by the first and read from the page cache by the rest,
    /// as long as the page cache holds one unit (one layer).
    /// </summary>
    internal static string LoadUnit(string tensor)
    {
        const string layers = "model.layers.";
        if (!tensor.StartsWith(layers, StringComparison.Ordinal))
        {
            return tensor;
        }

        var dot = tensor.IndexOf('.', layers.Length);
        return dot < 0 ? tensor : tensor[..(dot + 1)];
    }

    /// <summary>Each load unit's position: where its first tensor comes in <see cref="PlacementPlan.LoadOrder"/> (shard order, then file order).</summary>
    private static Dictionary<string, int> UnitRanks(Checkpoint checkpoint, PlacementPlan plan)
    {
        var rank = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (var (_, placements) in plan.LoadOrder(checkpoint))
        {
            foreach (var p in placements)
            {
                rank.TryAdd(LoadUnit(p.Tensor), rank.Count);
            }
        }

        return rank;
    }
}
