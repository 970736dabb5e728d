namespace DeepSeekCuda.Inference;

/// <summary>
/// How tokens are chosen and when generation stops. Unset values take DeepSeek-R1's recommended
/// settings (temperature 0.6, top-p 0.95; MODEL.md §8), so a caller that sets nothing gets the
/// configuration R1 was evaluated with.
/// </summary>
public sealed record SamplingOptions
{
    /// <summary>R1's recommended temperature.</summary>
    public const float DefaultTemperature = 0.6f;

    /// <summary>R1's recommended nucleus threshold.</summary>
    public const float DefaultTopP = 0.95f;

    /// <summary>
    /// Temperatures below this sample greedily, as vLLM does (its sampling epsilon): the softmax is argmax
    /// there for any real logits, and 1/T stays finite above it, so every finite temperature has a defined result.
    /// </summary>
    public const float GreedyBelowTemperature = 1e-5f;

    /// <summary>Softmax temperature; 0 (or anything below <see cref="GreedyBelowTemperature"/>) means greedy (argmax, lowest id on ties). Null: <see cref="DefaultTemperature"/>.</summary>
    public float? Temperature { get; init; }

    /// <summary>Keep only the k most likely tokens; null or 0: no limit.</summary>
    public int? TopK { get; init; }

    /// <summary>Nucleus sampling threshold in (0, 1]; null: <see cref="DefaultTopP"/>; 1 disables it.</summary>
    public float? TopP { get; init; }

    /// <summary>Seed of the sampler's random generator; the same seed gives the same tokens. Null: a fresh random seed.</summary>
    public long? Seed { get; init; }

    /// <summary>The most tokens to generate (EOS included); null: until EOS, a stop sequence or a full context.</summary>
    public int? MaxTokens { get; init; }

    /// <summary>Texts that end generation when they appear in the output; the stop text is not returned.</summary>
    public IReadOnlyList<string>? StopSequences { get; init; }

    /// <summary>Greedy decoding: always the most likely token.</summary>
    public static SamplingOptions Greedy { get; } = new() { Temperature = 0 };

    /// <summary>The temperature in effect.</summary>
    public float EffectiveTemperature => Temperature ?? DefaultTemperature;

    /// <summary>The nucleus threshold in effect.</summary>
    public float EffectiveTopP => TopP ?? DefaultTopP;

    /// <summary>Whether decoding is deterministic argmax regardless of the seed.</summary>
    public bool IsGreedy => EffectiveTemperature < GreedyBelowTemperature || TopK == 1;

    /// <summary>Throws when a value is out of range.</summary>
    public void Validate()
    {
        if (Temperature is { } t && (!float.IsFinite(t) || t < 0))
        {
            throw new ArgumentOutOfRangeException(nameof(Temperature), t, "temperature must be finite and >= 0");
        }

        if (TopP is { } p && (float.IsNaN(p) || p <= 0 || p > 1))
        {
            throw new ArgumentOutOfRangeException(nameof(TopP), p, "top-p must be in (0, 1]");
        }

        if (TopK is < 0)
        {
            throw new ArgumentOutOfRangeException(nameof(TopK), TopK, "top-k must be >= 0");
        }

        if (MaxTokens is < 0)
        {
            throw new ArgumentOutOfRangeException(nameof(MaxTokens), MaxTokens, "max tokens must be >= 0");
        }

        if (StopSequences is not null && StopSequences.Any(string.IsNullOrEmpty))
        {
            throw new ArgumentException("stop sequences must not be empty", nameof(StopSequences));
        }
    }
}
