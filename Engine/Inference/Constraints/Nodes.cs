namespace DeepSeekCuda.Inference.Constraints;

/// <summary>Exactly these bytes; data is how many matched.</summary>
internal sealed class LiteralLeaf(byte[] bytes) : Leaf
{
    public byte[] Bytes => bytes;

    public override int Step(int data, byte b) => data < bytes.Length && bytes[data] == b ? data + 1 : -1;

    public override bool CanFinish(int data) => data == bytes.Length;

    public override bool CanContinue(int data) => data < bytes.Length;
}

/// <summary>
/// Optional JSON whitespace (space, tab, LF, CR), at most <see cref="MaxRun"/> bytes in a row, so a
/// constrained model cannot spend its whole budget on indentation; data is the run so far.
/// </summary>
internal sealed class WhitespaceLeaf : Leaf
{
    /// <summary>The longest whitespace run allowed between two JSON tokens (enough for pretty printing ~15 levels deep).</summary>
    public const int MaxRun = 32;

    public static readonly WhitespaceLeaf Instance = new();

    public override int Step(int data, byte b) => data < MaxRun && b is (byte)' ' or (byte)'\t' or (byte)'\n' or (byte)'\r' ? data + 1 : -1;

    public override bool CanFinish(int data) => true;

    public override bool CanContinue(int data) => data < MaxRun;
}

/// <summary>
/// A JSON string, quotes included: valid UTF-8 (no overlong forms, no surrogates, nothing past U+10FFFF),
/// no raw control characters, only JSON's escapes, and a \u escape of a high surrogate must be followed by
/// one of a low surrogate (so the text decodes to valid UTF-16).
/// </summary>
internal sealed class JsonStringLeaf : Leaf
{
    public static readonly JsonStringLeaf Instance = new();

    // data: mode in bits 0-3; in Hex mode, the digit count in bits 4-6, "first digit was D" in bit 7,
    // "a high surrogate so far" in bit 8, "this escape must be a low surrogate" in bit 9.
    private const int Open = 0, Body = 1, Escape = 2, Hex = 3, LowBackslash = 4, LowU = 5, Cont1 = 6, Cont2 = 7, Cont3 = 8,
        AfterE0 = 9, AfterED = 10, AfterF0 = 11, AfterF4 = 12, Closed = 13;

    public override int Step(int data, byte b)
    {
        switch (data & 15)
        {
            case Open:
                return b == '"' ? Body : -1;
            case Body:
                return b switch
                {
                    (byte)'"' => Closed,
                    (byte)'\\' => Escape,
                    < 0x20 => -1,
                    < 0x80 => Body,
                    >= 0xC2 and <= 0xDF => Cont1,
                    0xE0 => AfterE0,
                    0xED => AfterED,
                    >= 0xE1 and <= 0xEF => Cont2,
                    0xF0 => AfterF0,
                    >= 0xF1 and <= 0xF3 => Cont3,
                    0xF4 => AfterF4,
                    _ => -1,
                };
            case Escape:
                return b switch
                {
                    (byte)'"' or (byte)'\\' or (byte)'/' or (byte)'b' or (byte)'f' or (byte)'n' or (byte)'r' or (byte)'t' => Body,
                    (byte)'u' => Hex,
                    _ => -1,
                };
            case Hex:
                return StepHex(data, b);
            case LowBackslash:
                return b == '\\' ? LowU : -1;
            case LowU:
                return b == 'u' ? Hex | (1 << 9) : -1;
            case Cont1:
                return b is >= 0x80 and <= 0xBF ? Body : -1;
            case Cont2:
                return b is >= 0x80 and <= 0xBF ? Cont1 : -1;
            case Cont3:
                return b is >= 0x80 and <= 0xBF ? Cont2 : -1;
            case AfterE0:
                return b is >= 0xA0 and <= 0xBF ? Cont1 : -1;
            case AfterED:
                return b is >= 0x80 and <= 0x9F ? Cont1 : -1;
            case AfterF0:
                return b is >= 0x90 and <= 0xBF ? Cont2 : -1;
            case AfterF4:
                return b is >= 0x80 and <= 0x8F ? Cont2 : -1;
            default:
                return -1;
        }
    }

    private static int StepHex(int data, byte b)
    {
        var h = b switch
        {
            >= (byte)'0' and <= (byte)'9' => b - '0',
            >= (byte)'a' and <= (byte)'f' => b - 'a' + 10,
            >= (byte)'A' and <= (byte)'F' => b - 'A' + 10,
            _ => -1,
        };
        if (h < 0)
        {
            return -1;
        }

        var count = (data >> 4) & 7;
        var firstD = (data >> 7) & 1;
        var high = (data >> 8) & 1;
        var mustBeLow = (data >> 9) & 1;
        switch (count)
        {
            case 0:
                if (mustBeLow == 1 && h != 0xD)
                {
                    return -1;
                }

                firstD = h == 0xD ? 1 : 0;
                break;
            case 1:
                if (mustBeLow == 1 && h < 0xC)
                {
                    return -1;
                }

                if (mustBeLow == 0 && firstD == 1 && h >= 0xC)
                {
                    return -1; // a lone low surrogate
                }

                high = mustBeLow == 0 && firstD == 1 && h is >= 0x8 and <= 0xB ? 1 : 0;
                break;
            case 3:
                return high == 1 ? LowBackslash : Body;
        }

        return Hex | ((count + 1) << 4) | (firstD << 7) | (high << 8) | (mustBeLow << 9);
    }

    public override bool CanFinish(int data) => data == Closed;

    public override bool CanContinue(int data) => data != Closed;
}

/// <summary>A JSON number (RFC 8259 grammar), or with <c>integer</c> one without fraction or exponent.</summary>
internal sealed class JsonNumberLeaf(bool integer) : Leaf
{
    public static readonly JsonNumberLeaf Number = new(false);
    public static readonly JsonNumberLeaf Integer = new(true);

    private const int Start = 0, Minus = 1, Zero = 2, Int = 3, Dot = 4, Frac = 5, E = 6, ESign = 7, Exp = 8;

    public override int Step(int data, byte b)
    {
        var digit = b is >= (byte)'0' and <= (byte)'9';
        switch (data)
        {
            case Start:
                return b == '-' ? Minus : b == '0' ? Zero : digit ? Int : -1;
            case Minus:
                return b == '0' ? Zero : digit ? Int : -1;
            case Zero:
            case Int:
                if (digit && data == Int)
                {
                    return Int;
                }

                return integer ? -1 : b == '.' ? Dot : b is (byte)'e' or (byte)'E' ? E : -1;
            case Dot:
                return digit ? Frac : -1;
            case Frac:
                return digit ? Frac : b is (byte)'e' or (byte)'E' ? E : -1;
            case E:
                return b is (byte)'+' or (byte)'-' ? ESign : digit ? Exp : -1;
            case ESign:
            case Exp:
                return digit ? Exp : -1;
            default:
                return -1;
        }
    }

    public override bool CanFinish(int data) => data is Zero or Int or Frac or Exp;

    public override bool CanContinue(int data) => !(integer && data == Zero);
}

/// <summary>Exactly one added token, by id; bytes never match it.</summary>
internal sealed class ControlTokenLeaf(int id) : Leaf
{
    public int Id => id;

    public override int Step(int data, byte b) => -1;

    public override bool CanFinish(int data) => false;

    public override bool CanContinue(int data) => true;
}

/// <summary>
/// Stands for an unknown context below a leaf (<see cref="TokenVocabulary.StringMask"/>): it accepts every byte and
/// never ends, so reaching it marks a token whose verdict depends on that context.
/// </summary>
internal sealed class HoleLeaf : Leaf
{
    public static readonly HoleLeaf Instance = new();

    public override int Step(int data, byte b) => 0;

    public override bool CanFinish(int data) => false;

    public override bool CanContinue(int data) => true;
}

/// <summary>Anything: every byte and every token, and it may end anywhere.</summary>
internal sealed class FreeTextLeaf : Leaf
{
    public static readonly FreeTextLeaf Instance = new();

    public override int Step(int data, byte b) => 0;

    public override bool CanFinish(int data) => true;

    public override bool CanContinue(int data) => true;
}

/// <summary>The parts one after another; data is the index of the next part.</summary>
internal sealed class SequenceRule(Node[] parts) : Rule
{
    public override void Expand(int data, Frame? rest, Expander x)
    {
        if (data >= parts.Length)
        {
            x.Enter(rest);
        }
        else if (data == parts.Length - 1)
        {
            x.Enter(new Frame(parts[data], 0, rest));
        }
        else
        {
            x.Enter(new Frame(parts[data], 0, new Frame(this, data + 1, rest)));
        }
    }
}

/// <summary>Any one of the alternatives.</summary>
internal sealed class ChoiceRule(Node[] alternatives) : Rule
{
    public override void Expand(int data, Frame? rest, Expander x)
    {
        foreach (var a in alternatives)
        {
            x.Enter(new Frame(a, 0, rest));
        }
    }
}

/// <summary>A node set after construction, so a grammar can refer to itself (JSON values, recursive $ref).</summary>
internal sealed class RefRule : Rule
{
    public Node? Target { get; set; }

    public override void Expand(int data, Frame? rest, Expander x) =>
        x.Enter(new Frame(Target ?? throw new InvalidOperationException("unresolved grammar reference"), 0, rest));
}

/// <summary>
/// A JSON array of <c>item</c> with between <c>min</c> and <c>max</c> elements. Data: phase in bits 0-1 (0 before
/// '[', 1 after it, 2 after an element), element count above; with no upper bound the count saturates at
/// <c>min</c>, so long arrays do not make every element a new state.
/// </summary>
internal sealed class ArrayRule(Node item, int min, int max) : Rule
{
    /// <summary>Bounds above this are treated as none (the count is kept in the frame's data).</summary>
    public const int Unbounded = 1 << 24;

    private static readonly LiteralLeaf OpenBracket = new("["u8.ToArray()), CloseBracket = new("]"u8.ToArray()), Comma = new(","u8.ToArray());

    public override void Expand(int data, Frame? rest, Expander x)
    {
        var ws = WhitespaceLeaf.Instance;
        var phase = data & 3;
        var count = data >> 2;
        if (phase == 0)
        {
            x.Enter(new Frame(OpenBracket, 0, new Frame(ws, 0, new Frame(this, 1, rest))));
            return;
        }

        if (count >= min)
        {
            x.Enter(new Frame(CloseBracket, 0, rest));
        }

        if (count < max)
        {
            var next = max >= Unbounded ? Math.Min(count + 1, min) : count + 1;
            var after = new Frame(item, 0, new Frame(ws, 0, new Frame(this, 2 | (next << 2), rest)));
            x.Enter(phase == 1 ? after : new Frame(Comma, 0, new Frame(ws, 0, after)));
        }
    }
}

/// <summary>One declared property of a <see cref="ObjectRule"/>: its key as JSON text (quotes included), value and whether required.</summary>
internal sealed record ObjectProperty(byte[] Key, Node Value, bool Required);

/// <summary>
/// A JSON object with declared properties in declaration order, optional ones skippable. Data: 0 before '{',
/// else 1 + 2 * (index of the next property that may come) + (1 when one was written, so a comma is due).
/// </summary>
internal sealed class ObjectRule : Rule
{
    private static readonly LiteralLeaf OpenBrace = new("{"u8.ToArray()), CloseBrace = new("}"u8.ToArray()), Comma = new(","u8.ToArray()), Colon = new(":"u8.ToArray());
    private readonly ObjectProperty[] _properties;
    private readonly LiteralLeaf[] _keys;

    public ObjectRule(ObjectProperty[] properties)
    {
        _properties = properties;
        _keys = [.. properties.Select(p => new LiteralLeaf(p.Key))];
    }

    public override void Expand(int data, Frame? rest, Expander x)
    {
        var ws = WhitespaceLeaf.Instance;
        if (data == 0)
        {
            x.Enter(new Frame(OpenBrace, 0, new Frame(ws, 0, new Frame(this, 1, rest))));
            return;
        }

        var next = (data - 1) >> 1;
        var written = ((data - 1) & 1) == 1;
        for (var j = next; j < _properties.Length; j++)
        {
            var member = new Frame(_keys[j], 0, new Frame(ws, 0, new Frame(Colon, 0, new Frame(ws, 0,
                new Frame(_properties[j].Value, 0, new Frame(ws, 0, new Frame(this, 1 + (2 * (j + 1)) + 1, rest)))))));
            x.Enter(written ? new Frame(Comma, 0, new Frame(ws, 0, member)) : member);
            if (_properties[j].Required)
            {
                return;
            }
        }

        x.Enter(new Frame(CloseBrace, 0, rest));
    }
}

/// <summary>The JSON grammar's shared nodes.</summary>
internal static class JsonNodes
{
    public static readonly LiteralLeaf True = Lit("true"), False = Lit("false"), Null = Lit("null");

    /// <summary>Any JSON value (objects of any keys, arrays of any length, nested without limit).</summary>
    public static readonly Node Value;

    /// <summary>Any JSON object.</summary>
    public static readonly Node Object;

    static JsonNodes()
    {
        var value = new RefRule();
        Object = MapOf(value);
        value.Target = new ChoiceRule([Object, new ArrayRule(value, 0, ArrayRule.Unbounded), JsonStringLeaf.Instance, JsonNumberLeaf.Number, True, False, Null]);
        Value = value;
    }

    public static LiteralLeaf Lit(string text) => new(System.Text.Encoding.UTF8.GetBytes(text));

    /// <summary>A JSON text (RFC 8259's <c>ws value ws</c>): <paramref name="value"/> with optional whitespace around it.</summary>
    public static Node Text(Node value) => new SequenceRule([WhitespaceLeaf.Instance, value, WhitespaceLeaf.Instance]);

    /// <summary>A JSON object with any keys, each value matching <paramref name="value"/>.</summary>
    public static Node MapOf(Node value)
    {
        var ws = WhitespaceLeaf.Instance;
        var tail = new RefRule();
        var member = new Node[] { JsonStringLeaf.Instance, ws, Lit(":"), ws, value, tail };
        tail.Target = new SequenceRule([ws, new ChoiceRule([Lit("}"), new SequenceRule([Lit(","), ws, .. member])])]);
        return new SequenceRule([Lit("{"), ws, new ChoiceRule([Lit("}"), new SequenceRule(member)])]);
    }
}

/// <summary>
/// A JSON string in one of the formats JSON Schema names and .NET serializes often: <c>date-time</c> (RFC 3339:
/// <c>YYYY-MM-DDTHH:MM:SS[.fraction]</c> then <c>Z</c> or <c>±HH:MM</c>), <c>date</c> (<c>YYYY-MM-DD</c>) and
/// <c>uuid</c> (8-4-4-4-12 hex digits). Dates are real calendar dates (month lengths, leap years, year 0001 to
/// 9999), seconds 00-59, at most 7 fraction digits, offsets up to ±14:00: what System.Text.Json reads as
/// <see cref="DateTime"/>, <see cref="DateTimeOffset"/>, <see cref="DateOnly"/> and <see cref="Guid"/>.
/// </summary>
internal sealed class FormatStringLeaf : Leaf
{
    public static readonly FormatStringLeaf DateTime = new(FormatKind.DateTime), Date = new(FormatKind.Date), Uuid = new(FormatKind.Uuid);

    // data: phase in bits 0-5; while the date is read, the year mod 400 in bits 6-14, "every year digit so far is 0"
    // in bit 15 and the month (its tens while the month is read) in bits 16-19; a scratch value in bits 20-22.
    private const int Quote = 0, Year1 = 1, Year4 = 4, Dash1 = 5, Month1 = 6, Month2 = 7, Dash2 = 8, Day1 = 9, Day2 = 10, T = 11,
        Hour1 = 12, Hour2 = 13, Colon1 = 14, Minute1 = 15, Minute2 = 16, Colon2 = 17, Second1 = 18, Second2 = 19, AfterSeconds = 20,
        Fraction = 21, OffsetHour1 = 22, OffsetHour2 = 23, OffsetColon = 24, OffsetMinute1 = 25, OffsetMinute2 = 26, EndQuote = 27, Closed = 28;

    private const int UuidLength = 36;

    private readonly FormatKind _kind;

    private FormatStringLeaf(FormatKind kind) => _kind = kind;

    private enum FormatKind
    {
        DateTime,
        Date,
        Uuid,
    }

    public override int Step(int data, byte b) => _kind == FormatKind.Uuid ? StepUuid(data, b) : StepDate(data, b);

    public override bool CanFinish(int data) => (data & 63) == (_kind == FormatKind.Uuid ? UuidLength + 2 : Closed);

    public override bool CanContinue(int data) => !CanFinish(data);

    // data is the position: 0 before the opening quote, 1..36 the characters, 37 the closing quote, 38 done.
    private static int StepUuid(int pos, byte b)
    {
        if (pos == 0 || pos == UuidLength + 1)
        {
            return b == '"' ? pos + 1 : -1;
        }

        if (pos > UuidLength + 1)
        {
            return -1;
        }

        var ok = pos is 9 or 14 or 19 or 24 ? b == '-' : char.IsAsciiHexDigit((char)b);
        return ok ? pos + 1 : -1;
    }

    private int StepDate(int data, byte b)
    {
        var phase = data & 63;
        var y400 = (data >> 6) & 511;
        var yearZero = (data >> 15) & 1;
        var month = (data >> 16) & 15;
        var scratch = (data >> 20) & 7;
        var d = b - '0';
        var digit = b is >= (byte)'0' and <= (byte)'9';
        int Pack(int p, int y = 0, int z = 0, int m = 0, int s = 0) => p | (y << 6) | (z << 15) | (m << 16) | (s << 20);
        switch (phase)
        {
            case Quote:
                return b == '"' ? Pack(Year1, 0, 1) : -1;
            case >= Year1 and < Year4:
                return digit ? Pack(phase + 1, ((y400 * 10) + d) % 400, yearZero & (d == 0 ? 1 : 0)) : -1;
            case Year4:
                return digit && !(yearZero == 1 && d == 0) ? Pack(Dash1, ((y400 * 10) + d) % 400) : -1;
            case Dash1:
                return b == '-' ? Pack(Month1, y400) : -1;
            case Month1:
                return b is (byte)'0' or (byte)'1' ? Pack(Month2, y400, 0, d) : -1;
            case Month2:
                return digit && (month == 0 ? d >= 1 : d <= 2) ? Pack(Dash2, y400, 0, (month * 10) + d) : -1;
            case Dash2:
                return b == '-' ? Pack(Day1, y400, 0, month) : -1;
            case Day1:
                return digit && d <= DaysIn(month, y400) / 10 ? Pack(Day2, y400, 0, month, d) : -1;
            case Day2:
                var day = (scratch * 10) + d;
                return digit && day >= 1 && day <= DaysIn(month, y400) ? Pack(_kind == FormatKind.Date ? EndQuote : T) : -1;
            case T:
                return b == 'T' ? Pack(Hour1) : -1;
            case Hour1:
                return digit && d <= 2 ? Pack(Hour2, s: d) : -1;
            case Hour2:
                return digit && (scratch < 2 || d <= 3) ? Pack(Colon1) : -1;
            case Colon1:
            case Colon2:
                return b == ':' ? Pack(phase + 1) : -1;
            case Minute1:
            case Second1:
                return digit && d <= 5 ? Pack(phase + 1) : -1;
            case Minute2:
            case Second2:
                return digit ? Pack(phase + 1) : -1;
            case AfterSeconds:
                return b == '.' ? Pack(Fraction) : Offset(b);
            case Fraction:
                if (digit)
                {
                    return scratch < 7 ? Pack(Fraction, s: scratch + 1) : -1;
                }

                return scratch > 0 ? Offset(b) : -1;
            case OffsetHour1:
                return digit && d <= 1 ? Pack(OffsetHour2, s: d) : -1;
            case OffsetHour2:
                return digit && (scratch == 0 || d <= 4) ? Pack(OffsetColon, s: scratch == 1 && d == 4 ? 1 : 0) : -1;
            case OffsetColon:
                return b == ':' ? Pack(OffsetMinute1, s: scratch) : -1;
            case OffsetMinute1:
                return digit && (scratch == 1 ? d == 0 : d <= 5) ? Pack(OffsetMinute2, s: scratch) : -1;
            case OffsetMinute2:
                return digit && (scratch == 0 || d == 0) ? Pack(EndQuote) : -1;
            case EndQuote:
                return b == '"' ? Pack(Closed) : -1;
            default:
                return -1;
        }

        static int Offset(byte b) => b == 'Z' ? EndQuote : b is (byte)'+' or (byte)'-' ? OffsetHour1 : -1;
    }

    private static int DaysIn(int month, int yearMod400) => month switch
    {
        2 => (yearMod400 % 4 == 0 && yearMod400 % 100 != 0) || yearMod400 == 0 ? 29 : 28,
        4 or 6 or 9 or 11 => 30,
        _ => 31,
    };
}
