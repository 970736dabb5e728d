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
    /// Uploads to each device of <paramref name="communicator"/> what <paramref name="plan"/> places on it, as
    /// <see cref="DeepSeekModel.Load"/> loads one device: load unit by load unit (a layer, or the embedding, final norm or
    /// lm_head) in the order of <see cref="PlacementPlan.LoadOrder"/>, each unit to all its devices back to back, so the mapped
    /// shards are walked forward once and a tensor several devices need is read from disk once and from the page cache for the
    /// others (each device's backend still reads and converts its own copy; there is no device-to-device fan-out here).
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

        var (devices, maxLength) = PlannedLoad.Load(checkpoint, plan, [.. Enumerable.Range(0, plan.DeviceCount).Select(communicator.Device)], options,
            progress, cancellationToken);
        return new ParallelModel(plan, communicator, options, maxLength, devices);
    }

    /// <summary>Starts an empty session (latent caches on the devices that run each layer, the MTP layer's included, allocated as it grows).</summary>
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
