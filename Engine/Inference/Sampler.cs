using DeepSeekCuda.Loader.Numerics;
namespace DeepSeekCuda.Inference;

/// <summary>
/// Chooses the next token from float32 logits: greedy, or temperature sampling restricted by top-k then
/// top-p (each applied to the probabilities left by the previous step), from the ids a
/// <see cref="ITokenConstraint"/> allows when there is one. Holds the seeded random generator, the
/// constraint's state and scratch buffers, so one sampler serves one generation, from one thread.
/// </summary>
internal sealed class Sampler
{
    private readonly ITokenConstraint? _constraint;
    private readonly float _temperature;
    private readonly int _topK;
    private readonly float _topP;
    private readonly Xoshiro256 _rng;
    private float[] _probs = [];
    private int[] _order = [];

    /// <summary>Creates a sampler for <paramref name="options"/> (validated here), restricted by <paramref name="constraint"/> when given.</summary>
    public Sampler(SamplingOptions options, ITokenConstraint? constraint = null)
    {
        ArgumentNullException.ThrowIfNull(options);
        options.Validate();
        _constraint = constraint;
        _temperature = options.IsGreedy ? 0 : options.EffectiveTemperature;
        _topK = options.TopK ?? 0;
        _topP = options.EffectiveTopP;
        _rng = new Xoshiro256(unchecked((ulong)(options.Seed ?? Random.Shared.NextInt64(long.MinValue, long.MaxValue))));
    }

    /// <summary>The index of the largest logit, the lowest such index on ties; NaN never wins.</summary>
    public static int ArgMax(ReadOnlySpan<float> logits)
    {
        if (logits.IsEmpty)
        {
            throw new ArgumentException("no logits", nameof(logits));
        }

        var best = 0;
        var bestValue = float.NegativeInfinity;
        for (var i = 0; i < logits.Length; i++)
        {
            if (logits[i] > bestValue)
            {
                bestValue = logits[i];
                best = i;
            }
        }

        return best;
    }

    /// <summary>
    /// Masks ids at and past <paramref name="vocabLimit"/> (a model vocabulary padded past the tokenizer's)
    /// to -infinity, in place. The one place where the padded rows are removed.
    /// </summary>
    public static void MaskPadding(Span<float> logits, int vocabLimit)
    {
        if (vocabLimit < logits.Length)
        {
            logits[Math.Max(vocabLimit, 0)..].Fill(float.NegativeInfinity);
        }
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
        MaskPadding(logits, vocabLimit);
        var real = logits[..Math.Min(vocabLimit, logits.Length)];
        if (real.IsEmpty)
        {
            throw new ArgumentOutOfRangeException(nameof(vocabLimit), vocabLimit, "no token id is left to sample");
        }

        var bad = -1;
        var broken = 0;
        var possible = false;
        for (var i = 0; i < real.Length; i++)
        {
            var x = real[i];
            if (float.IsNaN(x) || float.IsPositiveInfinity(x))
            {
                broken++;
                bad = bad < 0 ? i : bad;
            }
            else
            {
                possible |= x > float.NegativeInfinity;
            }
        }

        if (broken > 0 || !possible)
        {
            throw new NonFiniteLogitsException(bad, bad < 0 ? float.NegativeInfinity : real[bad], broken > 0 ? broken : real.Length, real.Length);
        }

        if (_constraint is null)
        {
            return Sample(logits);
        }

        _constraint.Mask(real);
        var id = Sample(real);
        if (float.IsNegativeInfinity(real[id]))
        {
            // Sample draws an impossible id only when every id is impossible: no second pass over the row to know it.
            throw new InvalidOperationException($"the output constraint ({_constraint.GetType().Name}) allows none of the {real.Length} token ids the model made possible");
        }

        _constraint.Advance(id);
        return id;
    }

    /// <summary>Draws a token id from <paramref name="logits"/> (any values: NaN is never drawn; all -infinity or NaN falls back to argmax).</summary>
    public int Sample(ReadOnlySpan<float> logits)
    {
        if (_temperature <= 0)
        {
            return ArgMax(logits);
        }

        var n = logits.Length;
        if (_probs.Length < n)
        {
            _probs = new float[n];
            _order = new int[n];
        }

        var max = logits[ArgMax(logits)];
        if (!float.IsFinite(max))
        {
            return ArgMax(logits); // all -inf (or NaN): nothing to weigh
        }

        // Unnormalized softmax; the largest entry is exactly 1, so the sum is at least 1.
        var probs = _probs.AsSpan(0, n);
        var invT = 1f / _temperature; // finite: greedy below SamplingOptions.GreedyBelowTemperature
        double total = 0;
        for (var i = 0; i < n; i++)
        {
            var p = logits[i] > float.NegativeInfinity ? MathF.Exp((logits[i] - max) * invT) : 0f;
            probs[i] = float.IsNaN(p) ? 0f : p;
            total += probs[i];
        }

        var limitK = _topK > 0 && _topK < n;
        var limitP = _topP < 1f;
        if (!limitK && !limitP)
        {
            return Draw(probs, total);
        }

        // Candidates by falling probability, lowest id first among equals, so truncation is deterministic.
        var order = _order.AsSpan(0, n);
        var count = 0;
        for (var i = 0; i < n; i++)
        {
            if (probs[i] > 0)
            {
                order[count++] = i;
            }
        }

        order = order[..count];
        order.Sort(new ByProbability(_probs));
        if (limitK && count > _topK)
        {
            order = order[.._topK];
        }

        double kept = 0;
        foreach (var id in order)
        {
            kept += probs[id];
        }

        if (limitP)
        {
            // Keep the smallest prefix whose mass reaches top-p of what top-k left; at least one token.
            var threshold = _topP * kept;
            double cumulative = 0;
            var keep = 0;
            while (keep < order.Length)
            {
                cumulative += probs[order[keep++]];
                if (cumulative >= threshold)
                {
                    break;
                }
            }

            order = order[..keep];
            kept = cumulative;
        }

        var u = _rng.NextDouble() * kept;
        double acc = 0;
        foreach (var id in order)
        {
            acc += probs[id];
            if (u < acc)
            {
                return id;
            }
        }

        return order[^1]; // rounding left u at the very top
    }

    private int Draw(ReadOnlySpan<float> probs, double total)
    {
        var u = _rng.NextDouble() * total;
        double acc = 0;
        var last = 0;
        for (var i = 0; i < probs.Length; i++)
        {
            if (probs[i] <= 0)
            {
                continue;
            }

            acc += probs[i];
            last = i;
            if (u < acc)
            {
                return i;
            }
        }

        return last;
    }

    private readonly struct ByProbability(float[] probs) : IComparer<int>
    {
        public int Compare(int a, int b)
        {
            var c = probs[b].CompareTo(probs[a]);
            return c != 0 ? c : a.CompareTo(b);
        }
    }
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
