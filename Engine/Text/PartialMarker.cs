namespace DeepSeekCuda.Text;

/// <summary>Streaming text scanners hold back the end of a chunk that may be the start of a marker the next chunk completes.</summary>
internal static class PartialMarker
{
    /// <summary>Length of the longest proper suffix of <paramref name="text"/> that begins <paramref name="marker"/> (0: none).</summary>
    public static int SuffixLength(ReadOnlySpan<char> text, string marker)
    {
        for (var n = Math.Min(marker.Length - 1, text.Length); n > 0; n--)
        {
            if (text[^n..].SequenceEqual(marker.AsSpan(0, n)))
            {
                return n;
            }
        }

        return 0;
    }
}
