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
    /// Uploads every weight of <paramref name="checkpoint"/> to <paramref name="backend"/> (each read once, in file order) and
    /// builds the rotary table: the load of a one-device plan (<see cref="PlacementPlan.Pipeline"/> over one device), as a model
    /// spread over several devices loads each device's part. The checkpoint may be disposed afterwards.
    /// </summary>
    /// <param name="checkpoint">The opened, validated checkpoint.</param>
    /// <param name="backend">Where the weights go.</param>
    /// <param name="options">Attention form, context length, MTP.</param>
    /// <param name="progress">Receives the fraction of the weight bytes uploaded, from 0 to 1.</param>
    /// <param name="cancellationToken">Checked before each upload (a layer, the MTP layer, the embedding, final norm or head); a cancelled load disposes what it loaded.</param>
    /// <exception cref="OperationCanceledException"><paramref name="cancellationToken"/> fired; nothing stays allocated.</exception>
    /// <exception cref="NotSupportedException">The config asks for something this engine does not implement.</exception>
    /// <exception cref="CheckpointException">A tensor is missing or has the wrong shape.</exception>
    public static DeepSeekModel Load(Checkpoint checkpoint, IBackend backend, ModelOptions? options = null, IProgress<double>? progress = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(checkpoint);
        ArgumentNullException.ThrowIfNull(backend);
        options ??= new ModelOptions();
        var plan = PlacementPlan.Pipeline(checkpoint.Config, 1, options.LoadMtp);
        var (weights, maxLength) = PlannedLoad.Load(checkpoint, plan, [backend], options, progress, cancellationToken);
        return new DeepSeekModel(weights[0], checkpoint.Config, options, maxLength);
    }

    /// <summary>Starts an empty session with latent caches of its own (main layers and MTP), allocated as it grows.</summary>
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
