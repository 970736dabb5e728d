using System.Diagnostics;
using System.Text.Json;
using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Backends.Cuda;
using DeepSeekCuda.Inference;
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
    /// max_position_embeddings and the memory left for <see cref="ConcurrentSessions"/> sessions' caches.
    /// A value above either limit is refused (an <see cref="ArgumentOutOfRangeException"/> naming the limit).
    /// </summary>
    public int? MaxSequenceLength { get; init; }

    /// <summary>
    /// Requests expected to hold a session at once, for sizing the default context: a chat client's
    /// <see cref="DeepSeekChatClientOptions.MaxBatch"/> (default 16, the same). A tool that runs one request at a time says 1.
    /// </summary>
    public int ConcurrentSessions { get; init; } = 16;

    /// <summary>Creates the backend instead of <see cref="BackendSelection"/> (tests observe what a failed load disposes).</summary>
    internal Func<IBackend>? BackendFactory { get; init; }

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
    private readonly IBackend _backend;

    private LocalModel(string directory, DeepSeekModel model, BpeTokenizer tokenizer, ChatTemplateKind kind, IBackend backend)
    {
        Directory = directory;
        Model = model;
        Tokenizer = tokenizer;
        TemplateKind = kind;
        _backend = backend;
    }

    /// <summary>The checkpoint folder.</summary>
    public string Directory { get; }

    /// <summary>The model.</summary>
    public DeepSeekModel Model { get; }

    /// <summary>The checkpoint's tokenizer.</summary>
    public BpeTokenizer Tokenizer { get; }

    /// <summary>The chat format the checkpoint expects.</summary>
    public ChatTemplateKind TemplateKind { get; }

    /// <summary>
    /// Validates and loads <paramref name="directory"/> (config, shards, tokenizer.json) onto the backend
    /// <see cref="LocalModelOptions.Device"/> selects. Everything is checked before weights are read; a failure
    /// or a cancellation leaves nothing loaded (the backend is disposed).
    /// </summary>
    /// <param name="directory">The checkpoint folder.</param>
    /// <param name="options">Device, numerics, context length, tokenizer folder, chat format.</param>
    /// <param name="progress">Receives the fraction of the weights loaded.</param>
    /// <param name="logger">Receives the backend choice, the context length with its reason, and the "Loaded ..." summary.</param>
    /// <param name="cancellationToken">Checked between layers while weights load.</param>
    /// <exception cref="CheckpointException">The checkpoint is missing, corrupt or does not match its config.</exception>
    /// <exception cref="TokenizerFormatException">tokenizer.json is missing or malformed.</exception>
    /// <exception cref="DeepSeekCuda.Cuda.CudaUnavailableException">CUDA was requested and cannot be used.</exception>
    /// <exception cref="ArgumentOutOfRangeException">MaxSequenceLength is above max_position_embeddings or what memory holds (ParamName <c>MaxSequenceLength</c>).</exception>
    /// <exception cref="OperationCanceledException"><paramref name="cancellationToken"/> fired.</exception>
    public static LocalModel Load(string directory, LocalModelOptions? options = null, IProgress<double>? progress = null, ILogger? logger = null, CancellationToken cancellationToken = default)
    {
        options ??= new LocalModelOptions();
        logger ??= NullLogger.Instance;
        ArgumentOutOfRangeException.ThrowIfLessThan(options.ConcurrentSessions, 1, nameof(LocalModelOptions.ConcurrentSessions));
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
        var backend = options.BackendFactory?.Invoke() ?? BackendSelection.Create(options.Device, options.Numerics, logger);
        try
        {
            var mtp = checkpoint.Config.NumNextNPredictLayers > 0;
            var context = backend is CudaBackend cuda
                ? ContextSize.ChooseForGpu(checkpoint.Config, cuda.Device.MemoryInfo().Free, options.ConcurrentSessions, mtp, options.MaxSequenceLength)
                : ContextSize.ChooseForCpu(checkpoint.Config, ContextSize.AvailableHostBytes(), options.ConcurrentSessions, mtp, options.MaxSequenceLength);
            Log.ContextChosen(logger, context.Tokens, context.Reason);
            var model = DeepSeekModel.Load(checkpoint, backend, new ModelOptions { MaxSequenceLength = context.Tokens }, progress, cancellationToken);
            var kind = options.TemplateKind ?? DetectTemplate(tokenizerDirectory);
            logger.LogInformation("Loaded {Directory}: {Bytes} bytes of weights in {Seconds:F2} s ({Config}), {Template} chat format",
                checkpoint.Directory, checkpoint.TotalTensorBytes, started.Elapsed.TotalSeconds, checkpoint.Config, kind);
            return new LocalModel(checkpoint.Directory, model, tokenizer, kind, backend);
        }
        catch
        {
            backend.Dispose();
            throw;
        }
    }

    /// <inheritdoc />
    public int VocabSize => Model.VocabSize;

    /// <inheritdoc />
    public int MaxSequenceLength => Model.MaxSequenceLength;

    /// <inheritdoc />
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

    /// <summary>Releases the model and its backend.</summary>
    public void Dispose()
    {
        Model.Dispose();
        _backend.Dispose();
    }
}
