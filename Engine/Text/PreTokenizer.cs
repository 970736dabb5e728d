using System.Text.RegularExpressions;

namespace DeepSeekCuda.Text;

/// <summary>A slice of a string: pre-tokenization passes ranges around instead of substrings.</summary>
internal readonly record struct TextPiece(string Source, int Start, int Length)
{
    public ReadOnlySpan<char> Span => Source.AsSpan(Start, Length);
}

/// <summary>One stage of a Hugging Face pre-tokenizer pipeline.</summary>
internal abstract class PreTokenizerStep
{
    /// <summary>
    /// Splits <paramref name="piece"/>, appending the non-empty results to <paramref name="output"/>;
    /// <paramref name="hasSurrogates"/> says whether the text holds astral characters (selects the slower exact regex).
    /// </summary>
    public abstract void Apply(TextPiece piece, bool hasSurrogates, List<TextPiece> output);
}

/// <summary>
/// A regex split that matches by code point. Two compiled forms are kept: the exact one, and a
/// simpler one that is equivalent on text without surrogates (most text), which runs faster.
/// </summary>
internal sealed class RegexSplitStep : PreTokenizerStep
{
    /// <summary>
    /// How long one match may run. A sound pattern scans even a megabyte-long piece in milliseconds; a
    /// pattern that backtracks catastrophically (<c>(a+)+$</c>) would run for hours.
    /// </summary>
    public static readonly TimeSpan DefaultMatchTimeout = TimeSpan.FromSeconds(10);

    private readonly Regex _bmp;

    // The exact form has long surrogate-pair alternations that take a while to compile, and much
    // text never needs it; it is built on first use.
    private readonly Lazy<Regex> _astral;
    private readonly bool _removeMatches;
    private readonly string _pattern;
    private readonly string _file;
    private readonly string _where;

    /// <param name="onigPattern">The pattern as written in the file.</param>
    /// <param name="removeMatches">Drop the matches (behavior Removed) instead of keeping them as pieces.</param>
    /// <param name="file">The tokenizer file, and <paramref name="where"/> the step in it, named by a timeout.</param>
    /// <param name="where">The step's path in the file, e.g. <c>pre_tokenizer.pretokenizers[2]</c>.</param>
    /// <param name="matchTimeout">How long one match may run; null for <see cref="DefaultMatchTimeout"/>.</param>
    public RegexSplitStep(string onigPattern, bool removeMatches, string file, string where, TimeSpan? matchTimeout = null)
    {
        var timeout = matchTimeout ?? DefaultMatchTimeout;
        _bmp = CodePointRegex.Compile(CodePointRegex.Translate(onigPattern, astral: false), timeout);
        _astral = new Lazy<Regex>(
            () => CodePointRegex.Compile(CodePointRegex.Translate(onigPattern, astral: true), timeout),
            LazyThreadSafetyMode.ExecutionAndPublication);
        _removeMatches = removeMatches;
        _pattern = onigPattern;
        _file = file;
        _where = where;
    }

    public override void Apply(TextPiece piece, bool hasSurrogates, List<TextPiece> output)
    {
        try
        {
            Split(piece, hasSurrogates, output);
        }
        catch (RegexMatchTimeoutException ex)
        {
            throw new TokenizerFormatException(_file, $"{_where}: the pattern '{_pattern}' ran over {ex.MatchTimeout.TotalSeconds:0.###} s on a piece of {piece.Length} characters (it backtracks catastrophically); this tokenizer cannot encode that text", ex);
        }
    }

    private void Split(TextPiece piece, bool hasSurrogates, List<TextPiece> output)
    {
        // Checking each piece keeps astral characters in one place from slowing the whole text.
        var regex = hasSurrogates && piece.Span.ContainsAnyInRange('\uD800', '\uDFFF') ? _astral.Value : _bmp;
        var last = 0;
        foreach (var m in regex.EnumerateMatches(piece.Span))
        {
            if (m.Length == 0)
            {
                continue;
            }

            if (m.Index > last)
            {
                output.Add(new TextPiece(piece.Source, piece.Start + last, m.Index - last));
            }

            if (!_removeMatches)
            {
                output.Add(new TextPiece(piece.Source, piece.Start + m.Index, m.Length));
            }

            last = m.Index + m.Length;
        }

        if (last < piece.Length)
        {
            output.Add(new TextPiece(piece.Source, piece.Start + last, piece.Length - last));
        }
    }
}

/// <summary>
/// Hugging Face's ByteLevel pre-tokenizer. The byte mapping itself happens in the BPE model; here
/// only the optional prefix space and the optional GPT-2 split apply.
/// </summary>
internal sealed class ByteLevelStep : PreTokenizerStep
{
    /// <summary>The split Hugging Face's ByteLevel applies when <c>use_regex</c> is true.</summary>
    public const string Gpt2Pattern = @"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

    private readonly bool _addPrefixSpace;
    private readonly RegexSplitStep? _split;

    public ByteLevelStep(bool addPrefixSpace, bool useRegex, string file, string where)
    {
        _addPrefixSpace = addPrefixSpace;
        _split = useRegex ? new RegexSplitStep(Gpt2Pattern, removeMatches: false, file, where) : null;
    }

    public override void Apply(TextPiece piece, bool hasSurrogates, List<TextPiece> output)
    {
        // Hugging Face prepends the space to every piece that reaches this step, not only the first.
        if (_addPrefixSpace && piece.Span[0] != ' ')
        {
            var spaced = " " + piece.Span.ToString();
            piece = new TextPiece(spaced, 0, spaced.Length);
        }

        if (_split is null)
        {
            output.Add(piece);
        }
        else
        {
            _split.Apply(piece, hasSurrogates, output);
        }
    }
}

/// <summary>The pre-tokenizer pipeline: each step splits every piece the previous step produced.</summary>
internal sealed class PreTokenizer(PreTokenizerStep[] steps)
{
    /// <summary>Splits <paramref name="text"/>; returns whichever of the two lists holds the pieces.</summary>
    public List<TextPiece> Split(TextPiece text, bool hasSurrogates, List<TextPiece> a, List<TextPiece> b)
    {
        a.Clear();
        a.Add(text);
        foreach (var step in steps)
        {
            b.Clear();
            foreach (var piece in a)
            {
                step.Apply(piece, hasSurrogates, b);
            }

            (a, b) = (b, a);
        }

        return a;
    }
}
