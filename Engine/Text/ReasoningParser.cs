using System.Text;

namespace DeepSeekCuda.Text;

/// <summary>Whether generated text is the model's reasoning or its answer.</summary>
public enum TextKind
{
    /// <summary>The final answer (everything outside the think block).</summary>
    Answer,

    /// <summary>Text inside <c>&lt;think&gt;…&lt;/think&gt;</c>.</summary>
    Reasoning,
}

/// <summary>A run of generated text of one kind.</summary>
/// <param name="Kind">Reasoning or answer.</param>
/// <param name="Text">The text, never empty.</param>
public readonly record struct TextSegment(TextKind Kind, string Text);

/// <summary>
/// Splits streamed model output into reasoning and answer. The tags may arrive whole (R1's tokenizer has
/// <c>&lt;think&gt;</c> and <c>&lt;/think&gt;</c> as added tokens) or in pieces across deltas (V3's
/// tokenizer spells them <c>&lt;</c>, <c>think</c>, <c>&gt;</c>), so text that could still become a tag is
/// held back until it is decided; tags themselves are never emitted.
/// </summary>
/// <remarks>
/// DeepSeek models write one think block at the very start of the answer, so <c>&lt;think&gt;</c> is
/// recognized only before any non-whitespace answer text, and nothing is recognized after
/// <c>&lt;/think&gt;</c>: an answer that talks about the tags keeps them as text.
/// </remarks>
public sealed class ReasoningParser
{
    private enum State
    {
        BeforeThink,
        Reasoning,
        Answer,
    }

    private readonly StringBuilder _pending = new();
    private State _state;

    /// <summary>Creates a parser.</summary>
    /// <param name="startInReasoning">
    /// The prompt already opened the think block (R1's template ends with <c>&lt;think&gt;\n</c>), so output
    /// is reasoning until <c>&lt;/think&gt;</c>.
    /// </param>
    public ReasoningParser(bool startInReasoning = false)
    {
        _state = startInReasoning ? State.Reasoning : State.BeforeThink;
    }

    /// <summary>Whether text pushed now would be reasoning.</summary>
    public bool InReasoning => _state == State.Reasoning;

    /// <summary>Adds generated text; returns the segments that are now decided (possibly none).</summary>
    public IReadOnlyList<TextSegment> Push(string delta)
    {
        ArgumentNullException.ThrowIfNull(delta);
        _pending.Append(delta);
        var output = new List<TextSegment>();
        Drain(output);
        return output;
    }

    /// <summary>Ends the stream: whatever is held back is emitted as text of the current kind.</summary>
    public IReadOnlyList<TextSegment> Flush()
    {
        var output = new List<TextSegment>();
        Emit(output, _state == State.Reasoning ? TextKind.Reasoning : TextKind.Answer, _pending.ToString());
        _pending.Clear();
        return output;
    }

    private void Drain(List<TextSegment> output)
    {
        while (_pending.Length > 0)
        {
            var text = _pending.ToString();
            switch (_state)
            {
                case State.Answer:
                    Emit(output, TextKind.Answer, text);
                    _pending.Clear();
                    return;

                case State.Reasoning:
                {
                    var close = text.IndexOf(ChatTemplate.ThinkClose, StringComparison.Ordinal);
                    if (close >= 0)
                    {
                        Emit(output, TextKind.Reasoning, text[..close]);
                        _pending.Remove(0, close + ChatTemplate.ThinkClose.Length);
                        _state = State.Answer;
                        continue;
                    }

                    var hold = PartialMarker.SuffixLength(text, ChatTemplate.ThinkClose);
                    Emit(output, TextKind.Reasoning, text[..^hold]);
                    _pending.Remove(0, text.Length - hold);
                    return;
                }

                case State.BeforeThink:
                {
                    var start = 0;
                    while (start < text.Length && char.IsWhiteSpace(text[start]))
                    {
                        start++;
                    }

                    var rest = text.AsSpan(start);
                    if (rest.StartsWith(ChatTemplate.ThinkOpen, StringComparison.Ordinal))
                    {
                        // Leading whitespace before the tag is kept as answer text so no output is lost.
                        Emit(output, TextKind.Answer, text[..start]);
                        _pending.Remove(0, start + ChatTemplate.ThinkOpen.Length);
                        _state = State.Reasoning;
                        continue;
                    }

                    if (ChatTemplate.ThinkOpen.AsSpan().StartsWith(rest, StringComparison.Ordinal))
                    {
                        return; // only whitespace and maybe the start of "<think>" so far: undecided
                    }

                    _state = State.Answer;
                    continue;
                }
            }
        }
    }

    private static void Emit(List<TextSegment> output, TextKind kind, string text)
    {
        if (text.Length == 0)
        {
            return;
        }

        if (output.Count > 0 && output[^1].Kind == kind)
        {
            output[^1] = new TextSegment(kind, output[^1].Text + text);
        }
        else
        {
            output.Add(new TextSegment(kind, text));
        }
    }
}
