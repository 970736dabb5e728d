using System.ClientModel;
using System.Text.Json;
using System.Text.Json.Nodes;
using DeepSeekCuda.Text;
using OpenAI;
using OpenAI.Chat;
using OaiFormat = OpenAI.Chat.ChatResponseFormat;

namespace DeepSeekCuda.Tests.Serve;

/// <summary>
/// Tools and <c>response_format</c> through <c>dscuda serve</c>, driven by the official OpenAI .NET library: a call the
/// model writes reaches the client as <c>tool_calls</c> (whole and streamed) with finish reason <c>tool_calls</c>, the
/// client's tool result goes back into the next prompt, <c>tool_choice</c> required forces a valid call out of a model
/// that writes random bytes, and a <c>json_schema</c> response format gives JSON that validates out of the demo's own output.
/// </summary>
[TestClass]
public sealed class ServeToolTests
{
    private static TestServer s_scripted = null!;
    private static TestServer s_free = null!;

    internal const string Arguments = "{\"city\": \"Paris\", \"days\": 2}";

    private static readonly BinaryData WeatherParameters = BinaryData.FromString(
        """{"type":"object","properties":{"city":{"type":"string"},"days":{"type":"integer"}},"required":["city","days"]}""");

    private static readonly ChatTool Weather = ChatTool.CreateFunctionTool("get_weather", "The forecast for a city", WeatherParameters);

    /// <summary>A call to get_weather, or, once the prompt holds a tool output, an answer quoting it.</summary>
    internal static string Script(string prompt)
    {
        var open = prompt.LastIndexOf(ChatTemplate.ToolOutputBegin, StringComparison.Ordinal);
        if (open < 0)
        {
            return "Let me look it up.</think>\n\n" + ChatTemplate.ToolCallsBegin + ChatTemplate.ToolCallBegin + "function" + ChatTemplate.ToolSep
                + "get_weather\n```json\n" + Arguments + "\n```" + ChatTemplate.ToolCallEnd + ChatTemplate.ToolCallsEnd;
        }

        var start = open + ChatTemplate.ToolOutputBegin.Length;
        return "It is " + prompt[start..prompt.IndexOf(ChatTemplate.ToolOutputEnd, start, StringComparison.Ordinal)] + ".";
    }

    [ClassInitialize]
    public static async Task Init(TestContext _)
    {
        s_scripted = await TestServer.StartAsync(ChatTemplateKind.R1, script: Script);
        s_free = await TestServer.StartAsync(ChatTemplateKind.V3);
    }

    [ClassCleanup]
    public static async Task Cleanup()
    {
        await s_scripted.DisposeAsync();
        await s_free.DisposeAsync();
    }

    private static ChatClient OpenAIClient(TestServer server) =>
        new(ServeModel.Id, new ApiKeyCredential("unused"), new OpenAIClientOptions { Endpoint = server.V1 });

    [TestMethod]
    public async Task AWrittenCall_ReachesTheOpenAIClient_AndItsResultTheNextPrompt()
    {
        var client = OpenAIClient(s_scripted);
        List<OpenAI.Chat.ChatMessage> messages = [new UserChatMessage("What is the weather in Paris?")];
        var options = new ChatCompletionOptions { Tools = { Weather }, Temperature = 0, MaxOutputTokenCount = 200 };
        ChatCompletion completion = await client.CompleteChatAsync(messages, options);

        Assert.AreEqual(OpenAI.Chat.ChatFinishReason.ToolCalls, completion.FinishReason);
        var call = completion.ToolCalls.Single();
        Assert.AreEqual("get_weather", call.FunctionName);
        Assert.AreEqual(Arguments, call.FunctionArguments.ToString(), "the arguments as the model wrote them");
        StringAssert.StartsWith(call.Id, "call_");

        messages.Add(new AssistantChatMessage(completion));
        messages.Add(new ToolChatMessage(call.Id, "sunny for 2 days in Paris"));
        ChatCompletion answer = await client.CompleteChatAsync(messages, options);
        Assert.AreEqual(OpenAI.Chat.ChatFinishReason.Stop, answer.FinishReason);
        Assert.AreEqual("It is sunny for 2 days in Paris.", string.Concat(answer.Content.Select(p => p.Text)));
        Assert.IsEmpty(answer.ToolCalls);
    }

    [TestMethod]
    public async Task AWrittenCall_Streams_AsOneToolCallDelta()
    {
        var client = OpenAIClient(s_scripted);
        var options = new ChatCompletionOptions { Tools = { Weather }, Temperature = 0, MaxOutputTokenCount = 200 };
        var updates = new List<StreamingChatToolCallUpdate>();
        OpenAI.Chat.ChatFinishReason? finish = null;
        await foreach (var u in client.CompleteChatStreamingAsync([new UserChatMessage("Weather in Paris?")], options))
        {
            updates.AddRange(u.ToolCallUpdates);
            finish = u.FinishReason ?? finish;
        }

        Assert.AreEqual(OpenAI.Chat.ChatFinishReason.ToolCalls, finish);
        var update = updates.Single();
        Assert.AreEqual(0, update.Index);
        Assert.AreEqual("get_weather", update.FunctionName);
        Assert.AreEqual(Arguments, update.FunctionArgumentsUpdate.ToString());
        StringAssert.StartsWith(update.ToolCallId, "call_");
    }

    /// <summary>
    /// The demo's 1,024-token context cannot hold the tool instructions (about 750 of its tokens) and a call it pads
    /// with whitespace, so required tool choice is shown over a model of random bytes with a long context
    /// (<see cref="Hosting.ChatClientToolTests.RandomBytes"/>): a model that never means to call anything.
    /// </summary>
    [TestMethod]
    public async Task RequiredToolChoice_ForcesAValidCall_FromARandomModel()
    {
        var model = Hosting.ChatClientToolTests.RandomBytes(seed: 3);
        var chat = new DeepSeekCuda.Hosting.DeepSeekChatClient(model, new Inference.FakeTokenizer(), new DeepSeekCuda.Hosting.DeepSeekChatClientOptions { ModelId = ServeModel.Id, TemplateKind = ChatTemplateKind.V3 });
        await using var server = await TestServer.StartAsync(chat);
        var client = OpenAIClient(server);
        var time = ChatTool.CreateFunctionTool("get_time", "The time in a zone", BinaryData.FromString("""{"type":"object","properties":{"zone":{"enum":["UTC","CET"]}},"required":["zone"]}"""));
        var names = new HashSet<string>();
        foreach (var (choice, expected) in new[] { (ChatToolChoice.CreateRequiredChoice(), (string?)null), (ChatToolChoice.CreateFunctionChoice("get_time"), "get_time") })
        {
            for (var seed = 0; seed < 4; seed++)
            {
#pragma warning disable OPENAI001 // Seed is marked experimental by the OpenAI library
                var options = new ChatCompletionOptions { Tools = { Weather, time }, ToolChoice = choice, Temperature = 1, Seed = seed, MaxOutputTokenCount = 2000 };
#pragma warning restore OPENAI001
                ChatCompletion completion = await client.CompleteChatAsync([new UserChatMessage("Why is the sky blue?")], options);
                Assert.AreEqual(OpenAI.Chat.ChatFinishReason.ToolCalls, completion.FinishReason, $"seed {seed}");
                Assert.IsNotEmpty(completion.ToolCalls);
                foreach (var call in completion.ToolCalls)
                {
                    names.Add(call.FunctionName);
                    using var args = JsonDocument.Parse(call.FunctionArguments);
                    if (expected is not null || call.FunctionName == "get_time")
                    {
                        Assert.AreEqual(expected ?? "get_time", call.FunctionName);
                        CollectionAssert.Contains(new[] { "UTC", "CET" }, args.RootElement.GetProperty("zone").GetString());
                    }
                    else
                    {
                        Assert.AreEqual("get_weather", call.FunctionName);
                        Assert.AreEqual(JsonValueKind.String, args.RootElement.GetProperty("city").ValueKind);
                        Assert.IsTrue(args.RootElement.GetProperty("days").TryGetInt64(out _));
                    }
                }
            }
        }

        Assert.HasCount(2, names, "required (any) reached both functions");
    }

    [TestMethod]
    public async Task JsonSchemaResponseFormat_GivesJsonThatValidates_FromTheDemosOwnOutput()
    {
        // A finite language: with whitespace runs bounded (32 bytes), no document of it is longer than 600 tokens.
        var client = OpenAIClient(s_free);
        var schema = BinaryData.FromString("""
            {"type":"object","properties":{"unit":{"type":"string","enum":["celsius","fahrenheit"]},"windy":{"type":"boolean"},"level":{"enum":[1,2,3,null]}},
             "required":["unit","windy","level"],"additionalProperties":false}
            """);
        for (var seed = 0; seed < 4; seed++)
        {
#pragma warning disable OPENAI001
            var options = new ChatCompletionOptions { ResponseFormat = OaiFormat.CreateJsonSchemaFormat("forecast", schema, jsonSchemaIsStrict: true), Temperature = 1, Seed = seed, MaxOutputTokenCount = 600 };
#pragma warning restore OPENAI001
            ChatCompletion completion = await client.CompleteChatAsync([new UserChatMessage("Forecast?")], options);
            Assert.AreEqual(OpenAI.Chat.ChatFinishReason.Stop, completion.FinishReason);
            var json = JsonNode.Parse(string.Concat(completion.Content.Select(p => p.Text)))!.AsObject();
            CollectionAssert.AreEqual(new[] { "unit", "windy", "level" }, json.Select(p => p.Key).ToArray());
            CollectionAssert.Contains(new[] { "celsius", "fahrenheit" }, (string?)json["unit"]);
            Assert.IsTrue(json["windy"]!.GetValueKind() is JsonValueKind.True or JsonValueKind.False);
            Assert.IsTrue(json["level"] is null || (int)json["level"]! is 1 or 2 or 3);
        }

        ChatCompletion obj = await client.CompleteChatAsync([new UserChatMessage("Anything")], new ChatCompletionOptions { ResponseFormat = OaiFormat.CreateJsonObjectFormat(), Temperature = 0, MaxOutputTokenCount = 400 });
        if (obj.FinishReason == OpenAI.Chat.ChatFinishReason.Stop)
        {
            Assert.AreEqual(JsonValueKind.Object, JsonDocument.Parse(string.Concat(obj.Content.Select(p => p.Text))).RootElement.ValueKind);
        }
        else
        {
            StringAssert.StartsWith(string.Concat(obj.Content.Select(p => p.Text)).TrimStart(), "{", "cut by max_tokens, still a JSON object's start");
        }
    }
}
