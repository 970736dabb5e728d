using System.Buffers;
using System.Globalization;
using System.Text;

namespace DeepSeekCuda.Text;

/// <summary>An entry of tokenizer.json's <c>added_tokens</c>.</summary>
/// <param name="Id">Token id.</param>
/// <param name="Content">The literal text.</param>
/// <param name="Special">Whether it is a special (control) token.</param>
/// <param name="SingleWord">Match only when not inside a word.</param>
/// <param name="LStrip">The match absorbs whitespace to its left.</param>
/// <param name="RStrip">The match absorbs whitespace to its right.</param>
/// <param name="Normalized">Matched against normalized text (after the non-normalized tokens).</param>
public sealed record AddedToken(int Id, string Content, bool Special, bool SingleWord, bool LStrip, bool RStrip, bool Normalized);

/// <summary>A run of text: either an added token (<see cref="Id"/> ≥ 0) or text to pre-tokenize (-1).</summary>
internal readonly record struct Segment(int Start, int Length, int Id);

/// <summary>
/// Finds added tokens in raw text as Hugging Face's AddedVocabulary does: non-overlapping,
/// leftmost then longest (Aho-Corasick LeftmostLongest), with single_word/lstrip/rstrip applied.
/// </summary>
internal sealed class AddedTokenMatcher
{
    private sealed class Node
    {
        public Dictionary<char, Node>? Children;
        public int Token = -1;
    }

    private readonly Node _root = new();
    private readonly AddedToken[] _tokens;
    private readonly SearchValues<char> _firstChars;

    public AddedTokenMatcher(IEnumerable<AddedToken> tokens)
    {
        _tokens = tokens.Where(t => t.Content.Length > 0).ToArray();
        var first = new HashSet<char>();
        for (var t = 0; t < _tokens.Length; t++)
        {
            var node = _root;
            foreach (var c in _tokens[t].Content)
            {
                node.Children ??= [];
                if (!node.Children.TryGetValue(c, out var child))
                {
                    child = new Node();
                    node.Children[c] = child;
                }

                node = child;
            }

            // A duplicate content keeps the first entry, as a map from content would.
            if (node.Token < 0)
            {
                node.Token = t;
            }

            first.Add(_tokens[t].Content[0]);
        }

        _firstChars = SearchValues.Create(first.ToArray());
    }

    public bool IsEmpty => _tokens.Length == 0;

    /// <summary>Splits <c>text[start..start+length)</c> into token and text segments, appended to <paramref name="output"/>.</summary>
    public void Split(string text, int start, int length, List<Segment> output)
    {
        var end = start + length;
        var offset = start;
        var pos = start;
        while (pos < end)
        {
            var idx = text.AsSpan(pos, end - pos).IndexOfAny(_firstChars);
            if (idx < 0)
            {
                break;
            }

            var i = pos + idx;
            var node = _root;
            var best = -1;
            var bestEnd = -1;
            for (var j = i; j < end && node.Children is not null && node.Children.TryGetValue(text[j], out node); j++)
            {
                if (node.Token >= 0)
                {
                    best = node.Token;
                    bestEnd = j + 1;
                }
            }

            if (best < 0)
            {
                pos = i + 1;
                continue;
            }

            var token = _tokens[best];
            var mStart = i;
            var mEnd = bestEnd;
            pos = mEnd;
            if (token.SingleWord && ((mStart > start && IsWordCharBefore(text, mStart, start)) || (mEnd < end && IsWordCharAt(text, mEnd))))
            {
                continue;
            }

            if (token.LStrip)
            {
                while (mStart > offset && IsWhiteSpaceBefore(text, mStart, out var width))
                {
                    mStart -= width;
                }
            }

            if (token.RStrip)
            {
                while (mEnd < end && IsWhiteSpaceAt(text, mEnd, out var width))
                {
                    mEnd += width;
                }

                pos = mEnd;
            }

            if (mStart > offset)
            {
                output.Add(new Segment(offset, mStart - offset, -1));
            }

            output.Add(new Segment(mStart, mEnd - mStart, token.Id));
            offset = mEnd;
        }

        if (offset < end)
        {
            output.Add(new Segment(offset, end - offset, -1));
        }
    }

    private static bool IsWord(Rune r)
    {
        var cat = Rune.GetUnicodeCategory(r);
        return Rune.IsLetter(r) || cat is UnicodeCategory.NonSpacingMark or UnicodeCategory.SpacingCombiningMark
            or UnicodeCategory.EnclosingMark or UnicodeCategory.DecimalDigitNumber or UnicodeCategory.ConnectorPunctuation;
    }

    private static bool IsWordCharAt(string text, int i) =>
        Rune.DecodeFromUtf16(text.AsSpan(i), out var r, out _) == OperationStatus.Done && IsWord(r);

    private static bool IsWordCharBefore(string text, int i, int start) =>
        Rune.DecodeLastFromUtf16(text.AsSpan(start, i - start), out var r, out _) == OperationStatus.Done && IsWord(r);

    private static bool IsWhiteSpaceAt(string text, int i, out int width) =>
        Rune.DecodeFromUtf16(text.AsSpan(i), out var r, out width) == OperationStatus.Done && Rune.IsWhiteSpace(r);

    private static bool IsWhiteSpaceBefore(string text, int i, out int width) =>
        Rune.DecodeLastFromUtf16(text.AsSpan(0, i), out var r, out width) == OperationStatus.Done && Rune.IsWhiteSpace(r);
}
