using System.Net;
using System.Text.Json.Nodes;
using DeepSeekCuda.Cli.Server;
using Microsoft.Extensions.AI;

namespace DeepSeekCuda.Tests.Serve;

/// <summary>
/// The wire format of <c>dscuda serve</c> read with a plain HttpClient: DeepSeek's <c>reasoning_content</c> in the message
/// and in the deltas (the R1 template: the demo's output is reasoning), server-sent events, <c>include_usage</c>, <c>n</c>,
/// <c>/v1/models</c>, <c>/health</c> while loading and after.
/// </summary>
[TestClass]
public sealed class ServeHttpTests
{
    private static TestServer s_server = null!;

    [ClassInitialize]
    public static async Task Init(TestContext _) => s_server = await TestServer.StartAsync();

    [ClassCleanup]
    public static async Task Cleanup() => await s_server.DisposeAsync();

    private const string Question = "Why is the sky blue?";

    private static async Task<(string Reasoning, string Answer, ChatResponse Response)> DirectAsync(ChatOptions options)
    {
        var response = await s_server.Client.GetResponseAsync([new ChatMessage(ChatRole.User, Question)], options);
        var contents = response.Messages.SelectMany(m => m.Contents).ToList();
        return (string.Concat(contents.OfType<TextReasoningContent>().Select(r => r.Text)), string.Concat(contents.OfType<TextContent>().Select(t => t.Text)), response);
    }

    [TestMethod]
    public async Task ReasoningContent_InTheMessage_AndInTheDeltas_EqualsTheChatClient()
    {
        var (reasoning, answer, direct) = await DirectAsync(new ChatOptions { Temperature = 0, MaxOutputTokens = 10 });
        Assert.IsGreaterThan(0, reasoning.Length, "R1 starts in reasoning");
        var before = DateTimeOffset.UtcNow.ToUnixTimeSeconds();

        var (status, body) = await s_server.ChatAsync(TestServer.Body(Question, 10));
        Assert.AreEqual(HttpStatusCode.OK, status, body?.ToJsonString());
        Assert.AreEqual("chat.completion", (string?)body!["object"]);
        StringAssert.StartsWith((string?)body["id"], "chatcmpl-");
        Assert.IsTrue((long)body["created"]! >= before - 1 && (long)body["created"]! <= DateTimeOffset.UtcNow.ToUnixTimeSeconds());
        var message = body["choices"]![0]!["message"]!;
        Assert.AreEqual("assistant", (string?)message["role"]);
        Assert.AreEqual(reasoning, (string?)message["reasoning_content"]);
        Assert.AreEqual(answer, (string?)message["content"]);
        Assert.AreEqual("length", (string?)body["choices"]![0]!["finish_reason"]);
        Assert.AreEqual(direct.Usage!.InputTokenCount, (long)body["usage"]!["prompt_tokens"]!);
        Assert.AreEqual(10, (long)body["usage"]!["completion_tokens"]!);
        Assert.AreEqual(direct.Usage.TotalTokenCount, (long)body["usage"]!["total_tokens"]!);

        var (events, done) = await s_server.StreamAsync(TestServer.Body(Question, 10, ",\"stream\":true,\"stream_options\":{\"include_usage\":true}"));
        Assert.IsTrue(done, "the stream ends with data: [DONE]");
        var id = (string?)events[0]["id"];
        StringAssert.StartsWith(id, "chatcmpl-");
        Assert.IsTrue(events.All(e => (string?)e["object"] == "chat.completion.chunk" && (string?)e["id"] == id), "every chunk is a chat.completion.chunk of one id");
        Assert.AreEqual("assistant", (string?)events[0]["choices"]![0]!["delta"]!["role"]);
        var chunks = events.Where(e => e["choices"]!.AsArray().Count > 0).ToList();
        Assert.AreEqual(reasoning, string.Concat(chunks.Select(e => (string?)e["choices"]![0]!["delta"]!["reasoning_content"])));
        Assert.AreEqual(answer, string.Concat(chunks.Select(e => (string?)e["choices"]![0]!["delta"]!["content"])));
        Assert.AreEqual("length", (string?)chunks[^1]["choices"]![0]!["finish_reason"]);
        Assert.IsTrue(chunks.All(e => e["usage"] is null), "usage is null on every chunk but the last");
        var last = events[^1];
        Assert.AreEqual(0, last["choices"]!.AsArray().Count, "the usage chunk has no choices");
        Assert.AreEqual(direct.Usage.InputTokenCount, (long)last["usage"]!["prompt_tokens"]!);
        Assert.AreEqual(10, (long)last["usage"]!["completion_tokens"]!);

        // Without include_usage no chunk carries usage.
        var (plain, _) = await s_server.StreamAsync(TestServer.Body(Question, 3, ",\"stream\":true"));
        Assert.IsTrue(plain.All(e => e.AsObject().ContainsKey("usage") is false && e["choices"]!.AsArray().Count == 1));
    }

    [TestMethod]
    public async Task Conversation_WithDeveloperRole_TextParts_AndPastReasoning_IsTheSameConversationForTheChatClient()
    {
        const string body = """
            {"model":"demo","max_completion_tokens":6,"temperature":0,"messages":[
              {"role":"system","content":"Be brief."},
              {"role":"developer","content":[{"type":"text","text":"Answer "},{"type":"text","text":"in English."}]},
              {"role":"user","content":"Hi"},
              {"role":"assistant","content":"Hello!","reasoning_content":"greet back"},
              {"role":"assistant","content":null,"reasoning_content":null},
              {"role":"user","content":"Why is the sky blue?"}]}
            """;
        var (status, json) = await s_server.ChatAsync(body);
        Assert.AreEqual(HttpStatusCode.OK, status, json?.ToJsonString());
        ChatMessage[] same =
        [
            new(ChatRole.System, "Be brief."),
            new(ChatRole.System, "Answer in English."),
            new(ChatRole.User, "Hi"),
            new(ChatRole.Assistant, "Hello!"),
            new(ChatRole.Assistant, ""),
            new(ChatRole.User, "Why is the sky blue?"),
        ];
        var direct = await s_server.Client.GetResponseAsync(same, new ChatOptions { Temperature = 0, MaxOutputTokens = 6 });
        var reasoning = string.Concat(direct.Messages.SelectMany(m => m.Contents).OfType<TextReasoningContent>().Select(r => r.Text));
        Assert.AreEqual(reasoning, (string?)json!["choices"]![0]!["message"]!["reasoning_content"]);
        Assert.AreEqual(direct.Usage!.InputTokenCount, (long)json["usage"]!["prompt_tokens"]!, "the same prompt tokens");
    }

    [TestMethod]
    public async Task N_RunsSeededChoices_EachTheRequestWithSeedPlusIndex()
    {
        const string sampled = ",\"top_p\":1,\"seed\":77";
        var (status, body) = await s_server.ChatAsync(TestServer.Body(Question, 6, sampled + ",\"n\":3", temperature: 1));
        Assert.AreEqual(HttpStatusCode.OK, status, body?.ToJsonString());
        var choices = body!["choices"]!.AsArray();
        Assert.HasCount(3, choices);
        var completion = 0L;
        for (var i = 0; i < 3; i++)
        {
            var (reasoning, _, alone) = await DirectAsync(new ChatOptions { Temperature = 1, TopP = 1, Seed = 77 + i, MaxOutputTokens = 6 });
            Assert.AreEqual(i, (int)choices[i]!["index"]!);
            Assert.AreEqual(reasoning, (string?)choices[i]!["message"]!["reasoning_content"], $"choice {i}");
            completion += alone.Usage!.OutputTokenCount!.Value;
        }

        Assert.AreEqual(completion, (long)body["usage"]!["completion_tokens"]!);

        var (events, done) = await s_server.StreamAsync(TestServer.Body(Question, 6, sampled + ",\"n\":2,\"stream\":true", temperature: 1));
        Assert.IsTrue(done);
        for (var i = 0; i < 2; i++)
        {
            var mine = events.Select(e => e["choices"]![0]!).Where(c => (int)c["index"]! == i).ToList();
            Assert.AreEqual((string?)choices[i]!["message"]!["reasoning_content"], string.Concat(mine.Select(c => (string?)c["delta"]!["reasoning_content"])), $"streamed choice {i}");
            Assert.AreEqual("length", (string?)mine[^1]["finish_reason"]);
        }
    }

    [TestMethod]
    public async Task Models_ListTheServedModel_AndUnknownRoutesAre404Errors()
    {
        var models = JsonNode.Parse(await s_server.Http.GetStringAsync("/v1/models"))!;
        Assert.AreEqual("list", (string?)models["object"]);
        Assert.AreEqual(ServeModel.Id, (string?)models["data"]![0]!["id"]);
        Assert.AreEqual("model", (string?)models["data"]![0]!["object"]);
        var one = JsonNode.Parse(await s_server.Http.GetStringAsync($"/v1/models/{ServeModel.Id}"))!;
        Assert.AreEqual(ServeModel.Id, (string?)one["id"]);
        using var missing = await s_server.Http.GetAsync("/v1/models/gpt-4o");
        Assert.AreEqual(HttpStatusCode.NotFound, missing.StatusCode);
        Assert.AreEqual("model_not_found", (string?)JsonNode.Parse(await missing.Content.ReadAsStringAsync())!["error"]!["code"]);
        using var nowhere = await s_server.Http.GetAsync("/v1/embeddings");
        Assert.AreEqual(HttpStatusCode.NotFound, nowhere.StatusCode);
        Assert.IsNotNull(JsonNode.Parse(await nowhere.Content.ReadAsStringAsync())!["error"]);
    }

    [TestMethod]
    public async Task Health_Is503WhileTheModelLoads_And200After()
    {
        using var release = new ManualResetEventSlim();
        using var client = ServeModel.CreateClient();
        await using var server = ChatServer.Create(new ChatServerOptions { Port = 0 }, _ =>
        {
            release.Wait(TimeSpan.FromSeconds(30));
            return client;
        });
        var address = await server.StartAsync();
        using var http = new HttpClient { BaseAddress = address };
        using (var loading = await http.GetAsync("/health"))
        {
            Assert.AreEqual(HttpStatusCode.ServiceUnavailable, loading.StatusCode);
            Assert.AreEqual("loading", (string?)JsonNode.Parse(await loading.Content.ReadAsStringAsync())!["status"]);
        }

        var (status, body) = await TestServer.PostAsync(http, "/v1/chat/completions", TestServer.Body("hi", 1));
        Assert.AreEqual(HttpStatusCode.ServiceUnavailable, status);
        Assert.AreEqual("model_not_ready", (string?)body!["error"]!["code"]);
        Assert.IsFalse(server.Ready.IsCompleted);

        release.Set();
        await server.Ready.WaitAsync(TimeSpan.FromSeconds(30));
        using var ready = await http.GetAsync("/health");
        Assert.AreEqual(HttpStatusCode.OK, ready.StatusCode);
        (status, body) = await TestServer.PostAsync(http, "/v1/chat/completions", TestServer.Body("hi", 1));
        Assert.AreEqual(HttpStatusCode.OK, status, body?.ToJsonString());
    }

    [TestMethod]
    public async Task FailedLoad_FaultsReady_AndHealthSaysFailed()
    {
        await using var server = ChatServer.Create(new ChatServerOptions { Port = 0 }, _ => throw new InvalidDataException("broken checkpoint"));
        var address = await server.StartAsync();
        await Assert.ThrowsAsync<InvalidDataException>(() => server.Ready);
        using var http = new HttpClient { BaseAddress = address };
        using var health = await http.GetAsync("/health");
        Assert.AreEqual(HttpStatusCode.ServiceUnavailable, health.StatusCode);
        Assert.AreEqual("failed", (string?)JsonNode.Parse(await health.Content.ReadAsStringAsync())!["status"]);
    }
}
