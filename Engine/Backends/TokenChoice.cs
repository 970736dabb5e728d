using System.Buffers;

namespace DeepSeekCuda.Backends;

/// <summary>
/// How one row of logits becomes a token where the logits are (<see cref="TokenChoices.ChooseTokens"/>): greedy, or a seeded
/// draw under temperature, top-k and top-p. <c>default</c> is a row not chosen there (its logits go to the host).
/// </summary>
/// <param name="VocabLimit">Ids at and past it are never chosen (a model vocabulary padded past the tokenizer's); 0: not chosen on the device.</param>
/// <param name="Temperature">Logits are divided by it; ≤ 0 is greedy (the largest logit, the lowest id on ties).</param>
/// <param name="TopK">Keeps the logits ≥ the k-th largest (ties at the threshold kept); ≤ 0 is off.</param>
/// <param name="TopP">Then keeps the largest logits whose weight reaches this share of what top-k kept (ties kept); ≥ 1 is off.</param>
/// <param name="Seed">The request's seed.</param>
/// <param name="Draw">The request's draw counter: the uniform draw is a function of (Seed, Draw) alone, so a request draws the same tokens whatever batch it runs in.</param>
/// <param name="Allowed">
/// When set, the ids that may be chosen, as bits: id i is allowed when bit i mod 64 of Allowed[i / 64] is set (at least
/// ⌈VocabLimit / 64⌉ words). The others count as −infinity for the draw, as a constraint's mask sets them on the host; the
/// check for NaN and +infinity still covers every id below the limit. Read when the tokens are chosen. Null: every id.
/// </param>
public readonly record struct TokenChoice(int VocabLimit, float Temperature, int TopK, float TopP, ulong Seed, ulong Draw, ulong[]? Allowed = null)
{
    /// <summary>Whether the row is chosen where the logits are.</summary>
    public bool OnDevice => VocabLimit > 0;

    /// <summary>Words of <see cref="Allowed"/> a mask over <paramref name="vocabLimit"/> ids needs.</summary>
    public static int MaskWords(int vocabLimit) => (vocabLimit + 63) / 64;

    /// <summary>What is wrong with <see cref="Allowed"/> (too short for the limit), or null.</summary>
    internal string? MaskProblem() =>
        Allowed is { } a && a.Length < MaskWords(VocabLimit)
            ? $"the allowed ids hold {a.Length} words ({a.Length * 64L} ids), fewer than the vocabulary limit {VocabLimit} needs ({MaskWords(VocabLimit)})"
            : null;

    /// <summary>Whether <paramref name="allowed"/> allows <paramref name="id"/>.</summary>
    public static bool IsAllowed(ReadOnlySpan<ulong> allowed, int id) => (allowed[id >> 6] & (1UL << (id & 63))) != 0;

    /// <summary>The largest logit below <paramref name="vocabLimit"/>, the lowest id on ties.</summary>
    public static TokenChoice Greedy(int vocabLimit) => new(vocabLimit, 0, 0, 1, 0, 0);
}

/// <summary>Token choice in one call, where the logits are.</summary>
public static class TokenChoices
{
    /// <summary>
    /// Chooses a token for each of the first <paramref name="choices"/>.Length rows of <paramref name="logits"/> and waits for
    /// the ids: <see cref="IBackend.SetTokenChoices"/>, <see cref="IBackend.ChooseTokenRows"/> over those rows, then
    /// <see cref="IBackend.ReadTokenChoices"/> into <paramref name="tokens"/> (−1 for a row not chosen there).
    /// </summary>
    public static void ChooseTokens(this IBackend backend, Tensor logits, ReadOnlySpan<TokenChoice> choices, TokenChoiceBuffer buffer, Span<int> tokens)
    {
        ArgumentNullException.ThrowIfNull(backend);
        ShapeCheck.Choices(logits, choices.Length, tokens.Length);
        backend.SetTokenChoices(choices, buffer);
        if (choices.IsEmpty)
        {
            return;
        }

        using var rows = backend.View(logits, 0, choices.Length);
        backend.ChooseTokenRows(rows, buffer);
        backend.ReadTokenChoices(buffer, tokens[..choices.Length]);
    }
}

/// <summary>
/// The rule of token choice: the executable specification of <c>Kernels/sampling.cu</c>, used by the CPU backend's
/// <see cref="TokenChoices.ChooseTokens"/> and by the host sampler, so a token drawn on a GPU, on the CPU backend or on the
/// host follows one definition (a GPU sums weights in another order: a draw within rounding of a boundary may differ).
/// </summary>
/// <remarks>
/// <para>A row can be sampled when no logit below the limit is NaN or +infinity and at least one it allows
/// (<see cref="TokenChoice.Allowed"/>) is above −infinity (−infinity is a mask: never chosen). Otherwise the choice is
/// <see cref="NotChosen"/>, and the caller reads the row. An id the choice does not allow is −infinity from there on.</para>
/// <para>Weights are w_i = exp((l_i − max) / T). Top-k keeps l_i ≥ the k-th largest logit; top-p then keeps l_i ≥ v*,
/// the largest logit whose kept weight at or above it reaches p of the top-k weight. With u = <see cref="Uniform"/>(seed,
/// draw) and W the kept weight, the token is the first kept id, in id order, where the running weight exceeds u·W (the
/// last kept id with weight when rounding leaves u·W at the very top).</para>
/// </remarks>
internal static class TokenSampling
{
    /// <summary>The choice of a row that is not chosen where its logits are: not asked for, or not sampleable.</summary>
    public const int NotChosen = -1;

    /// <summary>Chooses the token of <paramref name="row"/> (a whole row of logits; ids below <see cref="TokenChoice.VocabLimit"/> count), or <see cref="NotChosen"/>.</summary>
    public static int Choose(ReadOnlySpan<float> row, in TokenChoice choice)
    {
        if (!choice.OnDevice)
        {
            return NotChosen;
        }

        if (choice.MaskProblem() is { } problem)
        {
            throw new ArgumentException(problem, nameof(choice));
        }

        var real = row[..Math.Min(choice.VocabLimit, row.Length)];
        if (!IsSampleable(real, out _, out _))
        {
            return NotChosen;
        }

        var u = Uniform(choice.Seed, choice.Draw);
        if (choice.Allowed is not { } allowed)
        {
            return Draw(real, choice.Temperature, choice.TopK, choice.TopP, u);
        }

        var rented = ArrayPool<float>.Shared.Rent(real.Length);
        try
        {
            var masked = rented.AsSpan(0, real.Length);
            var possible = false;
            for (var i = 0; i < real.Length; i++)
            {
                masked[i] = TokenChoice.IsAllowed(allowed, i) ? real[i] : float.NegativeInfinity;
                possible |= masked[i] > float.NegativeInfinity;
            }

            return possible ? Draw(masked, choice.Temperature, choice.TopK, choice.TopP, u) : NotChosen;
        }
        finally
        {
            ArrayPool<float>.Shared.Return(rented);
        }
    }

    /// <summary>
    /// Whether a token can be drawn from <paramref name="real"/>: no NaN or +infinity, and some logit above −infinity.
    /// <paramref name="firstBad"/> is the first NaN or +infinity (−1: none), <paramref name="bad"/> how many there are.
    /// </summary>
    public static bool IsSampleable(ReadOnlySpan<float> real, out int firstBad, out int bad)
    {
        firstBad = -1;
        bad = 0;
        var possible = false;
        for (var i = 0; i < real.Length; i++)
        {
            var x = real[i];
            if (float.IsNaN(x) || float.IsPositiveInfinity(x))
            {
                bad++;
                firstBad = firstBad < 0 ? i : firstBad;
            }
            else
            {
                possible |= x > float.NegativeInfinity;
            }
        }

        return bad == 0 && possible;
    }

    /// <summary>The index of the largest logit, the lowest such index on ties; NaN never wins (0 when nothing is above −infinity).</summary>
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
    /// Draws from <paramref name="logits"/> with the uniform <paramref name="u"/> in [0, 1) (the remarks' rule). Any values:
    /// NaN is never drawn; greedy, or nothing above −infinity, is <see cref="ArgMax"/>.
    /// </summary>
    public static int Draw(ReadOnlySpan<float> logits, float temperature, int topK, float topP, float u)
    {
        var top = ArgMax(logits);
        var max = logits[top];
        if (temperature <= 0 || !float.IsFinite(max))
        {
            return top;
        }

        var invT = 1f / temperature;
        var n = logits.Length;
        var threshold = float.NegativeInfinity;
        var limitK = topK > 0 && topK < n;
        if (limitK || topP < 1f)
        {
            // The kept logits, largest first: top-k's threshold is the k-th of them, top-p's the first whose running weight reaches p.
            var rented = ArrayPool<float>.Shared.Rent(n);
            var sorted = rented.AsSpan(0, n);
            var count = 0;
            foreach (var x in logits)
            {
                if (!float.IsNaN(x))
                {
                    sorted[count++] = x;
                }
            }

            var values = sorted[..count];
            values.Sort(static (a, b) => b.CompareTo(a));
            if (limitK && count >= topK)
            {
                threshold = values[topK - 1];
                var kept = topK;
                while (kept < count && values[kept] == threshold)
                {
                    kept++; // ties at the threshold stay
                }

                values = values[..kept];
            }

            if (topP < 1f)
            {
                double kept = 0;
                foreach (var x in values)
                {
                    kept += Weight(x, max, invT);
                }

                var need = topP * kept;
                double running = 0;
                for (var i = 0; i < values.Length; i++)
                {
                    running += Weight(values[i], max, invT);
                    if ((i + 1 == values.Length || values[i + 1] != values[i]) && running >= need)
                    {
                        threshold = values[i];
                        break;
                    }
                }
            }

            ArrayPool<float>.Shared.Return(rented);
        }

        double total = 0;
        for (var i = 0; i < n; i++)
        {
            if (logits[i] >= threshold)
            {
                total += Weight(logits[i], max, invT);
            }
        }

        var target = u * total;
        double acc = 0;
        var last = -1;
        for (var i = 0; i < n; i++)
        {
            var w = logits[i] >= threshold ? Weight(logits[i], max, invT) : 0f;
            if (w > 0)
            {
                last = i;
                acc += w;
                if (acc > target)
                {
                    return i;
                }
            }
        }

        return last >= 0 ? last : top;
    }

    /// <summary>The unnormalized weight of a logit: exp((x − max) / T); 0 for −infinity.</summary>
    private static float Weight(float x, float max, float invT) => MathF.Exp((x - max) * invT);

    /// <summary>The draw in [0, 1) for (<paramref name="seed"/>, <paramref name="draw"/>): 24 bits of SplitMix64(seed ^ SplitMix64(draw)); bit-identical to the kernel's.</summary>
    public static float Uniform(ulong seed, ulong draw)
    {
        var h = SplitMix64(seed ^ SplitMix64(draw));
        return (uint)(h >> 40) * (1.0f / 16777216.0f);
    }

    private static ulong SplitMix64(ulong x)
    {
        unchecked
        {
            x += 0x9E3779B97F4A7C15UL;
            x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9UL;
            x = (x ^ (x >> 27)) * 0x94D049BB133111EBUL;
            return x ^ (x >> 31);
        }
    }
}
