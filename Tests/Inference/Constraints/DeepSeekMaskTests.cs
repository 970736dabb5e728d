using System.Text.Json;
using DeepSeekCuda.Backends;
using DeepSeekCuda.Inference.Constraints;
using DeepSeekCuda.Tests.Text;

namespace DeepSeekCuda.Tests.Inference.Constraints;

/// <summary>
/// On the real DeepSeek-V3 vocabulary (129K ids, multi-byte and partial-UTF-8 pieces): the trie-walked and
/// cached masks equal a brute-force reference that steps every id's bytes through the automaton, and the
/// tokenizer's own encoding of a valid document is allowed at every step.
/// </summary>
[TestClass]
public sealed class DeepSeekMaskTests
{
    internal const string Schema = """
        {"type":"object","properties":{
          "name":{"type":"string"},
          "age":{"type":"integer"},
          "score":{"type":"number"},
          "mood":{"enum":["happy","sad"]},
          "tags":{"type":"array","items":{"type":"string"},"maxItems":5},
          "home":{"type":"object","properties":{"city":{"type":"string"},"zip":{"type":["integer","null"]}},"required":["city","zip"]},
          "active":{"type":"boolean"}},
         "required":["name","age","score","mood","tags","home","active"]}
        """;

    internal const string Document = """
        {"name": "Zoë \"Z\" Ångström 日本語 😀", "age": 42, "score": -0.5e+3, "mood": "happy",
         "tags": ["a\\nb", "\u00e9t\u00e9", "x"], "home": {"city": "Zürich", "zip": null}, "active": true}
        """;

    [TestMethod]
    public void VocabularySeparatesAddedTokensFromTheTrie()
    {
        var tokenizer = TokenizerFixtures.DeepSeek;
        var v = Vocabularies.DeepSeek;
        var added = tokenizer.AddedTokens.Select(a => a.Id).Distinct().Order().ToArray();
        CollectionAssert.AreEqual(added, v.AddedIds, "special or not (the tool-call markers are not special), every added token is one indivisible id");
        Assert.IsTrue(tokenizer.AddedTokens.Any(a => !a.Special), "the fixture has non-special added tokens");

        // Every other id with bytes is in the trie exactly once, under its own bytes.
        var seen = new int[tokenizer.VocabSize];
        var trie = v.Trie;
        var path = new byte[trie.MaxDepth];
        for (var i = 0; i < trie.Count; i++)
        {
            path[trie.Depth[i] - 1] = trie.Label[i];
            for (var t = trie.TokenHead[i]; t >= 0; t = trie.NextSame[t])
            {
                seen[t]++;
                CollectionAssert.AreEqual(tokenizer.GetTokenBytes(t).ToArray(), path[..trie.Depth[i]], $"id {t}");
            }
        }

        for (var id = 0; id < tokenizer.VocabSize; id++)
        {
            Assert.AreEqual(v.IsAdded(id) || tokenizer.GetTokenBytes(id).IsEmpty ? 0 : 1, seen[id], $"id {id}");
        }
    }

    [TestMethod]
    public void MaskEqualsBruteForceAlongADocument()
    {
        var tokenizer = TokenizerFixtures.DeepSeek;
        using var doc = JsonDocument.Parse(Schema);
        var c = new GrammarConstraint(Grammar.JsonSchema(doc.RootElement), Vocabularies.DeepSeek);
        var ids = tokenizer.EncodeLiteral(Document.Trim());
        var logits = new float[tokenizer.VocabSize];
        var checkedStates = 0;
        for (var i = 0; i < ids.Length; i++)
        {
            if (i % 5 == 0 || i == ids.Length - 1)
            {
                ConstrainedRun.AssertMaskMatchesReference(c.Compiled, c.State!, tokenizer, $"before token {i} ({JsonSerializer.Serialize(tokenizer.Decode([ids[i]]))})");
                checkedStates++;
            }

            Array.Clear(logits);
            c.Mask(logits);
            Assert.IsFalse(float.IsNegativeInfinity(logits[ids[i]]), $"the tokenizer's own token {i} {JsonSerializer.Serialize(tokenizer.Decode([ids[i]]))} is masked");
            c.Advance(ids[i]);
        }

        Assert.IsTrue(c.IsComplete);
        ConstrainedRun.AssertMaskMatchesReference(c.Compiled, c.State!, tokenizer, "at the end");
        Array.Clear(logits);
        c.Mask(logits);
        Assert.IsFalse(float.IsNegativeInfinity(logits[tokenizer.EosId!.Value]));
        for (var id = 0; id < logits.Length; id++)
        {
            if (!float.IsNegativeInfinity(logits[id]) && id != tokenizer.EosId)
            {
                Assert.IsTrue(tokenizer.GetTokenBytes(id).ToArray().All(b => b is (byte)' ' or (byte)'\n' or (byte)'\r' or (byte)'\t'), $"complete object: EOS or whitespace, not {JsonSerializer.Serialize(tokenizer.Decode([id]))}");
            }
        }
        Assert.IsGreaterThan(8, checkedStates);
    }

    [TestMethod]
    public void MaskEqualsBruteForceForOtherGrammars()
    {
        var tokenizer = TokenizerFixtures.DeepSeek;
        var tool = Grammar.Sequence(Grammar.ControlToken("<｜tool▁calls▁begin｜>"), Grammar.Literal("function<｜tool▁sep｜>get_weather\n```json\n"), Grammar.JsonObject(), Grammar.Literal("\n```"));
        var x = new Expander();
        (Grammar Grammar, string Prefix)[] cases =
        [
            (Grammar.JsonValue(), ""),
            (Grammar.JsonValue(), "[1, {\"a\": \"b"),
            (Grammar.JsonValue(), "\"\\u00"),
            (Grammar.JsonValue(), "\"\\ud83d"),
            (Grammar.JsonValue(), "-12.5"),
            (Grammar.JsonValue(), "[\n   "),
            (Grammar.JsonValue(), "\"日"),
            (tool, ""),
            (Grammar.Sequence(Grammar.Literal("Answer: "), Grammar.Choice(Grammar.Literal("yes"), Grammar.Literal("no")), Grammar.FreeText()), "Answer: y"),
        ];
        foreach (var (grammar, prefix) in cases)
        {
            var compiled = grammar.CompileFor(Vocabularies.DeepSeek);
            var state = compiled.Start.Step(System.Text.Encoding.UTF8.GetBytes(prefix), x)!;
            Assert.IsNotNull(state, prefix);
            ConstrainedRun.AssertMaskMatchesReference(compiled, state, tokenizer, $"after {JsonSerializer.Serialize(prefix)}");
        }

        // The tool-call grammar on its own tokens: the added token first, then the literal however it is split.
        var begin = tokenizer.AddedTokenId("<｜tool▁calls▁begin｜>")!.Value;
        var c = new GrammarConstraint(tool, Vocabularies.DeepSeek);
        var logits = new float[tokenizer.VocabSize];
        c.Mask(logits);
        Assert.AreEqual(1, logits.Count(l => !float.IsNegativeInfinity(l)));
        c.Advance(begin);
        var sep = tokenizer.AddedTokenId("<｜tool▁sep｜>")!.Value;
        c.Mask(logits);
        Assert.IsTrue(float.IsNegativeInfinity(logits[sep]), "a Literal spelling an added token is bytes, not the added id");
    }

    [TestMethod]
    public void RandomGenerationOnDeepSeekIsValid()
    {
        var tokenizer = TokenizerFixtures.DeepSeek;
        using var doc = JsonDocument.Parse("""{"type":"object","properties":{"ok":{"type":"boolean"},"n":{"type":"integer"},"c":{"enum":["red","green"]}},"required":["ok","n","c"]}""");
        var grammar = Grammar.JsonSchema(doc.RootElement);
        for (var seed = 0; seed < 3; seed++)
        {
            var (text, _) = ConstrainedRun.Generate(new GrammarConstraint(grammar, Vocabularies.DeepSeek), tokenizer, seed, maxSteps: 200, closeAfter: 10);
            using var parsed = JsonDocument.Parse(text);
            Assert.IsNull(SchemaValidator.Validate(parsed.RootElement, doc.RootElement), System.Text.Encoding.UTF8.GetString(text));
        }
    }

    [TestMethod]
    public void StartAfterMaskEqualsBruteForce()
    {
        // R1 style: reasoning, then "</think>" (an added token in some checkpoints, plain bytes in this tokenizer's
        // text), then the constrained answer. Before the marker, an id is refused only when it would end the marker
        // and go on with bytes the grammar's start rejects.
        var tokenizer = TokenizerFixtures.DeepSeek;
        var grammar = Grammar.JsonObject();
        var c = new GrammarConstraint(grammar, Vocabularies.DeepSeek, startAfter: "</think>");
        var start = grammar.CompileFor(Vocabularies.DeepSeek).Start;
        var x = new Expander();
        var marker = "</think>"u8.ToArray();
        var text = new List<byte>();
        var logits = new float[tokenizer.VocabSize];
        var ids = tokenizer.EncodeLiteral("Okay, the user wants JSON. </th").Concat(tokenizer.EncodeLiteral("ink>")).ToArray();
        var blockedSomewhere = false;
        foreach (var id in ids)
        {
            Array.Clear(logits);
            c.Mask(logits);
            for (var t = 0; t < tokenizer.VocabSize; t++)
            {
                var joined = text.Concat(tokenizer.GetTokenBytes(t).ToArray()).ToArray();
                var at = joined.AsSpan().IndexOf(marker);
                var expected = at < 0 || start.Step(joined.AsSpan(at + marker.Length), x) is not null;
                blockedSomewhere |= !expected;
                Assert.AreEqual(expected, !float.IsNegativeInfinity(logits[t]), $"after {JsonSerializer.Serialize(System.Text.Encoding.UTF8.GetString([.. text]))}: id {t} {JsonSerializer.Serialize(tokenizer.Decode([t]))}");
            }

            Assert.IsFalse(c.IsStarted);
            c.Advance(id);
            text.AddRange(tokenizer.GetTokenBytes(id).ToArray());
        }

        Assert.IsTrue(blockedSomewhere, "some token ends the marker with bytes JSON cannot start with");
        Assert.IsTrue(c.IsStarted);
        Array.Clear(logits);
        c.Mask(logits);
        Assert.IsFalse(float.IsNegativeInfinity(logits[tokenizer.EncodeLiteral("{")[0]]));
        Assert.IsTrue(float.IsNegativeInfinity(logits[tokenizer.EosId!.Value]));
    }

    /// <summary>
    /// The allowed ids a constraint writes for the GPU's token choice are exactly the ids its mask leaves, at every step of an R1
    /// answer on the real vocabulary, over the model's padded width (129,280 ids): thinking before "&lt;/think&gt;" (every id but
    /// those that would end the marker wrongly, the padding included), then the document's JSON, then the end of sentence.
    /// </summary>
    [TestMethod]
    public void TheAllowedIdsWrittenAreTheIdsTheMaskLeaves()
    {
        const int modelVocab = 129_280;
        var tokenizer = TokenizerFixtures.DeepSeek;
        Assert.IsLessThan(modelVocab, tokenizer.VocabSize, "the model's vocabulary is padded past the tokenizer's");
        using var doc = JsonDocument.Parse(Schema);
        var c = new GrammarConstraint(Grammar.JsonSchema(doc.RootElement), Vocabularies.DeepSeek, startAfter: "</think>");
        int[] ids = [.. tokenizer.EncodeLiteral("Okay, they want JSON. </th"), .. tokenizer.EncodeLiteral("ink>"), .. tokenizer.EncodeLiteral(Document.Trim()), tokenizer.EosId!.Value];
        var allowed = new ulong[TokenChoice.MaskWords(modelVocab)];
        var logits = new float[modelVocab];
        var (thinking, answering) = (0, 0);
        foreach (var id in ids)
        {
            Array.Fill(allowed, 0x5A5A5A5A5A5A5A5AUL); // every word is written
            Assert.IsTrue(c.TryWriteAllowed(allowed));
            Array.Clear(logits);
            c.Mask(logits);
            var differ = Enumerable.Range(0, modelVocab).Where(t => TokenChoice.IsAllowed(allowed, t) == float.IsNegativeInfinity(logits[t])).ToArray();
            var text = JsonSerializer.Serialize(tokenizer.Decode([id]));
            Assert.IsEmpty(differ, $"before {text} ({(c.IsStarted ? "answering" : "thinking")}): ids {string.Join(", ", differ.Take(5))} differ");
            Assert.IsTrue(TokenChoice.IsAllowed(allowed, id), $"the answer's own token {text}");
            Assert.AreEqual(!c.IsStarted, TokenChoice.IsAllowed(allowed, modelVocab - 1), "the padding is allowed while thinking only (the limit removes it)");
            _ = c.IsStarted ? answering++ : thinking++;
            c.Advance(id);
        }

        Assert.IsGreaterThan(5, thinking);
        Assert.IsGreaterThan(30, answering);
        Assert.ThrowsExactly<InvalidOperationException>(() => c.TryWriteAllowed(allowed), "after the end of sentence");
    }

    [TestMethod]
    public void ConcurrentRequestsShareOneGrammar()
    {
        using var doc = JsonDocument.Parse(Schema);
        var grammar = Grammar.JsonSchema(doc.RootElement);
        var tokenizer = new PieceTokenizer();
        var texts = new byte[16][];
        Parallel.For(0, texts.Length, seed => texts[seed] = ConstrainedRun.Generate(new GrammarConstraint(grammar, Vocabularies.Pieces), tokenizer, seed, closeAfter: 30).Text);
        for (var seed = 0; seed < texts.Length; seed++)
        {
            using var parsed = JsonDocument.Parse(texts[seed]);
            Assert.IsNull(SchemaValidator.Validate(parsed.RootElement, doc.RootElement), System.Text.Encoding.UTF8.GetString(texts[seed]));
            CollectionAssert.AreEqual(texts[seed], ConstrainedRun.Generate(new GrammarConstraint(grammar, Vocabularies.Pieces), tokenizer, seed, closeAfter: 30).Text, "the same seed alone gives the same text");
        }
    }
}
