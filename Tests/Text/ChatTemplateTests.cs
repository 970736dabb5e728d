using System.Text.Json;
using DeepSeekCuda.Tests.Support;
using DeepSeekCuda.Text;

namespace DeepSeekCuda.Tests.Text;

[TestClass]
public sealed class ChatTemplateTests
{
    private const string B = "<｜begin▁of▁sentence｜>", E = "<｜end▁of▁sentence｜>", U = "<｜User｜>", A = "<｜Assistant｜>";
    private const string CallsB = "<｜tool▁calls▁begin｜>", CallsE = "<｜tool▁calls▁end｜>", CallB = "<｜tool▁call▁begin｜>", CallE = "<｜tool▁call▁end｜>", Sep = "<｜tool▁sep｜>";
    private const string OutsB = "<｜tool▁outputs▁begin｜>", OutsE = "<｜tool▁outputs▁end｜>", OutB = "<｜tool▁output▁begin｜>", OutE = "<｜tool▁output▁end｜>";

    private static readonly ChatTemplateOptions V3 = new() { Kind = ChatTemplateKind.V3 };
    private static readonly ChatTemplateOptions R1 = new() { Kind = ChatTemplateKind.R1 };

    [TestMethod]
    public void V3_RendersAndEncodesEverySharedCaseExactly()
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(SharedData.Tokenizer, "chat-template-cases.json")));
        var cases = doc.RootElement.GetProperty("cases");
        Assert.IsGreaterThan(0, cases.GetArrayLength());
        foreach (var c in cases.EnumerateArray())
        {
            var turns = c.GetProperty("messages").EnumerateArray().Select(ToolTemplateCasesTests.ToolCase.Turn).ToList();
            Assert.AreEqual(c.GetProperty("text").GetString(), ChatTemplate.Render(turns, V3));
            var ids = c.GetProperty("ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();
            CollectionAssert.AreEqual(ids, ChatTemplate.Encode(TokenizerFixtures.DeepSeek, turns, V3));
        }
    }

    [TestMethod]
    public void V3_WithoutGenerationPrompt_EndsAfterLastTurn()
    {
        // Jinja: the trailing '<｜Assistant｜>' is emitted only under add_generation_prompt.
        var text = ChatTemplate.Render([ChatTurn.User("Hi"), ChatTurn.Assistant("Yo")], V3 with { AddGenerationPrompt = false });
        Assert.AreEqual(B + U + "Hi" + A + "Yo" + E, text);
    }

    [TestMethod]
    public void V3_DoesNotStripPastReasoning()
    {
        var text = ChatTemplate.Render([ChatTurn.User("Q"), ChatTurn.Assistant("<think>r</think>a"), ChatTurn.User("Q2")], V3);
        Assert.AreEqual(B + U + "Q" + A + "<think>r</think>a" + E + U + "Q2" + A, text);
    }

    [TestMethod]
    public void R1_SingleUser_ForcesThink()
    {
        // MODEL.md §8 example: [user "Hi"] → <｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜><think>\n
        Assert.AreEqual(B + U + "Hi" + A + "<think>\n", ChatTemplate.Render([ChatTurn.User("Hi")], R1));
    }

    [TestMethod]
    public void R1_StripsPastAssistantUpToLastThinkClose_AndJoinsSystemPrompts()
    {
        // §8 rule 1 (systems joined by "\n\n" after BOS) and rule 2 (keep only text after the last </think>).
        var text = ChatTemplate.Render(
            [ChatTurn.System("S1"), ChatTurn.User("Q1"), ChatTurn.System("S2"), ChatTurn.Assistant("<think>a</think>b</think> final"), ChatTurn.User("Q2")],
            R1);
        Assert.AreEqual(B + "S1\n\nS2" + U + "Q1" + A + " final" + E + U + "Q2" + A + "<think>\n", text);
    }

    [TestMethod]
    public void R1_ToolCallsAndOutputs()
    {
        // §8 tools: "<｜Assistant｜>" + content + calls begin, each call "<｜tool▁call▁begin｜>type<｜tool▁sep｜>name\n```json\nargs\n```<｜tool▁call▁end｜>",
        // further calls prefixed by "\n", then calls end + EOS; outputs open the run with outputs begin, each wrapped,
        // separated by "\n" (as in both published templates); the next assistant turn opens with outputs end.
        var turns = new List<ChatTurn>
        {
            ChatTurn.User("Weather?"),
            ChatTurn.AssistantToolCalls([new ChatToolCall("get", "{\"c\":\"Paris\"}"), new ChatToolCall("get", "{\"c\":\"Rome\"}")], "Checking."),
            ChatTurn.Tool("20C"),
            ChatTurn.Tool("25C"),
            ChatTurn.Assistant("<think>compare</think>Rome is warmer."),
            ChatTurn.User("Thanks"),
        };
        var expected = B + U + "Weather?"
            + A + "Checking." + CallsB
            + CallB + "function" + Sep + "get\n```json\n{\"c\":\"Paris\"}\n```" + CallE
            + "\n" + CallB + "function" + Sep + "get\n```json\n{\"c\":\"Rome\"}\n```" + CallE
            + CallsE + E
            + OutsB + OutB + "20C" + OutE + "\n" + OutB + "25C" + OutE
            + OutsE + "Rome is warmer." + E
            + U + "Thanks" + A + "<think>\n";
        Assert.AreEqual(expected, ChatTemplate.Render(turns, R1));
    }

    [TestMethod]
    public void R1_EndingOnToolOutput_ClosesOutputsWithoutGenerationPrompt()
    {
        // §8: outputs end closes a prompt that finishes on a tool result; rule 3 skips the generation prompt then.
        var turns = new List<ChatTurn> { ChatTurn.User("x"), ChatTurn.AssistantToolCalls([new ChatToolCall("f", "{}")]), ChatTurn.Tool("1") };
        var expected = B + U + "x" + A + CallsB + CallB + "function" + Sep + "f\n```json\n{}\n```" + CallE + CallsE + E + OutsB + OutB + "1" + OutE + OutsE;
        Assert.AreEqual(expected, ChatTemplate.Render(turns, R1));
    }

    [TestMethod]
    public void V3_ToolCalls_FollowTheJinjaQuirks()
    {
        // From tokenizer_config.json's Jinja, content none: the first call of the conversation gets
        // '<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>...<｜tool▁call▁end｜>' with no calls end;
        // every later call (ns.is_first never resets) is '\n<｜tool▁call▁begin｜>...<｜tool▁call▁end｜>' followed by
        // '<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'. Tool outputs: the first ever opens with outputs begin, later
        // ones are '\n' + wrapped; the assistant after tools starts with outputs end; the template ends with
        // outputs end when the last message is a tool, and then adds no generation prompt.
        var turns = new List<ChatTurn>
        {
            ChatTurn.User("q"),
            ChatTurn.AssistantToolCalls([new ChatToolCall("f", "{\"a\":1}"), new ChatToolCall("g", "{}")]),
            ChatTurn.Tool("r1"),
            ChatTurn.Tool("r2"),
            ChatTurn.Assistant("done"),
            ChatTurn.User("again"),
            ChatTurn.AssistantToolCalls([new ChatToolCall("h", "[]")]),
            ChatTurn.Tool("r3"),
        };
        var expected = B + U + "q"
            + A + CallsB + CallB + "function" + Sep + "f\n```json\n{\"a\":1}\n```" + CallE
            + "\n" + CallB + "function" + Sep + "g\n```json\n{}\n```" + CallE + CallsE + E
            + OutsB + OutB + "r1" + OutE + "\n" + OutB + "r2" + OutE
            + OutsE + "done" + E
            + U + "again"
            + "\n" + CallB + "function" + Sep + "h\n```json\n[]\n```" + CallE + CallsE + E
            + "\n" + OutB + "r3" + OutE
            + OutsE;
        Assert.AreEqual(expected, ChatTemplate.Render(turns, V3));
    }

    [TestMethod]
    public void V3_AssistantWithTextAndCalls_DropsCalls()
    {
        // Jinja renders tool_calls only in the "content is none" branch.
        var turns = new List<ChatTurn> { ChatTurn.User("q"), ChatTurn.AssistantToolCalls([new ChatToolCall("f", "{}")], "text") };
        Assert.AreEqual(B + U + "q" + A + "text" + E + A, ChatTemplate.Render(turns, V3));
    }
}
