using System.Diagnostics;
using System.Text.Json.Nodes;
using DeepSeekCuda.Hosting;
using DeepSeekCuda.Tests.Cli;
using DeepSeekCuda.Tests.Support;
using DeepSeekCuda.Text;

namespace DeepSeekCuda.Tests.Text;

/// <summary>
/// Issue 19, tokenizer files and text input. Class 2: every size the file sets (the file's own, its ids, the
/// time its regexes may take) is bounded before it is trusted, and a FIFO or device does not hang the load.
/// Class 4: an escaped unpaired surrogate (<c>"\ud800"</c>) anywhere a string is read is a
/// <see cref="TokenizerFormatException"/> or a bad line naming file and field, never an internal error.
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

    [TestMethod]
    public void HugeVocabularyId_IsRefusedBeforeAnyTableIsSized()
    {
        // 256 bytes, the merge "he" and "xyz": 258 entries, so ids up to 258 + MaxIdGap are allowed.
        var limit = 258 + BpeTokenizer.MaxIdGap;
        var doc = TinyTokenizer.Document([("h", "e")], arrayMerges: false);
        doc["model"]!["vocab"]!["xyz"] = limit;
        Assert.AreEqual(limit + 1, BpeTokenizer.FromJson(doc.ToJsonString()).VocabSize);

        doc["model"]!["vocab"]!["xyz"] = 2_000_000_000;
        var ex = Assert.ThrowsExactly<TokenizerFormatException>(() => BpeTokenizer.FromJson(doc.ToJsonString()));
        StringAssert.StartsWith(ex.Problem, $"model.vocab entry 'xyz' has id 2000000000, over the limit {limit} (258 vocabulary and 0 added entries");
    }

    [TestMethod]
    public void HugeAddedTokenId_IsRefused()
    {
        var doc = TinyTokenizer.Document([("h", "e")], arrayMerges: false, addedTokens: [TinyTokenizer.Added(300, "<a>"), TinyTokenizer.Added(int.MaxValue, "<b>")]);
        var ex = Assert.ThrowsExactly<TokenizerFormatException>(() => BpeTokenizer.FromJson(doc.ToJsonString()));
        StringAssert.StartsWith(ex.Problem, $"added_tokens[1].id is {int.MaxValue}, over the limit {257 + 2 + BpeTokenizer.MaxIdGap}");
    }

    [TestMethod]
    public void TokenizerFileOverTheSizeLimit_IsRefusedUnread()
    {
        WithFolder(dir =>
        {
            // A sparse file: the limit is checked on the size, so nothing is read or written at this size.
            var path = Path.Combine(dir, "tokenizer.json");
            using (var f = File.Create(path))
            {
                f.SetLength(BpeTokenizer.MaxFileBytes + 1);
            }

            var ex = Assert.ThrowsExactly<TokenizerFormatException>(() => BpeTokenizer.Load(dir));
            Assert.AreEqual(path, ex.File);
            Assert.AreEqual($"{BpeTokenizer.MaxFileBytes + 1} bytes, over the limit of {BpeTokenizer.MaxFileBytes} for this file", ex.Problem);
        });
    }

    [TestMethod]
    [DataRow("tokenizer.json", "fifo")]
    [DataRow("tokenizer.json", "/dev/zero")]
    [DataRow("tokenizer_config.json", "fifo")]
    [DataRow("tokenizer_config.json", "/dev/zero")]
    public void SpecialFiles_AreRefusedWithoutHanging(string name, string kind)
    {
        WithFolder(dir =>
        {
            File.WriteAllText(Path.Combine(dir, "tokenizer.json"), TinyTokenizer.Document([("h", "e")], arrayMerges: false).ToJsonString());
            var path = Path.Combine(dir, name);
            File.Delete(path);
            if (kind == "fifo")
            {
                Fifo.Create(path);
            }
            else
            {
                File.CreateSymbolicLink(path, kind);
            }

            // Opening a FIFO blocks until a writer comes, and /dev/zero never ends: bound the wait.
            var load = Task.Run(() => BpeTokenizer.Load(dir));
            Assert.AreSame(load, Task.WhenAny(load, Task.Delay(TimeSpan.FromSeconds(20))).Result, $"loading with {name} a {kind} hung");
            var ex = load.Exception?.InnerException as TokenizerFormatException;
            Assert.IsNotNull(ex, $"expected a TokenizerFormatException, got {load.Exception?.InnerException?.GetType().Name ?? "success"}");
            Assert.AreEqual(path, ex.File);
            Assert.AreEqual(kind == "fifo" ? "not a regular file (it is a FIFO, socket or device); a model folder holds only regular files" : $"a symbolic link to {kind}, outside the model folder; links may end only inside {dir}", ex.Problem);
            if (name == "tokenizer_config.json")
            {
                Assert.ThrowsExactly<TokenizerFormatException>(() => LocalModel.DetectTemplate(dir));
            }
        });
    }

    [TestMethod]
    public void CatastrophicSplitPattern_IsRefusedPlainlyWithinItsTimeout()
    {
        // (a+)+$ on "aaa...ab" tries every way of cutting the run of a's: 2^40 steps for 40 of them.
        var step = new RegexSplitStep("(a+)+$", removeMatches: false, "tokenizer.json", "pre_tokenizer.pretokenizers[0]", TimeSpan.FromMilliseconds(200));
        var text = new string('a', 40) + "b";
        var clock = Stopwatch.StartNew();
        var ex = Assert.ThrowsExactly<TokenizerFormatException>(() => step.Apply(new TextPiece(text, 0, text.Length), hasSurrogates: false, []));
        Assert.IsLessThan(10.0, clock.Elapsed.TotalSeconds);
        Assert.AreEqual("tokenizer.json", ex.File);
        StringAssert.StartsWith(ex.Problem, "pre_tokenizer.pretokenizers[0]: the pattern '(a+)+$' ran over 0.2 s on a piece of 41 characters");

        // The same pattern where it is harmless still splits.
        var pieces = new List<TextPiece>();
        step.Apply(new TextPiece("baaa", 0, 4), hasSurrogates: false, pieces);
        CollectionAssert.AreEqual(new[] { "b", "aaa" }, pieces.Select(p => p.Span.ToString()).ToArray());
    }

    private static void WithFolder(Action<string> test)
    {
        var dir = Directory.CreateTempSubdirectory("dscuda-hostile-").FullName;
        try
        {
            test(dir);
        }
        finally
        {
            Directory.Delete(dir, true);
        }
    }
}
