namespace DeepSeekCuda.Inference;

/// <summary>
/// Restricts which token ids a request may sample, step by step (JSON output, a forced tool call). One
/// instance serves one generation and holds its state; the sampler of that generation calls it, from one
/// thread at a time, in the order <see cref="Mask"/>, then <see cref="Advance"/> with the id drawn from the
/// masked row.
/// </summary>
public interface ITokenConstraint
{
    /// <summary>
    /// Sets to -infinity, in place, the logit of every id that may not come next. <paramref name="logits"/>
    /// is the row the sampler draws from (the tokenizer's ids; the model's padding is already masked).
    /// </summary>
    void Mask(Span<float> logits);

    /// <summary>Moves past <paramref name="tokenId"/>, drawn from a row <see cref="Mask"/> restricted.</summary>
    void Advance(int tokenId);
}
