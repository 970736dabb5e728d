using System.Text;
using System.Text.Json;
using DeepSeekCuda.Inference.Constraints;
using Microsoft.Extensions.AI;

namespace DeepSeekCuda.Tests.Inference.Constraints;

/// <summary>
/// A random model constrained to a schema always writes JSON that System.Text.Json parses and that an
/// independent validator accepts; over many seeds every alternative the schema offers shows up.
/// </summary>
[TestClass]
public sealed class SchemaPropertyTests
{
    private const int Seeds = 40;

    public static IEnumerable<object[]> Schemas =>
    [
        ["string", """{"type":"string"}"""],
        ["number", """{"type":"number"}"""],
        ["integer", """{"type":"integer","description":"annotations are ignored","title":"n","default":1,"examples":[2]}"""],
        ["boolean", """{"type":"boolean"}"""],
        ["null", """{"type":"null"}"""],
        ["true schema", "true"],
        ["no type", """{"description":"any value"}"""],
        ["enum", """{"enum":["red","green","say \"hi\"",1,2.5,null,true,{"a":[1,"é"]},[]]}"""],
        ["typed enum", """{"type":"string","enum":["a","b",3]}"""],
        ["enum with format", """{"type":"string","format":"date","enum":["2024-02-29","2023-02-29","soon"]}"""],
        ["const", """{"const":{"x":"é\"\n","y":[1,2]}}"""],
        ["type array", """{"type":["string","null"]}"""],
        ["type array 2", """{"type":["integer","boolean","array"],"items":{"type":"null"},"maxItems":3}"""],
        ["object", """{"type":"object","properties":{"a":{"type":"string"},"b":{"type":"integer"},"c":{"type":"boolean"}},"required":["b"],"additionalProperties":false}"""],
        ["nested object", """{"type":"object","properties":{"p":{"type":"object","properties":{"q":{"type":"array","items":{"type":"object","properties":{"r":{"type":"number"}},"required":["r"]}}},"required":["q"]},"s":{"type":"string"}},"required":["p","s"]}"""],
        ["declared and additional", """{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"],"additionalProperties":{"type":"string","format":"email"}}"""],
        ["empty object", """{"type":"object","properties":{}}"""],
        ["map", """{"type":"object","additionalProperties":{"type":"integer"}}"""],
        ["closed map", """{"type":"object","additionalProperties":false}"""],
        ["array", """{"type":"array","items":{"type":"string"},"minItems":2,"maxItems":4}"""],
        ["array min only", """{"type":"array","items":{"type":"integer"},"minItems":3}"""],
        ["any array", """{"type":"array"}"""],
        ["anyOf", """{"anyOf":[{"type":"string"},{"type":"object","properties":{"k":{"const":1}},"required":["k"]},{"type":"null"}]}"""],
        ["oneOf", """{"oneOf":[{"type":"integer"},{"type":"string"},{"type":"array","items":{"type":"boolean"}}]}"""],
        ["oneOf tagged union", """{"oneOf":[{"type":"object","properties":{"kind":{"const":"circle"},"r":{"type":"number"}},"required":["kind","r"]},{"type":"object","properties":{"kind":{"enum":["square","box"]},"side":{"type":"number"}},"required":["kind","side"]},{"type":"null"}]}"""],
        ["oneOf values", """{"oneOf":[{"enum":["a","b"]},{"const":"c"},{"$ref":"#/$defs/d"}],"$defs":{"d":{"enum":["d",1]}}}"""],
        ["ref", """{"$defs":{"pt":{"type":"object","properties":{"x":{"type":"number"},"y":{"type":"number"}},"required":["x","y"]}},"type":"object","properties":{"from":{"$ref":"#/$defs/pt"},"to":{"$ref":"#/$defs/pt"}},"required":["from","to"]}"""],
        ["definitions", """{"definitions":{"c":{"enum":["a","b"]}},"type":"array","items":{"$ref":"#/definitions/c"}}"""],
        ["recursive ref", """{"$defs":{"node":{"type":"object","properties":{"v":{"type":"integer"},"kids":{"type":"array","items":{"$ref":"#/$defs/node"},"maxItems":2}},"required":["v"]}},"$ref":"#/$defs/node"}"""],
        ["date-time", """{"type":"string","format":"date-time"}"""],
        ["date", """{"type":"string","format":"date"}"""],
        ["uuid", """{"type":["string","null"],"format":"uuid"}"""],
        ["formats in an object", """{"type":"object","properties":{"when":{"type":"string","format":"date-time"},"id":{"type":"string","format":"uuid"},"on":{"type":"string","format":"date"}},"required":["when","id","on"]}"""],
        ["nullable object", """{"type":["object","null"],"properties":{"a":{"type":["integer","null"]}},"required":["a"]}"""],
    ];

    [TestMethod]
    [DynamicData(nameof(Schemas))]
    public void RandomOutputIsValid(string name, string schemaText)
    {
        using var doc = JsonDocument.Parse(schemaText);
        var grammar = Grammar.JsonSchema(doc.RootElement);
        var tokenizer = new PieceTokenizer();
        for (var seed = 0; seed < Seeds; seed++)
        {
            var (text, _) = ConstrainedRun.Generate(new GrammarConstraint(grammar, Vocabularies.Pieces), tokenizer, seed);
            AssertValid(text, doc.RootElement, $"{name}, seed {seed}");
        }
    }

    [TestMethod]
    public void RandomJsonValuesAndObjectsParse()
    {
        var tokenizer = new PieceTokenizer();
        for (var seed = 0; seed < Seeds; seed++)
        {
            var (value, _) = ConstrainedRun.Generate(new GrammarConstraint(Grammar.JsonValue(), Vocabularies.Pieces), tokenizer, seed);
            using (JsonDocument.Parse(value))
            {
            }

            var (obj, _) = ConstrainedRun.Generate(new GrammarConstraint(Grammar.JsonObject(), Vocabularies.Fake), new FakeTokenizer(), seed);
            using var parsed = JsonDocument.Parse(obj);
            Assert.AreEqual(JsonValueKind.Object, parsed.RootElement.ValueKind, Encoding.UTF8.GetString(obj));
        }
    }

    [TestMethod]
    public void EveryAlternativeIsReachable()
    {
        using var doc = JsonDocument.Parse("""
            {"type":"object","properties":{
              "color":{"enum":["red","green","blue"]},
              "ok":{"type":"boolean"},
              "maybe":{"type":["string","null"]},
              "opt":{"type":"integer"},
              "kind":{"anyOf":[{"const":"x"},{"type":"integer"}]}},
             "required":["color","ok","maybe","kind"]}
            """);
        var grammar = Grammar.JsonSchema(doc.RootElement);
        var end = grammar.CompileFor(Vocabularies.Pieces).Start.Step("{\"color\":\"red\",\"ok\":true,\"maybe\":null,\"kind\":5}"u8, new Expander());
        Assert.IsTrue(end is { IsComplete: true }, "the rare alternatives are in the grammar");
        var seen = new HashSet<string>();
        for (var seed = 0; seed < 300; seed++)
        {
            var (text, _) = ConstrainedRun.Generate(new GrammarConstraint(grammar, Vocabularies.Pieces), new PieceTokenizer(), seed, closeAfter: 400);
            using var parsed = AssertValid(text, doc.RootElement, $"seed {seed}");
            var o = parsed.RootElement;
            seen.Add("color=" + o.GetProperty("color").GetString());
            seen.Add("ok=" + o.GetProperty("ok").GetBoolean());
            seen.Add("maybe=" + o.GetProperty("maybe").ValueKind);
            seen.Add("opt " + (o.TryGetProperty("opt", out _) ? "present" : "absent"));
            seen.Add("kind=" + o.GetProperty("kind").ValueKind);
        }

        string[] expected = ["color=red", "color=green", "color=blue", "ok=True", "ok=False", "maybe=String", "maybe=Null", "opt present", "opt absent", "kind=String", "kind=Number"];
        CollectionAssert.IsSubsetOf(expected, seen.ToArray(), $"seen: {string.Join(", ", seen.Order())}");
    }

    [TestMethod]
    public void EveryArrayLengthIsReachable()
    {
        using var doc = JsonDocument.Parse("""{"type":"array","items":{"enum":[1,2]},"minItems":1,"maxItems":4}""");
        var grammar = Grammar.JsonSchema(doc.RootElement);
        var lengths = new HashSet<int>();
        for (var seed = 0; seed < 100; seed++)
        {
            var (text, _) = ConstrainedRun.Generate(new GrammarConstraint(grammar, Vocabularies.Pieces), new PieceTokenizer(), seed, closeAfter: 400);
            using var parsed = AssertValid(text, doc.RootElement, $"seed {seed}");
            lengths.Add(parsed.RootElement.GetArrayLength());
        }

        CollectionAssert.AreEquivalent(new[] { 1, 2, 3, 4 }, lengths.ToArray());
    }

    private sealed record Address(string Street, string City, int? Zip);

    private enum Mood
    {
        Happy,
        Sad,
    }

    private sealed record Person(string Name, int Age, double Height, bool Active, Mood Mood, List<string> Tags, Address Home, Address? Work, int? Score, List<Address> Past,
        Mood? Maybe, Dictionary<string, int> Counts, DateTime When, DateTimeOffset At, DateOnly On, Guid Id, long Big, float Small, decimal Money);

    [TestMethod]
    public void SchemasFromAIJsonUtilitiesAreAccepted()
    {
        JsonElement[] schemas =
        [
            AIJsonUtilities.CreateJsonSchema(typeof(Person)),
            AIJsonUtilities.CreateJsonSchema(typeof(Address)),
            AIJsonUtilities.CreateJsonSchema(typeof(List<Mood>)),
            ((ChatResponseFormatJson)ChatResponseFormat.ForJsonSchema<Person>()).Schema!.Value,
        ];
        foreach (var schema in schemas)
        {
            var grammar = Grammar.JsonSchema(schema);
            for (var seed = 0; seed < 15; seed++)
            {
                var (text, _) = ConstrainedRun.Generate(new GrammarConstraint(grammar, Vocabularies.Pieces), new PieceTokenizer(), seed, closeAfter: 60);
                using var parsed = AssertValid(text, schema, $"{schema}, seed {seed}");
                if (schema.GetProperty("type").ToString().Contains("object", StringComparison.Ordinal) && schema.TryGetProperty("properties", out var props) && props.TryGetProperty("name", out _))
                {
                    // The model type round-trips: what the constraint allows, the caller's deserializer reads.
                    var person = parsed.RootElement.Deserialize<Person>(AIJsonUtilities.DefaultOptions);
                    Assert.IsNotNull(person);
                }
            }
        }
    }

    private static JsonDocument AssertValid(byte[] text, JsonElement schema, string what)
    {
        JsonDocument parsed;
        try
        {
            parsed = JsonDocument.Parse(text);
        }
        catch (JsonException e)
        {
            Assert.Fail($"{what}: not JSON ({e.Message}): {Encoding.UTF8.GetString(text)}");
            throw;
        }

        ReadAllStrings(parsed.RootElement); // decoding throws on invalid UTF-8 or unpaired surrogate escapes
        if (SchemaValidator.Validate(parsed.RootElement, schema) is { } error)
        {
            Assert.Fail($"{what}: {error} in {Encoding.UTF8.GetString(text)}");
        }

        return parsed;
    }

    private static void ReadAllStrings(JsonElement e)
    {
        switch (e.ValueKind)
        {
            case JsonValueKind.String:
                _ = e.GetString();
                break;
            case JsonValueKind.Array:
                foreach (var item in e.EnumerateArray())
                {
                    ReadAllStrings(item);
                }

                break;
            case JsonValueKind.Object:
                foreach (var p in e.EnumerateObject())
                {
                    _ = p.Name;
                    ReadAllStrings(p.Value);
                }

                break;
        }
    }
}
