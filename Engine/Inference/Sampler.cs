using DeepSeekCuda.Backends;

namespace DeepSeekCuda.Inference;

/// <summary>
/// Chooses one request's tokens from float32 logits: greedy, or temperature sampling restricted by top-k then top-p, from
/// the ids a <see cref="ITokenConstraint"/> allows when there is one. The rule is <see cref="TokenSampling"/>'s, with the
/// request's seed and a draw counter (the n-th token drawn uses draw n), so the same request draws the same tokens on the
/// host or where the logits are (<see cref="Choice"/>, <see cref="Accept"/>), whatever batch it runs in. Holds the
/// constraint's state: one sampler serves one generation, from one thread.
/// </summary>
internal sealed class Sampler
{
    private readonly ITokenConstraint? _constraint;
    private readonly float _temperature;
    private readonly int _topK;
    private readonly float _topP;
    private readonly ulong _seed;
    private ulong _draw;
    private ulong[]? _allowed;
    private bool _chosenWithMask;

    /// <summary>Creates a sampler for <paramref name="options"/> (validated here), restricted by <paramref name="constraint"/> when given.</summary>
    public Sampler(SamplingOptions options, ITokenConstraint? constraint = null)
    {
        ArgumentNullException.ThrowIfNull(options);
        options.Validate();
        _constraint = constraint;
        _temperature = options.IsGreedy ? 0 : options.EffectiveTemperature;
        _topK = options.TopK ?? 0;
        _topP = options.EffectiveTopP;
        _seed = unchecked((ulong)(options.Seed ?? Random.Shared.NextInt64(long.MinValue, long.MaxValue)));
    }

    /// <summary>The index of the largest logit, the lowest such index on ties; NaN never wins.</summary>
    public static int ArgMax(ReadOnlySpan<float> logits) => TokenSampling.ArgMax(logits);

    /// <summary>
    /// Masks ids at and past <paramref name="vocabLimit"/> (a model vocabulary padded past the tokenizer's)
    /// to -infinity, in place. The one place where the padded rows are removed on the host.
    /// </summary>
    public static void MaskPadding(Span<float> logits, int vocabLimit)
    {
        if (vocabLimit < logits.Length)
        {
            logits[Math.Max(vocabLimit, 0)..].Fill(float.NegativeInfinity);
        }
    }

    /// <summary>
    /// How the token <paramref name="ahead"/> draws after the next one may be chosen where the logits are: the rule, the seed
    /// and the draw counter, and under a constraint the ids it allows next (<see cref="ITokenConstraint.TryWriteAllowed"/>;
    /// the choice reads them from this sampler's buffer, rewritten by the next call). <c>default</c> (chosen on the host) for
    /// a constraint that only masks rows, and for a constrained token past the next one (the constraint has not seen the
    /// tokens before it yet).
    /// </summary>
    public TokenChoice Choice(int vocabLimit, int ahead = 0)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(vocabLimit, 1);
        ArgumentOutOfRangeException.ThrowIfNegative(ahead);
        var choice = new TokenChoice(vocabLimit, _temperature, _topK, _topP, _seed, _draw + (ulong)ahead);
        if (_constraint is null)
        {
            return choice;
        }

        if (ahead > 0)
        {
            return default;
        }

        _chosenWithMask = false;
        var words = TokenChoice.MaskWords(vocabLimit);
        if (_allowed is null || _allowed.Length != words)
        {
            _allowed = new ulong[words];
        }

        if (!_constraint.TryWriteAllowed(_allowed))
        {
            return default;
        }

        _chosenWithMask = true;
        return choice with { Allowed = _allowed };
    }

    /// <summary>
    /// Takes <paramref name="id"/>, chosen where the logits are under <see cref="Choice"/>, as the next token drawn (and moves
    /// the constraint past it).
    /// </summary>
    /// <exception cref="InvalidOperationException">A constrained sampler whose last choice carried no allowed ids: its row must be sampled here.</exception>
    public int Accept(int id)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(id);
        if (_constraint is not null)
        {
            if (!_chosenWithMask)
            {
                throw new InvalidOperationException("this constrained token was not chosen among the ids its constraint allows: its row must be sampled on the host");
            }

            _chosenWithMask = false;
            _constraint.Advance(id);
        }

        _draw++;
        return id;
    }

    /// <summary>
    /// Chooses the next token from one row of the model's logits: the padded ids past
    /// <paramref name="vocabLimit"/> are masked, and a row with a NaN or +infinite logit below it, or with no
    /// finite logit at all, is refused, so broken numerics end the request with an error instead of a token.
    /// -infinity is a legitimate logit: it means "impossible" (a mask), and is never drawn. The constraint,
    /// if any, masks the row after that check (so broken numerics are never hidden by it), and is advanced
    /// past the token drawn.
    /// </summary>
    /// <exception cref="NonFiniteLogitsException">A logit below <paramref name="vocabLimit"/> is NaN or +infinity, or all are -infinity.</exception>
    /// <exception cref="InvalidOperationException">The constraint allows none of the ids the model made possible.</exception>
    public int SampleModelRow(Span<float> logits, int vocabLimit)
    {
        _chosenWithMask = false;
        MaskPadding(logits, vocabLimit);
        var real = logits[..Math.Min(vocabLimit, logits.Length)];
        if (real.IsEmpty)
        {
            throw new ArgumentOutOfRangeException(nameof(vocabLimit), vocabLimit, "no token id is left to sample");
        }

        if (!TokenSampling.IsSampleable(real, out var bad, out var broken))
        {
            throw new NonFiniteLogitsException(bad, bad < 0 ? float.NegativeInfinity : real[bad], broken > 0 ? broken : real.Length, real.Length);
        }

        if (_constraint is null)
        {
            return Sample(real);
        }

        _constraint.Mask(real);
        var id = Sample(real);
        if (float.IsNegativeInfinity(real[id]))
        {
            // Draw gives an impossible id only when every id is impossible: no second pass over the row to know it.
            throw new InvalidOperationException($"the output constraint ({_constraint.GetType().Name}) allows none of the {real.Length} token ids the model made possible");
        }

        _constraint.Advance(id);
        return id;
    }

    /// <summary>Draws a token id from <paramref name="logits"/> (any values: NaN is never drawn; all -infinity or NaN falls back to argmax).</summary>
    public int Sample(ReadOnlySpan<float> logits) =>
        TokenSampling.Draw(logits, _temperature, _topK, _topP, TokenSampling.Uniform(_seed, _draw++));
}

/// <summary>The model produced a NaN or +infinite logit, or only -infinity: broken weights or numerics, never a token to emit.</summary>
public sealed class NonFiniteLogitsException(int tokenId, float value, int count, int vocab)
    : InvalidOperationException(tokenId < 0
        ? $"the model's logits are all -infinity ({vocab} ids): no token is possible; the weights or the numerics are broken"
        : $"the model's logits are not finite: {count} of {vocab} are NaN or +infinity (first: id {tokenId} = {value}); the weights or the numerics are broken")
{
    /// <summary>The first token id whose logit is NaN or +infinity; -1 when every logit is -infinity.</summary>
    public int TokenId { get; } = tokenId;

    /// <summary>How many of the row's logits are NaN or +infinity (all of them when every one is -infinity).</summary>
    public int Count { get; } = count;
}
