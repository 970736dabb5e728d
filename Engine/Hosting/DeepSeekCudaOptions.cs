using DeepSeekCuda.Inference;
using DeepSeekCuda.Text;

namespace DeepSeekCuda.Hosting;

/// <summary>
/// What <see cref="ServiceCollectionExtensions.AddDeepSeekCuda"/> needs: how to get the model and
/// tokenizer, and the chat client's settings. Give <see cref="ModelPath"/> (optionally with a
/// custom <see cref="Loader"/>) or <see cref="ModelFactory"/>; the factory wins when both are set.
/// Validated when the host starts (and at the latest when first used); a failure names the field.
/// </summary>
public sealed class DeepSeekCudaOptions
{
    /// <summary>Builds the model and tokenizer from the container (first resolution of the chat client, or host start with <see cref="LoadOnStart"/>).</summary>
    public Func<IServiceProvider, (ILanguageModel Model, ITokenizer Tokenizer)>? ModelFactory { get; set; }

    /// <summary>
    /// A checkpoint folder. Loaded with <see cref="LocalModel.Load"/> unless <see cref="Loader"/> is set; the
    /// chat format (R1 or V3) is then detected from the checkpoint and replaces <c>Chat.TemplateKind</c>.
    /// </summary>
    public string? ModelPath { get; set; }

    /// <summary>Loads the model and tokenizer from <see cref="ModelPath"/>; default: <see cref="LocalModel.Load"/> with <see cref="LoadOptions"/>.</summary>
    public Func<string, (ILanguageModel Model, ITokenizer Tokenizer)>? Loader { get; set; }

    /// <summary>
    /// How <see cref="LocalModel.Load"/> runs <see cref="ModelPath"/>: device (default Auto), the GPUs and how the
    /// model is spread over several, numerics, context length (default: sized from max_position_embeddings and
    /// memory), tokenizer folder. Its
    /// <see cref="LocalModelOptions.ConcurrentSessions"/> is replaced by <c>Chat.MaxBatch</c>.
    /// </summary>
    public LocalModelOptions LoadOptions { get; set; } = new();

    /// <summary>
    /// Load the model while the host starts (an <c>IHostedService</c>; cancelled with the start) instead of on the
    /// first resolution of the chat client. Default false. Needs a host (<c>Microsoft.Extensions.Hosting</c>).
    /// </summary>
    public bool LoadOnStart { get; set; }

    /// <summary>Template, default sampling, model id, reasoning parsing and batching (MaxBatch, MaxTokensPerStep, SpeculativeDecoding, KvCacheBlocks) of the chat client.</summary>
    public DeepSeekChatClientOptions Chat { get; } = new();

    /// <summary>The first problem with these settings, naming the field; null when they are valid.</summary>
    internal string? Problem()
    {
        if (ModelFactory is null && string.IsNullOrEmpty(ModelPath))
        {
            return "DeepSeekCudaOptions.ModelPath: set a checkpoint folder (or DeepSeekCudaOptions.ModelFactory)";
        }

        if (LoadOptions is null)
        {
            return "DeepSeekCudaOptions.LoadOptions: must not be null";
        }

        try
        {
            LoadOptions.CheckGpus();
        }
        catch (ArgumentException e)
        {
            return $"DeepSeekCudaOptions.LoadOptions.{e.ParamName}: {e.Reason()}";
        }

        try
        {
            Chat.Validate();
        }
        catch (ArgumentException e)
        {
            return $"DeepSeekCudaOptions.Chat.{e.ParamName}: {e.Reason()}";
        }

        return null;
    }

    internal (ILanguageModel Model, ITokenizer Tokenizer) Load(IServiceProvider services, Microsoft.Extensions.Logging.ILogger? logger, CancellationToken cancellationToken)
    {
        if (ModelFactory is not null)
        {
            return ModelFactory(services);
        }

        if (!string.IsNullOrEmpty(ModelPath))
        {
            if (Loader is not null)
            {
                return Loader(ModelPath);
            }

            // The checkpoint says which chat format it expects (R1 or V3); a folder name is a better
            // model id than the generic default.
            var local = LocalModel.Load(ModelPath, LoadOptions with { ConcurrentSessions = Chat.MaxBatch }, logger: logger, cancellationToken: cancellationToken);
            Chat.TemplateKind = local.TemplateKind;
            if (Chat.ModelId == new DeepSeekChatClientOptions().ModelId)
            {
                Chat.ModelId = Path.GetFileName(local.Directory.TrimEnd(Path.DirectorySeparatorChar));
            }

            return (local, local.Tokenizer);
        }

        throw new InvalidOperationException("DeepSeekCudaOptions.ModelPath: set a checkpoint folder (or DeepSeekCudaOptions.ModelFactory)");
    }
}
