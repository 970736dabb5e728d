using System.Text.Json.Nodes;
using DeepSeekCuda.Hosting;
using DeepSeekCuda.Tests.Cli;
using DeepSeekCuda.Tests.Support;
using DeepSeekCuda.Text;

namespace DeepSeekCuda.Tests.Text;

/// <summary>
/// Issue 19, tokenizer files and text input: an escaped unpaired surrogate (<c>"\ud800"</c>) anywhere a
/// string is read (class 4) is a <see cref="TokenizerFormatException"/> or a bad line naming file and field,
/// never an internal error.
/// </summary>
[TestClass]
public sealed class HostileTokenizerFileTests
{
    // System.Text.Json will not write a lone surrogate, so documents carry a marker replaced by the escape.
    private const string Lone = "@@LONE@@";

    private static string WithLoneSurrogate(JsonNode doc) => doc.ToJsonString().Replace(Lone, "\\ud800", StringComparison.Ordinal);

    public static IEnumerable<object[]> TokenizerFields =>
    [
        ["model.vocab entry #257", // after the 256 bytes and the merge "he"
        (Action<JsonObject>)(d => d["model"]!["vocab"]![Lone] = 300)],
        ["model.merges[0]", (Action<JsonObject>)(d => d["model"]!["merges"] = new JsonArray(Lone + " h"))],
        ["model.merges[0][1]", (Action<JsonObject>)(d => d["model"]!["merges"] = new JsonArray(new JsonArray("h", Lone)))],
        ["added_tokens[1].content", (Action<JsonObject>)(d => d["added_tokens"] = new JsonArray(TinyTokenizer.Added(300, "<ok>"), TinyTokenizer.Added(301, "a" + Lone)))],
        ["pre_tokenizer.pretokenizers[0].pattern.Regex", (Action<JsonObject>)(d => d["pre_tokenizer"] = TinyTokenizer.SplitThenByteLevel("x" + Lone))],
        ["pre_tokenizer.type", (Action<JsonObject>)(d => d["pre_tokenizer"] = new JsonObject { ["type"] = Lone })],
        ["model.type", (Action<JsonObject>)(d => d["model"]!["type"] = Lone)],
    ];

    [TestMethod]
    [DynamicData(nameof(TokenizerFields))]
    public void LoneSurrogateInTokenizerJson_NamesTheField(string field, Action<JsonObject> plant)
    {
        var doc = TinyTokenizer.Document([("h", "e")], arrayMerges: false);
        plant(doc);
        var ex = Assert.ThrowsExactly<TokenizerFormatException>(() => BpeTokenizer.FromJson(WithLoneSurrogate(doc)));
        Assert.AreEqual("tokenizer.json", ex.File);
        Assert.AreEqual($"{field} {BpeTokenizer.UnpairedSurrogate}", ex.Problem);
    }

    [TestMethod]
    [DataRow("""{"bos_token": "@@LONE@@"}""", "bos_token")]
    [DataRow("""{"eos_token": {"content": "x@@LONE@@"}}""", "eos_token.content")]
    public void LoneSurrogateInTokenizerConfig_NamesTheField(string config, string field)
    {
        var json = TinyTokenizer.Document([("h", "e")], arrayMerges: false).ToJsonString();
        var ex = Assert.ThrowsExactly<TokenizerFormatException>(() => BpeTokenizer.FromJson(json, config.Replace(Lone, "\\ud800", StringComparison.Ordinal)));
        Assert.AreEqual("tokenizer_config.json", ex.File);
        StringAssert.StartsWith(ex.Problem, field + " holds an unpaired surrogate");
    }

    [TestMethod]
    public void LoneSurrogateInChatTemplate_NamesTheFileAndField()
    {
        var dir = Directory.CreateTempSubdirectory("dscuda-template-").FullName;
        try
        {
            var path = Path.Combine(dir, "tokenizer_config.json");
            File.WriteAllText(path, """{"chat_template": "{{ '<think>' }}\udc00"}""");
            var ex = Assert.ThrowsExactly<TokenizerFormatException>(() => LocalModel.DetectTemplate(dir));
            Assert.AreEqual(path, ex.File);
            StringAssert.StartsWith(ex.Problem, "chat_template holds an unpaired surrogate");
        }
        finally
        {
            Directory.Delete(dir, true);
        }
    }

    [TestMethod]
    public void PairedSurrogateEscapes_AreText()
    {
        // The refusal is for unpaired halves only: an escaped pair is an emoji, in the vocabulary as anywhere.
        var doc = TinyTokenizer.Document([("h", "e")], arrayMerges: false);
        doc["added_tokens"] = new JsonArray(TinyTokenizer.Added(300, "EMOJI"));
        var t = BpeTokenizer.FromJson(doc.ToJsonString().Replace("EMOJI", "\\ud83d\\ude00", StringComparison.Ordinal));
        CollectionAssert.AreEqual(new[] { (int)'h', 300 }, t.Encode("h\U0001F600", addBos: false));
    }

    [TestMethod]
    public void LoneSurrogateInATokenizeLine_IsABadLine()
    {
        var input = "{\"text\": \"fine\"}\n{\"text\": \"a\\ud800b\"}\n";
        var ex = Assert.ThrowsExactly<InvalidDataException>(() => JsonLinesTokenizer.Run(new StringReader(input), new StringWriter(), TokenizerFixtures.DeepSeek));
        Assert.AreEqual($"line 2: \"text\" {BpeTokenizer.UnpairedSurrogate}", ex.Message);

        var r = CliRunner.RunWithInput(input, "tokenize", "--tokenizer", SharedData.Tokenizer);
        Assert.AreEqual(1, r.ExitCode, r.Error);
        StringAssert.Contains(r.Error, "line 2: \"text\" holds an unpaired surrogate");
        Assert.AreEqual(1, r.Output.Split('\n', StringSplitOptions.RemoveEmptyEntries).Length, "the line before the bad one is written");
    }

    [TestMethod]
    public void DecodingAnIdOutsideTheVocabulary_IsAnArgumentError()
    {
        var t = TokenizerFixtures.DeepSeek;
        foreach (var id in new[] { -1, t.VocabSize, int.MaxValue })
        {
            var ex = Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => t.Decode([0, id]));
            Assert.AreEqual("id", ex.ParamName);
            Assert.AreEqual(id, ex.ActualValue);
        }
    }
}
