using System.Net;
using System.Net.Http.Headers;
using System.Text;
using System.Text.Json.Nodes;
using DeepSeekCuda.Cli.Server;

namespace DeepSeekCuda.Tests.Serve;

/// <summary>
/// Bad requests get OpenAI's error object with the status OpenAI uses and the offending field in <c>param</c>; options the
/// engine would ignore are refused, never dropped; and none of it harms the server: a good request still succeeds after
/// all of them. The API key guards every route but <c>/health</c>.
/// </summary>
[TestClass]
public sealed class ServeBadRequestTests
{
    private static TestServer s_server = null!;

    [ClassInitialize]
    public static async Task Init(TestContext _) => s_server = await TestServer.StartAsync();

    [ClassCleanup]
    public static async Task Cleanup() => await s_server.DisposeAsync();

    private const string M = "\"model\":\"demo\"";
    private const string Msgs = "\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]";

    /// <summary>(name, body, status, param); a null param means OpenAI's <c>"param": null</c>.</summary>
    public static IEnumerable<object?[]> Cases =>
    [
        ["not JSON", "{\"model\": \"demo\", ", 400, null],
        ["not an object", "[1, 2]", 400, null],
        ["duplicate field", $"{{{M},{Msgs},\"n\":1,\"n\":2}}", 400, null],
        ["no model", $"{{{Msgs}}}", 400, "model"],
        ["unknown model", $"{{\"model\":\"gpt-4o\",{Msgs}}}", 404, "model"],
        ["model not a string", $"{{\"model\":7,{Msgs}}}", 400, "model"],
        ["no messages", $"{{{M}}}", 400, "messages"],
        ["empty messages", $"{{{M},\"messages\":[]}}", 400, "messages"],
        ["messages not an array", $"{{{M},\"messages\":\"hi\"}}", 400, "messages"],
        ["unknown role", $"{{{M},\"messages\":[{{\"role\":\"wizard\",\"content\":\"hi\"}}]}}", 400, "messages[0].role"],
        ["tool message without tool_call_id", $"{{{M},\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}},{{\"role\":\"tool\",\"content\":\"1\"}}]}}", 400, "messages[1].tool_call_id"],
        ["function role", $"{{{M},\"messages\":[{{\"role\":\"function\",\"content\":\"1\"}}]}}", 400, "messages[0].role"],
        ["tool_call_id on a user message", $"{{{M},\"messages\":[{{\"role\":\"user\",\"content\":\"hi\",\"tool_call_id\":\"c\"}}]}}", 400, "messages[0].tool_call_id"],
        ["tool call arguments not JSON", $"{{{M},\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}},{{\"role\":\"assistant\",\"tool_calls\":[{{\"id\":\"c\",\"type\":\"function\",\"function\":{{\"name\":\"f\",\"arguments\":\"{{x\"}}}}]}}]}}", 400, "messages[1].tool_calls[0].function.arguments"],
        ["tool call arguments an array", $"{{{M},\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}},{{\"role\":\"assistant\",\"tool_calls\":[{{\"id\":\"c\",\"type\":\"function\",\"function\":{{\"name\":\"f\",\"arguments\":\"[1]\"}}}}]}}]}}", 400, "messages[1].tool_calls[0].function.arguments"],
        ["tool call without id", $"{{{M},\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}},{{\"role\":\"assistant\",\"tool_calls\":[{{\"type\":\"function\",\"function\":{{\"name\":\"f\",\"arguments\":\"{{}}\"}}}}]}}]}}", 400, "messages[1].tool_calls[0].id"],
        ["content a number", $"{{{M},\"messages\":[{{\"role\":\"user\",\"content\":5}}]}}", 400, "messages[0].content"],
        ["image part", $"{{{M},\"messages\":[{{\"role\":\"user\",\"content\":[{{\"type\":\"image_url\",\"image_url\":{{\"url\":\"x\"}}}}]}}]}}", 400, "messages[0].content[0].type"],
        ["message name", $"{{{M},\"messages\":[{{\"role\":\"user\",\"content\":\"hi\",\"name\":\"bob\"}}]}}", 400, "messages[0].name"],
        ["prompt over the context", $"{{{M},\"messages\":[{{\"role\":\"user\",\"content\":\"{new string('x', 200_000)}\"}}]}}", 400, "messages"],
        ["max_tokens 0", $"{{{M},{Msgs},\"max_tokens\":0}}", 400, "max_tokens"],
        ["max_tokens negative", $"{{{M},{Msgs},\"max_tokens\":-5}}", 400, "max_tokens"],
        ["max_completion_tokens 0", $"{{{M},{Msgs},\"max_completion_tokens\":0}}", 400, "max_completion_tokens"],
        ["max_tokens and max_completion_tokens differ", $"{{{M},{Msgs},\"max_tokens\":3,\"max_completion_tokens\":4}}", 400, "max_tokens"],
        ["max_tokens a string", $"{{{M},{Msgs},\"max_tokens\":\"ten\"}}", 400, "max_tokens"],
        ["max_tokens fractional", $"{{{M},{Msgs},\"max_tokens\":2.5}}", 400, "max_tokens"],
        ["temperature a string", $"{{{M},{Msgs},\"temperature\":\"hot\"}}", 400, "temperature"],
        ["temperature 3", $"{{{M},{Msgs},\"temperature\":3}}", 400, "temperature"],
        ["top_p 0", $"{{{M},{Msgs},\"top_p\":0}}", 400, "top_p"],
        ["seed fractional", $"{{{M},{Msgs},\"seed\":1.5}}", 400, "seed"],
        ["stop a number", $"{{{M},{Msgs},\"stop\":5}}", 400, "stop"],
        ["stop item a number", $"{{{M},{Msgs},\"stop\":[\"a\",5]}}", 400, "stop[1]"],
        ["stop empty", $"{{{M},{Msgs},\"stop\":[\"a\",\"\"]}}", 400, "stop[1]"],
        ["five stops", $"{{{M},{Msgs},\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\"]}}", 400, "stop"],
        ["n 0", $"{{{M},{Msgs},\"n\":0}}", 400, "n"],
        ["n 100", $"{{{M},{Msgs},\"n\":100}}", 400, "n"],
        ["stream a string", $"{{{M},{Msgs},\"stream\":\"yes\"}}", 400, "stream"],
        ["stream_options without stream", $"{{{M},{Msgs},\"stream_options\":{{\"include_usage\":true}}}}", 400, "stream_options"],
        ["logprobs", $"{{{M},{Msgs},\"logprobs\":true}}", 400, "logprobs"],
        ["top_logprobs", $"{{{M},{Msgs},\"top_logprobs\":2}}", 400, "top_logprobs"],
        ["frequency_penalty", $"{{{M},{Msgs},\"frequency_penalty\":0.5}}", 400, "frequency_penalty"],
        ["presence_penalty", $"{{{M},{Msgs},\"presence_penalty\":-1}}", 400, "presence_penalty"],
        ["response_format unknown type", $"{{{M},{Msgs},\"response_format\":{{\"type\":\"yaml\"}}}}", 400, "response_format.type"],
        ["response_format json_schema without json_schema", $"{{{M},{Msgs},\"response_format\":{{\"type\":\"json_schema\"}}}}", 400, "response_format.json_schema"],
        ["response_format json_schema without name", $"{{{M},{Msgs},\"response_format\":{{\"type\":\"json_schema\",\"json_schema\":{{\"schema\":{{\"type\":\"object\"}}}}}}}}", 400, "response_format.json_schema.name"],
        ["response_format schema not enforceable", $"{{{M},{Msgs},\"response_format\":{{\"type\":\"json_schema\",\"json_schema\":{{\"name\":\"s\",\"schema\":{{\"not\":{{\"type\":\"string\"}}}}}}}}}}", 400, "response_format"],
        ["tools not an array", $"{{{M},{Msgs},\"tools\":{{}}}}", 400, "tools"],
        ["tool type retrieval", $"{{{M},{Msgs},\"tools\":[{{\"type\":\"retrieval\"}}]}}", 400, "tools[0].type"],
        ["tool without function", $"{{{M},{Msgs},\"tools\":[{{\"type\":\"function\"}}]}}", 400, "tools[0].function"],
        ["function name with a space", $"{{{M},{Msgs},\"tools\":[{{\"type\":\"function\",\"function\":{{\"name\":\"get weather\"}}}}]}}", 400, "tools[0].function.name"],
        ["function defined twice", $"{{{M},{Msgs},\"tools\":[{{\"type\":\"function\",\"function\":{{\"name\":\"f\"}}}},{{\"type\":\"function\",\"function\":{{\"name\":\"f\"}}}}]}}", 400, "tools[1].function.name"],
        ["function parameters not an object", $"{{{M},{Msgs},\"tools\":[{{\"type\":\"function\",\"function\":{{\"name\":\"f\",\"parameters\":[]}}}}]}}", 400, "tools[0].function.parameters"],
        ["tool_choice required without tools", $"{{{M},{Msgs},\"tool_choice\":\"required\"}}", 400, "tool_choice"],
        ["tool_choice unknown", $"{{{M},{Msgs},\"tool_choice\":\"always\"}}", 400, "tool_choice"],
        ["tool_choice names an unknown function", $"{{{M},{Msgs},\"tools\":[{{\"type\":\"function\",\"function\":{{\"name\":\"f\"}}}}],\"tool_choice\":{{\"type\":\"function\",\"function\":{{\"name\":\"g\"}}}}}}", 400, "tool_choice.function.name"],
        ["functions", $"{{{M},{Msgs},\"functions\":[{{\"name\":\"f\"}}]}}", 400, "functions"],
        ["logit_bias", $"{{{M},{Msgs},\"logit_bias\":{{\"50256\":-100}}}}", 400, "logit_bias"],
        ["unknown field", $"{{{M},{Msgs},\"reasoning_effort\":\"high\"}}", 400, "reasoning_effort"],
    ];

    public static string CaseName(System.Reflection.MethodInfo _, object?[] row) => (string)row[0]!;

    [TestMethod]
    [DynamicData(nameof(Cases), DynamicDataDisplayName = nameof(CaseName))]
    public async Task BadRequest_IsRefusedWithOpenAIsErrorObject_NamingTheField(string name, string body, int status, string? param)
    {
        var (code, error) = await s_server.ChatAsync(body);
        Assert.AreEqual(status, (int)code, $"{name}: {error?.ToJsonString()}");
        var e = error!["error"]!;
        Assert.AreEqual("invalid_request_error", (string?)e["type"]);
        Assert.AreEqual(param, (string?)e["param"], name);
        Assert.IsFalse(string.IsNullOrEmpty((string?)e["message"]));
        Assert.IsTrue(e.AsObject().ContainsKey("code"), "code is always present (null or a string)");
    }

    [TestMethod]
    public async Task AfterEveryBadRequest_AGoodOneStillSucceeds_AndNeutralValuesOfRefusedOptionsAreAccepted()
    {
        foreach (var row in Cases)
        {
            var (code, _) = await s_server.ChatAsync((string)row[1]!);
            Assert.AreEqual((int)row[2]!, (int)code, (string)row[0]!);
        }

        Assert.AreEqual(0, s_server.Client.Scheduler.RunningCount);
        Assert.AreEqual(s_server.Client.Scheduler.Blocks.TotalBlocks, s_server.Client.Scheduler.Blocks.FreeBlocks);
        const string neutral = ",\"logprobs\":false,\"frequency_penalty\":0,\"presence_penalty\":0,\"response_format\":{\"type\":\"text\"},\"tools\":[],\"tool_choice\":\"none\"," +
            "\"logit_bias\":{},\"store\":false,\"user\":\"u1\",\"metadata\":{\"k\":\"v\"},\"parallel_tool_calls\":false,\"top_k\":5,\"seed\":null,\"stop\":\"\\u0001\"";
        var (status, body) = await s_server.ChatAsync(TestServer.Body("hi", 2, neutral));
        Assert.AreEqual(HttpStatusCode.OK, status, body?.ToJsonString());
        Assert.AreEqual(2, (int)body!["usage"]!["completion_tokens"]!);
    }

    [TestMethod]
    public async Task ApiKey_GuardsEveryRouteButHealth_With401()
    {
        await using var server = await TestServer.StartAsync(apiKey: "s3cret-key");
        var good = TestServer.Body("hi", 1);
        foreach (var key in new[] { null, "wrong", "s3cret-ke", "s3cret-key2" })
        {
            var (status, body) = await server.ChatAsync(good, key);
            Assert.AreEqual(HttpStatusCode.Unauthorized, status, key ?? "no key");
            Assert.AreEqual("invalid_api_key", (string?)body!["error"]!["code"]);
            Assert.AreEqual("invalid_request_error", (string?)body["error"]!["type"]);
        }

        foreach (var path in new[] { "/v1/models", "/metrics" })
        {
            using var refused = await server.Http.GetAsync(path);
            Assert.AreEqual(HttpStatusCode.Unauthorized, refused.StatusCode, path);
            using var request = new HttpRequestMessage(HttpMethod.Get, path);
            request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", "s3cret-key");
            using var allowed = await server.Http.SendAsync(request);
            Assert.AreEqual(HttpStatusCode.OK, allowed.StatusCode, path);
        }

        using (var health = await server.Http.GetAsync("/health"))
        {
            Assert.AreEqual(HttpStatusCode.OK, health.StatusCode);
        }

        var (ok, answer) = await server.ChatAsync(good, "s3cret-key");
        Assert.AreEqual(HttpStatusCode.OK, ok, answer?.ToJsonString());
    }

    [TestMethod]
    public void Host_MustBeAnAddress()
    {
        Assert.Throws<ArgumentException>(() => ChatServer.Create(new ChatServerOptions { Host = "example.com", Port = 0 }, _ => throw new InvalidOperationException()));
    }
}
