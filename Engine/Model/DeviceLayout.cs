using DeepSeekCuda.Backends;
using DeepSeekCuda.Loader;

namespace DeepSeekCuda.Model;

/// <summary>What one device holds of a model: the weights it runs and the context its layer steps need.</summary>
internal sealed class DeviceWeights(IBackend backend, int layers) : IDisposable
{
    public IBackend Backend { get; } = backend;
    public required RopeTable Rope { get; init; }
    public required LayerContext Context { get; init; }

    /// <summary>The part of every layer the device holds under tensor/expert parallelism; null where it holds whole layers.</summary>
    public LayerShard? Shard { get; init; }

    /// <summary>The embedding table, on the devices that run the first layer.</summary>
    public EmbeddingWeight? Embed { get; set; }

    /// <summary>The final norm, on the devices that run the last layer.</summary>
    public NormWeight? FinalNorm { get; set; }

    /// <summary>lm_head, on the head device.</summary>
    public LinearWeight? Head { get; set; }

    /// <summary>The next stage's first input_layernorm (pipeline stages but the last).</summary>
    public NormWeight? NextStageNorm { get; set; }

    /// <summary>The MTP module where the device runs its layer (see <see cref="MtpWeights"/>); null elsewhere or when it is not loaded.</summary>
    public MtpWeights? Mtp { get; set; }

    /// <summary>Layers by index; null where another device runs the layer.</summary>
    public DecoderLayer?[] Layers { get; } = new DecoderLayer?[layers];

    /// <summary>The norm that follows layer <paramref name="i"/> on this device: the next layer's input norm, the next stage's, or the final one.</summary>
    public NormWeight NormAfter(int i) =>
        (i + 1 == Layers.Length ? FinalNorm : Layers[i + 1]?.InputNorm ?? NextStageNorm)
        ?? throw new InvalidOperationException($"the device runs layer {i} but holds no norm to follow it");

    public void Dispose()
    {
        BackendResource?[] all = [Rope, Embed, FinalNorm, Head, NextStageNorm];
        foreach (var r in all)
        {
            r?.Dispose();
        }

        Mtp?.Dispose();

        foreach (var layer in Layers)
        {
            layer?.Dispose();
        }
    }
}

/// <summary>
/// A model's weights over its devices, as a forward pass walks them (<see cref="ModelPass"/>): which devices run each layer (one pipeline stage,
/// or every device of a tensor/expert-parallel plan, whose partial outputs the collectives all-reduce), which device
/// computes the logits, and the MTP module when it is loaded (on the devices that run the last layer, its input side on the
/// head device). One device is a layout of one.
/// </summary>
internal sealed class DeviceLayout
{
    public DeviceLayout(ModelConfig config, int maxSequenceLength, IReadOnlyList<DeviceWeights> devices, int headDevice, ICommunicator? communicator)
    {
        if (devices.Count > 1 && communicator is null)
        {
            throw new ArgumentException($"{devices.Count} devices and no communicator", nameof(communicator));
        }

        Config = config;
        MaxSequenceLength = maxSequenceLength;
        Devices = devices;
        HeadDevice = headDevice;
        Communicator = communicator;
        AllReduce = communicator is null ? null : communicator.AllReduceSum;
        Runners = new int[config.NumHiddenLayers][];
        for (var i = 0; i < Runners.Length; i++)
        {
            Runners[i] = [.. Enumerable.Range(0, devices.Count).Where(r => devices[r].Layers[i] is not null)];
            if (Runners[i].Length == 0)
            {
                throw new ArgumentException($"no device runs layer {i}", nameof(devices));
            }
        }

        var stages = new List<PassStage>();
        for (int first = 0, i = 1; i <= Runners.Length; i++)
        {
            if (i < Runners.Length)
            {
                if (Runners[i].AsSpan().SequenceEqual(Runners[first]))
                {
                    continue;
                }

                if (Runners[first].Length != 1 || Runners[i].Length != 1)
                {
                    throw new ArgumentException(
                        $"layer {i} changes from devices [{string.Join(",", Runners[first])}] to [{string.Join(",", Runners[i])}]: a pipeline hands the stream from one device to one device",
                        nameof(devices));
                }
            }

            stages.Add(new PassStage(first, i, Runners[first]));
            first = i;
        }

        Stages = stages;
        var head = devices[headDevice];
        if (head.Head is null || head.FinalNorm is null || !Runners[^1].Contains(headDevice))
        {
            throw new ArgumentException($"device {headDevice} does not run the last layer and hold the final norm and lm_head", nameof(headDevice));
        }

        MtpRunners = [.. Enumerable.Range(0, devices.Count).Where(r => devices[r].Mtp is not null)];
        if (MtpRunners.Length > 0)
        {
            if (!MtpRunners.AsSpan().SequenceEqual(Runners[^1]))
            {
                throw new ArgumentException(
                    $"the MTP layer is on devices [{string.Join(",", MtpRunners)}]; it runs where the last layer runs, [{string.Join(",", Runners[^1])}]",
                    nameof(devices));
            }

            var inputs = MtpRunners.Where(r => devices[r].Mtp!.HasInput).ToArray();
            if (inputs is not [var input] || input != headDevice || head.Embed is null)
            {
                throw new ArgumentException(
                    $"the MTP module's input side (enorm, hnorm, eh_proj) and the embedding must be on the head device {headDevice} alone; the input side is on [{string.Join(",", inputs)}]",
                    nameof(devices));
            }
        }
    }

    public ModelConfig Config { get; }

    public int MaxSequenceLength { get; }

    public IReadOnlyList<DeviceWeights> Devices { get; }

    /// <summary>The device that holds lm_head (and the MTP module).</summary>
    public int HeadDevice { get; }

    /// <summary>The devices' collectives (all-reduce, copies, barrier, graphs over every device); null for one device.</summary>
    public ICommunicator? Communicator { get; }

    /// <summary><see cref="Communicator"/>'s all-reduce, as the layer steps take it; null for one device.</summary>
    public Action<IReadOnlyList<Tensor>>? AllReduce { get; }

    /// <summary>The MTP module's weights on the head device (its input side, and the layer or the head's shard of it); null when it is not loaded.</summary>
    public MtpWeights? Mtp => Devices[HeadDevice].Mtp;

    /// <summary>
    /// The devices that run the MTP layer, ascending: those that run the last main layer (the head device alone, or every
    /// device of a tensor/expert-parallel plan, each with its shard of the layer); empty without the module.
    /// </summary>
    public int[] MtpRunners { get; }

    /// <summary>[layer] → the devices that run it, ascending.</summary>
    public int[][] Runners { get; }

    /// <summary>
    /// The pass's stages in layer order: one where every layer runs on the same devices, else a pipeline's, each on one
    /// device, whose boundaries hand the stream from one device to the next (<see cref="ModelPass.HandOver"/>).
    /// </summary>
    public IReadOnlyList<PassStage> Stages { get; }
}

/// <summary>A stage of a forward pass: layers <paramref name="First"/> .. <paramref name="End"/> − 1, run on <paramref name="Devices"/> (ascending).</summary>
internal sealed record PassStage(int First, int End, int[] Devices);

/// <summary>A model a <c>PagedStepRunner</c> can run: its weights laid out over one device or several.</summary>
internal interface IPagedModel
{
    DeviceLayout Layout { get; }
}
