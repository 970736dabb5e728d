using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;
using DeepSeekCuda.Inference.Constraints;
using DeepSeekCuda.Tests.Text;
using DeepSeekCuda.Text;

namespace DeepSeekCuda.Tests.Inference.Constraints;

/// <summary>
/// Byte-level tokenizer with multi-byte pieces: ids 0..255 are single bytes, then JSON-ish pieces (so one token
/// can close a string and open the next key, or hold a whole UTF-8 character or a broken half of one), then
/// added tokens: EOS (special), a tool-call marker (special) and &lt;/think&gt; (added, not special).
/// </summary>
internal sealed class PieceTokenizer : ITokenizer
{
    public static readonly string[] Pieces =
    [
        "{\"", "\"}", "\":", "\",", "\", \"", ", \"", "\": \"", "\":\"", "\":[", "\"]", "\"],", "},{", "}]", "]}", "[]", "{}", " {", " [",
        "true", "false", "null", "tr", "ue", "nu", "ll", "fa", "lse", "0.", "-0", ".5", "e+", "E-", "12", "007", "10", "\\u", "\\ud83d", "\\ude00",
        "\\n", "\\\"", "\\\\", "\\x", "é", "日本", "😀", "\u00ff\u00fe", "\n", "\n  ", "  ", "\t", "name", "age", "\"name", "\"age\":", "<think>", "</", "think", ">",
        "</think>", "</think>\n\n{", "</th", "ink>{\"", "ink>x", "red", "\"red\"", "green", "blue",
    ];

    public static readonly string[] Added = ["<｜end▁of▁sentence｜>", "<｜tool▁calls▁begin｜>", "</think>"];

    private static readonly byte[][] Bytes = BuildBytes();

    public int VocabSize => Bytes.Length;

    public int? BosId => null;

    public int? EosId => 256 + Pieces.Length + 3 + 0;

    public bool AddBosToken => false;

    public static int AddedId(int i) => 256 + Pieces.Length + 3 + i;

    private static byte[][] BuildBytes()
    {
        var list = new List<byte[]>();
        for (var b = 0; b < 256; b++)
        {
            list.Add([(byte)b]);
        }

        list.AddRange(Pieces.Select(Encoding.UTF8.GetBytes));
        list.Add([0xE6, 0x97]); // the first two bytes of 日
        list.Add([0xA5]);
        list.Add([0xC0, 0x80]); // overlong NUL, never valid
        list.AddRange(Added.Select(Encoding.UTF8.GetBytes));
        return [.. list];
    }

    public int[] Encode(string text, bool addBos) => EncodeLiteral(text);

    public int[] EncodeLiteral(string text) => [.. Encoding.UTF8.GetBytes(text).Select(b => (int)b)];

    public int? AddedTokenId(string content) => Array.IndexOf(Added, content) is var i and >= 0 ? AddedId(i) : null;

    public ReadOnlySpan<byte> GetTokenBytes(int id) => Bytes[id];

    public bool IsSpecial(int id) => id == AddedId(0) || id == AddedId(1);

    public int? TokenToId(string token) => AddedTokenId(token);

    public string Decode(ReadOnlySpan<int> ids)
    {
        var bytes = new List<byte>();
        foreach (var id in ids)
        {
            bytes.AddRange(Bytes[id]);
        }

        return Encoding.UTF8.GetString([.. bytes]);
    }
}

/// <summary>Vocabularies built once per test run.</summary>
internal static class Vocabularies
{
    private static readonly Lazy<TokenVocabulary> LazyFake = new(() => TokenVocabulary.Create(new FakeTokenizer()));
    private static readonly Lazy<TokenVocabulary> LazyPieces = new(() => TokenVocabulary.Create(new PieceTokenizer()));
    private static readonly Lazy<TokenVocabulary> LazyDeepSeek = new(() => TokenVocabulary.Create(TokenizerFixtures.DeepSeek));

    public static TokenVocabulary Fake => LazyFake.Value;

    public static TokenVocabulary Pieces => LazyPieces.Value;

    public static TokenVocabulary DeepSeek => LazyDeepSeek.Value;
}

/// <summary>Runs a constraint with a seeded random "model" and checks masks against a brute-force reference.</summary>
internal static class ConstrainedRun
{
    /// <summary>
    /// Samples from random logits with the mask applied (the argmax of uniform noise over the allowed ids), until
    /// EOS. Ids that end structures (<c>"</c>, <c>}</c>, <c>]</c>, EOS) get a bonus growing with the step, so runs
    /// terminate; every choice is still one the mask allowed.
    /// </summary>
    public static (byte[] Text, int[] Ids) Generate(GrammarConstraint constraint, ITokenizer tokenizer, int seed, int maxSteps = 3000, double closeAfter = 40)
    {
        var rng = new Random(seed);
        var logits = new float[tokenizer.VocabSize];
        var text = new List<byte>();
        var ids = new List<int>();
        for (var step = 0; step < maxSteps; step++)
        {
            var bonus = (float)(step / closeAfter);
            for (var id = 0; id < logits.Length; id++)
            {
                logits[id] = (float)rng.NextDouble();
                var bytes = tokenizer.GetTokenBytes(id);
                if (id == tokenizer.EosId || (bytes.Length > 0 && !tokenizer.IsSpecial(id) && bytes[0] is (byte)'"' or (byte)'}' or (byte)']'))
                {
                    logits[id] += bonus;
                }
            }

            constraint.Mask(logits);
            var next = 0;
            for (var id = 1; id < logits.Length; id++)
            {
                if (logits[id] > logits[next])
                {
                    next = id;
                }
            }

            Assert.IsFalse(float.IsNegativeInfinity(logits[next]), "the mask allowed nothing");
            if (next == tokenizer.EosId)
            {
                Assert.IsTrue(constraint.IsComplete, "EOS was allowed before the grammar was complete");
                return ([.. text], [.. ids]);
            }

            ids.Add(next);
            text.AddRange(tokenizer.GetTokenBytes(next).ToArray());
            constraint.Advance(next);
        }

        Assert.Fail($"no EOS after {maxSteps} steps: {Encoding.UTF8.GetString([.. text])}");
        return default;
    }

    /// <summary>The allowed ids after <paramref name="state"/>, one id at a time: its bytes stepped directly, no trie, no cache.</summary>
    public static bool[] BruteForce(AutomatonState state, TokenVocabulary vocabulary, ITokenizer tokenizer)
    {
        var x = new Expander();
        var allowed = new bool[tokenizer.VocabSize];
        for (var id = 0; id < allowed.Length; id++)
        {
            if (state.Stacks.Any(s => s.Node is FreeTextLeaf))
            {
                allowed[id] = true;
            }
            else if (id == tokenizer.EosId)
            {
                allowed[id] = state.Stacks.Contains(Frame.End);
            }
            else if (vocabulary.IsAdded(id))
            {
                allowed[id] = state.Stacks.Any(s => s.Node is ControlTokenLeaf c && c.Id == id);
            }
            else
            {
                var s = state;
                foreach (var b in tokenizer.GetTokenBytes(id))
                {
                    s = s.Step(b, x);
                    if (s is null)
                    {
                        break;
                    }
                }

                allowed[id] = s is not null && tokenizer.GetTokenBytes(id).Length > 0;
            }
        }

        return allowed;
    }

    /// <summary>Asserts the mask (trie walk and cached) equals <see cref="BruteForce"/> at <paramref name="state"/>.</summary>
    public static void AssertMaskMatchesReference(CompiledGrammar grammar, AutomatonState state, ITokenizer tokenizer, string where)
    {
        var expected = BruteForce(state, grammar.Vocabulary, tokenizer);
        var walked = grammar.ComputeMask(state);
        var cached = grammar.MaskFor(state);
        for (var id = 0; id < expected.Length; id++)
        {
            if (walked.IsAllowed(id) != expected[id] || cached.IsAllowed(id) != expected[id])
            {
                Assert.Fail($"{where}: id {id} ({JsonSerializer.Serialize(tokenizer.Decode([id]))}) reference {expected[id]}, trie {walked.IsAllowed(id)}, cached {cached.IsAllowed(id)}");
            }
        }

        var logits = new float[tokenizer.VocabSize];
        cached.Apply(logits);
        for (var id = 0; id < expected.Length; id++)
        {
            Assert.AreEqual(expected[id], !float.IsNegativeInfinity(logits[id]), $"{where}: Apply disagrees at id {id}");
        }
    }
}

/// <summary>
/// A validator for the JSON Schema subset, written from the specification independently of the compiler:
/// it walks the parsed value and the schema together.
/// </summary>
internal static class SchemaValidator
{
    public static string? Validate(JsonElement value, JsonElement schema) => Validate(value, schema, schema, "$");

    private static string? Validate(JsonElement value, JsonElement schema, JsonElement root, string at)
    {
        if (schema.ValueKind == JsonValueKind.True)
        {
            return null;
        }

        if (schema.ValueKind == JsonValueKind.False)
        {
            return $"{at}: schema false";
        }

        if (schema.TryGetProperty("$ref", out var r))
        {
            var target = root;
            foreach (var part in r.GetString()!.TrimStart('#').Split('/', StringSplitOptions.RemoveEmptyEntries))
            {
                target = target.GetProperty(part.Replace("~1", "/").Replace("~0", "~"));
            }

            if (Validate(value, target, root, at) is { } e)
            {
                return e;
            }
        }

        if (schema.TryGetProperty("type", out var type))
        {
            var types = type.ValueKind == JsonValueKind.Array ? type.EnumerateArray().Select(t => t.GetString()!).ToArray() : [type.GetString()!];
            if (!types.Any(t => HasType(value, t)))
            {
                return $"{at}: {value.ValueKind} is not {string.Join("|", types)}";
            }
        }

        if (schema.TryGetProperty("format", out var format) && value.ValueKind == JsonValueKind.String && !HasFormat(value, format.GetString()!))
        {
            return $"{at}: {value.GetRawText()} is not a {format.GetString()}";
        }

        if (schema.TryGetProperty("const", out var c) && !JsonElement.DeepEquals(c, value))
        {
            return $"{at}: not the const";
        }

        if (schema.TryGetProperty("enum", out var en) && !en.EnumerateArray().Any(e => JsonElement.DeepEquals(e, value)))
        {
            return $"{at}: {value.GetRawText()} not in the enum";
        }

        if (schema.TryGetProperty("anyOf", out var anyOf) && !anyOf.EnumerateArray().Any(s => Validate(value, s, root, at) is null))
        {
            return $"{at}: no anyOf alternative matches";
        }

        if (schema.TryGetProperty("oneOf", out var oneOf) && oneOf.EnumerateArray().Count(s => Validate(value, s, root, at) is null) != 1)
        {
            return $"{at}: not exactly one oneOf alternative matches";
        }

        if (value.ValueKind == JsonValueKind.Object)
        {
            var props = schema.TryGetProperty("properties", out var p) ? p : default;
            if (schema.TryGetProperty("required", out var req))
            {
                foreach (var name in req.EnumerateArray())
                {
                    if (!value.TryGetProperty(name.GetString()!, out _))
                    {
                        return $"{at}: missing required '{name.GetString()}'";
                    }
                }
            }

            foreach (var member in value.EnumerateObject())
            {
                if (props.ValueKind == JsonValueKind.Object && props.TryGetProperty(member.Name, out var ps))
                {
                    if (Validate(member.Value, ps, root, $"{at}.{member.Name}") is { } e)
                    {
                        return e;
                    }
                }
                else if (schema.TryGetProperty("additionalProperties", out var ap) && Validate(member.Value, ap, root, $"{at}.{member.Name}") is { } e)
                {
                    return e;
                }
            }
        }

        if (value.ValueKind == JsonValueKind.Array)
        {
            var n = value.GetArrayLength();
            if (schema.TryGetProperty("minItems", out var min) && n < min.GetInt32())
            {
                return $"{at}: {n} items, under minItems";
            }

            if (schema.TryGetProperty("maxItems", out var max) && n > max.GetInt32())
            {
                return $"{at}: {n} items, over maxItems";
            }

            if (schema.TryGetProperty("items", out var items))
            {
                var i = 0;
                foreach (var item in value.EnumerateArray())
                {
                    if (Validate(item, items, root, $"{at}[{i++}]") is { } e)
                    {
                        return e;
                    }
                }
            }
        }

        return null;
    }

    /// <summary>The shape by RFC 3339 (date-time requires an offset) and the value by .NET's own parsers.</summary>
    private static bool HasFormat(JsonElement v, string format)
    {
        var s = v.GetString()!;
        return format switch
        {
            "date-time" => Regex.IsMatch(s, @"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$") && v.TryGetDateTimeOffset(out _) && v.TryGetDateTime(out _),
            "date" => DateOnly.TryParseExact(s, "yyyy-MM-dd", System.Globalization.CultureInfo.InvariantCulture, System.Globalization.DateTimeStyles.None, out _),
            "uuid" => Guid.TryParseExact(s, "D", out _),
            _ => throw new NotSupportedException(format),
        };
    }

    private static bool HasType(JsonElement v, string t) => t switch
    {
        "object" => v.ValueKind == JsonValueKind.Object,
        "array" => v.ValueKind == JsonValueKind.Array,
        "string" => v.ValueKind == JsonValueKind.String,
        "number" => v.ValueKind == JsonValueKind.Number,
        "integer" => v.ValueKind == JsonValueKind.Number && double.Parse(v.GetRawText(), System.Globalization.CultureInfo.InvariantCulture) is var d && d == Math.Floor(d),
        "boolean" => v.ValueKind is JsonValueKind.True or JsonValueKind.False,
        "null" => v.ValueKind == JsonValueKind.Null,
        _ => false,
    };
}
