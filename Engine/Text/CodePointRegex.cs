using System.Globalization;
using System.Text;
using System.Text.RegularExpressions;

namespace DeepSeekCuda.Text;

/// <summary>
/// Translates an Oniguruma-style pattern (as written in tokenizer.json) into a .NET regex that
/// matches by code point, as Hugging Face's Rust tokenizers do. .NET matches UTF-16 code units, so
/// <c>\p{L}</c> would not match an astral letter and <c>[^\p{S}]</c> would match half of an emoji.
/// Each class, category escape, negated shorthand and <c>.</c> becomes an alternation of a BMP set
/// (surrogates excluded) and explicit surrogate pairs for the astral code points it contains.
/// </summary>
internal static class CodePointRegex
{
    private const string NoSurrogates = "-[\\uD800-\\uDFFF]";

    /// <summary>
    /// Translates <paramref name="pattern"/>. With <paramref name="astral"/> false the result is
    /// only valid on text without surrogates (it is simpler, hence faster, for that common case).
    /// </summary>
    /// <exception cref="ArgumentException">The pattern uses a construct that cannot be translated exactly.</exception>
    public static string Translate(string pattern, bool astral)
    {
        var sb = new StringBuilder(pattern.Length * 2);
        var i = 0;
        while (i < pattern.Length)
        {
            var c = pattern[i];
            if (c == '\\')
            {
                if (i + 1 >= pattern.Length)
                {
                    throw new ArgumentException("pattern ends with a lone backslash");
                }

                var e = pattern[i + 1];
                if (e is 'p' or 'P' or 'd' or 'D' or 'w' or 'W' or 'S' or 's')
                {
                    var item = ParseClassEscape(pattern, ref i);
                    var cls = item.Negated
                        ? new ClassSpec(true, [item with { Negated = false, Text = item.PositiveText }])
                        : new ClassSpec(false, [item]);
                    Emit(sb, cls, astral);
                    continue;
                }

                if (e == 'x' || e == 'u' || e == 'U' || e is 't' or 'n' or 'r' or 'f' or 'v' or 'a' or 'e' || !char.IsLetterOrDigit(e))
                {
                    var cp = ParseLiteral(pattern, ref i);
                    EmitLiteral(sb, cp);
                    continue;
                }

                // Anchors and the like (\b, \B, \A, \z, \G) mean the same in .NET.
                if (e is 'b' or 'B' or 'A' or 'z' or 'G')
                {
                    sb.Append('\\').Append(e);
                    i += 2;
                    continue;
                }

                throw new ArgumentException($"unsupported escape \\{e} in pattern");
            }

            if (c == '[')
            {
                var cls = ParseClass(pattern, ref i);
                Emit(sb, cls, astral);
                continue;
            }

            if (c == '.')
            {
                sb.Append(astral ? "(?:[^\\n\\uD800-\\uDFFF]|[\\uD800-\\uDBFF][\\uDC00-\\uDFFF])" : "[^\\n]");
                i++;
                continue;
            }

            if (char.IsHighSurrogate(c) && i + 1 < pattern.Length && char.IsLowSurrogate(pattern[i + 1]))
            {
                EmitLiteral(sb, char.ConvertToUtf32(c, pattern[i + 1]));
                i += 2;
                continue;
            }

            if (c == '(' && i + 2 < pattern.Length && pattern[i + 1] == '?' && pattern[i + 2] is 'i' or 'm' or 's' or 'x' or '-')
            {
                throw new ArgumentException("inline options are not supported in pattern");
            }

            sb.Append(c);
            i++;
        }

        return sb.ToString();
    }

    /// <summary>
    /// Builds the compiled regex for a translated pattern. Patterns come from tokenizer files and .NET's
    /// engine backtracks, so each match gives up after <paramref name="matchTimeout"/> (the non-backtracking
    /// engine would need no timeout but has no lookarounds, which DeepSeek's and GPT-2's patterns use).
    /// </summary>
    public static Regex Compile(string translated, TimeSpan matchTimeout) =>
        new(translated, RegexOptions.Compiled | RegexOptions.CultureInvariant, matchTimeout);

    // Text: the item as .NET class syntax (BMP semantics); PositiveText: the non-negated form,
    // for hoisting a top-level negation into the class.
    private readonly record struct ClassItem(ItemKind Kind, int Lo, int Hi, UnicodeCategory[]? Categories, bool Negated, string Text = "", string PositiveText = "");

    private enum ItemKind { Range, Categories, Space }

    private sealed record ClassSpec(bool Negated, List<ClassItem> Items);

    private static ClassSpec ParseClass(string p, ref int i)
    {
        i++; // '['
        var negated = false;
        if (i < p.Length && p[i] == '^')
        {
            negated = true;
            i++;
        }

        var items = new List<ClassItem>();
        var first = true;
        while (true)
        {
            if (i >= p.Length)
            {
                throw new ArgumentException("unterminated character class in pattern");
            }

            var c = p[i];
            if (c == ']' && !first)
            {
                i++;
                break;
            }

            first = false;
            if (c == '[')
            {
                throw new ArgumentException("nested character classes and POSIX brackets are not supported in pattern");
            }

            if (c == '&' && i + 1 < p.Length && p[i + 1] == '&')
            {
                throw new ArgumentException("class intersection (&&) is not supported in pattern");
            }

            if (c == '\\' && i + 1 < p.Length && p[i + 1] is 'p' or 'P' or 'd' or 'D' or 'w' or 'W' or 's' or 'S')
            {
                items.Add(ParseClassEscape(p, ref i));
                continue;
            }

            var lo = ParseLiteral(p, ref i);
            if (i + 1 < p.Length && p[i] == '-' && p[i + 1] != ']')
            {
                i++;
                if (p[i] == '\\' && i + 1 < p.Length && p[i + 1] is 'p' or 'P' or 'd' or 'D' or 'w' or 'W' or 's' or 'S')
                {
                    throw new ArgumentException("a range cannot end in a class escape in pattern");
                }

                var hi = ParseLiteral(p, ref i);
                if (hi < lo)
                {
                    throw new ArgumentException("reversed range in character class in pattern");
                }

                items.Add(new ClassItem(ItemKind.Range, lo, hi, null, false));
            }
            else
            {
                items.Add(new ClassItem(ItemKind.Range, lo, lo, null, false));
            }
        }

        return new ClassSpec(negated, items);
    }

    /// <summary>Parses one literal code point (raw, surrogate pair or escaped) and advances.</summary>
    private static int ParseLiteral(string p, ref int i)
    {
        var c = p[i];
        if (c != '\\')
        {
            if (char.IsHighSurrogate(c) && i + 1 < p.Length && char.IsLowSurrogate(p[i + 1]))
            {
                i += 2;
                return char.ConvertToUtf32(c, p[i - 1]);
            }

            i++;
            return c;
        }

        if (i + 1 >= p.Length)
        {
            throw new ArgumentException("pattern ends with a lone backslash");
        }

        var e = p[i + 1];
        i += 2;
        switch (e)
        {
            case 't': return '\t';
            case 'n': return '\n';
            case 'r': return '\r';
            case 'f': return '\f';
            case 'v': return '\v';
            case 'a': return '\a';
            case 'e': return '\u001B';
            case 'x':
                if (i < p.Length && p[i] == '{')
                {
                    var close = p.IndexOf('}', i);
                    if (close < 0)
                    {
                        throw new ArgumentException("unterminated \\x{...} in pattern");
                    }

                    var v = int.Parse(p.AsSpan(i + 1, close - i - 1), NumberStyles.HexNumber, CultureInfo.InvariantCulture);
                    i = close + 1;
                    return v;
                }

                return ReadHex(p, ref i, 2);
            case 'u': return ReadHex(p, ref i, 4);
            case 'U': return ReadHex(p, ref i, 8);
            default:
                if (char.IsLetterOrDigit(e))
                {
                    throw new ArgumentException($"unsupported escape \\{e} in pattern");
                }

                return e;
        }
    }

    private static int ReadHex(string p, ref int i, int digits)
    {
        if (i + digits > p.Length)
        {
            throw new ArgumentException("truncated hex escape in pattern");
        }

        var v = int.Parse(p.AsSpan(i, digits), NumberStyles.HexNumber, CultureInfo.InvariantCulture);
        i += digits;
        return v;
    }

    private static ClassItem ParseClassEscape(string p, ref int i)
    {
        var e = p[i + 1];
        i += 2;
        switch (e)
        {
            case 's': return new ClassItem(ItemKind.Space, 0, 0, null, false, "\\s", "\\s");
            case 'S': return new ClassItem(ItemKind.Space, 0, 0, null, true, "\\S", "\\s");
            case 'd': return new ClassItem(ItemKind.Categories, 0, 0, [UnicodeCategory.DecimalDigitNumber], false, "\\p{Nd}", "\\p{Nd}");
            case 'D': return new ClassItem(ItemKind.Categories, 0, 0, [UnicodeCategory.DecimalDigitNumber], true, "\\P{Nd}", "\\p{Nd}");
            case 'w': return new ClassItem(ItemKind.Categories, 0, 0, WordCategories, false, WordText, WordText);

            // Inside a class .NET's own \W is the closest expressible form (it differs from Oniguruma only on some marks).
            case 'W': return new ClassItem(ItemKind.Categories, 0, 0, WordCategories, true, "\\W", WordText);
        }

        // \p{X}, \P{X}, \pX; Oniguruma also allows \p{^X} for the complement.
        var negated = e == 'P';
        string name;
        if (i < p.Length && p[i] == '{')
        {
            var close = p.IndexOf('}', i);
            if (close < 0)
            {
                throw new ArgumentException("unterminated \\p{...} in pattern");
            }

            name = p.Substring(i + 1, close - i - 1);
            i = close + 1;
        }
        else if (i < p.Length)
        {
            name = p[i].ToString();
            i++;
        }
        else
        {
            throw new ArgumentException("pattern ends inside \\p");
        }

        if (name.StartsWith('^'))
        {
            negated = !negated;
            name = name[1..];
        }

        var cats = CategoriesFor(name);
        return new ClassItem(ItemKind.Categories, 0, 0, cats, negated, (negated ? "\\P{" : "\\p{") + name + "}", "\\p{" + name + "}");
    }

    private const string WordText = "\\p{L}\\p{M}\\p{Nd}\\p{Pc}";

    // Oniguruma's Unicode \w: Letter | Mark | Decimal_Number | Connector_Punctuation.
    private static readonly UnicodeCategory[] WordCategories =
    [
        UnicodeCategory.UppercaseLetter, UnicodeCategory.LowercaseLetter, UnicodeCategory.TitlecaseLetter,
        UnicodeCategory.ModifierLetter, UnicodeCategory.OtherLetter,
        UnicodeCategory.NonSpacingMark, UnicodeCategory.SpacingCombiningMark, UnicodeCategory.EnclosingMark,
        UnicodeCategory.DecimalDigitNumber, UnicodeCategory.ConnectorPunctuation,
    ];

    private static readonly (string Name, UnicodeCategory Category)[] CategoryNames =
    [
        ("Lu", UnicodeCategory.UppercaseLetter), ("Ll", UnicodeCategory.LowercaseLetter),
        ("Lt", UnicodeCategory.TitlecaseLetter), ("Lm", UnicodeCategory.ModifierLetter),
        ("Lo", UnicodeCategory.OtherLetter), ("Mn", UnicodeCategory.NonSpacingMark),
        ("Mc", UnicodeCategory.SpacingCombiningMark), ("Me", UnicodeCategory.EnclosingMark),
        ("Nd", UnicodeCategory.DecimalDigitNumber), ("Nl", UnicodeCategory.LetterNumber),
        ("No", UnicodeCategory.OtherNumber), ("Zs", UnicodeCategory.SpaceSeparator),
        ("Zl", UnicodeCategory.LineSeparator), ("Zp", UnicodeCategory.ParagraphSeparator),
        ("Cc", UnicodeCategory.Control), ("Cf", UnicodeCategory.Format),
        ("Cs", UnicodeCategory.Surrogate), ("Co", UnicodeCategory.PrivateUse),
        ("Pc", UnicodeCategory.ConnectorPunctuation), ("Pd", UnicodeCategory.DashPunctuation),
        ("Ps", UnicodeCategory.OpenPunctuation), ("Pe", UnicodeCategory.ClosePunctuation),
        ("Pi", UnicodeCategory.InitialQuotePunctuation), ("Pf", UnicodeCategory.FinalQuotePunctuation),
        ("Po", UnicodeCategory.OtherPunctuation), ("Sm", UnicodeCategory.MathSymbol),
        ("Sc", UnicodeCategory.CurrencySymbol), ("Sk", UnicodeCategory.ModifierSymbol),
        ("So", UnicodeCategory.OtherSymbol), ("Cn", UnicodeCategory.OtherNotAssigned),
    ];

    private static UnicodeCategory[] CategoriesFor(string name)
    {
        var found = CategoryNames.Where(c => c.Name == name || (name.Length == 1 && c.Name[0] == name[0])).Select(c => c.Category).ToArray();
        if (found.Length == 0)
        {
            throw new ArgumentException($"unsupported Unicode property \\p{{{name}}} in pattern (only general categories are supported)");
        }

        return found;
    }

    private static bool Contains(ClassSpec cls, int cp)
    {
        var hit = false;
        foreach (var item in cls.Items)
        {
            var m = item.Kind switch
            {
                ItemKind.Range => cp >= item.Lo && cp <= item.Hi,
                ItemKind.Space => Rune.IsWhiteSpace(new Rune(cp)) != item.Negated,
                _ => Array.IndexOf(item.Categories!, CharUnicodeInfo.GetUnicodeCategory(cp)) >= 0 != item.Negated,
            };
            if (m)
            {
                hit = true;
                break;
            }
        }

        return hit != cls.Negated;
    }

    private static void Emit(StringBuilder sb, ClassSpec cls, bool astral)
    {
        var bmp = new StringBuilder();
        foreach (var item in cls.Items)
        {
            if (item.Kind == ItemKind.Range)
            {
                if (item.Lo <= 0xFFFF)
                {
                    AppendBmpChar(bmp, item.Lo);
                    if (item.Hi > item.Lo)
                    {
                        bmp.Append('-');
                        AppendBmpChar(bmp, Math.Min(item.Hi, 0xFFFF));
                    }
                }
            }
            else
            {
                bmp.Append(item.Text);
            }
        }

        // Subtracting the surrogate block keeps a BMP set from matching half of a pair;
        // subtraction is slow in .NET, so it is only added where the set could otherwise match one.
        var couldMatchSurrogate = cls.Negated || cls.Items.Any(it =>
            it.Negated
            || (it.Kind == ItemKind.Range && it.Lo <= 0xDFFF && it.Hi >= 0xD800)
            || (it.Kind == ItemKind.Categories && it.Categories!.Contains(UnicodeCategory.Surrogate)));
        string? bmpSet = cls.Negated || bmp.Length > 0
            ? "[" + (cls.Negated ? "^" : "") + bmp + (astral && couldMatchSurrogate ? NoSurrogates : "") + "]"
            : null;
        var pairs = astral ? AstralAlternatives(cls) : [];
        if (pairs.Count == 0)
        {
            sb.Append(bmpSet ?? "(?!)");
            return;
        }

        sb.Append("(?:");
        if (bmpSet is not null)
        {
            sb.Append(bmpSet).Append('|');
        }

        sb.Append(string.Join('|', pairs)).Append(')');
    }

    private static void AppendBmpChar(StringBuilder sb, int c) => sb.Append("\\u").Append(c.ToString("X4", CultureInfo.InvariantCulture));

    private static void EmitLiteral(StringBuilder sb, int cp)
    {
        if (cp <= 0xFFFF)
        {
            AppendBmpChar(sb, cp);
            return;
        }

        var s = char.ConvertFromUtf32(cp);
        sb.Append("(?:");
        AppendBmpChar(sb, s[0]);
        AppendBmpChar(sb, s[1]);
        sb.Append(')');
    }

    /// <summary>
    /// Astral members of the class as surrogate-pair alternatives, one per run of high surrogates
    /// sharing the same low-surrogate set, so the alternation stays short.
    /// </summary>
    private static List<string> AstralAlternatives(ClassSpec cls)
    {
        var result = new List<string>();
        string? prevLow = null;
        var runStart = -1;
        var prevHigh = -1;
        var low = new StringBuilder();
        for (var high = 0xD800; high <= 0xDBFF; high++)
        {
            low.Clear();
            var baseCp = 0x10000 + ((high - 0xD800) << 10);
            var start = -1;
            for (var l = 0; l <= 0x400; l++)
            {
                var inSet = l < 0x400 && Contains(cls, baseCp + l);
                if (inSet && start < 0)
                {
                    start = l;
                }
                else if (!inSet && start >= 0)
                {
                    AppendBmpChar(low, 0xDC00 + start);
                    if (l - 1 > start)
                    {
                        low.Append('-');
                        AppendBmpChar(low, 0xDC00 + l - 1);
                    }

                    start = -1;
                }
            }

            var lowSet = low.Length == 0 ? null : low.ToString();
            if (lowSet != prevLow)
            {
                Flush();
                runStart = high;
                prevLow = lowSet;
            }

            prevHigh = high;
        }

        Flush();
        return result;

        void Flush()
        {
            if (prevLow is null || runStart < 0)
            {
                return;
            }

            var highText = new StringBuilder();
            AppendBmpChar(highText, runStart);
            if (prevHigh > runStart)
            {
                highText.Insert(0, '[').Append('-');
                AppendBmpChar(highText, prevHigh);
                highText.Append(']');
            }

            result.Add(highText + "[" + prevLow + "]");
        }
    }
}
