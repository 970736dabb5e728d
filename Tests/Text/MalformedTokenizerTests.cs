using System.Text.Json.Nodes;
using DeepSeekCuda.Text;

namespace DeepSeekCuda.Tests.Text;

[TestClass]
public sealed class MalformedTokenizerTests
{
    private static string Mutate(Action<JsonObject> change)
    {
        var doc = TinyTokenizer.Document([("h", "e")], arrayMerges: false);
        change(doc);
        return doc.ToJsonString();
    }

    private static void AssertRejected(string json, string expectedInMessage, string? config = null)
    {
        var ex = Assert.ThrowsExactly<TokenizerFormatException>(() => BpeTokenizer.FromJson(json, config));
        Assert.Contains(expectedInMessage, ex.Message);
    }

    [TestMethod]
    public void MissingVocab() => AssertRejected(Mutate(d => d["model"]!.AsObject().Remove("vocab")), "model.vocab");

    [TestMethod]
    public void UnsupportedModelType() => AssertRejected(Mutate(d => d["model"]!["type"] = "WordPiece"), "unsupported model type 'WordPiece'");

    [TestMethod]
    public void BadMergeString() => AssertRejected(Mutate(d => d["model"]!["merges"] = new JsonArray("h e x")), "bad merge entry #0");

    [TestMethod]
    public void BadMergeArray() => AssertRejected(Mutate(d => d["model"]!["merges"] = new JsonArray(new JsonArray("h"))), "bad merge entry #0");

    [TestMethod]
    public void MergeOutsideVocab() => AssertRejected(Mutate(d => d["model"]!["merges"] = new JsonArray("h e", "he zz")), "'zz' is not in model.vocab");

    [TestMethod]
    public void UnsupportedNormalizer() => AssertRejected(Mutate(d => d["normalizer"] = new JsonObject { ["type"] = "NFKC" }), "unsupported normalizer");

    [TestMethod]
    public void UnsupportedPreTokenizer() => AssertRejected(Mutate(d => d["pre_tokenizer"] = new JsonObject { ["type"] = "Whitespace" }), "unsupported pre-tokenizer");

    [TestMethod]
    public void UnsupportedRegexProperty() =>
        AssertRejected(Mutate(d => d["pre_tokenizer"] = TinyTokenizer.SplitThenByteLevel(@"\p{Han}+")), @"\p{Han}");

    [TestMethod]
    public void InvalidJson() => AssertRejected("{\"model\": ", "invalid JSON");

    [TestMethod]
    public void UnknownBosToken() => AssertRejected(Mutate(_ => { }), "bos_token '<nope>'", """{"bos_token": "<nope>"}""");

    [TestMethod]
    public void MessageNamesTheFile()
    {
        var ex = Assert.ThrowsExactly<TokenizerFormatException>(() => BpeTokenizer.FromJson("[]"));
        Assert.AreEqual("tokenizer.json", ex.File);
    }

    [TestMethod]
    public void MissingFolder() =>
        Assert.ThrowsExactly<DirectoryNotFoundException>(() => BpeTokenizer.Load(Path.Combine(Path.GetTempPath(), "no-such-tokenizer-" + Guid.NewGuid())));
}
