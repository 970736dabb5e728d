using System.Text.Json;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Cli;

[TestClass]
public sealed class TokenizeCommandTests
{
    [TestMethod]
    public void EncodesJsonLinesLikeTheIndependentImplementation()
    {
        using var doc = JsonDocument.Parse(File.ReadAllBytes(Path.Combine(SharedData.Tokenizer, "encode-cases.json")));
        var cases = doc.RootElement.GetProperty("cases").EnumerateArray().Take(20).ToArray();
        var input = string.Join("\n", cases.Select(c => JsonSerializer.Serialize(new { text = c.GetProperty("text").GetString() }))) + "\n";
        var r = CliRunner.RunWithInput(input, "tokenize", "--tokenizer", SharedData.Tokenizer);
        Assert.AreEqual(0, r.ExitCode, r.Error);
        var lines = r.Output.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.HasCount(cases.Length, lines);
        for (var i = 0; i < cases.Length; i++)
        {
            var expected = cases[i].GetProperty("ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();
            CollectionAssert.AreEqual(expected, JsonSerializer.Deserialize<int[]>(lines[i]), $"line {i + 1}");
        }
    }

    [TestMethod]
    public void BadLineIsAOneLineErrorNamingTheLine()
    {
        var r = CliRunner.RunWithInput("{\"text\":\"ok\"}\nnot json\n", "tokenize", "--tokenizer", SharedData.Tokenizer);
        Assert.AreEqual(1, r.ExitCode);
        StringAssert.Contains(r.Error, "line 2");
    }
}
