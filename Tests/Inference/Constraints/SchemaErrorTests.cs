using System.Text.Json;
using DeepSeekCuda.Inference.Constraints;

namespace DeepSeekCuda.Tests.Inference.Constraints;

/// <summary>What the schema compiler cannot enforce it refuses, naming the keyword and where it is.</summary>
[TestClass]
public sealed class SchemaErrorTests
{
    private static Grammar Compile(string schema)
    {
        using var doc = JsonDocument.Parse(schema);
        return Grammar.JsonSchema(doc.RootElement);
    }

    [TestMethod]
    [DataRow("""{"type":"object","properties":{"name":{"type":"string","pattern":"^a"}}}""", "'pattern'", "#/properties/name/pattern")]
    [DataRow("""{"type":"string","format":"email"}""", "'format'", "#/format")]
    [DataRow("""{"type":"object","properties":{"t":{"type":"string","format":"time"}}}""", "'format'", "#/properties/t/format")]
    [DataRow("""{"type":"integer","minimum":0}""", "'minimum'", "#/minimum")]
    [DataRow("""{"type":"array","items":{"type":"string","minLength":1}}""", "'minLength'", "#/items/minLength")]
    [DataRow("""{"allOf":[{"type":"string"}]}""", "'allOf'", "#/allOf")]
    [DataRow("""{"not":{"type":"string"}}""", "'not'", "#/not")]
    [DataRow("""{"type":"array","uniqueItems":true}""", "'uniqueItems'", "#/uniqueItems")]
    [DataRow("""{"type":"object","patternProperties":{"a":{}}}""", "'patternProperties'", "#/patternProperties")]
    [DataRow("""{"$defs":{"a":{"type":"number","multipleOf":2}},"$ref":"#/$defs/a"}""", "'multipleOf'", "#/$defs/a/multipleOf")]
    [DataRow("""{"anyOf":[{"type":"string"},{"type":"string","maxLength":3}]}""", "'maxLength'", "#/anyOf/1/maxLength")]
    [DataRow("""{"$ref":"https://example.com/s.json"}""", "only local references", "#/$ref")]
    [DataRow("""{"$defs":{"a":{"type":"string"}},"$ref":"#/$defs/a","type":"string"}""", "'type' beside '$ref'", "#/type")]
    [DataRow("""{"type":"array","items":[{"type":"string"}]}""", "tuple 'items'", "#/items")]
    [DataRow("""{"type":"object","properties":{"a/b":{"type":"string","const":"x","if":{}}}}""", "'if'", "#/properties/a~1b/if")]
    [DataRow("""{"type":"string","anyOf":[{"type":"string"}]}""", "'type' beside 'anyOf'", "#/type")]
    [DataRow("""{"$defs":{"a":{"anyOf":[{"$ref":"#/$defs/a"},{"type":"null"}]}},"$ref":"#/$defs/a"}""", "left recursion", "#/$defs/a/anyOf/0/$ref")]
    [DataRow("""{"type":"object","properties":{"x":{"$ref":"#/properties/x"}}}""", "left recursion", "#/properties/x/$ref")]
    [DataRow("""{"oneOf":[{"type":"number"},{"type":"integer"}]}""", "alternatives 0 and 1", "#/oneOf")]
    [DataRow("""{"oneOf":[{"type":"string"},{"type":"null"},{"enum":["x"]}]}""", "alternatives 0 and 2", "#/oneOf")]
    [DataRow("""{"oneOf":[{"type":"object","properties":{"k":{"const":1}},"required":["k"]},{"type":"object","properties":{"k":{"enum":[2,1]}},"required":["k"]}]}""", "alternatives 0 and 1", "#/oneOf")]
    [DataRow("""{"oneOf":[{"type":"object","properties":{"k":{"const":1}}},{"type":"object","properties":{"k":{"const":2}}}]}""", "alternatives 0 and 1", "#/oneOf")]
    [DataRow("""{"oneOf":[{},{"type":"null"}]}""", "alternatives 0 and 1", "#/oneOf")]
    [DataRow("""{"type":"object","properties":{"a":{}},"required":["b"]}""", "names 'b'", "#/required")]
    public void UnenforcedKeywordsAreRefused(string schema, string keyword, string pointer)
    {
        var e = Assert.ThrowsExactly<NotSupportedException>(() => Compile(schema));
        StringAssert.Contains(e.Message, keyword);
        StringAssert.Contains(e.Message, pointer);
    }

    [TestMethod]
    [DataRow("""{"type":"strin"}""", "#/type")]
    [DataRow("""{"type":"array","minItems":3,"maxItems":2}""", "'#'")]
    [DataRow("""{"type":"array","minItems":-1}""", "#/minItems")]
    [DataRow("""{"$ref":"#/$defs/missing"}""", "#/$ref")]
    [DataRow("""{"type":"object","properties":{"a":false}}""", "#/properties/a")]
    [DataRow("""{"type":"string","enum":[1,2]}""", "#/enum")]
    [DataRow("""{"anyOf":[]}""", "#/anyOf")]
    [DataRow("""{"const":1,"enum":[2,3]}""", "#/const")]
    [DataRow("""{"type":"string","format":"uuid","const":"not-a-uuid"}""", "#/const")]
    [DataRow("3", "'#'")]
    public void MalformedSchemasAreArgumentErrors(string schema, string pointer)
    {
        var e = Assert.ThrowsExactly<ArgumentException>(() => Compile(schema));
        StringAssert.Contains(e.Message, pointer);
    }

    [TestMethod]
    public void AnnotationsAreIgnored()
    {
        var g = Compile("""{"$schema":"https://json-schema.org/draft/2020-12/schema","$id":"x","title":"t","description":"d","default":1,"examples":[1],"$comment":"c","deprecated":false,"readOnly":true,"writeOnly":false,"type":"integer"}""");
        Assert.IsNotNull(g);
    }
}
