using DeepSeekCuda.Text;

namespace DeepSeekCuda.Inference;

/// <summary>
/// Finds stop sequences in streamed text. Text that could be the beginning of a stop sequence is held
/// back, so a stop sequence split across tokens is still found and none of it is ever emitted: any
/// occurrence starts inside the held-back part, never in text already released.
/// </summary>
internal sealed class StopSequenceMatcher(IReadOnlyList<string> stops)
{
    private string _pending = string.Empty;

    /// <summary>Whether a stop sequence has been seen.</summary>
    public bool Stopped { get; private set; }

    /// <summary>Adds text; returns the text now safe to emit (before the stop sequence, when one was found).</summary>
    public string Push(string text)
    {
        if (Stopped)
        {
            return string.Empty;
        }

        var pending = _pending + text;
        var first = -1;
        foreach (var stop in stops)
        {
            var i = pending.IndexOf(stop, StringComparison.Ordinal);
            if (i >= 0 && (first < 0 || i < first))
            {
                first = i;
            }
        }

        if (first >= 0)
        {
            Stopped = true;
            _pending = string.Empty;
            return pending[..first];
        }

        var hold = 0;
        foreach (var stop in stops)
        {
            hold = Math.Max(hold, PartialMarker.SuffixLength(pending, stop));
        }

        _pending = pending[(pending.Length - hold)..];
        return pending[..^hold];
    }

    /// <summary>Ends the stream: releases what was held back.</summary>
    public string Flush()
    {
        var rest = _pending;
        _pending = string.Empty;
        return rest;
    }
}
