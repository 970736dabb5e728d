using DeepSeekCuda.Text;

namespace DeepSeekCuda.Inference;

/// <summary>Why generation ended.</summary>
/// <remarks>There is no "cancelled": cancellation surfaces as <see cref="OperationCanceledException"/>.</remarks>
public enum FinishReason
{
    /// <summary>A stop sequence appeared.</summary>
    Stop,

    /// <summary><see cref="SamplingOptions.MaxTokens"/> reached, or the context is full.</summary>
    Length,

    /// <summary>The model produced the end-of-sentence token.</summary>
    EndOfSequence,
}

/// <summary>How generated text is split into reasoning and answer.</summary>
public enum ReasoningMode
{
    /// <summary>All text is answer.</summary>
    None,

    /// <summary>A <c>&lt;think&gt;…&lt;/think&gt;</c> block at the start of the output is reasoning.</summary>
    Detect,

    /// <summary>The prompt already opened the think block (R1 template): output is reasoning until <c>&lt;/think&gt;</c>.</summary>
    StartInReasoning,
}

/// <summary>Token counts of one generation.</summary>
/// <param name="PromptTokens">Tokens of the prompt.</param>
/// <param name="GeneratedTokens">Tokens sampled, the final EOS included (it cost a forward pass like any other).</param>
public readonly record struct GenerationUsage(int PromptTokens, int GeneratedTokens)
{
    /// <summary>Prompt and generated tokens.</summary>
    public int TotalTokens => PromptTokens + GeneratedTokens;
}

/// <summary>One step of streamed generation.</summary>
/// <param name="TokenId">The token sampled at this step, or null for text released at the end and for the final update.</param>
/// <param name="Text">Text now decided (may be empty: held back as a partial character, tag or stop sequence).</param>
/// <param name="Kind">Whether <paramref name="Text"/> is reasoning or answer.</param>
/// <param name="FinishReason">Set on the last update only.</param>
/// <param name="Usage">Counts so far.</param>
public sealed record GenerationUpdate(int? TokenId, string Text, TextKind Kind, FinishReason? FinishReason, GenerationUsage Usage);

/// <summary>A finished generation.</summary>
/// <param name="Text">All emitted text, reasoning and answer, in order (tags removed when reasoning is parsed).</param>
/// <param name="Reasoning">The reasoning text.</param>
/// <param name="Answer">The answer text.</param>
/// <param name="TokenIds">The sampled tokens (EOS included when it ended generation).</param>
/// <param name="FinishReason">Why it ended.</param>
/// <param name="Usage">Token counts.</param>
public sealed record GenerationResult(string Text, string Reasoning, string Answer, IReadOnlyList<int> TokenIds, FinishReason FinishReason, GenerationUsage Usage);
