using System.Text;
using System.Text.Json;

namespace DeepSeekCuda.Text;

/// <summary>Something <see cref="ToolCallParser"/> recognized in the model's output.</summary>
public abstract record ToolCallEvent;

/// <summary>Ordinary output text, before, between or after tool-call blocks; never empty.</summary>
/// <param name="Text">The text.</param>
public sealed record ToolCallText(string Text) : ToolCallEvent;

/// <summary>A tool call whose name is complete; its arguments follow as <see cref="ToolCallArgumentsDelta"/>s.</summary>
/// <param name="Index">The call's number in the output, from 0 (across blocks).</param>
/// <param name="Name">The function name, trimmed.</param>
/// <param name="Type">What the model wrote before <c>&lt;｜tool▁sep｜&gt;</c>, trimmed (normally "function"; kept as written).</param>
public sealed record ToolCallStarted(int Index, string Name, string Type) : ToolCallEvent;

/// <summary>More of a call's arguments, as streamed (without the <c>```json</c> fence); never empty.</summary>
/// <param name="Index">The call's number.</param>
/// <param name="Delta">The next piece of the arguments' JSON text.</param>
public sealed record ToolCallArgumentsDelta(int Index, string Delta) : ToolCallEvent;

/// <summary>
/// A finished call. The deltas of the call concatenate to <paramref name="Arguments"/> (empty arguments are
/// sent as one delta <c>{}</c>).
/// </summary>
/// <param name="Index">The call's number.</param>
/// <param name="Name">The function name.</param>
/// <param name="Arguments">The arguments' JSON text as written (<c>{}</c> when the model wrote none).</param>
/// <param name="Type">The call's type, as in <see cref="ToolCallStarted"/>.</param>
/// <param name="ArgumentsValid">Whether <paramref name="Arguments"/> parses as one JSON object; if not, the text is the model's, unchanged.</param>
public sealed record ToolCallCompleted(int Index, string Name, string Arguments, string Type, bool ArgumentsValid) : ToolCallEvent;

/// <summary>
/// Finds DeepSeek-V3/R1 tool calls in streamed output text:
/// <c>&lt;｜tool▁calls▁begin｜&gt;&lt;｜tool▁call▁begin｜&gt;function&lt;｜tool▁sep｜&gt;NAME\n```json\n{ARGS}\n```&lt;｜tool▁call▁end｜&gt;</c>,
/// more calls (optionally after "\n"), then <c>&lt;｜tool▁calls▁end｜&gt;</c> (the format of
/// <see cref="ChatTemplate"/>'s past calls). The markers are non-special added tokens, so they arrive in
/// the decoded text, whole or split across pushes; text that could still become a marker (or the end of
/// a call's arguments) is held back until it is decided, and everything else is reported at once.
/// The events do not depend on how the text is split.
/// </summary>
/// <remarks>
/// Lenient where models are: the fence may be missing (bare JSON after the name) or spaced
/// (<c>``` json</c>); a marker inside a JSON string of the arguments is text; a call may end at
/// <c>&lt;｜tool▁calls▁end｜&gt;</c> or at the next <c>&lt;｜tool▁call▁begin｜&gt;</c> without its own end
/// marker; a block may end without <c>&lt;｜tool▁calls▁end｜&gt;</c> (text after it is text). Nothing is
/// dropped except the markers, the fences and the whitespace between calls: a block or call that breaks
/// off before its name is complete is given back as text, and invalid arguments are reported with
/// <see cref="ToolCallCompleted.ArgumentsValid"/> false. Nothing throws.
/// <para>
/// Feed it the answer text, after <see cref="ReasoningParser"/> has taken out R1's reasoning: a block
/// the model only thinks about is not a call. Only a block opened by <c>&lt;｜tool▁calls▁begin｜&gt;</c> is
/// recognized. One instance per stream; not thread-safe.
/// </para>
/// </remarks>
public sealed class ToolCallParser
{
    private const int MaxTypeLength = 64;
    private const int MaxNameLength = 256;
    private const string Fence = "```";

    // Markers that end a call's arguments when they appear outside a JSON string.
    private static readonly string[] CallEnders = [ChatTemplate.ToolCallEnd, ChatTemplate.ToolCallsEnd, ChatTemplate.ToolCallBegin];

    private enum State
    {
        Text,
        BetweenCalls,
        Type,
        Name,
        FenceOpen,
        Arguments,
    }

    private readonly StringBuilder _pending = new();
    private readonly StringBuilder _unit = new();   // raw text of a block or call not yet started: given back if it breaks off
    private readonly StringBuilder _arguments = new();
    private State _state;
    private int _callsInBlock;
    private int _nextIndex;
    private string _type = string.Empty;
    private string _name = string.Empty;
    private bool _inString;
    private bool _escaped;

    /// <summary>Adds output text; returns the events it decides (possibly none).</summary>
    public IReadOnlyList<ToolCallEvent> Push(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        _pending.Append(text);
        var output = new List<ToolCallEvent>();
        Drain(output);
        return output;
    }

    /// <summary>
    /// Ends the stream. Held-back text is emitted as text; a call whose name was complete is completed with
    /// the arguments so far (a closing fence dropped), valid or not; a block or call that broke off earlier
    /// is given back as text. The parser is then ready for a new stream.
    /// </summary>
    public IReadOnlyList<ToolCallEvent> Flush()
    {
        var output = new List<ToolCallEvent>();
        var rest = _pending.ToString();
        _pending.Clear();
        switch (_state)
        {
            case State.Text:
                EmitText(output, rest);
                break;
            case State.BetweenCalls when _callsInBlock > 0:
                // The block's <｜tool▁calls▁end｜> is missing: forgiven. Separators after the last call are dropped.
                if (!rest.AsSpan().Trim().IsEmpty)
                {
                    EmitText(output, rest);
                }

                break;
            case State.BetweenCalls or State.Type or State.Name:
                EmitText(output, _unit + rest);
                break;
            case State.FenceOpen:
                Complete(output);
                break;
            case State.Arguments:
                // The held tail is a possible closing: dropped when it is only whitespace and a closing fence.
                if (!IsFenceTail(rest))
                {
                    AppendArguments(output, rest);
                }

                Complete(output);
                break;
        }

        _state = State.Text;
        _unit.Clear();
        _callsInBlock = 0;
        _nextIndex = 0;
        return output;
    }

    private void Drain(List<ToolCallEvent> output)
    {
        while (_pending.Length > 0)
        {
            var text = _pending.ToString();
            var progressed = _state switch
            {
                State.Text => OnText(output, text),
                State.BetweenCalls => OnBetweenCalls(output, text),
                State.Type => OnType(output, text),
                State.Name => OnName(output, text),
                State.FenceOpen => OnFenceOpen(text),
                _ => OnArguments(output, text),
            };
            if (!progressed)
            {
                return;
            }
        }
    }

    private bool OnText(List<ToolCallEvent> output, string text)
    {
        var begin = text.IndexOf(ChatTemplate.ToolCallsBegin, StringComparison.Ordinal);
        if (begin < 0)
        {
            var hold = PartialMarker.SuffixLength(text, ChatTemplate.ToolCallsBegin);
            EmitText(output, text[..^hold]);
            _pending.Remove(0, text.Length - hold);
            return false;
        }

        EmitText(output, text[..begin]);
        Consume(begin + ChatTemplate.ToolCallsBegin.Length, text);
        _state = State.BetweenCalls;
        _callsInBlock = 0;
        return true;
    }

    private bool OnBetweenCalls(List<ToolCallEvent> output, string text)
    {
        var start = 0;
        while (start < text.Length && char.IsWhiteSpace(text[start]))
        {
            start++;
        }

        var rest = text.AsSpan(start);
        if (rest.StartsWith(ChatTemplate.ToolCallBegin, StringComparison.Ordinal))
        {
            Consume(start + ChatTemplate.ToolCallBegin.Length, text);
            _state = State.Type;
            return true;
        }

        if (rest.StartsWith(ChatTemplate.ToolCallsEnd, StringComparison.Ordinal))
        {
            _pending.Remove(0, start + ChatTemplate.ToolCallsEnd.Length);
            _unit.Clear();
            _state = State.Text;
            return true;
        }

        if (rest.IsEmpty || IsPrefixOf(rest, ChatTemplate.ToolCallBegin) || IsPrefixOf(rest, ChatTemplate.ToolCallsEnd))
        {
            return false;
        }

        // Something else: the block ended without its end marker (or never held a call). What is pending
        // stays and is read as text; a block without calls is given back whole.
        GiveBack(output);
        return true;
    }

    private bool OnType(List<ToolCallEvent> output, string text)
    {
        for (var i = 0; i < text.Length; i++)
        {
            if (i > MaxTypeLength || text[i] == '\n')
            {
                GiveBack(output);
                return true;
            }

            if (text[i] != '<')
            {
                continue;
            }

            var rest = text.AsSpan(i);
            if (rest.StartsWith(ChatTemplate.ToolSep, StringComparison.Ordinal))
            {
                _type = text[..i].Trim();
                Consume(i + ChatTemplate.ToolSep.Length, text);
                _state = State.Name;
                return true;
            }

            if (!IsPrefixOf(rest, ChatTemplate.ToolSep))
            {
                GiveBack(output);
                return true;
            }

            return false; // a split <｜tool▁sep｜>
        }

        return false;
    }

    private bool OnName(List<ToolCallEvent> output, string text)
    {
        // The name ends where its arguments can begin: the newline, a fence, bare JSON, or a marker.
        var end = text.AsSpan().IndexOfAny("\n`{[<");
        if (end < 0 || end > MaxNameLength)
        {
            if (end > MaxNameLength || text.Length > MaxNameLength)
            {
                GiveBack(output);
                return true;
            }

            return false;
        }

        _name = text[..end].Trim();
        _pending.Remove(0, end);
        _unit.Clear();
        _arguments.Clear();
        _inString = _escaped = false;
        output.Add(new ToolCallStarted(_nextIndex, _name, _type));
        _state = State.FenceOpen;
        return true;
    }

    private bool OnFenceOpen(string text)
    {
        var i = 0;
        while (i < text.Length && char.IsWhiteSpace(text[i]))
        {
            i++;
        }

        if (i == text.Length || (text.Length - i < Fence.Length && Fence.AsSpan().StartsWith(text.AsSpan(i), StringComparison.Ordinal)))
        {
            return false;
        }

        if (string.CompareOrdinal(text, i, Fence, 0, Fence.Length) == 0)
        {
            // ``` [ \t]* language? [ \t]* newline? — wait for the first character that is none of these.
            var j = i + Fence.Length;
            while (j < text.Length && text[j] is ' ' or '\t')
            {
                j++;
            }

            while (j < text.Length && char.IsAsciiLetter(text[j]))
            {
                j++;
            }

            while (j < text.Length && text[j] is ' ' or '\t' or '\r')
            {
                j++;
            }

            if (j == text.Length)
            {
                return false;
            }

            i = text[j] == '\n' ? j + 1 : j;
        }

        _pending.Remove(0, i);
        _state = State.Arguments;
        return true;
    }

    private bool OnArguments(List<ToolCallEvent> output, string text)
    {
        var i = 0;
        for (; i < text.Length; i++)
        {
            var c = text[i];
            if (_inString)
            {
                if (_escaped)
                {
                    _escaped = false;
                }
                else if (c == '\\')
                {
                    _escaped = true;
                }
                else if (c == '"')
                {
                    _inString = false;
                }

                continue;
            }

            if (c == '"')
            {
                _inString = true;
                continue;
            }

            if (!char.IsWhiteSpace(c) && c is not '`' and not '<')
            {
                continue;
            }

            var (decided, marker, end) = Closing(text, i);
            if (!decided)
            {
                AppendArguments(output, text[..i]);
                _pending.Remove(0, i);
                return false;
            }

            if (marker is null)
            {
                continue;
            }

            AppendArguments(output, text[..i]);
            _pending.Remove(0, end);
            Complete(output);
            if (marker == ChatTemplate.ToolCallEnd)
            {
                _state = State.BetweenCalls;
            }
            else if (marker == ChatTemplate.ToolCallBegin)
            {
                _unit.Append(marker);
                _state = State.Type;
            }
            else
            {
                _state = State.Text;
            }

            return true;
        }

        AppendArguments(output, text);
        _pending.Clear();
        return false;
    }

    /// <summary>
    /// Whether the arguments end at <paramref name="pos"/>: whitespace, an optional closing fence, whitespace,
    /// then a marker that ends a call. Not decided while the text so far could still become that.
    /// </summary>
    private static (bool Decided, string? Marker, int End) Closing(string text, int pos)
    {
        var i = SkipWhiteSpace(text, pos);
        var ticks = 0;
        while (i < text.Length && text[i] == '`')
        {
            i++;
            ticks++;
        }

        if (ticks > Fence.Length || (ticks is > 0 and < 3 && i < text.Length))
        {
            return (true, null, 0);
        }

        i = SkipWhiteSpace(text, i);
        var rest = text.AsSpan(i);
        if (rest.IsEmpty)
        {
            return (false, null, 0);
        }

        foreach (var marker in CallEnders)
        {
            if (rest.StartsWith(marker, StringComparison.Ordinal))
            {
                return (true, marker, i + marker.Length);
            }

            if (IsPrefixOf(rest, marker))
            {
                return (false, null, 0);
            }
        }

        return (true, null, 0);
    }

    private void AppendArguments(List<ToolCallEvent> output, string text)
    {
        if (text.Length == 0)
        {
            return;
        }

        _arguments.Append(text);
        if (output.Count > 0 && output[^1] is ToolCallArgumentsDelta last && last.Index == _nextIndex)
        {
            output[^1] = last with { Delta = last.Delta + text };
        }
        else
        {
            output.Add(new ToolCallArgumentsDelta(_nextIndex, text));
        }
    }

    private void Complete(List<ToolCallEvent> output)
    {
        if (_arguments.ToString().AsSpan().Trim().IsEmpty)
        {
            _arguments.Clear();
            AppendArguments(output, "{}");
        }

        var arguments = _arguments.ToString();
        output.Add(new ToolCallCompleted(_nextIndex, _name, arguments, _type, IsJsonObject(arguments)));
        _nextIndex++;
        _callsInBlock++;
        _arguments.Clear();
        _unit.Clear();
    }

    private static bool IsJsonObject(string text)
    {
        try
        {
            using var doc = JsonDocument.Parse(text);
            return doc.RootElement.ValueKind == JsonValueKind.Object;
        }
        catch (JsonException)
        {
            return false;
        }
    }

    /// <summary>Moves <paramref name="count"/> characters of <paramref name="text"/> (the pending text) into the unit.</summary>
    private void Consume(int count, string text)
    {
        _unit.Append(text, 0, count);
        _pending.Remove(0, count);
    }

    /// <summary>The block or call broke off before a call started: its raw text becomes text, and so does what is pending.</summary>
    private void GiveBack(List<ToolCallEvent> output)
    {
        EmitText(output, _unit.ToString());
        _unit.Clear();
        _state = State.Text;
    }

    /// <summary>Whether <paramref name="text"/> is whitespace, at most one fence, whitespace.</summary>
    private static bool IsFenceTail(string text)
    {
        var rest = text.AsSpan().Trim();
        return rest.IsEmpty || rest.SequenceEqual(Fence);
    }

    private static int SkipWhiteSpace(string text, int i)
    {
        while (i < text.Length && char.IsWhiteSpace(text[i]))
        {
            i++;
        }

        return i;
    }

    /// <summary>Whether <paramref name="text"/> is a proper prefix of <paramref name="marker"/>.</summary>
    private static bool IsPrefixOf(ReadOnlySpan<char> text, string marker) =>
        text.Length < marker.Length && marker.AsSpan().StartsWith(text, StringComparison.Ordinal);

    private static void EmitText(List<ToolCallEvent> output, string text)
    {
        if (text.Length == 0)
        {
            return;
        }

        if (output.Count > 0 && output[^1] is ToolCallText last)
        {
            output[^1] = new ToolCallText(last.Text + text);
        }
        else
        {
            output.Add(new ToolCallText(text));
        }
    }
}
