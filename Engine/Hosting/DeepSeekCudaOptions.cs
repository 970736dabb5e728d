using DeepSeekCuda.Inference;
using DeepSeekCuda.Text;

namespace DeepSeekCuda.Hosting;

/// <summary>
/// What <see cref="ServiceCollectionExtensions.AddDeepSeekCuda"/> needs: how to get the model and
/// tokenizer, and the chat client's settings. Give either <see cref="ModelFactory"/>, or
/// <see cref="ModelPath"/> with <see cref="Loader"/>; the factory wins when both are set.
/// </summary>
public sealed class DeepSeekCudaOptions
{
    /// <summary>Builds the model and tokenizer from the container (first resolution of the chat client).</summary>
    public Func<IServiceProvider, (ILanguageModel Model, ITokenizer Tokenizer)>? ModelFactory { get; set; }

    /// <summary>A model folder handed to <see cref="Loader"/>.</summary>
    public string? ModelPath { get; set; }

    /// <summary>Loads the model and tokenizer from <see cref="ModelPath"/>.</summary>
    public Func<string, (ILanguageModel Model, ITokenizer Tokenizer)>? Loader { get; set; }

    /// <summary>Template, default sampling, model id and reasoning parsing of the chat client.</summary>
    public DeepSeekChatClientOptions Chat { get; } = new();

    internal (ILanguageModel Model, ITokenizer Tokenizer) Load(IServiceProvider services)
    {
        if (ModelFactory is not null)
        {
            return ModelFactory(services);
        }

        if (Loader is not null && !string.IsNullOrEmpty(ModelPath))
        {
            return Loader(ModelPath);
        }

        throw new InvalidOperationException("DeepSeekCuda: set ModelFactory, or ModelPath and Loader");
    }
}
