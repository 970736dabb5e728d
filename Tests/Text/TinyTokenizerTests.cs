using System.Text.Json.Nodes;
using DeepSeekCuda.Text;

namespace DeepSeekCuda.Tests.Text;

[TestClass]
public sealed class TinyTokenizerTests
{
    private static readonly (string, string)[] HelloMerges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o")];

    [TestMethod]
    [DataRow(false)]
    [DataRow(true)]
    public void BothMergeFormsLoadAndMerge(bool arrayForm)
    {
        var t = TinyTokenizer.Build(TinyTokenizer.Document(HelloMerges, arrayForm));

        // Vocab ids 256.. are assigned in merge order: he=256, ll=257, hell=258, hello=259; 'Ġ' is byte 32.
        CollectionAssert.AreEqual(new[] { 259, 32, 259, 33 }, t.Encode("hello hello!", addBos: false));
        CollectionAssert.AreEqual(new[] { 258 }, t.Encode("hell", addBos: false));
        Assert.AreEqual(260, t.VocabSize);
    }

    [TestMethod]
    public void LowerRankMergesFirst()
    {
        // "a b" (rank 0) beats "b c" (rank 1), so "abc" becomes ab + c, not a + bc.
        var t = TinyTokenizer.Build(TinyTokenizer.Document([("a", "b"), ("b", "c")], arrayMerges: false));
        CollectionAssert.AreEqual(new[] { 256, (int)'c' }, t.Encode("abc", addBos: false));
        var swapped = TinyTokenizer.Build(TinyTokenizer.Document([("b", "c"), ("a", "b")], arrayMerges: true));
        CollectionAssert.AreEqual(new[] { (int)'a', 256 }, swapped.Encode("abc", addBos: false));
    }

    [TestMethod]
    public void LongPiecesUseTheSameMergeOrder()
    {
        // 200 'a's in one piece goes through the heap path; pairs merge leftmost first: aa aa ... then aaaa.
        var t = TinyTokenizer.Build(TinyTokenizer.Document([("a", "a"), ("aa", "aa")], arrayMerges: false));
        var ids = t.Encode(new string('a', 202), addBos: false);
        CollectionAssert.AreEqual(Enumerable.Repeat(257, 50).Append(256).ToArray(), ids);
        CollectionAssert.AreEqual(new[] { 257, 256, (int)'a' }, t.Encode("aaaaaaa", addBos: false));
    }

    [TestMethod]
    public void AddedTokensMatchLongestFirst()
    {
        var added = new JsonArray(TinyTokenizer.Added(300, "<x>"), TinyTokenizer.Added(301, "<x><y>"));
        var t = TinyTokenizer.Build(TinyTokenizer.Document(HelloMerges, false, addedTokens: added));
        CollectionAssert.AreEqual(new[] { (int)'a', 301, (int)'b', 300, 259 }, t.Encode("a<x><y>b<x>hello", addBos: false));
        CollectionAssert.AreEqual(new[] { 300, (int)'<', (int)'y' }, t.Encode("<x><y", addBos: false));
        Assert.IsTrue(t.IsSpecial(301));
        Assert.AreEqual("<x><y>", t.Decode([301]));
    }

    [TestMethod]
    public void AddedTokenStripAndSingleWordFlags()
    {
        var added = new JsonArray(
            TinyTokenizer.Added(300, "<s>", lstrip: true, rstrip: true),
            TinyTokenizer.Added(301, "cat", special: false, singleWord: true));
        var t = TinyTokenizer.Build(TinyTokenizer.Document([], false, addedTokens: added));
        CollectionAssert.AreEqual(new[] { (int)'a', 300, (int)'b' }, t.Encode("a  <s> b", addBos: false));

        // "cat" inside "concat" is part of a word, so only the free-standing one is the added token.
        CollectionAssert.AreEqual(new[] { 'c', 'o', 'n', 'c', 'a', 't', ' ', 301 }.Select(c => (int)c).ToArray(), t.Encode("concat cat", addBos: false));
    }

    [TestMethod]
    public void SplitRegexMatchesByCodePoint()
    {
        // With a UTF-16 regex, [^\p{S}]+ would swallow the emoji's surrogates and the "a"+0xF0 merge would fire.
        var doc = TinyTokenizer.Document([("a", "\u00F0")], false, preTokenizer: TinyTokenizer.SplitThenByteLevel(@"[^\p{S}]+"));
        var t = TinyTokenizer.Build(doc);
        CollectionAssert.AreEqual(new[] { 'a', 0xF0, 0x9F, 0x98, 0x80, 'b' }.Select(c => (int)c).ToArray(), t.Encode("a\U0001F600b", addBos: false));

        // Control: when the split keeps "a" and the emoji together, the merge does fire.
        var together = TinyTokenizer.Build(TinyTokenizer.Document([("a", "\u00F0")], false, preTokenizer: TinyTokenizer.SplitThenByteLevel(@"\s+")));
        CollectionAssert.AreEqual(new[] { 256, 0x9F, 0x98, 0x80, 'b' }, together.Encode("a\U0001F600b", addBos: false));
    }

    [TestMethod]
    public void ConfigTokensMayBeStringsOrObjects()
    {
        var added = new JsonArray(TinyTokenizer.Added(300, "<s>"), TinyTokenizer.Added(301, "</s>"));
        var doc = TinyTokenizer.Document([], false, addedTokens: added);
        var t = TinyTokenizer.Build(doc, """{"add_bos_token": true, "bos_token": "<s>", "eos_token": {"content": "</s>"}}""");
        Assert.AreEqual(300, t.BosId);
        Assert.AreEqual(301, t.EosId);
        CollectionAssert.AreEqual(new[] { 300, (int)'x' }, t.Encode("x", addBos: true));
        var noConfig = TinyTokenizer.Build(doc);
        Assert.IsFalse(noConfig.AddBosToken);
        Assert.IsNull(noConfig.BosId);
    }
}

[TestClass]
public sealed class MergeLoopTests
{
    [TestMethod]
    public void HeapAndScanMergeLoopsAgree()
    {
        // The short-piece scan and the long-piece heap must give identical merges; compare them on
        // varied real pieces from the shared cases and on synthetic long words.
        var tokenizer = TokenizerFixtures.DeepSeek;
        var rng = new Random(1234);
        var words = TokenizerFixtures.Cases.SelectMany(c => c.Text.Split(' ', '\n')).Where(w => w.Length > 0).ToList();
        for (var i = 0; i < 200; i++)
        {
            words.Add(new string(Enumerable.Range(0, rng.Next(20, 120)).Select(_ => (char)('a' + rng.Next(26))).ToArray()));
        }

        foreach (var w in words)
        {
            CollectionAssert.AreEqual(tokenizer.BpeWith(w, heap: false), tokenizer.BpeWith(w, heap: true), w);
        }
    }

    [TestMethod]
    public void ByteLevelPrefixSpaceAppliesToEachTextSegment()
    {
        var pre = new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = true, ["use_regex"] = true };
        var added = new JsonArray(TinyTokenizer.Added(300, "<x>"));
        var t = TinyTokenizer.Build(TinyTokenizer.Document([("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o")], false, pre, added));
        CollectionAssert.AreEqual(new[] { 32, 259 }, t.Encode("hello", addBos: false));
        CollectionAssert.AreEqual(new[] { 32, 259, 300, 32, 259 }, t.Encode("hello<x>hello", addBos: false));
    }
}
