using System.Text;
using System.Text.Json;
using DeepSeekCuda.Inference.Constraints;
using DeepSeekCuda.Text;

namespace DeepSeekCuda.Tests.Inference.Constraints;

/// <summary>ControlToken, Sequence, Choice, FreeText, startAfter and EOS as GrammarConstraint specifies them.</summary>
[TestClass]
public sealed class GrammarConstraintTests
{
    private static readonly PieceTokenizer Tokenizer = new();
    private static readonly int Eos = Tokenizer.EosId!.Value;
    private static readonly int ToolBegin = PieceTokenizer.AddedId(1);
    private static readonly int ThinkClose = PieceTokenizer.AddedId(2);

    private static int Piece(string text) => 256 + Array.IndexOf(PieceTokenizer.Pieces, text);

    private static HashSet<int> Allowed(GrammarConstraint c)
    {
        var logits = new float[Tokenizer.VocabSize];
        c.Mask(logits);
        return [.. Enumerable.Range(0, logits.Length).Where(i => !float.IsNegativeInfinity(logits[i]))];
    }

    [TestMethod]
    public void ControlTokenAllowsOnlyItsId()
    {
        var g = Grammar.Sequence(Grammar.ControlToken(PieceTokenizer.Added[1]), Grammar.Literal("f"), Grammar.JsonObject());
        var c = new GrammarConstraint(g, Vocabularies.Pieces);
        CollectionAssert.AreEquivalent(new[] { ToolBegin }, Allowed(c).ToArray(), "only the added token, not its spelling in bytes");
        Assert.ThrowsExactly<InvalidOperationException>(() => new GrammarConstraint(g, Vocabularies.Pieces).Advance('<'));
        c.Advance(ToolBegin);
        CollectionAssert.AreEquivalent(new[] { (int)'f' }, Allowed(c).ToArray());
        c.Advance('f');
        Assert.IsFalse(Allowed(c).Contains(Eos));
        c.Advance(Piece("{\""));
        c.Advance('x');
        c.Advance(Piece("\":"));
        Assert.IsFalse(c.IsComplete);
        c.Advance(Piece("null"));
        c.Advance('}');
        Assert.IsTrue(c.IsComplete);
        CollectionAssert.AreEquivalent(new[] { Eos, ' ', '\t', '\n', '\r', Piece("\n"), Piece("\n  "), Piece("  "), Piece("\t") }, Allowed(c).ToArray(), "complete: EOS, or whitespace after the JSON");
        var end = new GrammarConstraint(Grammar.Sequence(Grammar.JsonObject(), Grammar.Literal("!")), Vocabularies.Pieces);
        foreach (var id in new[] { (int)'{', '}', '!' })
        {
            end.Advance(id);
        }

        CollectionAssert.AreEquivalent(new[] { Eos }, Allowed(end).ToArray(), "complete and nothing can follow: only EOS");
        c.Advance(Eos);
    }

    [TestMethod]
    public void ByteTokensNeverMatchControlTokensNorTheReverse()
    {
        // "</think>" is both a byte-level piece and an added token; a literal takes the piece, a control token the added id.
        var literal = Allowed(new GrammarConstraint(Grammar.Literal("</think>"), Vocabularies.Pieces));
        Assert.Contains(Piece("</think>"), literal);
        Assert.Contains(Piece("</"), literal);
        Assert.DoesNotContain(ThinkClose, literal);
        var control = Allowed(new GrammarConstraint(Grammar.ControlToken("</think>"), Vocabularies.Pieces));
        CollectionAssert.AreEquivalent(new[] { ThinkClose }, control.ToArray());
    }

    [TestMethod]
    public void UnknownControlTokenIsRefused() =>
        Assert.ThrowsExactly<ArgumentException>(() => new GrammarConstraint(Grammar.ControlToken("<｜nope｜>"), Vocabularies.Pieces));

    [TestMethod]
    public void ChoiceOfToolCallOrFreeText()
    {
        var g = Grammar.Choice(Grammar.Sequence(Grammar.ControlToken(PieceTokenizer.Added[1]), Grammar.JsonObject()), Grammar.Sequence(Grammar.Literal("ok"), Grammar.FreeText()));
        var c = new GrammarConstraint(g, Vocabularies.Pieces);
        var first = Allowed(c);
        Assert.Contains(ToolBegin, first);
        Assert.Contains('o', first);
        Assert.DoesNotContain(Eos, first);
        Assert.DoesNotContain(ThinkClose, first);
        c.Advance('o');
        c.Advance('k');
        Assert.IsTrue(c.IsComplete);
        Assert.HasCount(Tokenizer.VocabSize, Allowed(c), "free text: every id, added ones and EOS included");
        c.Advance(ThinkClose);
        c.Advance(Piece("😀"));
        Assert.HasCount(Tokenizer.VocabSize, Allowed(c));
        c.Advance(Eos);
    }

    [TestMethod]
    public void FreeTextAloneAllowsEverything()
    {
        var c = new GrammarConstraint(Grammar.FreeText(), Vocabularies.Pieces);
        Assert.HasCount(Tokenizer.VocabSize, Allowed(c));
        Assert.IsTrue(c.IsComplete);
        c.Advance(ToolBegin);
        c.Advance(Tokenizer.VocabSize - 4); // an overlong byte pair: free text is bytes, not checked text
        Assert.HasCount(Tokenizer.VocabSize, Allowed(c));
    }

    [TestMethod]
    public void StartAfterAnAddedToken()
    {
        var c = new GrammarConstraint(Grammar.JsonObject(), Vocabularies.Pieces, startAfter: "</think>");
        Assert.IsFalse(c.IsStarted);
        foreach (var id in Tokenizer.EncodeLiteral("I think { is next <think> hmm"))
        {
            Assert.Contains(id, Allowed(c));
            c.Advance(id);
        }

        Assert.IsFalse(c.IsStarted);
        Assert.Contains(Eos, Allowed(c), "unconstrained before the marker");
        c.Advance(ThinkClose);
        Assert.IsTrue(c.IsStarted);
        var allowed = Allowed(c);
        Assert.Contains('{', allowed);
        Assert.Contains('\n', allowed, "JSON may start with whitespace");
        Assert.DoesNotContain('[', allowed);
        Assert.DoesNotContain(Eos, allowed);
    }

    [TestMethod]
    public void StartAfterBytesSplitAcrossTokens()
    {
        var c = new GrammarConstraint(Grammar.JsonObject(), Vocabularies.Pieces, startAfter: "</think>");
        var before = Allowed(c);
        Assert.Contains(Piece("</think>\n\n{"), before, "ends the marker, then a blank line and the object");
        Assert.Contains(Piece("ink>x"), before, "cannot end the marker from here, so it is free text");
        Assert.Contains(Piece("</think>"), before);
        c.Advance(Piece("</th"));
        var mid = Allowed(c);
        Assert.Contains(Piece("ink>{\""), mid, "ends the marker and starts the object");
        Assert.DoesNotContain(Piece("ink>x"), mid, "ends the marker, then 'x' is not JSON");
        Assert.Contains('i', mid);
        c.Advance(Piece("ink>{\""));
        Assert.IsTrue(c.IsStarted);
        var inKey = Allowed(c);
        Assert.Contains('a', inKey);
        Assert.DoesNotContain('\n', inKey);
        Assert.DoesNotContain(Eos, inKey);
    }

    [TestMethod]
    public void StartAfterMarkerSplitIntoBytes()
    {
        var c = new GrammarConstraint(Grammar.Literal("x"), Vocabularies.Pieces, startAfter: "</think>");
        foreach (var b in "<</thin</think>"u8.ToArray())
        {
            Assert.IsFalse(c.IsStarted);
            c.Advance(b);
        }

        Assert.IsTrue(c.IsStarted);
        CollectionAssert.AreEquivalent(new[] { (int)'x' }, Allowed(c).ToArray());
        c.Advance('x');
        CollectionAssert.AreEquivalent(new[] { Eos }, Allowed(c).ToArray());
    }

    [TestMethod]
    public void EosOnlyWhenComplete()
    {
        using var doc = JsonDocument.Parse("""{"type":"integer"}""");
        var c = new GrammarConstraint(Grammar.JsonSchema(doc.RootElement), Vocabularies.Pieces);
        Assert.DoesNotContain(Eos, Allowed(c));
        c.Advance('1');
        var allowed = Allowed(c);
        Assert.Contains(Eos, allowed, "1 may end here");
        Assert.Contains('2', allowed, "or go on");
        Assert.DoesNotContain('.', allowed);
        c.Advance('2');
        Assert.IsTrue(c.IsComplete);
    }

    [TestMethod]
    public void NoAllowedTokenThrows()
    {
        // A vocabulary of "a", "b" and EOS cannot write "c".
        var tokenizer = new ListTokenizer(["a", "b", "<eos>"], eos: 2);
        var vocabulary = TokenVocabulary.Create(tokenizer);
        var c = new GrammarConstraint(Grammar.Sequence(Grammar.Literal("a"), Grammar.Literal("c")), vocabulary);
        c.Mask(new float[3]);
        c.Advance(0);
        var e = Assert.ThrowsExactly<InvalidOperationException>(() => c.Mask(new float[3]));
        StringAssert.Contains(e.Message, "no token");
        Assert.ThrowsExactly<InvalidOperationException>(() => new GrammarConstraint(Grammar.Choice(), vocabulary));
    }

    [TestMethod]
    public void AdvanceRefusesDisallowedIds()
    {
        var c = new GrammarConstraint(Grammar.JsonValue(), Vocabularies.Pieces);
        Assert.ThrowsExactly<InvalidOperationException>(() => c.Advance('x'));
        Assert.ThrowsExactly<InvalidOperationException>(() => c.Advance(Eos));
        Assert.ThrowsExactly<InvalidOperationException>(() => c.Advance(ToolBegin));
    }

    [TestMethod]
    public void MasksAreCachedPerState()
    {
        var grammar = Grammar.JsonValue();
        var c = new GrammarConstraint(grammar, Vocabularies.Fake);
        var logits = new float[Vocabularies.Fake.Size];
        c.Mask(logits);
        c.Advance('"');
        var hits = c.Compiled.CacheHits;
        foreach (var b in "abcdefgh"u8.ToArray())
        {
            c.Mask(new float[Vocabularies.Fake.Size]);
            c.Advance(b);
        }

        Assert.AreEqual(hits + 7, c.Compiled.CacheHits, "inside a string the state repeats: one walk, then hits");
        var again = new GrammarConstraint(grammar, Vocabularies.Fake);
        again.Mask(logits);
        Assert.AreEqual(hits + 8, again.Compiled.CacheHits, "a second request with the same grammar shares the cache");
    }

    /// <summary>A tokenizer whose ids are the given strings; the EOS id is special.</summary>
    private sealed class ListTokenizer(string[] tokens, int eos) : ITokenizer
    {
        public int VocabSize => tokens.Length;

        public int? BosId => null;

        public int? EosId => eos;

        public bool AddBosToken => false;

        public int[] Encode(string text, bool addBos) => throw new NotSupportedException();

        public int[] EncodeLiteral(string text) => throw new NotSupportedException();

        public int? AddedTokenId(string content) => content == tokens[eos] ? eos : null;

        public ReadOnlySpan<byte> GetTokenBytes(int id) => Encoding.UTF8.GetBytes(tokens[id]);

        public bool IsSpecial(int id) => id == eos;

        public int? TokenToId(string token) => Array.IndexOf(tokens, token) is var i and >= 0 ? i : null;

        public string Decode(ReadOnlySpan<int> ids) => throw new NotSupportedException();
    }
}
