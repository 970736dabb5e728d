using System.Text.Json;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Text;

/// <summary>
/// 2,000 seeded random strings (whitespace oddities such as U+0085 and U+FEFF, astral letters,
/// digits and symbols, emoji sequences, added-token fragments) with the ids the Hugging Face Rust
/// library gives them (npm "tokenizers" 0.23.2; generator in Data/make-hf-fuzz-cases.js).
/// </summary>
[TestClass]
public sealed class HfFuzzCasesTests
{
    private static string DataFile() => Path.Combine(SharedData.Checkout, "Tests", "Text", "Data", "hf-fuzz-cases.jsonl");

    [TestMethod]
    public void EncodeMatchesHuggingFaceOnFuzzCases()
    {
        var lines = File.ReadAllText(DataFile()).Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.HasCount(2000, lines);
        var failures = new List<string>();
        for (var i = 0; i < lines.Length; i++)
        {
            using var doc = JsonDocument.Parse(lines[i]);
            var text = doc.RootElement.GetProperty("text").GetString()!;
            var expected = doc.RootElement.GetProperty("ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();
            var actual = TokenizerFixtures.DeepSeek.Encode(text, addBos: false);
            if (!expected.AsSpan().SequenceEqual(actual))
            {
                failures.Add($"line {i + 1} {JsonSerializer.Serialize(text)}: {TokenizerFixtures.Describe(expected, actual)}");
            }
        }

        Assert.IsEmpty(failures, string.Join("\n", failures.Take(10)));
    }
}
