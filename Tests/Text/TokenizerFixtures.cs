using System.Text.Json;
using DeepSeekCuda.Tests.Support;
using DeepSeekCuda.Text;

namespace DeepSeekCuda.Tests.Text;

/// <summary>The DeepSeek-V3 tokenizer and its independently produced cases, loaded once.</summary>
internal static class TokenizerFixtures
{
    private static readonly Lazy<BpeTokenizer> LazyDeepSeek = new(() => BpeTokenizer.Load(SharedData.Tokenizer));
    private static readonly Lazy<EncodeCase[]> LazyCases = new(LoadCases);

    public static BpeTokenizer DeepSeek => LazyDeepSeek.Value;

    public static EncodeCase[] Cases => LazyCases.Value;

    private static EncodeCase[] LoadCases()
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(SharedData.Tokenizer, "encode-cases.json")));
        return doc.RootElement.GetProperty("cases").EnumerateArray()
            .Select(c => new EncodeCase(
                c.GetProperty("text").GetString()!,
                c.GetProperty("ids").EnumerateArray().Select(e => e.GetInt32()).ToArray(),
                c.GetProperty("ids_with_bos").EnumerateArray().Select(e => e.GetInt32()).ToArray()))
            .ToArray();
    }

    /// <summary>First index where two id sequences differ, for readable failures.</summary>
    public static string Describe(int[] expected, int[] actual)
    {
        var i = 0;
        while (i < expected.Length && i < actual.Length && expected[i] == actual[i])
        {
            i++;
        }

        return $"first difference at {i}: expected [{string.Join(",", expected.Skip(i).Take(8))}] got [{string.Join(",", actual.Skip(i).Take(8))}] (lengths {expected.Length}/{actual.Length})";
    }
}

internal sealed record EncodeCase(string Text, int[] Ids, int[] IdsWithBos);
