using System.Text;
using System.Text.Json;
using DeepSeekCuda.Hosting;
using DeepSeekCuda.Tests.Inference;
using DeepSeekCuda.Text;
using Microsoft.Extensions.AI;

namespace DeepSeekCuda.Tests.Hosting;

/// <summary>
/// Tools and structured output through the chat client: tool definitions reach the prompt, calls the model writes
/// come back as <see cref="FunctionCallContent"/> (and run through Microsoft.Extensions.AI's function-invocation
/// middleware), <see cref="ChatToolMode"/> and JSON response formats hold even for a model that writes random bytes.
/// </summary>
[TestClass]
public sealed class ChatClientToolTests
{
    private static readonly FakeTokenizer Tok = new();
    private static readonly ChatMessage[] Ask = [new(ChatRole.User, "What is the weather in Paris?")];

    private static string Call(string name, string arguments) =>
        $"{ChatTemplate.ToolCallsBegin}{ChatTemplate.ToolCallBegin}function{ChatTemplate.ToolSep}{name}\n```json\n{arguments}\n```{ChatTemplate.ToolCallEnd}{ChatTemplate.ToolCallsEnd}";

    private static DeepSeekChatClient Client(FakeModel model, ChatTemplateKind kind = ChatTemplateKind.R1) =>
        new(model, Tok, new DeepSeekChatClientOptions { TemplateKind = kind, ModelId = "fake" });

    private static readonly int[] OutputsEnd = Tok.Encode(ChatTemplate.ToolOutputsEnd, addBos: false);

    /// <summary>
    /// Where the model's output starts in <paramref name="history"/>: after the last generation prompt, or after
    /// the tool outputs that end a prompt (the templates add no generation prompt there); -1 inside a prompt
    /// prefilled in chunks, before its generation prompt.
    /// </summary>
    private static int GenerationStart(IReadOnlyList<int> history)
    {
        var assistant = history.Count - 1;
        while (assistant >= 0 && history[assistant] != FakeTokenizer.AssistantId)
        {
            assistant--;
        }

        if (assistant < 0)
        {
            return -1;
        }

        var start = assistant + 1;
        for (var i = history.Count - OutputsEnd.Length; i > start; i--)
        {
            if (history.Skip(i).Take(OutputsEnd.Length).SequenceEqual(OutputsEnd))
            {
                return i + OutputsEnd.Length;
            }
        }

        return start + 1 < history.Count && history[start] == FakeTokenizer.Think && history[start + 1] == '\n' ? start + 2 : start;
    }

    /// <summary>A model that writes <paramref name="scriptFor"/>(the prompt's text) token by token, then EOS.</summary>
    private static FakeModel Scripted(Func<string, string> scriptFor) => new(Tok.VocabSize, 4096, (history, logits) =>
    {
        var start = GenerationStart(history);
        Array.Clear(logits);
        if (start < 0)
        {
            return; // a prompt chunk: its logits are not sampled
        }

        var prompt = Tok.Decode(history.Take(start).ToArray());
        var script = Tok.Encode(scriptFor(prompt), addBos: false);
        var step = history.Count - start;
        logits[step < script.Length ? script[step] : FakeTokenizer.Eos] = 10f;
    });

    /// <summary>
    /// A model of seeded random logits over every byte (JSON punctuation that ends a value a little favoured, so
    /// strings end), EOS a little less likely, the same logits in every process; with the R1 template it closes its
    /// reasoning after <paramref name="thinkTokens"/> tokens (and never ends before).
    /// </summary>
    internal static FakeModel RandomBytes(int seed, int thinkTokens = 6) => new(Tok.VocabSize, 4096, (history, logits) =>
    {
        var start = Math.Max(GenerationStart(history), 2);
        var step = history.Count - start;
        var rng = new Random(unchecked((seed * 1_000_003) + (step * 8191) + history[^1])); // not HashCode: that is seeded per process
        Array.Fill(logits, float.NegativeInfinity);
        for (var b = 0; b < 256; b++)
        {
            logits[b] = (float)(rng.NextDouble() * 3) + (b is '"' or '}' or ']' or ',' ? 4f : 0f);
        }

        logits[FakeTokenizer.Eos] = 1f;
        if (history[start - 1] == '\n' && history[start - 2] == FakeTokenizer.Think)
        {
            // Reasoning: no EOS before it is closed, so there is always an answer to constrain.
            logits[FakeTokenizer.EndThink] = step == thinkTokens ? 50f : float.NegativeInfinity;
            logits[FakeTokenizer.Eos] = step <= thinkTokens ? float.NegativeInfinity : 1f;
        }
    });

    private static AIFunction Weather(List<string>? calls = null) =>
        AIFunctionFactory.Create((string city, int days) =>
        {
            calls?.Add(city);
            return $"sunny for {days} days in {city}";
        }, "get_weather", "The forecast for a city");

    private static AIFunction Time() => AIFunctionFactory.Create((string zone) => "12:00", "get_time", "The time in a zone");

    [TestMethod]
    public async Task Tools_AreDescribedInThePrompt_ExceptWithToolModeNone()
    {
        string? prompt = null; // the last forward's history: the whole prompt (prefilled in chunks) and "ok"
        var model = Scripted(p => "ok");
        model.OnForward = h => prompt = Tok.Decode(h.ToArray());
        using var client = Client(model);
        await client.GetResponseAsync(Ask, new ChatOptions { Tools = [Weather()] });
        StringAssert.Contains(prompt, "get_weather");
        StringAssert.Contains(prompt, "The forecast for a city");
        StringAssert.Contains(prompt, "\"days\"");

        prompt = null;
        await client.GetResponseAsync(Ask, new ChatOptions { Tools = [Weather()], ToolMode = ChatToolMode.None });
        Assert.AreEqual(Tok.Decode(ChatTemplate.Encode(Tok, [ChatTurn.User(Ask[0].Text)])) + "ok", prompt, "no tools: the plain prompt");
    }

    [TestMethod]
    public async Task AWrittenCall_ComesBackAsFunctionCallContent_WholeAndStreamed()
    {
        var script = "I need the forecast.</think>\n\n" + Call("get_weather", "{\"city\": \"Paris\", \"days\": 3}");
        using var client = Client(Scripted(_ => script));
        var options = new ChatOptions { Tools = [Weather()] };

        var response = await client.GetResponseAsync(Ask, options);
        Assert.AreEqual(ChatFinishReason.ToolCalls, response.FinishReason);
        var contents = response.Messages.Single().Contents;
        Assert.AreEqual("I need the forecast.", string.Concat(contents.OfType<TextReasoningContent>().Select(r => r.Text)));
        var call = contents.OfType<FunctionCallContent>().Single();
        Assert.AreEqual("get_weather", call.Name);
        Assert.IsNull(call.Exception);
        Assert.AreEqual("Paris", ((JsonElement)call.Arguments!["city"]!).GetString());
        Assert.AreEqual(3, ((JsonElement)call.Arguments["days"]!).GetInt32());
        Assert.AreEqual("{\"city\": \"Paris\", \"days\": 3}", call.RawRepresentation, "the arguments as written");
        StringAssert.StartsWith(call.CallId, "call_");
        Assert.IsFalse(contents.OfType<TextContent>().Any(t => t.Text.Contains(ChatTemplate.ToolCallBegin, StringComparison.Ordinal)), "no marker leaks into the text");

        var streamed = new List<ChatResponseUpdate>();
        await foreach (var u in client.GetStreamingResponseAsync(Ask, options))
        {
            streamed.Add(u);
        }

        var streamedCall = streamed.SelectMany(u => u.Contents).OfType<FunctionCallContent>().Single();
        Assert.AreEqual("get_weather", streamedCall.Name);
        Assert.AreEqual("{\"city\": \"Paris\", \"days\": 3}", streamedCall.RawRepresentation);
        Assert.AreEqual(ChatFinishReason.ToolCalls, streamed[^1].FinishReason);
    }

    [TestMethod]
    public async Task FunctionInvocationMiddleware_RunsTheCall_AndTheResultReachesTheNextPrompt()
    {
        string ScriptFor(string prompt)
        {
            var open = prompt.LastIndexOf(ChatTemplate.ToolOutputBegin, StringComparison.Ordinal);
            if (open < 0)
            {
                return "Let me look.</think>" + Call("get_weather", "{\"city\": \"Paris\", \"days\": 2}");
            }

            var start = open + ChatTemplate.ToolOutputBegin.Length;
            return "It is " + prompt[start..prompt.IndexOf(ChatTemplate.ToolOutputEnd, start, StringComparison.Ordinal)] + ".";
        }

        var invoked = new List<string>();
        using var inner = Client(Scripted(ScriptFor));
        using var client = new ChatClientBuilder(inner).UseFunctionInvocation().Build();
        var response = await client.GetResponseAsync(Ask, new ChatOptions { Tools = [Weather(invoked)] });

        CollectionAssert.AreEqual(new[] { "Paris" }, invoked);
        Assert.AreEqual("It is sunny for 2 days in Paris.", response.Text);
        Assert.AreEqual(ChatFinishReason.Stop, response.FinishReason);
        var call = response.Messages.SelectMany(m => m.Contents).OfType<FunctionCallContent>().Single();
        var result = response.Messages.SelectMany(m => m.Contents).OfType<FunctionResultContent>().Single();
        Assert.AreEqual(call.CallId, result.CallId);
    }

    [TestMethod]
    public async Task MalformedArguments_GiveACallThatCarriesTheError_NotACrash()
    {
        using var client = Client(Scripted(_ => "</think>" + Call("get_weather", "{\"city\": Paris}")));
        var response = await client.GetResponseAsync(Ask, new ChatOptions { Tools = [Weather()] });
        var call = response.Messages.Single().Contents.OfType<FunctionCallContent>().Single();
        Assert.IsNotNull(call.Exception);
        Assert.AreEqual("{\"city\": Paris}", call.RawRepresentation);
        Assert.AreEqual(ChatFinishReason.ToolCalls, response.FinishReason);
    }

    [TestMethod]
    public async Task AnUnfinishedCall_EndsAsText()
    {
        var text = ChatTemplate.ToolCallsBegin + ChatTemplate.ToolCallBegin + "function" + ChatTemplate.ToolSep + "get_wea";
        using var client = Client(Scripted(_ => "</think>" + text));
        var response = await client.GetResponseAsync(Ask, new ChatOptions { Tools = [Weather()] });
        Assert.IsFalse(response.Messages.Single().Contents.OfType<FunctionCallContent>().Any());
        StringAssert.Contains(response.Text, "get_wea", "nothing the model wrote is lost");
        Assert.AreEqual(ChatFinishReason.Stop, response.FinishReason);
    }

    [TestMethod]
    [DataRow(ChatTemplateKind.V3)]
    [DataRow(ChatTemplateKind.R1)]
    public async Task RequiredToolMode_ForcesAValidCall_FromARandomModel(ChatTemplateKind kind)
    {
        for (var seed = 0; seed < 12; seed++)
        {
            using var client = Client(RandomBytes(seed), kind);
            var specific = seed % 2 == 1;
            var options = new ChatOptions
            {
                Tools = [Weather(), Time()],
                ToolMode = specific ? ChatToolMode.RequireSpecific("get_time") : ChatToolMode.RequireAny,
                Temperature = 1,
                Seed = seed,
                MaxOutputTokens = 400,
            };
            var response = await client.GetResponseAsync(Ask, options);
            var call = response.Messages.Single().Contents.OfType<FunctionCallContent>().FirstOrDefault();
            Assert.IsNotNull(call, $"seed {seed}: a call, text {response.Text}");
            Assert.IsNull(call.Exception, $"seed {seed}: {call.RawRepresentation}");
            if (specific || call.Name == "get_time")
            {
                Assert.AreEqual("get_time", call.Name);
                Assert.AreEqual(JsonValueKind.String, ((JsonElement)call.Arguments!["zone"]!).ValueKind);
            }
            else
            {
                Assert.AreEqual("get_weather", call.Name);
                Assert.AreEqual(JsonValueKind.String, ((JsonElement)call.Arguments!["city"]!).ValueKind);
                Assert.IsTrue(((JsonElement)call.Arguments["days"]!).TryGetInt32(out _), $"seed {seed}: days is an integer");
            }
        }
    }

    [TestMethod]
    [DataRow(ChatTemplateKind.V3)]
    [DataRow(ChatTemplateKind.R1)]
    public async Task JsonResponseFormat_GivesAJsonObject_FromARandomModel(ChatTemplateKind kind)
    {
        for (var seed = 0; seed < 10; seed++)
        {
            using var client = Client(RandomBytes(100 + seed), kind);
            var response = await client.GetResponseAsync(Ask, new ChatOptions { ResponseFormat = ChatResponseFormat.Json, Temperature = 1, Seed = seed, MaxOutputTokens = 600 });
            Assert.AreNotEqual(ChatFinishReason.Length, response.FinishReason, $"seed {seed}: ended by itself");
            using var doc = JsonDocument.Parse(response.Text);
            Assert.AreEqual(JsonValueKind.Object, doc.RootElement.ValueKind, $"seed {seed}: {response.Text}");
        }
    }

    public enum Sky
    {
        Clear,
        Cloudy,
        Rain,
    }

    public sealed record Forecast(string City, int Days, bool Windy, Sky Sky, double? Temperature);

    [TestMethod]
    public async Task GetResponseAsyncOfT_ParsesWhatARandomModelWrites()
    {
        var skies = new HashSet<Sky>();
        for (var seed = 0; seed < 12; seed++)
        {
            using var client = Client(RandomBytes(200 + seed));
            var response = await client.GetResponseAsync<Forecast>(Ask, new ChatOptions { Temperature = 1, Seed = seed, MaxOutputTokens = 800 });
            Assert.IsTrue(response.TryGetResult(out var forecast), $"seed {seed}: {response.Text}");
            Assert.IsNotNull(forecast.City);
            skies.Add(forecast.Sky);
        }

        Assert.IsGreaterThan(1, skies.Count, "the constraint leaves every enum value reachable");
    }

    [TestMethod]
    public void RequestsThatAskTheSame_ShareOnePlan_AndItsGrammar()
    {
        var cache = new System.Collections.Concurrent.ConcurrentDictionary<string, ChatRequestPlan>();
        ChatOptions Required(string? name = null) => new() { Tools = [Weather(), Time()], ToolMode = name is null ? ChatToolMode.RequireAny : ChatToolMode.RequireSpecific(name), Temperature = 0.3f };
        var first = ChatRequestPlan.Create(Required(), Tok, startsInReasoning: true, cache);
        Assert.AreSame(first, ChatRequestPlan.Create(Required(), Tok, startsInReasoning: true, cache), "new but equal options, sampling aside");
        Assert.IsNotNull(first.Grammar);
        Assert.AreNotSame(first, ChatRequestPlan.Create(Required(), Tok, startsInReasoning: false, cache));
        Assert.AreNotSame(first, ChatRequestPlan.Create(Required("get_time"), Tok, startsInReasoning: true, cache));
        var json = ChatRequestPlan.Create(new ChatOptions { ResponseFormat = ChatResponseFormat.ForJsonSchema<Forecast>() }, Tok, false, cache);
        Assert.AreSame(json, ChatRequestPlan.Create(new ChatOptions { ResponseFormat = ChatResponseFormat.ForJsonSchema<Forecast>() }, Tok, false, cache));
        Assert.HasCount(4, cache);
        Assert.IsNull(ChatRequestPlan.Create(new ChatOptions { Temperature = 1 }, Tok, false, cache).Grammar);
        Assert.HasCount(4, cache, "a request with nothing to plan is not cached");
        for (var i = 0; i < ChatRequestPlan.MaxCachedPlans; i++)
        {
            ChatRequestPlan.Create(new ChatOptions { Tools = [AIFunctionFactory.Create(() => i, $"f{i}")] }, Tok, false, cache);
        }

        Assert.IsLessThanOrEqualTo(ChatRequestPlan.MaxCachedPlans, cache.Count, "bounded");
    }

    [TestMethod]
    public void ToolOptionsTheEngineCannotHonour_AreRefusedBeforeAnyWork()
    {
        using var client = Client(Scripted(_ => "x"));
        Assert.ThrowsExactly<ArgumentException>(() => client.GetStreamingResponseAsync(Ask, new ChatOptions { ToolMode = ChatToolMode.RequireAny }));
        var e = Assert.ThrowsExactly<ArgumentException>(() => client.GetStreamingResponseAsync(Ask, new ChatOptions { Tools = [Weather()], ToolMode = ChatToolMode.RequireSpecific("nope") }));
        StringAssert.Contains(e.Message, "nope");
        var n = Assert.ThrowsExactly<NotSupportedException>(() => client.GetStreamingResponseAsync(Ask, new ChatOptions { Tools = [new HostedWebSearchTool()] }));
        StringAssert.Contains(n.Message, "Tools");
        var schema = JsonDocument.Parse("""{"type":"object","properties":{"a":{"not":{"type":"string"}}}}""").RootElement;
        var f = Assert.ThrowsExactly<NotSupportedException>(() => client.GetStreamingResponseAsync(Ask, new ChatOptions { ResponseFormat = ChatResponseFormat.ForJsonSchema(schema, "s") }));
        StringAssert.Contains(f.Message, "ResponseFormat");
    }
}
