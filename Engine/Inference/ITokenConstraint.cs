namespace DeepSeekCuda.Inference;

/// <summary>
/// Restricts which token ids a request may sample, step by step (JSON output, a forced tool call). One
/// instance serves one generation and holds its state; the sampler of that generation calls it, from one
/// thread at a time, in the order <see cref="Mask"/> (or <see cref="TryWriteAllowed"/>), then <see cref="Advance"/> with the
/// id drawn from the masked row.
/// </summary>
public interface ITokenConstraint
{
    /// <summary>
    /// Sets to -infinity, in place, the logit of every id that may not come next. <paramref name="logits"/>
    /// is the row the sampler draws from (the tokenizer's ids; the model's padding is already masked).
    /// </summary>
    void Mask(Span<float> logits);

    /// <summary>Moves past <paramref name="tokenId"/>, drawn from a row <see cref="Mask"/> restricted (or among the ids <see cref="TryWriteAllowed"/> wrote).</summary>
    void Advance(int tokenId);

    /// <summary>
    /// Writes the ids that may come next as bits, so the token can be chosen where the logits are (on the GPU, with only its
    /// id coming back) instead of the row coming to the host for <see cref="Mask"/>: bit i mod 64 of
    /// <paramref name="allowed"/>[i / 64] set when id i may come next, for every id below allowed.Length · 64. The ids set
    /// must be exactly those <see cref="Mask"/> would leave in a row of that many ids. Returns false when the constraint only
    /// masks rows (the default): its rows are then masked on the host.
    /// </summary>
    bool TryWriteAllowed(Span<ulong> allowed) => false;
}
