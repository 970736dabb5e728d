namespace DeepSeekCuda.Inference;

/// <summary>
/// A causal language model as generation drives it: each session owns its own KV cache, so sessions
/// are independent of each other. Implemented by the DeepSeek-V3 model over any backend.
/// </summary>
public interface ILanguageModel : IDisposable
{
    /// <summary>Rows of the logits (the model's vocabulary, which may exceed the tokenizer's).</summary>
    int VocabSize { get; }

    /// <summary>The most tokens one session can hold (prompt and generated together).</summary>
    int MaxSequenceLength { get; }

    /// <summary>Starts an empty session (empty KV cache).</summary>
    IModelSession CreateSession();
}

/// <summary>One sequence being processed: a KV cache and its length.</summary>
public interface IModelSession : IDisposable
{
    /// <summary>Tokens already in the cache; the next token goes to this position.</summary>
    int Length { get; }

    /// <summary>
    /// Runs <paramref name="tokens"/> at positions <see cref="Length"/>.. (prefill when several, a decode
    /// step when one), appends them to the cache and writes the logits of the last token.
    /// </summary>
    /// <param name="tokens">Token ids, at least one.</param>
    /// <param name="lastLogits">Receives [VocabSize] logits of the last token.</param>
    /// <exception cref="ArgumentException">No tokens, an id out of range, or the session would exceed <see cref="ILanguageModel.MaxSequenceLength"/>.</exception>
    void Forward(ReadOnlySpan<int> tokens, Span<float> lastLogits);
}
