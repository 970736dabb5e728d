using DeepSeekCuda.Inference;
using DeepSeekCuda.Text;

namespace DeepSeekCuda.Hosting;

/// <summary>
/// What <see cref="ServiceCollectionExtensions.AddDeepSeekCuda"/> needs: how to get the model and
/// tokenizer, and the chat client's settings. Give <see cref="ModelPath"/> (optionally with a
/// custom <see cref="Loader"/>) or <see cref="ModelFactory"/>; the factory wins when both are set.
/// </summary>
public sealed class DeepSeekCudaOptions
{
    /// <summary>Builds the model and tokenizer from the container (first resolution of the chat client).</summary>
    public Func<IServiceProvider, (ILanguageModel Model, ITokenizer Tokenizer)>? ModelFactory { get; set; }

    /// <summary>
    /// A checkpoint folder. Loaded with <see cref="LocalModel.Load"/> unless <see cref="Loader"/> is set; the
    /// chat format (R1 or V3) is then detected from the checkpoint and replaces <c>Chat.TemplateKind</c>.
    /// </summary>
    public string? ModelPath { get; set; }

    /// <summary>Loads the model and tokenizer from <see cref="ModelPath"/>; default: <see cref="LocalModel.Load"/> on the CPU backend.</summary>
    public Func<string, (ILanguageModel Model, ITokenizer Tokenizer)>? Loader { get; set; }

    /// <summary>Template, default sampling, model id, reasoning parsing and batching (MaxBatch, MaxTokensPerStep, SpeculativeDecoding, KvCacheBlocks) of the chat client.</summary>
    public DeepSeekChatClientOptions Chat { get; } = new();

    internal (ILanguageModel Model, ITokenizer Tokenizer) Load(IServiceProvider services)
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
            var local = LocalModel.Load(ModelPath);
            Chat.TemplateKind = local.TemplateKind;
            if (Chat.ModelId == new DeepSeekChatClientOptions().ModelId)
            {
                Chat.ModelId = Path.GetFileName(local.Directory.TrimEnd(Path.DirectorySeparatorChar));
            }
            // The container disposes the model it was given: hand it the LocalModel, which owns the backend too.
            return (local, local.Tokenizer);
        }

        throw new InvalidOperationException("DeepSeekCuda: set ModelPath (a checkpoint folder) or ModelFactory");
    }
}
