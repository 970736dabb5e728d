using DeepSeekCuda.Text;

namespace DeepSeekCuda.Tests.Inference;

[TestClass]
public sealed class ReasoningParserTests
{
    private static (string Reasoning, string Answer, List<TextSegment> Segments) Run(ReasoningParser parser, IEnumerable<string> deltas)
    {
        var segments = new List<TextSegment>();
        foreach (var d in deltas)
        {
            segments.AddRange(parser.Push(d));
        }

        segments.AddRange(parser.Flush());
        return (string.Concat(segments.Where(s => s.Kind == TextKind.Reasoning).Select(s => s.Text)),
                string.Concat(segments.Where(s => s.Kind == TextKind.Answer).Select(s => s.Text)),
                segments);
    }

    /// <summary>Every way to cut <paramref name="text"/> into three pieces (two cut points).</summary>
    private static IEnumerable<string[]> Splits(string text)
    {
        for (var i = 0; i <= text.Length; i++)
        {
            for (var j = i; j <= text.Length; j++)
            {
                yield return [text[..i], text[i..j], text[j..]];
            }
        }
    }

    [TestMethod]
    public void TagsSplitAnywhere_SplitExactly_AndNoTagLeaks()
    {
        const string Text = "<think>\nstep 1</think>\n\nThe answer";
        foreach (var parts in Splits(Text))
        {
            var (reasoning, answer, segments) = Run(new ReasoningParser(), parts);
            var where = string.Join("|", parts);
            Assert.AreEqual("\nstep 1", reasoning, where);
            Assert.AreEqual("\n\nThe answer", answer, where);
            Assert.IsFalse(segments.Any(s => s.Text.Contains('<') || s.Text.Contains('>')), where);
        }
    }

    [TestMethod]
    public void StartInReasoning_EveryCharacterAsItsOwnDelta_AndEveryTwoWaySplit()
    {
        const string Text = "thinking</think>answer";
        var (r, a, _) = Run(new ReasoningParser(startInReasoning: true), Text.Select(c => c.ToString()));
        Assert.AreEqual("thinking", r);
        Assert.AreEqual("answer", a);
        foreach (var parts in Splits(Text))
        {
            (r, a, var segments) = Run(new ReasoningParser(startInReasoning: true), parts);
            Assert.AreEqual("thinking", r);
            Assert.AreEqual("answer", a);
            Assert.IsFalse(segments.Any(s => s.Text.Contains('<')));
        }
    }

    [TestMethod]
    public void WholeTagTokens_AsR1Emits()
    {
        var (r, a, _) = Run(new ReasoningParser(), ["<think>", "x", "</think>", "y"]);
        Assert.AreEqual("x", r);
        Assert.AreEqual("y", a);
    }

    [TestMethod]
    public void NearMissesStayText()
    {
        var (r, a, _) = Run(new ReasoningParser(startInReasoning: true), ["a<b</th", "ink", ">c<thin"]);
        Assert.AreEqual("a<b", r);
        Assert.AreEqual("c<thin", a);

        (r, a, _) = Run(new ReasoningParser(), ["<thing>", "x"]);
        Assert.AreEqual(string.Empty, r);
        Assert.AreEqual("<thing>x", a);
    }

    [TestMethod]
    public void ThinkAfterAnswerText_IsText()
    {
        var (r, a, _) = Run(new ReasoningParser(), ["Hello <think>x</think>"]);
        Assert.AreEqual(string.Empty, r);
        Assert.AreEqual("Hello <think>x</think>", a);
    }

    [TestMethod]
    public void UnclosedReasoning_FlushesHeldPartialTagAsReasoning()
    {
        var parser = new ReasoningParser(startInReasoning: true);
        var pushed = parser.Push("abc</thi");
        Assert.HasCount(1, pushed);
        Assert.AreEqual(new TextSegment(TextKind.Reasoning, "abc"), pushed[0]);
        var flushed = parser.Flush();
        Assert.HasCount(1, flushed);
        Assert.AreEqual(new TextSegment(TextKind.Reasoning, "</thi"), flushed[0]);
    }
}
