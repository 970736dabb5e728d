using System.Text;
using System.Text.Json;
using DeepSeekCuda.Inference.Constraints;

namespace DeepSeekCuda.Tests.Inference.Constraints;

/// <summary>The byte automaton alone: which texts are complete sentences, which are prefixes, which are rejected.</summary>
[TestClass]
public sealed class AutomatonTests
{
    private enum Verdict
    {
        Rejected,
        Prefix,
        Complete,
    }

    private static Verdict Run(Grammar grammar, byte[] bytes)
    {
        var state = grammar.CompileFor(Vocabularies.Fake).Start.Step(bytes, new Expander());
        return state is null ? Verdict.Rejected : state.IsComplete ? Verdict.Complete : Verdict.Prefix;
    }

    private static Verdict Run(Grammar grammar, string text) => Run(grammar, Encoding.UTF8.GetBytes(text));

    [TestMethod]
    [DataRow("{}")]
    [DataRow("[]")]
    [DataRow("{\"a\":1,\"b\":[true,false,null],\"c\":{\"d\":\"e\"}}")]
    [DataRow("{ \"a\" : [ 1 , 2 ] }")]
    [DataRow("\"\"")]
    [DataRow("\"\\\" \\\\ \\/ \\b \\f \\n \\r \\t \\u00e9 \\uD83D\\uDE00\"")]
    [DataRow("\"日本語 é 😀\"")]
    [DataRow("-0.5e+3")]
    [DataRow("0")]
    [DataRow("-0")]
    [DataRow("123.456E-7")]
    [DataRow("1e9")]
    [DataRow("[[[[[[[[[[1]]]]]]]]]]")]
    [DataRow("{\n  \"a\": [\n    1\n  ]\n}")]
    [DataRow(" 1")]
    [DataRow("\n\n{}\n")]
    public void CompleteJson(string text)
    {
        Assert.AreEqual(Verdict.Complete, Run(Grammar.JsonValue(), text), text);
        using var _ = JsonDocument.Parse(text); // the cases are JSON by the reference parser too
    }

    [TestMethod]
    [DataRow("{\"a\":")]
    [DataRow("[1,")]
    [DataRow("\"abc")]
    [DataRow("\"\\u12")]
    [DataRow("\"\\uD83D")]
    [DataRow("-")]
    [DataRow("1.")]
    [DataRow("1e")]
    [DataRow("1e+")]
    [DataRow("tr")]
    [DataRow("{")]
    public void PrefixesOfJson(string text) => Assert.AreEqual(Verdict.Prefix, Run(Grammar.JsonValue(), text), text);

    [TestMethod]
    [DataRow("01")]
    [DataRow("+1")]
    [DataRow(".5")]
    [DataRow("1.e3")]
    [DataRow("--1")]
    [DataRow("[1,]")]
    [DataRow("{\"a\":1,}")]
    [DataRow("{a:1}")]
    [DataRow("{\"a\" 1}")]
    [DataRow("'a'")]
    [DataRow("\"\\x\"")]
    [DataRow("\"\\u12g4\"")]
    [DataRow("\"\\uDE00\"")]
    [DataRow("\"\\uD83Dx\"")]
    [DataRow("\"\\uD83D\\u0041\"")]
    [DataRow("\"a\tb\"")]
    [DataRow("\"a\nb\"")]
    [DataRow("truex")]
    [DataRow("nul l")]
    [DataRow("{}}")]
    [DataRow("NaN")]
    public void RejectedJson(string text) => Assert.AreEqual(Verdict.Rejected, Run(Grammar.JsonValue(), text), text);

    [TestMethod]
    [DataRow(new byte[] { 0x22, 0xC0, 0x80 }, DisplayName = "overlong NUL")]
    [DataRow(new byte[] { 0x22, 0xE0, 0x80, 0x80 }, DisplayName = "overlong 3-byte")]
    [DataRow(new byte[] { 0x22, 0xED, 0xA0, 0x80 }, DisplayName = "UTF-8 surrogate")]
    [DataRow(new byte[] { 0x22, 0xF4, 0x90, 0x80, 0x80 }, DisplayName = "past U+10FFFF")]
    [DataRow(new byte[] { 0x22, 0xF5 }, DisplayName = "F5 lead")]
    [DataRow(new byte[] { 0x22, 0x80 }, DisplayName = "lone continuation")]
    [DataRow(new byte[] { 0x22, 0xC3, 0x22 }, DisplayName = "truncated character")]
    public void InvalidUtf8InStringsIsRejected(byte[] bytes) => Assert.AreEqual(Verdict.Rejected, Run(Grammar.JsonValue(), bytes));

    [TestMethod]
    public void SplitCharactersArePrefixes()
    {
        var bytes = Encoding.UTF8.GetBytes("\"😀\"");
        for (var n = 1; n < bytes.Length; n++)
        {
            Assert.AreEqual(Verdict.Prefix, Run(Grammar.JsonValue(), bytes[..n]), $"first {n} bytes");
        }
    }

    [TestMethod]
    public void WhitespaceRunsAreBounded()
    {
        var within = "[" + new string(' ', WhitespaceLeaf.MaxRun) + "1]";
        var beyond = "[" + new string(' ', WhitespaceLeaf.MaxRun + 1) + "1]";
        Assert.AreEqual(Verdict.Complete, Run(Grammar.JsonValue(), within));
        Assert.AreEqual(Verdict.Rejected, Run(Grammar.JsonValue(), beyond));
        Assert.AreEqual(Verdict.Complete, Run(Grammar.JsonValue(), "[" + new string(' ', WhitespaceLeaf.MaxRun) + "1," + new string(' ', WhitespaceLeaf.MaxRun) + "2]"), "each run counts separately");
        Assert.AreEqual(Verdict.Complete, Run(Grammar.JsonObject(), new string('\n', WhitespaceLeaf.MaxRun) + "{}" + new string(' ', WhitespaceLeaf.MaxRun)), "before and after the value");
        Assert.AreEqual(Verdict.Rejected, Run(Grammar.JsonObject(), new string('\n', WhitespaceLeaf.MaxRun + 1) + "{}"));
        Assert.AreEqual(Verdict.Rejected, Run(Grammar.JsonObject(), "{}" + new string(' ', WhitespaceLeaf.MaxRun + 1)));
    }

    [TestMethod]
    public void JsonObjectIsOnlyObjects()
    {
        Assert.AreEqual(Verdict.Complete, Run(Grammar.JsonObject(), "{\"a\":[1]}"));
        Assert.AreEqual(Verdict.Rejected, Run(Grammar.JsonObject(), "[1]"));
        Assert.AreEqual(Verdict.Rejected, Run(Grammar.JsonObject(), "\"a\""));
    }

    [TestMethod]
    public void LiteralsSequencesAndChoices()
    {
        var g = Grammar.Sequence(Grammar.Literal("say "), Grammar.Choice(Grammar.Literal("yes"), Grammar.Literal("yeah"), Grammar.Literal("no")), Grammar.Literal("!"));
        Assert.AreEqual(Verdict.Complete, Run(g, "say yes!"));
        Assert.AreEqual(Verdict.Complete, Run(g, "say yeah!"));
        Assert.AreEqual(Verdict.Complete, Run(g, "say no!"));
        Assert.AreEqual(Verdict.Prefix, Run(g, "say ye"));
        Assert.AreEqual(Verdict.Rejected, Run(g, "say yes?"));
        Assert.AreEqual(Verdict.Rejected, Run(g, "Say"));
        Assert.AreEqual(Verdict.Complete, Run(Grammar.Literal("é日"), "é日"));
        Assert.AreEqual(Verdict.Complete, Run(Grammar.Sequence(), ""));
    }

    [TestMethod]
    public void SchemaAcceptsAndRejects()
    {
        using var doc = JsonDocument.Parse("""
            {"type":"object","properties":{
              "name":{"type":"string"},
              "age":{"type":"integer"},
              "tags":{"type":"array","items":{"enum":["a","b"]},"minItems":1,"maxItems":2},
              "note":{"type":["string","null"]}},
             "required":["name","tags"]}
            """);
        var g = Grammar.JsonSchema(doc.RootElement);
        Assert.AreEqual(Verdict.Complete, Run(g, "{\"name\":\"x\",\"age\":3,\"tags\":[\"a\"],\"note\":null}"));
        Assert.AreEqual(Verdict.Complete, Run(g, "{\"name\":\"x\",\"tags\":[\"a\",\"b\"]}"), "optional age and note skipped");
        Assert.AreEqual(Verdict.Complete, Run(g, "{ \"name\" : \"x\" , \"tags\" : [ \"b\" ] , \"note\" : \"n\" }"));
        Assert.AreEqual(Verdict.Rejected, Run(g, "{\"age\":3,\"name\":\"x\""), "properties in the schema's order");
        Assert.AreEqual(Verdict.Rejected, Run(g, "{\"name\":\"x\",\"tags\":[]"), "minItems");
        Assert.AreEqual(Verdict.Rejected, Run(g, "{\"name\":\"x\",\"tags\":[\"a\",\"b\",\"a\""), "maxItems");
        Assert.AreEqual(Verdict.Rejected, Run(g, "{\"name\":\"x\",\"age\":3.5"), "integer");
        Assert.AreEqual(Verdict.Rejected, Run(g, "{\"name\":\"x\",\"tags\":[\"c\""), "enum");
        Assert.AreEqual(Verdict.Rejected, Run(g, "{\"name\":\"x\"}"), "required tags");
        Assert.AreEqual(Verdict.Rejected, Run(g, "{\"name\":\"x\",\"extra\""), "undeclared property");
        Assert.AreEqual(Verdict.Prefix, Run(g, "{\"name\":\"x\",\"tags\":[\"a\"]"));
    }

    private static Grammar Format(string format)
    {
        using var doc = JsonDocument.Parse($$"""{"type":"string","format":"{{format}}"}""");
        return Grammar.JsonSchema(doc.RootElement);
    }

    [TestMethod]
    [DataRow("\"2024-02-29T23:59:59.1234567+14:00\"")]
    [DataRow("\"0001-01-01T00:00:00Z\"")]
    [DataRow("\"9999-12-31T23:59:59-13:59\"")]
    [DataRow("\"2000-02-29T12:30:00.5Z\"")]
    public void DateTimesAccepted(string text) => Assert.AreEqual(Verdict.Complete, Run(Format("date-time"), text), text);

    [TestMethod]
    [DataRow("\"2023-02-29T00:00:00Z\"")]
    [DataRow("\"1900-02-29T00:00:00Z\"")]
    [DataRow("\"0000-01-01T00:00:00Z\"")]
    [DataRow("\"2024-04-31T00:00:00Z\"")]
    [DataRow("\"2024-13-01T00:00:00Z\"")]
    [DataRow("\"2024-00-01T00:00:00Z\"")]
    [DataRow("\"2024-01-00T00:00:00Z\"")]
    [DataRow("\"2024-01-01T24:00:00Z\"")]
    [DataRow("\"2024-01-01T00:60:00Z\"")]
    [DataRow("\"2024-01-01T00:00:60Z\"")]
    [DataRow("\"2024-01-01T00:00:00\"")]
    [DataRow("\"2024-01-01T00:00:00.Z\"")]
    [DataRow("\"2024-01-01T00:00:00.12345678Z\"")]
    [DataRow("\"2024-01-01T00:00:00+14:30\"")]
    [DataRow("\"2024-01-01T00:00:00+15:00\"")]
    [DataRow("\"2024-01-01t00:00:00Z\"")]
    [DataRow("\"2024-01-01 00:00:00Z\"")]
    public void BadDateTimesRejected(string text) => Assert.AreEqual(Verdict.Rejected, Run(Format("date-time"), text), text);

    [TestMethod]
    public void DatesAreExactlyTheCalendar()
    {
        var date = Format("date");
        foreach (var year in new[] { "0001", "1900", "2000", "2023", "2024", "2100", "9999", "0000" })
        {
            for (var month = 0; month < 20; month++)
            {
                for (var day = 0; day < 40; day++)
                {
                    var text = $"{year}-{month:00}-{day:00}";
                    var valid = DateOnly.TryParseExact(text, "yyyy-MM-dd", System.Globalization.CultureInfo.InvariantCulture, System.Globalization.DateTimeStyles.None, out _);
                    Assert.AreEqual(valid ? Verdict.Complete : Verdict.Rejected, Run(date, $"\"{text}\""), text);
                }
            }
        }
    }

    [TestMethod]
    public void Uuids()
    {
        var uuid = Format("uuid");
        Assert.AreEqual(Verdict.Complete, Run(uuid, $"\"{Guid.NewGuid():D}\""));
        Assert.AreEqual(Verdict.Complete, Run(uuid, "\"0AF3E1B2-ffff-4000-8000-00000000000a\""));
        Assert.AreEqual(Verdict.Rejected, Run(uuid, $"\"{Guid.NewGuid():N}\""));
        Assert.AreEqual(Verdict.Rejected, Run(uuid, "\"0af3e1b2-ffff-4000-8000-00000000000g\""));
        Assert.AreEqual(Verdict.Rejected, Run(uuid, "\"0af3e1b2-ffff-4000-8000-00000000000a0\""));
    }
}
