using System.Text;
using DeepSeekCuda.Inference;
using DeepSeekCuda.Serving;
using DeepSeekCuda.Text;

namespace DeepSeekCuda.Tests.Inference;

[TestClass]
public sealed class TextGeneratorTests
{
    private static readonly FakeTokenizer Tok = new();

    private static int[] Prompt(string text) => Tok.Encode(text, addBos: true);

    private static int[] Bytes(string text) => Tok.Encode(text, addBos: false);

    [TestMethod]
    public async Task Greedy_EqualsIndependentArgmaxLoop()
    {
        var model = FakeModel.Bigram(seed: 1);
        var prompt = Prompt("Hi");
        var expected = Reference.Greedy(model, prompt, FakeTokenizer.Eos, maxTokens: 30);
        var result = await new TextGenerator(model, Tok).GenerateTextAsync(prompt, SamplingOptions.Greedy with { MaxTokens = 30 });

        CollectionAssert.AreEqual(expected, result.TokenIds.ToList());
        Assert.AreEqual(Tok.Decode(expected.Where(id => id != FakeTokenizer.Eos).ToArray()), result.Text);
        Assert.AreEqual(new GenerationUsage(prompt.Length, expected.Count), result.Usage);
        Assert.AreEqual(expected[^1] == FakeTokenizer.Eos ? FinishReason.EndOfSequence : FinishReason.Length, result.FinishReason);
    }

    [TestMethod]
    public async Task SpecialTokensAreNotText_ThinkTagsAre()
    {
        // A (special) chat marker in the output is counted and reported by id, but prints nothing;
        // R1's non-special <think>/</think> stay text for the reasoning parser.
        var prompt = Prompt("q");
        int[] script = [.. Bytes("ab"), FakeTokenizer.AssistantId, .. Bytes("c"), FakeTokenizer.EndThink, .. Bytes("d")];
        var model = FakeModel.Scripted(script, prompt.Length);
        var updates = new List<GenerationUpdate>();
        await foreach (var u in new TextGenerator(model, Tok).GenerateAsync(prompt, SamplingOptions.Greedy))
        {
            updates.Add(u);
        }

        Assert.AreEqual("abc</think>d", string.Concat(updates.Select(u => u.Text)));
        Assert.IsTrue(updates.Any(u => u.TokenId == FakeTokenizer.AssistantId && u.Text.Length == 0));
        Assert.AreEqual(script.Length + 1, updates[^1].Usage.GeneratedTokens);
    }

    [TestMethod]
    public async Task Scripted_MultiByteCharacters_StreamIntact_EndsOnEos()
    {
        const string Out = "héllo € 😀!";
        var prompt = Prompt("q");
        var model = FakeModel.Scripted(Bytes(Out), prompt.Length);
        var deltas = new List<string>();
        GenerationUpdate? last = null;
        await foreach (var u in new TextGenerator(model, Tok).GenerateAsync(prompt, SamplingOptions.Greedy))
        {
            deltas.Add(u.Text);
            last = u;
        }

        Assert.AreEqual(Out, string.Concat(deltas));
        Assert.IsFalse(deltas.Any(d => d.Contains('\uFFFD')));
        Assert.AreEqual(FinishReason.EndOfSequence, last!.FinishReason);
        Assert.AreEqual(Encoding.UTF8.GetByteCount(Out) + 1, last.Usage.GeneratedTokens);
        Assert.AreEqual(1, model.SessionsDisposed);
    }

    [TestMethod]
    public async Task StopSequence_AcrossTokens_NotEmitted_NorAnyPrefixOfIt()
    {
        var prompt = Prompt("q");
        var model = FakeModel.Scripted(Bytes("Hello, wSTorld. STOP here"), prompt.Length);
        var deltas = new List<string>();
        GenerationUpdate? last = null;
        await foreach (var u in new TextGenerator(model, Tok).GenerateAsync(prompt, SamplingOptions.Greedy with { StopSequences = ["STOP", "xyz"] }))
        {
            deltas.Add(u.Text);
            last = u;
        }

        Assert.AreEqual("Hello, wSTorld. ", string.Concat(deltas));
        Assert.AreEqual(FinishReason.Stop, last!.FinishReason);
        Assert.AreEqual("Hello, wSTorld. STOP".Length, last.Usage.GeneratedTokens);

        // "S" and "ST" were held back until "o" showed they were not "STOP"; no delta ends in a stop prefix.
        CollectionAssert.Contains(deltas, "STo");
        Assert.IsFalse(deltas.Any(d => d.EndsWith('S') || d.EndsWith("ST", StringComparison.Ordinal)));
    }

    [TestMethod]
    public async Task HeldBackStopPrefix_IsReleasedAtEos()
    {
        var prompt = Prompt("q");
        var model = FakeModel.Scripted(Bytes("abcab"), prompt.Length);
        var result = await new TextGenerator(model, Tok).GenerateTextAsync(prompt, SamplingOptions.Greedy with { StopSequences = ["abd"] });
        Assert.AreEqual("abcab", result.Text);
        Assert.AreEqual(FinishReason.EndOfSequence, result.FinishReason);
    }

    [TestMethod]
    public async Task MaxTokens_FinishesWithLength()
    {
        var prompt = Prompt("q");
        var model = FakeModel.Scripted(Bytes("abcdefgh"), prompt.Length);
        var result = await new TextGenerator(model, Tok).GenerateTextAsync(prompt, SamplingOptions.Greedy with { MaxTokens = 3 });
        Assert.AreEqual("abc", result.Text);
        Assert.AreEqual(FinishReason.Length, result.FinishReason);
        Assert.AreEqual(3, result.Usage.GeneratedTokens);
        Assert.AreEqual(3, model.ForwardCalls); // prefill + 2 decode steps: the last token is never fed
    }

    [TestMethod]
    public async Task FullContext_FinishesWithLength()
    {
        var prompt = Prompt("q"); // 2 tokens
        var model = FakeModel.Scripted(Bytes("abcdefgh"), prompt.Length, maxSequenceLength: 5);
        var result = await new TextGenerator(model, Tok).GenerateTextAsync(prompt, SamplingOptions.Greedy);

        // Cache holds 5: the prompt and 3 generated tokens fed back, plus the 4th sampled from the last logits.
        Assert.AreEqual("abcd", result.Text);
        Assert.AreEqual(FinishReason.Length, result.FinishReason);
    }

    [TestMethod]
    public void PromptLongerThanContext_ThrowsAtTheCall_NamingTheLimit_NoSession()
    {
        var prompt = Prompt("abcdef"); // 7 tokens
        var model = FakeModel.Scripted(Bytes("x"), prompt.Length, maxSequenceLength: 6);
        var e = Assert.ThrowsExactly<ArgumentException>(() => new TextGenerator(model, Tok).GenerateAsync(prompt, SamplingOptions.Greedy));
        Assert.AreEqual("promptIds", e.ParamName);
        StringAssert.Contains(e.Message, "7 tokens");
        StringAssert.Contains(e.Message, "holds 6");
        Assert.AreEqual(0, model.SessionsCreated);
    }

    [TestMethod]
    public async Task PromptFillingTheContext_GeneratesExactlyOneToken()
    {
        var prompt = Prompt("abcde"); // 6 tokens
        var model = FakeModel.Scripted(Bytes("xyz"), prompt.Length, maxSequenceLength: 6);
        var result = await new TextGenerator(model, Tok).GenerateTextAsync(prompt, SamplingOptions.Greedy);
        Assert.AreEqual("x", result.Text);
        Assert.AreEqual(FinishReason.Length, result.FinishReason);
        Assert.AreEqual(1, model.ForwardCalls);
    }

    [TestMethod]
    public async Task ReasoningStartInside_SplitsOnPlainTextTag()
    {
        var prompt = Prompt("q");
        var model = FakeModel.Scripted(Bytes("plan</think>\n\nok"), prompt.Length);
        var result = await new TextGenerator(model, Tok).GenerateTextAsync(prompt, SamplingOptions.Greedy, ReasoningMode.StartInReasoning);
        Assert.AreEqual("plan", result.Reasoning);
        Assert.AreEqual("\n\nok", result.Answer);
    }

    [TestMethod]
    public async Task ReasoningDetect_SplitsOnAddedTagTokens()
    {
        var prompt = Prompt("q");
        int[] script = [FakeTokenizer.Think, .. Bytes("r"), FakeTokenizer.EndThink, .. Bytes("a")];
        var model = FakeModel.Scripted(script, prompt.Length);
        var result = await new TextGenerator(model, Tok).GenerateTextAsync(prompt, SamplingOptions.Greedy, ReasoningMode.Detect);
        Assert.AreEqual("r", result.Reasoning);
        Assert.AreEqual("a", result.Answer);
    }

    [TestMethod]
    public async Task Cancellation_ThrowsAndDisposesSession()
    {
        var model = FakeModel.Bigram(seed: 2, eosLogit: float.NegativeInfinity);
        using var cts = new CancellationTokenSource();
        var seen = 0;
        await Assert.ThrowsAsync<OperationCanceledException>(async () =>
        {
            await foreach (var _ in new TextGenerator(model, Tok).GenerateAsync(Prompt("q"), new SamplingOptions { Seed = 1 }, cancellationToken: cts.Token))
            {
                if (++seen == 5)
                {
                    await cts.CancelAsync();
                }
            }
        });
        Assert.AreEqual(5, seen);
        Assert.AreEqual(1, model.SessionsDisposed);
    }

    [TestMethod]
    public void StringPrompt_WithBosText_IsNotGivenASecondBos()
    {
        var g = new TextGenerator(FakeModel.Bigram(1), Tok);
        CollectionAssert.AreEqual(new[] { FakeTokenizer.Bos, FakeTokenizer.UserId, 'x' }, g.EncodePrompt(ChatTemplate.Bos + ChatTemplate.User + "x"));
        CollectionAssert.AreEqual(new[] { FakeTokenizer.Bos, 'x' }, g.EncodePrompt("x"));
    }
}
