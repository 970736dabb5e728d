using System.Text.Json;
using DeepSeekCuda.Text;

namespace DeepSeekCuda.Tests.Text;

[TestClass]
public sealed class JsonLinesTokenizerTests
{
    [TestMethod]
    public void WritesOneIdArrayPerLine()
    {
        var cases = TokenizerFixtures.Cases.Take(40).ToArray();
        var input = string.Join("\n", cases.Select(c => JsonSerializer.Serialize(new { text = c.Text })));
        var output = new StringWriter();
        var n = JsonLinesTokenizer.Run(new StringReader(input), output, TokenizerFixtures.DeepSeek);
        Assert.AreEqual(cases.Length, n);
        var lines = output.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.HasCount(cases.Length, lines);
        for (var i = 0; i < cases.Length; i++)
        {
            CollectionAssert.AreEqual(cases[i].Ids, JsonSerializer.Deserialize<int[]>(lines[i]), $"line {i + 1}");
        }
    }

    [TestMethod]
    [DataRow("{\"text\": \"ok\"}\n{not json}", "line 2")]
    [DataRow("{\"text\": 5}", "line 1")]
    [DataRow("[\"text\"]", "line 1")]
    public void BadLineIsNamed(string input, string expected)
    {
        var ex = Assert.ThrowsExactly<InvalidDataException>(() => JsonLinesTokenizer.Run(new StringReader(input), new StringWriter(), TokenizerFixtures.DeepSeek));
        Assert.Contains(expected, ex.Message);
    }
}
