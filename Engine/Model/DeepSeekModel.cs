using DeepSeekCuda.Backends;
using DeepSeekCuda.Inference;
using DeepSeekCuda.Loader;

namespace DeepSeekCuda.Model;

/// <summary>
/// The DeepSeek-V3/R1 forward pass (MODEL.md §3–§6) over any <see cref="IBackend"/>: embedding, MLA with a
/// latent KV cache, dense MLP or group-limited MoE, final norm and lm_head, plus the MTP module.
/// Weights live in the backend; this class only sequences backend operations.
/// </summary>
public sealed class DeepSeekModel : ILanguageModel, IPagedModel
{
    private readonly DeviceWeights _weights;

    private DeepSeekModel(DeviceWeights weights, ModelConfig config, ModelOptions options, int maxSequenceLength)
    {
        _weights = weights;
        Config = config;
        Options = options;
        MaxSequenceLength = maxSequenceLength;
        Layout = new DeviceLayout(config, maxSequenceLength, [weights], headDevice: 0, collectives: null);
    }

    /// <summary>The model's config.</summary>
    public ModelConfig Config { get; }

    /// <summary>The options it was loaded with.</summary>
    public ModelOptions Options { get; }

    /// <summary>The backend that holds the weights and runs the operations (owned by the caller).</summary>
    public IBackend Backend => _weights.Backend;

    /// <inheritdoc />
    public int VocabSize => Config.VocabSize;

    /// <inheritdoc />
    public int MaxSequenceLength { get; }

    /// <summary>Whether the MTP module was loaded (<see cref="DeepSeekSession.MtpForward(ReadOnlySpan{float}, ReadOnlySpan{int}, int, Action{Intermediate}?)"/> works).</summary>
    public bool HasMtp => _weights.Mtp is not null;

    /// <summary>The model's weights as a layout of one device.</summary>
    internal DeviceLayout Layout { get; }

    DeviceLayout IPagedModel.Layout => Layout;

    /// <summary>
    /// Uploads every weight of <paramref name="checkpoint"/> to <paramref name="backend"/> (each read once)
    /// and builds the rotary table. The checkpoint may be disposed afterwards.
    /// </summary>
    /// <param name="checkpoint">The opened, validated checkpoint.</param>
    /// <param name="backend">Where the weights go.</param>
    /// <param name="options">Attention form, context length, MTP.</param>
    /// <param name="progress">Receives the fraction of layers loaded, from 0 to 1.</param>
    /// <param name="cancellationToken">Checked between tensor groups (embedding, each layer, the MTP layer); a cancelled load disposes what it loaded.</param>
    /// <exception cref="OperationCanceledException"><paramref name="cancellationToken"/> fired; nothing stays allocated.</exception>
    /// <exception cref="NotSupportedException">The config asks for something this engine does not implement.</exception>
    /// <exception cref="CheckpointException">A tensor is missing or has the wrong shape.</exception>
    public static DeepSeekModel Load(Checkpoint checkpoint, IBackend backend, ModelOptions? options = null, IProgress<double>? progress = null, CancellationToken cancellationToken = default) =>
        LoadTracked(checkpoint, backend, options, progress, [], cancellationToken);

    /// <summary><see cref="Load(Checkpoint, IBackend, ModelOptions?, IProgress{double}?, CancellationToken)"/>, keeping in <paramref name="loaded"/> what it uploads (tests check a cancelled load disposed all of it).</summary>
    internal static DeepSeekModel LoadTracked(Checkpoint checkpoint, IBackend backend, ModelOptions? options, IProgress<double>? progress, List<IDisposable> loaded, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(checkpoint);
        ArgumentNullException.ThrowIfNull(backend);
        options ??= new ModelOptions();
        var config = checkpoint.Config;
        CheckSupported(config);
        var maxLength = options.MaxSequenceLength ?? Math.Min(config.MaxPositionEmbeddings, ModelOptions.DefaultMaxSequenceLength);
        if (maxLength < 1 || maxLength > config.MaxPositionEmbeddings)
        {
            throw new ArgumentOutOfRangeException(nameof(options), maxLength, $"MaxSequenceLength must be within 1..max_position_embeddings ({config.MaxPositionEmbeddings})");
        }

        cancellationToken.ThrowIfCancellationRequested();
        var (cos, sin) = YarnRope.Table(config, maxLength);
        // Everything uploaded so far, released if the load is cancelled or fails part way (Uploads).
        try
        {
            var embed = loaded.Track(backend.UploadEmbedding(checkpoint, CheckpointLayout.Embedding, config.VocabSize, config.HiddenSize));
            var head = loaded.Track(backend.UploadHead(checkpoint, config.TieWordEmbeddings ? CheckpointLayout.Embedding : CheckpointLayout.LmHead,
                config.VocabSize, config.HiddenSize));
            var eps = (float)config.RmsNormEps;
            var layers = new DecoderLayer[config.NumHiddenLayers];
            for (var i = 0; i < layers.Length; i++)
            {
                cancellationToken.ThrowIfCancellationRequested();
                layers[i] = loaded.Track(DecoderLayer.Load(checkpoint, backend, config, i));
                // Layers hold nearly all the bytes; the MTP layer counts as one more.
                progress?.Report((i + 1.0) / (layers.Length + 1));
            }

            MtpWeights? mtp = null;
            if (options.LoadMtp && config.NumNextNPredictLayers > 0)
            {
                cancellationToken.ThrowIfCancellationRequested();
                // Only the first MTP layer: V3/R1 ship one, and one draft token is what speculative decoding uses.
                mtp = loaded.Track(MtpWeights.Load(checkpoint, backend, config, config.NumHiddenLayers));
            }

            var finalNorm = loaded.Track(backend.UploadNorm(checkpoint, CheckpointLayout.FinalNorm, config.HiddenSize, eps));
            var rope = loaded.Track(backend.UploadRope(cos, sin, maxLength, config.QkRopeHeadDim / 2));
            cancellationToken.ThrowIfCancellationRequested();
            progress?.Report(1.0);
            var dims = new MlaDims(config.NumAttentionHeads, config.QkNopeHeadDim, config.QkRopeHeadDim, config.VHeadDim, config.KvLoraRank);
            var weights = new DeviceWeights(backend, layers.Length)
            {
                Rope = rope,
                Context = new LayerContext(backend, config, rope, dims, (float)config.SoftmaxScale, options.Attention),
                Embed = embed,
                FinalNorm = finalNorm,
                Head = head,
                Mtp = mtp,
            };
            layers.CopyTo(weights.Layers, 0);
            return new DeepSeekModel(weights, config, options, maxLength);
        }
        catch
        {
            loaded.Release();
            throw;
        }
    }

    internal static void CheckSupported(ModelConfig config)
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

    /// <summary>Starts an empty session with its own latent caches (main layers and MTP).</summary>
    public DeepSeekSession CreateSession() => new(Layout);

    IModelSession ILanguageModel.CreateSession() => CreateSession();

    /// <summary>
    /// Logits at every position of one prefill of <paramref name="tokens"/> from position 0 (for
    /// <c>dscuda logits</c> and tests): [tokens, vocab], row-major.
    /// </summary>
    public float[] ComputeLogits(ReadOnlySpan<int> tokens, Action<Intermediate>? observer = null)
    {
        using var session = CreateSession();
        return session.ForwardAll(tokens, observer);
    }

    /// <summary>Releases the weights held by the backend (the backend itself belongs to the caller).</summary>
    public void Dispose() => _weights.Dispose();
}

/// <summary>
/// The MTP module's weights (MODEL.md §6) on one device: its decoder layer (whole, or the device's shard of it under
/// tensor/expert parallelism) and the head norm on every device that runs the layer; the input side (the two norms and
/// eh_proj) on the head device alone, which computes the layer's input for all of them (<see cref="LayerSteps.Mtp"/>).
/// </summary>
internal sealed class MtpWeights : IDisposable
{
    /// <summary>enorm, on the head device; null elsewhere.</summary>
    public NormWeight? ENorm { get; private init; }

    /// <summary>hnorm, on the head device; null elsewhere.</summary>
    public NormWeight? HNorm { get; private init; }

    /// <summary>eh_proj, on the head device; null elsewhere.</summary>
    public LinearWeight? EhProj { get; private init; }

    public required DecoderLayer Layer { get; init; }
    public required NormWeight HeadNorm { get; init; }

    /// <summary>Whether this device computes the layer's input (holds enorm, hnorm and eh_proj).</summary>
    public bool HasInput => EhProj is not null;

    /// <summary>
    /// Uploads MTP layer <paramref name="index"/>: the whole layer, or <paramref name="shard"/>'s part of it; with
    /// <paramref name="input"/>, the input side too. A failed upload releases what it had uploaded.
    /// </summary>
    public static MtpWeights Load(Checkpoint checkpoint, IBackend backend, ModelConfig config, int index, LayerShard? shard = null, bool input = true)
    {
        var n = CheckpointLayout.Layer(config, index);
        var eps = (float)config.RmsNormEps;
        var d = config.HiddenSize;
        // The MTP embedding and head are copies of the main model's (README_WEIGHTS: shared parameters);
        // the main ones are used instead of holding two more [V, D] tables.
        var loaded = new List<IDisposable>();
        try
        {
            return new MtpWeights
            {
                ENorm = input ? loaded.Track(backend.UploadNorm(checkpoint, n.MtpEnorm, d, eps)) : null,
                HNorm = input ? loaded.Track(backend.UploadNorm(checkpoint, n.MtpHnorm, d, eps)) : null,
                EhProj = input ? loaded.Track(backend.UploadLinear(checkpoint, new LinearSpec(n.MtpEhProj, d, 2 * d, Quantized: false))) : null,
                Layer = loaded.Track(DecoderLayer.Load(checkpoint, backend, config, index, shard)),
                HeadNorm = loaded.Track(backend.UploadNorm(checkpoint, n.MtpHeadNorm, d, eps)),
            };
        }
        catch
        {
            loaded.Release();
            throw;
        }
    }

    public void Dispose()
    {
        ENorm?.Dispose();
        HNorm?.Dispose();
        EhProj?.Dispose();
        Layer.Dispose();
        HeadNorm.Dispose();
    }
}
