using DeepSeekCuda.Text;

namespace DeepSeekCuda.Tests.Text;

[TestClass]
public sealed class ToolCallParserTests
{
    private const string CallsB = ChatTemplate.ToolCallsBegin, CallsE = ChatTemplate.ToolCallsEnd, CallB = ChatTemplate.ToolCallBegin, CallE = ChatTemplate.ToolCallEnd, Sep = ChatTemplate.ToolSep;

    private static string Call(string name, string args, string type = "function") => CallB + type + Sep + name + "\n```json\n" + args + "\n```" + CallE;

    // Outputs as DeepSeek models write them, and as they go wrong.
    private static readonly string[] Samples =
    [
        "Let me check." + CallsB + Call("get_weather", "{\"location\": \"Paris\"}") + CallsE,
        CallsB + Call("get_weather", "{\"location\":\"Paris\"}") + "\n" + Call("get_time", "{}") + CallsE + "Done.",
        CallsB + Call("echo", "{\"text\": \"a " + CallE + " b \\\" ``` " + CallsE + "\"}") + CallsE,
        CallsB + CallB + "function" + Sep + "search\n{\"query\": \"cats\"}" + CallE,
        "<｜tool nope " + CallsB + CallB + "function" + Sep + "f\n``` JSON  \n{\n  \"a\": [1, 2],\n  \"b\": {\"c\": null}\n}\n```  \n" + CallE + CallsE + " after",
        CallsB + Call("run", "{\"cmd\": \"ls\"}", "code_interpreter") + CallsE,
        CallsB + CallB + "function" + Sep + "ping\n```json\n\n```" + CallE + CallsE,
        CallsB + Call("bad", "{\"a\": 1,}") + CallsE,
        "plain <｜tool▁calls text with a < and ``` and " + CallE + " only",
        "x" + CallsB + Call("a", "{}") + Call("b", "{\"k\": \"v\"}") + "tail",
        CallsB + Call("get_weather", "{\"loc\": \"中文 😀\"}") + "\n" + Call("f", "[1]") + CallsE,

        // Broken ones: given back as text, completed at Flush, or ended by the next marker.
        CallsB + "oops" + CallsB + Call("a", "{}") + CallsE,
        CallsB + CallB + "func\ntion" + Sep + "a\n{}" + CallE + CallsE,
        CallsB + CallB + "function" + Sep + "f\n```json\n{\"a\": \"unfinished",
        CallsB + CallB + "function" + Sep + "f\n```json\n{\"a\": 1}\n```\n",
        CallsB + CallB + "function" + Sep + "a\n```json\n{\"x\": 1}\n```" + CallB + "function" + Sep + "b\n{}" + CallsE + "!",
        CallsB + Call("a", "{}") + "\n" + CallB + "function" + Sep + "b",
        "Hi " + CallsB[..5],
    ];

    [TestMethod]
    public void OneCall_TextThenStartedDeltasCompleted()
    {
        var events = Parse(Samples[0]);
        CollectionAssert.AreEqual(
            new ToolCallEvent[]
            {
                new ToolCallText("Let me check."),
                new ToolCallStarted(0, "get_weather", "function"),
                new ToolCallArgumentsDelta(0, "{\"location\": \"Paris\"}"),
                new ToolCallCompleted(0, "get_weather", "{\"location\": \"Paris\"}", "function", true),
            },
            events.ToArray());
    }

    [TestMethod]
    public void SeveralCalls_SeparatedByNewline_TextAfterBlock()
    {
        var events = Parse(Samples[1]);
        CollectionAssert.AreEqual(
            new ToolCallEvent[]
            {
                new ToolCallStarted(0, "get_weather", "function"),
                new ToolCallArgumentsDelta(0, "{\"location\":\"Paris\"}"),
                new ToolCallCompleted(0, "get_weather", "{\"location\":\"Paris\"}", "function", true),
                new ToolCallStarted(1, "get_time", "function"),
                new ToolCallArgumentsDelta(1, "{}"),
                new ToolCallCompleted(1, "get_time", "{}", "function", true),
                new ToolCallText("Done."),
            },
            events.ToArray());
    }

    [TestMethod]
    public void MarkersAndFencesInsideAJsonString_AreArguments()
    {
        var args = "{\"text\": \"a " + CallE + " b \\\" ``` " + CallsE + "\"}";
        Assert.AreEqual(new ToolCallCompleted(0, "echo", args, "function", true), Completed(Parse(Samples[2])).Single());
    }

    [TestMethod]
    public void MissingFence_AndMissingBlockEnd()
    {
        var events = Parse(Samples[3]);
        Assert.AreEqual(new ToolCallCompleted(0, "search", "{\"query\": \"cats\"}", "function", true), Completed(events).Single());
        Assert.IsFalse(events.OfType<ToolCallText>().Any());
    }

    [TestMethod]
    public void FenceVariants_PrettyJson_NearMissMarkerText()
    {
        var events = Parse(Samples[4]);
        Assert.AreEqual(new ToolCallText("<｜tool nope "), events[0]);
        Assert.AreEqual(new ToolCallCompleted(0, "f", "{\n  \"a\": [1, 2],\n  \"b\": {\"c\": null}\n}", "function", true), Completed(events).Single());
        Assert.AreEqual(new ToolCallText(" after"), events[^1]);
    }

    [TestMethod]
    public void UnknownType_IsKept()
    {
        Assert.AreEqual(new ToolCallCompleted(0, "run", "{\"cmd\": \"ls\"}", "code_interpreter", true), Completed(Parse(Samples[5])).Single());
        Assert.AreEqual(new ToolCallStarted(0, "run", "code_interpreter"), Parse(Samples[5])[0]);
    }

    [TestMethod]
    public void EmptyArguments_AreAnEmptyObject()
    {
        var events = Parse(Samples[6]);
        CollectionAssert.AreEqual(
            new ToolCallEvent[] { new ToolCallStarted(0, "ping", "function"), new ToolCallArgumentsDelta(0, "{}"), new ToolCallCompleted(0, "ping", "{}", "function", true) },
            events.ToArray());

        // No fence and nothing at all between the name and the end marker.
        Assert.AreEqual(new ToolCallCompleted(0, "ping", "{}", "function", true), Completed(Parse(CallsB + CallB + "function" + Sep + "ping" + CallE + CallsE)).Single());
    }

    [TestMethod]
    public void InvalidJson_IsReportedWithTheRawText()
    {
        Assert.AreEqual(new ToolCallCompleted(0, "bad", "{\"a\": 1,}", "function", false), Completed(Parse(Samples[7])).Single());
        Assert.AreEqual(new ToolCallCompleted(1, "f", "[1]", "function", false), Completed(Parse(Samples[10]))[1], "an array is not an arguments object");
    }

    [TestMethod]
    public void TextWithoutABlock_PassesThrough()
    {
        CollectionAssert.AreEqual(new ToolCallEvent[] { new ToolCallText(Samples[8]) }, Parse(Samples[8]).ToArray());
    }

    [TestMethod]
    public void CallsWithoutSeparator_ThenTextWithoutBlockEnd()
    {
        var events = Parse(Samples[9]);
        Assert.AreEqual(new ToolCallText("x"), events[0]);
        CollectionAssert.AreEqual(new[] { "a", "b" }, Completed(events).Select(c => c.Name).ToArray());
        CollectionAssert.AreEqual(new[] { 0, 1 }, Completed(events).Select(c => c.Index).ToArray());
        Assert.AreEqual(new ToolCallText("tail"), events[^1]);
    }

    [TestMethod]
    public void CallWithoutItsEndMarker_EndsAtTheNextCallOrBlockEnd()
    {
        var text = CallsB + CallB + "function" + Sep + "a\n```json\n{\"x\": 1}\n```" + CallB + "function" + Sep + "b\n{}" + CallsE + "!";
        var events = Parse(text);
        CollectionAssert.AreEqual(new[] { "{\"x\": 1}", "{}" }, Completed(events).Select(c => c.Arguments).ToArray());
        Assert.AreEqual(new ToolCallText("!"), events[^1]);
    }

    [TestMethod]
    public void Flush_TruncatedArguments_CompletedAsMalformed_TruncatedNameGivenBackAsText()
    {
        var truncatedArgs = CallsB + CallB + "function" + Sep + "f\n```json\n{\"a\": \"unfinished";
        Assert.AreEqual(new ToolCallCompleted(0, "f", "{\"a\": \"unfinished", "function", false), Completed(Parse(truncatedArgs)).Single());

        var missingEnd = CallsB + CallB + "function" + Sep + "f\n```json\n{\"a\": 1}\n```\n";
        Assert.AreEqual(new ToolCallCompleted(0, "f", "{\"a\": 1}", "function", true), Completed(Parse(missingEnd)).Single());

        foreach (var broken in new[] { CallsB, CallsB + "\n", CallsB + CallB, CallsB + CallB + "func", CallsB + CallB + "function" + Sep + "get_wea", "Hi " + CallsB[..5] })
        {
            var events = Parse(broken);
            CollectionAssert.AreEqual(new ToolCallEvent[] { new ToolCallText(broken) }, events.ToArray(), broken);
        }

        // A second call that breaks off is given back as text after the first one.
        var second = CallsB + Call("a", "{}") + "\n" + CallB + "function" + Sep + "b";
        var tail = Parse(second);
        Assert.AreEqual(1, Completed(tail).Count);
        Assert.AreEqual(new ToolCallText("\n" + CallB + "function" + Sep + "b"), tail[^1]);
    }

    [TestMethod]
    public void BrokenBlock_IsGivenBackAsText_AndParsingGoesOn()
    {
        var text = CallsB + "oops" + CallsB + Call("a", "{}") + CallsE;
        var events = Parse(text);
        Assert.AreEqual(new ToolCallText(CallsB + "oops"), events[0]);
        Assert.AreEqual("a", Completed(events).Single().Name);

        var newlineInType = CallsB + CallB + "func\ntion" + Sep + "a\n{}" + CallE + CallsE;
        Assert.AreEqual(new ToolCallText(newlineInType), Parse(newlineInType).Single());
    }

    [TestMethod]
    public void EveryTwoAndThreeChunkSplit_GivesTheSameEvents()
    {
        foreach (var sample in Samples)
        {
            var whole = Parse(sample);
            CheckInvariants(whole, sample);
            for (var i = 0; i <= sample.Length; i++)
            {
                AssertSame(whole, Parse(sample[..i], sample[i..]), sample, i);
                if (sample.Length > 120)
                {
                    continue;
                }

                for (var j = i; j <= sample.Length; j++)
                {
                    AssertSame(whole, Parse(sample[..i], sample[i..j], sample[j..]), sample, i, j);
                }
            }
        }
    }

    [TestMethod]
    public void RandomSplits_GiveTheSameEvents()
    {
        var random = new Random(18);
        foreach (var sample in Samples)
        {
            var whole = Parse(sample);
            for (var trial = 0; trial < 300; trial++)
            {
                var cuts = Enumerable.Range(0, random.Next(1, 12)).Select(_ => random.Next(sample.Length + 1)).Order().ToArray();
                var chunks = new List<string>();
                var at = 0;
                foreach (var cut in cuts)
                {
                    chunks.Add(sample[at..cut]);
                    at = cut;
                }

                chunks.Add(sample[at..]);
                AssertSame(whole, Parse([.. chunks]), sample, cuts);
            }

            // One character at a time: every delta arrives as soon as it is decided.
            AssertSame(whole, Parse([.. sample.Select(c => c.ToString())]), sample);
        }
    }

    [TestMethod]
    public void ArgumentsStreamBeforeTheCallEnds()
    {
        var parser = new ToolCallParser();
        Assert.AreEqual(0, parser.Push(CallsB + CallB + "function" + Sep + "get_wea").Count);
        Assert.AreEqual(new ToolCallStarted(0, "get_weather", "function"), parser.Push("ther\n```json\n").Single());
        Assert.AreEqual(new ToolCallArgumentsDelta(0, "{\"location\": \"Pa"), parser.Push("{\"location\": \"Pa").Single());
        Assert.AreEqual(new ToolCallArgumentsDelta(0, "ris\"}"), parser.Push("ris\"}\n``").Single(), "the possible closing fence is held back");
        var end = parser.Push("`" + CallE);
        Assert.AreEqual(new ToolCallCompleted(0, "get_weather", "{\"location\": \"Paris\"}", "function", true), end.Single());
        Assert.AreEqual(new ToolCallText("x"), parser.Push(CallsE + "x").Single());
        Assert.AreEqual(0, parser.Flush().Count);
    }

    [TestMethod]
    public void RoundTrip_R1AssistantTurnWithCalls_ParsesBackToTheSameCalls()
    {
        ChatToolCall[] calls =
        [
            new("get_weather", "{\"location\": \"北京\", \"unit\": \"celsius\"}"),
            new("search", "{\"query\": \"a \\\"quoted\\\" " + CallE + " marker\"}"),
            new("run", "{}", "code_interpreter"),
        ];
        foreach (var content in new[] { null, "I will call tools. " })
        {
            var prompt = ChatTemplate.Render([ChatTurn.User("Q"), ChatTurn.AssistantToolCalls(calls, content)], new ChatTemplateOptions { Kind = ChatTemplateKind.R1, AddGenerationPrompt = false });
            var turn = prompt[(prompt.IndexOf(ChatTemplate.Assistant, StringComparison.Ordinal) + ChatTemplate.Assistant.Length)..];
            Assert.IsTrue(turn.EndsWith(ChatTemplate.Eos, StringComparison.Ordinal));
            var events = Parse(turn[..^ChatTemplate.Eos.Length]);
            CollectionAssert.AreEqual(
                calls.Select((c, i) => new ToolCallCompleted(i, c.Name, c.Arguments, c.Type, true)).ToArray(),
                Completed(events).ToArray());
            Assert.AreEqual(content ?? string.Empty, string.Concat(events.OfType<ToolCallText>().Select(t => t.Text)));
        }
    }

    [TestMethod]
    public void RoundTrip_EveryToolCallTurnOfTheTemplateCases()
    {
        var turns = ToolTemplateCasesTests.Cases.SelectMany(c => c.Turns).Where(t => t.ToolCalls is { Count: > 0 }).Distinct().ToList();
        Assert.IsGreaterThanOrEqualTo(5, turns.Count);
        foreach (var turn in turns)
        {
            var prompt = ChatTemplate.Render([turn], new ChatTemplateOptions { Kind = ChatTemplateKind.R1, AddGenerationPrompt = false });
            var body = prompt[(prompt.IndexOf(ChatTemplate.Assistant, StringComparison.Ordinal) + ChatTemplate.Assistant.Length)..^ChatTemplate.Eos.Length];
            var events = Parse(body);
            CollectionAssert.AreEqual(
                turn.ToolCalls!.Select((c, i) => new ToolCallCompleted(i, c.Name, c.Arguments.Length == 0 ? "{}" : c.Arguments, c.Type, true)).ToArray(),
                Completed(events).ToArray(),
                body);
            Assert.AreEqual(turn.Content ?? string.Empty, string.Concat(events.OfType<ToolCallText>().Select(t => t.Text)));
        }
    }

    [TestMethod]
    public void Flush_ResetsForANewStream()
    {
        var parser = new ToolCallParser();
        parser.Push(CallsB + Call("a", "{}"));
        parser.Flush();
        var again = parser.Push(CallsB + Call("b", "{}") + CallsE);
        Assert.AreEqual(0, again.OfType<ToolCallCompleted>().Single().Index);
    }

    private static List<ToolCallEvent> Parse(params string[] chunks)
    {
        var parser = new ToolCallParser();
        var events = new List<ToolCallEvent>();
        foreach (var chunk in chunks)
        {
            Append(events, parser.Push(chunk));
        }

        Append(events, parser.Flush());
        return events;

        static void Append(List<ToolCallEvent> events, IReadOnlyList<ToolCallEvent> more)
        {
            foreach (var e in more)
            {
                // Adjacent text and adjacent deltas of one call are the same events split differently.
                switch (e, events.Count > 0 ? events[^1] : null)
                {
                    case (ToolCallText t, ToolCallText last):
                        events[^1] = new ToolCallText(last.Text + t.Text);
                        break;
                    case (ToolCallArgumentsDelta d, ToolCallArgumentsDelta last) when d.Index == last.Index:
                        events[^1] = last with { Delta = last.Delta + d.Delta };
                        break;
                    default:
                        Assert.IsFalse(e is ToolCallText { Text.Length: 0 } or ToolCallArgumentsDelta { Delta.Length: 0 }, "no empty events");
                        events.Add(e);
                        break;
                }
            }
        }
    }

    private static List<ToolCallCompleted> Completed(List<ToolCallEvent> events) => [.. events.OfType<ToolCallCompleted>()];

    private static void CheckInvariants(List<ToolCallEvent> events, string sample)
    {
        foreach (var done in Completed(events))
        {
            var deltas = string.Concat(events.OfType<ToolCallArgumentsDelta>().Where(d => d.Index == done.Index).Select(d => d.Delta));
            Assert.AreEqual(done.Arguments, deltas, sample);
            var started = events.OfType<ToolCallStarted>().Single(s => s.Index == done.Index);
            Assert.IsLessThan(events.IndexOf(done), events.IndexOf(started), sample);
        }
    }

    private static void AssertSame(List<ToolCallEvent> expected, List<ToolCallEvent> actual, string sample, params int[] cuts)
    {
        if (!expected.SequenceEqual(actual))
        {
            Assert.Fail($"split at [{string.Join(",", cuts)}] of {sample}:\nexpected {string.Join(" | ", expected)}\nactual   {string.Join(" | ", actual)}");
        }
    }
}
