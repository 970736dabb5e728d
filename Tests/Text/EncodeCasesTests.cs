using System.Text.Json;
using DeepSeekCuda.Tests.Support;
using DeepSeekCuda.Text;

namespace DeepSeekCuda.Tests.Text;

[TestClass]
public sealed class EncodeCasesTests
{
    public static IEnumerable<object[]> CaseIndices => Enumerable.Range(0, TokenizerFixtures.Cases.Length).Select(i => new object[] { i });

    [TestMethod]
    public void CaseFileHasAllCases()
    {
        Assert.IsGreaterThanOrEqualTo(201, TokenizerFixtures.Cases.Length);
    }

    [TestMethod]
    [DynamicData(nameof(CaseIndices))]
    public void EncodeMatchesReference(int index)
    {
        var c = TokenizerFixtures.Cases[index];
        var actual = TokenizerFixtures.DeepSeek.Encode(c.Text, addBos: false);
        CollectionAssert.AreEqual(c.Ids, actual, $"case {index} {JsonSerializer.Serialize(c.Text)}: {TokenizerFixtures.Describe(c.Ids, actual)}");
    }

    [TestMethod]
    [DynamicData(nameof(CaseIndices))]
    public void EncodeWithBosMatchesReference(int index)
    {
        // The reference's add_special_tokens follows tokenizer.json's post_processor (ByteLevel, which
        // adds nothing), so its ids_with_bos hold no BOS. addBos follows tokenizer_config.json's
        // add_bos_token as transformers' LlamaTokenizerFast does: BOS, then exactly those ids.
        var c = TokenizerFixtures.Cases[index];
        var tokenizer = TokenizerFixtures.DeepSeek;
        int[] expected = [tokenizer.BosId!.Value, .. c.IdsWithBos];
        var actual = tokenizer.Encode(c.Text, addBos: true);
        CollectionAssert.AreEqual(expected, actual, $"case {index} {JsonSerializer.Serialize(c.Text)}: {TokenizerFixtures.Describe(expected, actual)}");
    }

    [TestMethod]
    public void DecodeRoundTripsEveryCase()
    {
        var failures = new List<int>();
        for (var i = 0; i < TokenizerFixtures.Cases.Length; i++)
        {
            var c = TokenizerFixtures.Cases[i];
            if (TokenizerFixtures.DeepSeek.Decode(c.Ids) != c.Text)
            {
                failures.Add(i);
            }
        }

        Assert.IsEmpty(failures, "cases not round-tripping: " + string.Join(",", failures));
    }

    [TestMethod]
    public void ConcurrentEncodingGivesTheSameIds()
    {
        var tokenizer = BpeTokenizer.Load(SharedData.Tokenizer); // fresh cache, so threads race to fill it
        var cases = TokenizerFixtures.Cases;
        var mismatches = 0;
        Parallel.For(0, cases.Length * 8, new ParallelOptions { MaxDegreeOfParallelism = 8 }, k =>
        {
            var c = cases[k % cases.Length];
            if (!c.Ids.AsSpan().SequenceEqual(tokenizer.Encode(c.Text, addBos: false)))
            {
                Interlocked.Increment(ref mismatches);
            }
        });
        Assert.AreEqual(0, mismatches);
    }

    [TestMethod]
    public void ChatTemplatePromptsEncodeToReferenceIds()
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(SharedData.Tokenizer, "chat-template-cases.json")));
        var cases = doc.RootElement.GetProperty("cases").EnumerateArray().ToArray();
        Assert.IsNotEmpty(cases);
        foreach (var c in cases)
        {
            var text = c.GetProperty("text").GetString()!;
            var expected = c.GetProperty("ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();
            var actual = TokenizerFixtures.DeepSeek.Encode(text, addBos: false);
            CollectionAssert.AreEqual(expected, actual, $"{JsonSerializer.Serialize(text)}: {TokenizerFixtures.Describe(expected, actual)}");
        }
    }

    [TestMethod]
    public void ConfigAndVocabularyFacts()
    {
        var t = TokenizerFixtures.DeepSeek;

        // Facts of the shared files: the largest id in tokenizer.json is the added token 128814
        // (the model's 129,280 embedding rows are config.json's business, not the tokenizer's).
        Assert.AreEqual(128815, t.VocabSize);
        Assert.AreEqual(127741, t.MergeCount);
        Assert.AreEqual(818, t.AddedTokens.Count);
        Assert.IsTrue(t.AddBosToken);
        Assert.AreEqual(0, t.BosId);
        Assert.AreEqual(1, t.EosId);
        Assert.IsTrue(t.IsSpecial(0));
        Assert.AreEqual(128803, t.TokenToId("<｜User｜>"));
        Assert.IsFalse(t.IsSpecial(128803), "<｜User｜> is an added token but not special in this file");
        Assert.IsNull(t.TokenToId("<think>"));
        Assert.AreEqual("<｜end▁of▁sentence｜>", System.Text.Encoding.UTF8.GetString(t.GetTokenBytes(1)));
    }
}
