using DeepSeekCuda.Backends;
using DeepSeekCuda.Inference;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Model;

namespace DeepSeekCuda.Distributed;

/// <summary>
/// A DeepSeek-V3 model spread over the devices of an <see cref="ICommunicator"/> by a
/// <see cref="PlacementPlan"/>: each device's <see cref="IBackend"/> holds only what the plan gives it,
/// and the forward pass runs the same layer steps as <see cref="DeepSeekModel"/> on each device, with a
/// copy of the hidden state between pipeline stages or an all-reduce after o_proj and after the FFN under
/// tensor/expert parallelism. A chat client or scheduler serves it batched and paged through <see cref="Serving.PagedStepRunner"/>
/// (<see cref="Serving.StepRunners.For"/>), drafting with the MTP module when the plan places it (where the last layer runs:
/// the head device of a pipeline, sharded over every device under tensor/expert parallelism); its sessions
/// (<see cref="DeepSeekSession"/>, as a single device's) run one sequence each, and the MTP module where the step runner does.
/// </summary>
public sealed class ParallelModel : ILanguageModel, IPagedModel
{
    private ParallelModel(PlacementPlan plan, ICommunicator communicator, ModelOptions options, int maxLength, DeviceWeights[] devices)
    {
        Plan = plan;
        Communicator = communicator;
        Options = options;
        MaxSequenceLength = maxLength;
        Devices = devices;
        Layout = new DeviceLayout(plan.Config, maxLength, devices, plan.HeadDevice,
            new Collectives(communicator.AllReduceSum, communicator.Copy, communicator.Barrier,
                communicator.CanCaptureGraphs ? communicator.CaptureGraph : null, communicator.ReplayGraph));
    }

    /// <summary>The placement.</summary>
    public PlacementPlan Plan { get; }

    /// <summary>The devices and their collectives (owned by the caller).</summary>
    public ICommunicator Communicator { get; }

    /// <summary>The model's config.</summary>
    public ModelConfig Config => Plan.Config;

    /// <summary>The options it was loaded with.</summary>
    public ModelOptions Options { get; }

    /// <summary>Whether the MTP module was loaded (the plan places it and the options asked for it): a step runner over the model drafts.</summary>
    public bool HasMtp => Layout.Mtp is not null;

    /// <inheritdoc />
    public int VocabSize => Config.VocabSize;

    /// <inheritdoc />
    public int MaxSequenceLength { get; }

    internal DeviceWeights[] Devices { get; }

    /// <summary>The devices' weights as the layer steps walk them (which devices run each layer).</summary>
    internal DeviceLayout Layout { get; }

    /// <inheritdoc />
    DeviceLayout IPagedModel.Layout => Layout;

    /// <summary>
    /// Uploads to each device of <paramref name="communicator"/> what <paramref name="plan"/> places on it, following
    /// <see cref="PlacementPlan.LoadOrder"/>: load units (a layer, or the embedding, final norm or lm_head; see
    /// <see cref="LoadUnit"/>) in shard order and file order of their first tensor, each unit uploaded to all its
    /// devices back to back. So the mapped shards are walked forward once at unit granularity, and a tensor several
    /// devices need is read from disk once and from the page cache for the other devices (each device's backend still
    /// reads and converts its own copy from the mapped checkpoint; there is no device-to-device fan-out here).
    /// </summary>
    /// <param name="checkpoint">The opened, validated checkpoint.</param>
    /// <param name="plan">What goes where.</param>
    /// <param name="communicator">The devices (owned by the caller).</param>
    /// <param name="options">Attention form, context length, and whether to load the MTP layer where the plan places it
    /// (<see cref="PlacementPlan.IncludesMtp"/>; a plan without it loads none, whatever <see cref="ModelOptions.LoadMtp"/> says).</param>
    /// <param name="progress">Receives the fraction of the placed weight bytes uploaded, from 0 to 1.</param>
    /// <param name="cancellationToken">Checked before each upload (a layer, or the embedding, norm or head, on one device); a cancelled load disposes what it loaded.</param>
    /// <exception cref="ArgumentException">The plan is for another config or device count.</exception>
    /// <exception cref="NotSupportedException">The config asks for something the engine does not implement.</exception>
    /// <exception cref="CheckpointException">A tensor is missing or has the wrong shape.</exception>
    /// <exception cref="OperationCanceledException"><paramref name="cancellationToken"/> fired; nothing stays allocated.</exception>
    public static ParallelModel Load(Checkpoint checkpoint, PlacementPlan plan, ICommunicator communicator, ModelOptions? options = null,
        IProgress<double>? progress = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(checkpoint);
        ArgumentNullException.ThrowIfNull(plan);
        ArgumentNullException.ThrowIfNull(communicator);
        options ??= new ModelOptions();
        var config = checkpoint.Config;
        if (plan.Config != config)
        {
            throw new ArgumentException("the plan was made for another config", nameof(plan));
        }

        if (plan.DeviceCount != communicator.DeviceCount)
        {
            throw new ArgumentException($"the plan is for {plan.DeviceCount} devices, the communicator has {communicator.DeviceCount}", nameof(plan));
        }

        DeepSeekModel.CheckSupported(config);
        var maxLength = options.MaxSequenceLength ?? Math.Min(config.MaxPositionEmbeddings, ModelOptions.DefaultMaxSequenceLength);
        if (maxLength < 1 || maxLength > config.MaxPositionEmbeddings)
        {
            throw new ArgumentOutOfRangeException(nameof(options), maxLength, $"MaxSequenceLength must be within 1..max_position_embeddings ({config.MaxPositionEmbeddings})");
        }

        var (cos, sin) = YarnRope.Table(config, maxLength);
        var eps = (float)config.RmsNormEps;
        var d = config.HiddenSize;
        var dims = new MlaDims(config.NumAttentionHeads, config.QkNopeHeadDim, config.QkRopeHeadDim, config.VHeadDim, config.KvLoraRank);
        var devices = new DeviceWeights[plan.DeviceCount];
        var mtp = options.LoadMtp && plan.IncludesMtp;
        try
        {
            var uploads = new List<(int Device, string Unit, Action Upload)>();
            for (var r = 0; r < devices.Length; r++)
            {
                cancellationToken.ThrowIfCancellationRequested();
                var b = communicator.Device(r);
                var shard = plan.Shard(r);
                var (start, count) = plan.Stages[r];
                var rope = b.UploadRope(cos, sin, maxLength, config.QkRopeHeadDim / 2);
                var w = devices[r] = new DeviceWeights(b, config.NumHiddenLayers)
                {
                    Rope = rope,
                    Context = new LayerContext(b, config, rope, shard is null ? dims : dims with { Heads = shard.Heads }, (float)config.SoftmaxScale,
                        options.Attention),
                    Shard = shard,
                };
                var holdsHead = r == plan.HeadDevice;
                var holdsEmbedding = shard is not null || start == 0 || (holdsHead && mtp); // the MTP layer embeds too
                if (holdsEmbedding)
                {
                    uploads.Add((r, CheckpointLayout.Embedding, () => w.Embed = b.UploadEmbedding(checkpoint, CheckpointLayout.Embedding, config.VocabSize, d)));
                }

                if (shard is not null || holdsHead)
                {
                    uploads.Add((r, CheckpointLayout.FinalNorm, () => w.FinalNorm = b.UploadNorm(checkpoint, CheckpointLayout.FinalNorm, d, eps)));
                }

                if (holdsHead)
                {
                    var head = config.TieWordEmbeddings ? CheckpointLayout.Embedding : CheckpointLayout.LmHead;
                    uploads.Add((r, head, () => w.Head = b.UploadHead(checkpoint, head, config.VocabSize, d)));
                }

                for (var i = start; i < start + count; i++)
                {
                    var layer = i;
                    uploads.Add((r, CheckpointLayout.LayerPrefix(layer), () => w.Layers[layer] = DecoderLayer.Load(checkpoint, b, config, layer, shard)));
                }

                if (mtp && plan.MtpDevices.Contains(r))
                {
                    var index = config.NumHiddenLayers; // only the first MTP layer, as on one device
                    uploads.Add((r, CheckpointLayout.LayerPrefix(index), () => w.Mtp = MtpWeights.Load(checkpoint, b, config, index, shard, input: holdsHead)));
                }

                if (shard is null && start + count < config.NumHiddenLayers)
                {
                    var next = start + count;
                    uploads.Add((r, CheckpointLayout.LayerPrefix(next),
                        () => w.NextStageNorm = b.UploadNorm(checkpoint, CheckpointLayout.Layer(config, next).InputNorm, d, eps)));
                }
            }

            // Unit-major, device-minor (see LoadUnit): OrderBy is stable, so a unit's uploads keep device order.
            var rank = UnitRanks(checkpoint, plan);
            var ordered = uploads.OrderBy(u => rank.GetValueOrDefault(u.Unit, int.MaxValue)).ToList();
            var bytes = UnitBytes(plan);
            var total = Math.Max(1, ordered.Sum(u => bytes.GetValueOrDefault((u.Device, u.Unit))));
            long done = 0;
            foreach (var (device, unit, upload) in ordered)
            {
                cancellationToken.ThrowIfCancellationRequested();
                upload();
                done += bytes.GetValueOrDefault((device, unit));
                progress?.Report((double)done / total);
            }

            cancellationToken.ThrowIfCancellationRequested();
            progress?.Report(1.0);
        }
        catch
        {
            foreach (var w in devices)
            {
                w?.Dispose();
            }

            throw;
        }

        return new ParallelModel(plan, communicator, options, maxLength, devices);
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

    /// <summary>Placed bytes per (device, load unit): what each upload adds to the load's progress.</summary>
    private static Dictionary<(int Device, string Unit), long> UnitBytes(PlacementPlan plan)
    {
        var bytes = new Dictionary<(int, string), long>();
        foreach (var p in plan.Placements)
        {
            var key = (p.Device, LoadUnit(p.Tensor));
            bytes[key] = bytes.GetValueOrDefault(key) + p.Bytes;
        }

        return bytes;
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

    /// <summary>Starts an empty session (latent caches on the devices that run each layer, the MTP layer's included).</summary>
    public DeepSeekSession CreateSession() => new(Layout);

    IModelSession ILanguageModel.CreateSession() => CreateSession();

    /// <summary>Logits at every position of one prefill of <paramref name="tokens"/> from position 0: [tokens, vocab].</summary>
    public float[] ComputeLogits(ReadOnlySpan<int> tokens)
    {
        using var session = CreateSession();
        return session.ForwardAll(tokens);
    }

    /// <summary>Releases the weights on every device (the backends belong to the caller).</summary>
    public void Dispose()
    {
        foreach (var w in Devices)
        {
            w.Dispose();
        }
    }
}
