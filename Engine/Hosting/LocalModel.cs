using System.Diagnostics;
using System.Text.Json;
using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Backends.Cuda;
using DeepSeekCuda.Distributed;
using DeepSeekCuda.Inference;
using DeepSeekCuda.Kernels;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Model;
using DeepSeekCuda.Serving;
using DeepSeekCuda.Text;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace DeepSeekCuda.Hosting;

/// <summary>How <see cref="LocalModel.Load"/> runs a checkpoint.</summary>
public sealed record LocalModelOptions
{
    /// <summary>Where to run: Auto picks the CUDA backend when it can be used (see <see cref="BackendSelection"/>).</summary>
    public ComputeDevice Device { get; init; } = ComputeDevice.Auto;

    /// <summary>Arithmetic of the CPU backend.</summary>
    public CpuNumerics Numerics { get; init; } = CpuNumerics.Float32;

    /// <summary>
    /// Longest session (prompt and output). Null (default): sized by <see cref="ContextSize"/> from
    /// max_position_embeddings and the memory left for the caches (on CUDA, the pool <see cref="ConcurrentSessions"/>
    /// requests share; on the CPU backend, room for a full-length cache for each of them).
    /// A value above either limit is refused (an <see cref="ArgumentOutOfRangeException"/> naming the limit).
    /// </summary>
    public int? MaxSequenceLength { get; init; }

    /// <summary>
    /// Requests expected to run at once: a chat client's <see cref="DeepSeekChatClientOptions.MaxBatch"/> (default 16, the
    /// same). A tool that runs one request at a time says 1. On CUDA it sizes the step buffers the memory plan sets aside
    /// before the cache pool it predicts (the chat client sizes the real pool from the memory left when it is created); on
    /// the CPU backend, the default context (room for a full-length cache for each).
    /// </summary>
    public int ConcurrentSessions { get; init; } = 16;

    /// <summary>
    /// The GPUs (CUDA device ordinals) to run on. Null (default): GPU 0 when the CUDA backend runs. One ordinal: that GPU.
    /// Several (at most 8, each listed once): the model is spread over them, one rank per GPU, as <see cref="Placement"/>
    /// says (one <see cref="DeepSeekModel"/> over them), which is how a model larger than one GPU (DeepSeek-V3/R1) runs. Needs the CUDA
    /// backend: refused with <see cref="ComputeDevice.Cpu"/>, and <see cref="ComputeDevice.Auto"/> then requires CUDA.
    /// </summary>
    public IReadOnlyList<int>? Gpus { get; init; }

    /// <summary>
    /// How a model on several GPUs is spread; null (default): <see cref="PlacementPlan.Choose"/> on the GPUs' free memory
    /// (tensor/expert parallel when it fits, else a pipeline). Ignored on one device.
    /// </summary>
    public PlacementKind? Placement { get; init; }

    /// <summary>Creates the backend instead of <see cref="BackendSelection"/> (tests observe what a failed load disposes).</summary>
    internal Func<IBackend>? BackendFactory { get; init; }

    /// <summary>Creates the devices of a load over several <see cref="Gpus"/> instead of CUDA (tests: simulated devices that declare their free bytes).</summary>
    internal Func<int, DeviceGroup>? DevicesFactory { get; init; }

    /// <summary>Refuses a <see cref="Gpus"/> list that names no GPU, one twice, a negative ordinal or more than 8, or one with the CPU backend.</summary>
    internal void CheckGpus()
    {
        if (Gpus is not { } gpus)
        {
            return;
        }

        var list = $"[{string.Join(", ", gpus)}]";
        var problem = gpus.Count == 0 ? "lists no GPU (leave it null for the default)"
            : gpus.Count > AllReduceKernel.MaxRanks ? $"lists {gpus.Count} GPUs; at most {AllReduceKernel.MaxRanks} run one model"
            : gpus.FirstOrDefault(g => g < 0) is var n && n < 0 ? $"names GPU {n}, which is not a device ordinal"
            : gpus.GroupBy(g => g).FirstOrDefault(g => g.Count() > 1) is { } twice ? $"names GPU {twice.Key} twice"
            : Device == ComputeDevice.Cpu ? "needs the CUDA backend, and Device is Cpu"
            : null;
        if (problem is not null)
        {
            throw new ArgumentException($"{list} {problem}", nameof(Gpus));
        }
    }

    /// <summary>Folder holding tokenizer.json (and tokenizer_config.json) when the checkpoint folder has none; null: the checkpoint folder.</summary>
    public string? TokenizerDirectory { get; init; }

    /// <summary>Chat format; null: detected from tokenizer_config.json (R1 when its template forces <c>&lt;think&gt;</c>, else V3).</summary>
    public ChatTemplateKind? TemplateKind { get; init; }
}

/// <summary>
/// A checkpoint folder made ready to chat with: the validated checkpoint on a backend, its tokenizer and
/// its chat format. The one call a service or tool needs:
/// <code>
/// using var local = LocalModel.Load("/models/DeepSeek-R1");
/// IChatClient client = local.CreateChatClient();
/// </code>
/// </summary>
public sealed class LocalModel : ILanguageModel
{
    private readonly IDisposable _devices;

    private LocalModel(string directory, ILanguageModel model, PlacementPlan? placement, BpeTokenizer tokenizer, ChatTemplateKind kind, IDisposable devices)
    {
        Directory = directory;
        Model = model;
        Placement = placement;
        Tokenizer = tokenizer;
        TemplateKind = kind;
        _devices = devices;
    }

    /// <summary>The checkpoint folder.</summary>
    public string Directory { get; }

    /// <summary>The model: a <see cref="DeepSeekModel"/> (on one device or spread over several), or the demo model.</summary>
    public ILanguageModel Model { get; }

    /// <summary>Where the weights went over several devices; null on one.</summary>
    public PlacementPlan? Placement { get; }

    /// <summary>The checkpoint's tokenizer.</summary>
    public BpeTokenizer Tokenizer { get; }

    /// <summary>The chat format the checkpoint expects.</summary>
    public ChatTemplateKind TemplateKind { get; }

    /// <summary>
    /// Validates and loads <paramref name="directory"/> (config, shards, tokenizer.json) onto the backend
    /// <see cref="LocalModelOptions.Device"/> selects, or spread over the <see cref="LocalModelOptions.Gpus"/> when it
    /// lists several. Everything is checked before weights are read; a failure or a cancellation leaves nothing
    /// loaded (the backends are disposed).
    /// </summary>
    /// <param name="directory">The checkpoint folder.</param>
    /// <param name="options">Device, GPUs and placement, numerics, context length, tokenizer folder, chat format.</param>
    /// <param name="progress">Receives the fraction of the weights loaded.</param>
    /// <param name="logger">Receives the backend choice, the context length with its reason, and the "Loaded ..." summary.</param>
    /// <param name="cancellationToken">Checked between layers while weights load.</param>
    /// <exception cref="CheckpointException">The checkpoint is missing, corrupt or does not match its config.</exception>
    /// <exception cref="TokenizerFormatException">tokenizer.json is missing or malformed.</exception>
    /// <exception cref="DeepSeekCuda.Cuda.CudaUnavailableException">CUDA was requested and cannot be used.</exception>
    /// <exception cref="ArgumentOutOfRangeException">MaxSequenceLength is above max_position_embeddings or what memory holds (ParamName <c>MaxSequenceLength</c>).</exception>
    /// <exception cref="ArgumentException">A bad <see cref="LocalModelOptions.Gpus"/> list (ParamName <c>Gpus</c>), checked before anything is read.</exception>
    /// <exception cref="PlacementException">The model does not fit the GPUs, or the requested placement cannot split it.</exception>
    /// <exception cref="InsufficientDeviceMemoryException">A device cannot hold its weights with a cache for the concurrent sessions.</exception>
    /// <exception cref="OperationCanceledException"><paramref name="cancellationToken"/> fired.</exception>
    public static LocalModel Load(string directory, LocalModelOptions? options = null, IProgress<double>? progress = null, ILogger? logger = null, CancellationToken cancellationToken = default)
    {
        options ??= new LocalModelOptions();
        logger ??= NullLogger.Instance;
        ArgumentOutOfRangeException.ThrowIfLessThan(options.ConcurrentSessions, 1, nameof(LocalModelOptions.ConcurrentSessions));
        options.CheckGpus();
        var started = Stopwatch.StartNew();
        using var checkpoint = Checkpoint.Open(directory);
        var tokenizerDirectory = options.TokenizerDirectory ?? checkpoint.Directory;
        var tokenizer = BpeTokenizer.Load(tokenizerDirectory);
        if (tokenizer.VocabSize > checkpoint.Config.VocabSize)
        {
            throw new CheckpointException(
                $"{Path.Combine(tokenizerDirectory, "tokenizer.json")}: tokenizer has {tokenizer.VocabSize} tokens, more than the model's vocab_size {checkpoint.Config.VocabSize} ({checkpoint.Directory})",
                checkpoint.Directory);
        }

        cancellationToken.ThrowIfCancellationRequested();
        if (options.Gpus is { Count: > 1 } gpus)
        {
            return LoadSpread(checkpoint, tokenizer, tokenizerDirectory, options, gpus.Count, progress, logger, started, cancellationToken);
        }

        var backend = options.BackendFactory?.Invoke() ?? BackendSelection.Create(options.Gpus is null ? options.Device : ComputeDevice.Cuda, options.Numerics, logger, options.Gpus?[0]);
        try
        {
            var mtp = checkpoint.Config.NumNextNPredictLayers > 0;
            var context = backend is CudaBackend cuda
                ? ContextSize.ChooseForDevices(PlacementPlan.Pipeline(checkpoint.Config, 1, mtp), [cuda.Device.MemoryInfo().Free], options.ConcurrentSessions,
                    options.MaxSequenceLength)
                : ContextSize.ChooseForCpu(checkpoint.Config, ContextSize.AvailableHostBytes(), options.ConcurrentSessions, mtp, options.MaxSequenceLength);
            Log.ContextChosen(logger, context.Tokens, context.Reason);
            var model = DeepSeekModel.Load(checkpoint, backend, new ModelOptions { MaxSequenceLength = context.Tokens }, progress, cancellationToken);
            return Loaded(checkpoint, model, placement: null, tokenizer, tokenizerDirectory, options, new Owned(model, backend), logger, started);
        }
        catch
        {
            backend.Dispose();
            throw;
        }
    }

    /// <summary>
    /// The load over several devices: the CUDA ranks (or the test factory's devices), a placement that fits their free
    /// memory (with the MTP layer where the last layer runs when the checkpoint has one, so the chat client drafts as on one
    /// device), the context their memory leaves, then the model's load over them. A failure disposes the devices.
    /// </summary>
    private static LocalModel LoadSpread(Checkpoint checkpoint, BpeTokenizer tokenizer, string tokenizerDirectory, LocalModelOptions options, int count,
        IProgress<double>? progress, ILogger logger, Stopwatch started, CancellationToken cancellationToken)
    {
        var group = options.DevicesFactory?.Invoke(count) ?? DeviceGroup.Cuda(options.Gpus!);
        try
        {
            Log.DevicesOpened(logger, count, group.Description);
            var config = checkpoint.Config;
            var mtp = config.NumNextNPredictLayers > 0; // placed where the last layer runs, as one device loads it
            var plan = options.Placement switch
            {
                PlacementKind.Pipeline => PlacementPlan.Pipeline(config, count, mtp),
                PlacementKind.TensorExpertParallel => PlacementPlan.TensorExpertParallel(config, count, includeMtp: mtp),
                _ => PlacementPlan.Choose(config, count, group.FreeBytes.Min(), includeMtp: mtp),
            };
            Log.PlacementChosen(logger, ContextSize.PlacementName(plan.Kind), count, options.Placement is null ? "auto" : "requested",
                string.Join(", ", Enumerable.Range(0, count).Select(d => ContextSize.Gib(plan.BytesOn(d)))));
            var context = ContextSize.ChooseForDevices(plan, group.FreeBytes, options.ConcurrentSessions, options.MaxSequenceLength);
            Log.ContextChosen(logger, context.Tokens, context.Reason);
            var model = DeepSeekModel.Load(checkpoint, plan, group.Communicator, new ModelOptions { MaxSequenceLength = context.Tokens }, progress, cancellationToken);
            return Loaded(checkpoint, model, plan, tokenizer, tokenizerDirectory, options, new Owned(model, group.Owner), logger, started);
        }
        catch
        {
            group.Owner.Dispose();
            throw;
        }
    }

    private static LocalModel Loaded(Checkpoint checkpoint, ILanguageModel model, PlacementPlan? placement, BpeTokenizer tokenizer, string tokenizerDirectory,
        LocalModelOptions options, IDisposable devices, ILogger logger, Stopwatch started)
    {
        var kind = options.TemplateKind ?? DetectTemplate(tokenizerDirectory);
        logger.LogInformation("Loaded {Directory}: {Bytes} bytes of weights in {Seconds:F2} s ({Config}), {Template} chat format",
            checkpoint.Directory, checkpoint.TotalTensorBytes, started.Elapsed.TotalSeconds, checkpoint.Config, kind);
        return new LocalModel(checkpoint.Directory, model, placement, tokenizer, kind, devices);
    }

    /// <inheritdoc />
    public int VocabSize => Model.VocabSize;

    /// <inheritdoc />
    public int MaxSequenceLength => Model.MaxSequenceLength;

    /// <summary>
    /// Starts an empty session with latent caches of its own, which grow with it, outside any chat client's pool. Beside a
    /// chat client, whose pool takes the memory the devices have left, open one with <see cref="DeepSeekChatClient.CreateSession"/>
    /// instead: its calls run in the client's steps and pool.
    /// </summary>
    public IModelSession CreateSession() => Model.CreateSession();

    /// <summary>A chat client over this model (it does not own the model: dispose this object when done).</summary>
    public DeepSeekChatClient CreateChatClient(DeepSeekChatClientOptions? options = null, ILogger<DeepSeekChatClient>? logger = null)
    {
        options ??= new DeepSeekChatClientOptions
        {
            TemplateKind = TemplateKind,
            ModelId = Path.GetFileName(Directory.TrimEnd(Path.DirectorySeparatorChar)),
        };

        return new DeepSeekChatClient(Model, Tokenizer, options, logger, stepRunner: CreateStepRunner());
    }

    /// <summary>
    /// The step runner a chat client's scheduler drives (owned by the caller; <see cref="StepRunners.For"/>): batched
    /// and paged on this model's backend, with MTP drafting when the checkpoint has the module.
    /// </summary>
    public IStepRunner CreateStepRunner() => StepRunners.For(Model);

    /// <summary>R1's template ends the generation prompt with a forced <c>&lt;think&gt;</c>; V3's does not.</summary>
    internal static ChatTemplateKind DetectTemplate(string directory)
    {
        var path = Path.Combine(directory, "tokenizer_config.json");
        if (!File.Exists(path))
        {
            return ChatTemplateKind.R1;
        }

        try
        {
            using var doc = JsonDocument.Parse(BpeTokenizer.ReadFile(path)); // checked: a FIFO or device must not hang the load
            if (doc.RootElement.TryGetProperty("chat_template", out var template) && template.ValueKind == JsonValueKind.String)
            {
                return BpeTokenizer.ReadString(template, path, "chat_template").Contains("<think>", StringComparison.Ordinal) ? ChatTemplateKind.R1 : ChatTemplateKind.V3;
            }
        }
        catch (JsonException e)
        {
            throw new TokenizerFormatException(path, $"not valid JSON: {e.Message}", e);
        }
        // No template: our own demo and synthetic models, which are R1-style.
        return ChatTemplateKind.R1;
    }

    /// <summary>Releases the model and its backends.</summary>
    public void Dispose() => _devices.Dispose();

    /// <summary>The model, then what holds its devices (a model's weights go before the backends they live on).</summary>
    private sealed class Owned(IDisposable model, IDisposable devices) : IDisposable
    {
        public void Dispose()
        {
            model.Dispose();
            devices.Dispose();
        }
    }
}

/// <summary>The devices of a load over several GPUs: their communicator, what owns them, and what each has free.</summary>
/// <param name="Communicator">The devices and their collectives.</param>
/// <param name="Owner">Disposes the devices (and the communicator).</param>
/// <param name="FreeBytes">Free memory per device before the weights load.</param>
/// <param name="Description">For the log: which devices.</param>
internal sealed record DeviceGroup(ICommunicator Communicator, IDisposable Owner, IReadOnlyList<long> FreeBytes, string Description)
{
    /// <summary>One CUDA rank per GPU of <paramref name="gpus"/> (<see cref="CudaParallel.Devices"/>).</summary>
    /// <exception cref="DeepSeekCuda.Cuda.CudaUnavailableException">CUDA cannot be used here.</exception>
    public static DeviceGroup Cuda(IReadOnlyList<int> gpus) => Of(CudaParallel.Devices(gpus));

    /// <summary>The ranks of <paramref name="parallel"/> (owned from here on; disposed if this throws).</summary>
    public static DeviceGroup Of(CudaParallel parallel)
    {
        try
        {
            var free = parallel.Backends.Select(b => b.Device.MemoryInfo().Free).ToArray();
            var names = string.Join(", ", parallel.Backends.Select((b, r) => $"rank {r}: GPU {b.Device.Ordinal} {b.Device.Name}"));
            return new DeviceGroup(parallel.Communicator, parallel, free, names);
        }
        catch
        {
            parallel.Dispose();
            throw;
        }
    }
}
