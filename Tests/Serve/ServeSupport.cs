using System.Net;
using System.Net.Http.Headers;
using System.Text;
using System.Text.Json.Nodes;
using DeepSeekCuda.Cli.Server;
using DeepSeekCuda.Hosting;
using DeepSeekCuda.Serving;
using DeepSeekCuda.Tests.Serving;
using DeepSeekCuda.Text;

namespace DeepSeekCuda.Tests.Serve;

/// <summary>
/// The demo checkpoint loaded once for every <c>Serve</c> test class (the tests run one at a time), and a server over
/// a chat client of it on a loopback port: real Kestrel, real HTTP.
/// </summary>
internal static class ServeModel
{
    public const string Id = "demo";

    private static readonly Lazy<LocalModel> Demo = new(() => LocalModel.Load(DemoModel.Ensure(out _)));

    public static LocalModel Local => Demo.Value;

    /// <summary>
    /// A chat client of the demo; with <paramref name="stepDelay"/>, every forward takes at least that long (a request
    /// that stays running); with <paramref name="failForward"/>, that forward (counted from 1) throws, once.
    /// </summary>
    /// <remarks>
    /// With <paramref name="script"/>, the demo is made to write script(prompt text), then EOS (its greedy choice is
    /// forced; see <see cref="ScriptedRunner"/>).
    /// </remarks>
    public static DeepSeekChatClient CreateClient(ChatTemplateKind kind = ChatTemplateKind.R1, int maxBatch = 16, TimeSpan? stepDelay = null, int? failForward = null, Func<string, string>? script = null)
    {
        var options = new DeepSeekChatClientOptions { ModelId = Id, TemplateKind = kind, MaxBatch = maxBatch };
        if (script is not null)
        {
            return new DeepSeekChatClient(Local, Local.Tokenizer, options, stepRunner: new ScriptedRunner(Local.CreateStepRunner(), Local.Tokenizer, script));
        }

        return stepDelay is not null || failForward is not null
            ? new DeepSeekChatClient(Local, Local.Tokenizer, options, stepRunner: new TestRunner(Local.CreateStepRunner(), stepDelay ?? TimeSpan.Zero, failForward ?? 0))
            : Local.CreateChatClient(options);
    }

    /// <summary>
    /// Runs the demo, then forces each logit row so that the model writes script(prompt text) and EOS. The prompt is
    /// the history up to the last generation prompt (<c>&lt;｜Assistant｜&gt;</c>, with R1's <c>&lt;think&gt;\n</c>) or
    /// the tool outputs that end it; the output so far is the script's own first tokens.
    /// </summary>
    private sealed class ScriptedRunner(IStepRunner inner, ITokenizer tokenizer, Func<string, string> script) : DelegatingStepRunner(inner)
    {
        private readonly Dictionary<int, List<int>> _histories = [];

        public override bool CanDraft => false;

        public override void Open(int slot, bool drafts)
        {
            _histories[slot] = [];
            Inner.Open(slot, drafts);
        }

        public override void Close(int slot)
        {
            _histories.Remove(slot);
            Inner.Close(slot);
        }

        public override void Truncate(int slot, int length)
        {
            var h = _histories[slot];
            h.RemoveRange(length, h.Count - length);
            Inner.Truncate(slot, length);
        }

        public override void Forward(ReadOnlySpan<StepSequence> batch, Span<float> logits)
        {
            Inner.Forward(batch, logits);
            var offset = 0;
            foreach (var e in batch)
            {
                var h = _histories[e.Slot];
                h.AddRange(e.Tokens.ToArray());
                for (var r = 0; r < e.LogitRows; r++)
                {
                    var row = logits.Slice(offset, VocabSize);
                    row.Clear();
                    row[Next(h[..(h.Count - e.LogitRows + r + 1)])] = 100f;
                    offset += VocabSize;
                }
            }
        }

        public override void Draft(ReadOnlySpan<DraftSequence> batch, Span<float> logits) => throw new NotSupportedException();

        private int Next(List<int> history)
        {
            for (var k = 0; k < history.Count; k++)
            {
                var prompt = tokenizer.Decode(history.GetRange(0, history.Count - k).ToArray());
                if (!prompt.EndsWith(ChatTemplate.Assistant, StringComparison.Ordinal) && !prompt.EndsWith(ChatTemplate.Assistant + ChatTemplate.ThinkOpen + "\n", StringComparison.Ordinal)
                    && !prompt.EndsWith(ChatTemplate.ToolOutputsEnd, StringComparison.Ordinal))
                {
                    continue;
                }

                var ids = tokenizer.Encode(script(prompt), addBos: false);
                if (history.Skip(history.Count - k).SequenceEqual(ids.Take(k)))
                {
                    return k < ids.Length ? ids[k] : tokenizer.EosId!.Value;
                }
            }

            throw new InvalidOperationException("the history is not a prompt followed by the script");
        }
    }

    private sealed class TestRunner(IStepRunner inner, TimeSpan delay, int failForward) : DelegatingStepRunner(inner)
    {
        private int _forwards;

        public override void Forward(ReadOnlySpan<StepSequence> batch, Span<float> logits)
        {
            Thread.Sleep(delay);
            if (Interlocked.Increment(ref _forwards) == failForward)
            {
                throw new InvalidOperationException("injected step failure");
            }

            Inner.Forward(batch, logits);
        }
    }
}

/// <summary>A <see cref="ChatServer"/> on 127.0.0.1:0 over a chat client this object owns, with an HTTP client pointed at it.</summary>
internal sealed class TestServer : IAsyncDisposable
{
    private TestServer(DeepSeekChatClient client, ChatServer server, Uri address)
    {
        Client = client;
        Server = server;
        Address = address;
        Http = new HttpClient { BaseAddress = address, Timeout = TimeSpan.FromSeconds(60) };
    }

    public DeepSeekChatClient Client { get; }

    public ChatServer Server { get; }

    public Uri Address { get; }

    /// <summary>The OpenAI base URL: the address with <c>/v1</c>.</summary>
    public Uri V1 => new(Address, "/v1");

    public HttpClient Http { get; }

    public static Task<TestServer> StartAsync(ChatTemplateKind kind = ChatTemplateKind.R1, string? apiKey = null, int maxBatch = 16, TimeSpan? stepDelay = null, int? failForward = null, Func<string, string>? script = null) =>
        StartAsync(ServeModel.CreateClient(kind, maxBatch, stepDelay, failForward, script), apiKey);

    /// <summary>A server over <paramref name="client"/>, which the returned object owns.</summary>
    public static async Task<TestServer> StartAsync(DeepSeekChatClient client, string? apiKey = null)
    {
        var server = ChatServer.Create(new ChatServerOptions { Port = 0, ApiKey = apiKey }, client);
        var address = await server.StartAsync();
        await server.Ready;
        return new TestServer(client, server, address);
    }

    public async ValueTask DisposeAsync()
    {
        Http.Dispose();
        await Server.DisposeAsync();
        Client.Dispose();
    }

    /// <summary>POSTs a JSON body to /v1/chat/completions; returns the status and the parsed body.</summary>
    public Task<(HttpStatusCode Status, JsonNode? Body)> ChatAsync(string json, string? apiKey = null) => PostAsync(Http, "/v1/chat/completions", json, apiKey);

    public static async Task<(HttpStatusCode Status, JsonNode? Body)> PostAsync(HttpClient http, string path, string json, string? apiKey = null)
    {
        using var request = new HttpRequestMessage(HttpMethod.Post, path) { Content = new StringContent(json, Encoding.UTF8, "application/json") };
        if (apiKey is not null)
        {
            request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", apiKey);
        }

        using var response = await http.SendAsync(request);
        var text = await response.Content.ReadAsStringAsync();
        return (response.StatusCode, text.Length == 0 ? null : JsonNode.Parse(text));
    }

    /// <summary>POSTs a streaming request and returns the JSON of every <c>data:</c> event, and whether <c>[DONE]</c> ended it.</summary>
    public async Task<(List<JsonNode> Events, bool Done)> StreamAsync(string json)
    {
        using var request = new HttpRequestMessage(HttpMethod.Post, "/v1/chat/completions") { Content = new StringContent(json, Encoding.UTF8, "application/json") };
        using var response = await Http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead);
        Assert.AreEqual(HttpStatusCode.OK, response.StatusCode, await response.Content.ReadAsStringAsync());
        Assert.AreEqual("text/event-stream", response.Content.Headers.ContentType?.MediaType);
        var events = new List<JsonNode>();
        var done = false;
        using var reader = new StreamReader(await response.Content.ReadAsStreamAsync());
        while (await reader.ReadLineAsync() is { } line)
        {
            if (!line.StartsWith("data: ", StringComparison.Ordinal))
            {
                Assert.AreEqual("", line, "an SSE event is one data line and a blank line");
                continue;
            }

            Assert.IsFalse(done, "an event after [DONE]");
            var data = line["data: ".Length..];
            if (data == "[DONE]")
            {
                done = true;
            }
            else
            {
                events.Add(JsonNode.Parse(data)!);
            }
        }

        return (events, done);
    }

    /// <summary>The request body of a chat completion of one user message (greedy unless told), with <paramref name="extra"/> fields appended.</summary>
    public static string Body(string prompt, int maxTokens, string extra = "", double temperature = 0) =>
        new JsonObject { ["model"] = ServeModel.Id, ["messages"] = new JsonArray(new JsonObject { ["role"] = "user", ["content"] = prompt }), ["temperature"] = temperature, ["max_tokens"] = maxTokens }
            .ToJsonString()[..^1] + extra + "}";
}
