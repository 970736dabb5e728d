using System.Diagnostics;
using System.Net;
using System.Text;
using System.Text.Json.Nodes;

namespace DeepSeekCuda.Tests.Serve;

/// <summary>
/// The server on the continuous-batching scheduler: many concurrent HTTP requests each get what they get alone, and a
/// client that hangs up mid-stream cancels its request and returns every cache block (seen in the scheduler and in
/// <c>/metrics</c>).
/// </summary>
[TestClass]
public sealed class ServeSchedulerTests
{
    [TestMethod]
    public async Task SixtyFourConcurrentRequests_EachEqualTheSameRequestAlone()
    {
        await using var server = await TestServer.StartAsync(maxBatch: 64);
        var prompts = Enumerable.Range(0, 64).Select(i => $"Question {i}: what is {i} times {i + 3}?").ToArray();
        // Half streamed, half whole: both paths share the scheduler at once.
        async Task<string> AskAsync(int i)
        {
            var body = TestServer.Body(prompts[i], 4, i % 2 == 0 ? "" : ",\"stream\":true");
            if (i % 2 == 0)
            {
                var (status, json) = await server.ChatAsync(body);
                Assert.AreEqual(HttpStatusCode.OK, status, json?.ToJsonString());
                var message = json!["choices"]![0]!["message"]!;
                return $"{(string?)message["reasoning_content"]}|{(string?)message["content"]}";
            }

            var (events, done) = await server.StreamAsync(body);
            Assert.IsTrue(done);
            var deltas = events.Select(e => e["choices"]![0]!["delta"]!).ToList();
            return $"{string.Concat(deltas.Select(d => (string?)d["reasoning_content"]))}|{string.Concat(deltas.Select(d => (string?)d["content"]))}";
        }

        // Watch the running batch while the 64 run together: they must really share steps.
        var largest = 0;
        using var watching = new CancellationTokenSource();
        var watcher = Task.Run(async () =>
        {
            while (!watching.IsCancellationRequested)
            {
                largest = Math.Max(largest, server.Client.Scheduler.RunningCount);
                await Task.Delay(1);
            }
        });
        var together = await Task.WhenAll(Enumerable.Range(0, 64).Select(AskAsync));
        await watching.CancelAsync();
        await watcher;
        Assert.IsGreaterThan(8, largest, "requests ran in one batch");
        var distinct = together.Distinct().Count();
        Assert.IsGreaterThan(1, distinct, "different prompts give different texts");
        for (var i = 0; i < 64; i++)
        {
            Assert.AreEqual(await AskAsync(i), together[i], $"request {i}");
        }
    }

    [TestMethod]
    public async Task ClientDisconnectMidStream_CancelsTheRequest_AndReturnsEveryCacheBlock()
    {
        // Slow steps: the request is surely still running when the client hangs up.
        await using var server = await TestServer.StartAsync(stepDelay: TimeSpan.FromMilliseconds(20));
        var blocks = server.Client.Scheduler.Blocks;
        var total = blocks.TotalBlocks;
        Assert.AreEqual(total, blocks.FreeBlocks);
        Assert.AreEqual(total, KvGauge(await ScrapeAsync(server), "free"));

        // A long prompt holds several 64-token blocks; a large max_tokens keeps the request running until we hang up.
        var prompt = string.Join(' ', Enumerable.Repeat("the sky is blue because", 15));
        using var http = new HttpClient { BaseAddress = server.Address };
        using var request = new HttpRequestMessage(HttpMethod.Post, "/v1/chat/completions")
        {
            Content = new StringContent(TestServer.Body(prompt, 500, ",\"stream\":true"), Encoding.UTF8, "application/json"),
        };
        var response = await http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead);
        Assert.AreEqual(HttpStatusCode.OK, response.StatusCode);
        var reader = new StreamReader(await response.Content.ReadAsStreamAsync());
        Assert.StartsWith("data: ", await reader.ReadLineAsync() ?? "");
        Assert.AreEqual(1, server.Client.Scheduler.RunningCount);
        var held = total - blocks.FreeBlocks;
        Assert.IsGreaterThan(1, held, "the running request holds its prompt's blocks");
        Assert.AreEqual(held, KvGauge(await ScrapeAsync(server), "used"), "/metrics shows the held blocks");

        // Hang up: drop the response stream and the connection.
        reader.Dispose();
        response.Dispose();
        http.Dispose();
        var clock = Stopwatch.StartNew();
        while ((blocks.FreeBlocks != total || server.Client.Scheduler.RunningCount != 0) && clock.Elapsed < TimeSpan.FromSeconds(10))
        {
            await Task.Delay(20);
        }

        Assert.AreEqual(0, server.Client.Scheduler.RunningCount, "the request was cancelled");
        Assert.AreEqual(total, blocks.FreeBlocks, "every block returned");
        Assert.IsLessThan(TimeSpan.FromSeconds(5), clock.Elapsed);
        var metrics = await ScrapeAsync(server);
        Assert.AreEqual(total, KvGauge(metrics, "free"));
        Assert.AreEqual(0, KvGauge(metrics, "used"));

        // The server goes on serving.
        var (status, body) = await server.ChatAsync(TestServer.Body("hi", 2));
        Assert.AreEqual(HttpStatusCode.OK, status, body?.ToJsonString());
    }

    [TestMethod]
    public async Task Stop_DrainsARunningStream_ToItsEnd()
    {
        var server = await TestServer.StartAsync(stepDelay: TimeSpan.FromMilliseconds(30));
        var stream = server.StreamAsync(TestServer.Body("drain me", 12, ",\"stream\":true"));
        var clock = Stopwatch.StartNew();
        while (server.Client.Scheduler.RunningCount == 0 && clock.Elapsed < TimeSpan.FromSeconds(10))
        {
            await Task.Delay(5);
        }

        Assert.AreEqual(1, server.Client.Scheduler.RunningCount);
        await server.Server.StopAsync();
        Assert.AreEqual(0, server.Client.Scheduler.RunningCount, "StopAsync returned before the running request ended");
        var (events, done) = await stream.WaitAsync(TimeSpan.FromSeconds(10));
        Assert.IsTrue(done, "the drained stream ended normally");
        Assert.AreEqual("length", (string?)events.Last(e => e["choices"]!.AsArray().Count > 0)["choices"]![0]!["finish_reason"]);
        await server.DisposeAsync();
    }

    [TestMethod]
    public async Task StepFailureAfterTheFirstChunk_EndsThatStreamWithAnErrorEvent_AndTheServerGoesOn()
    {
        // The prompt takes one forward, the first token's chunk goes out, and the fourth forward throws.
        await using var server = await TestServer.StartAsync(failForward: 4);
        var (events, done) = await server.StreamAsync(TestServer.Body("hi", 10, ",\"stream\":true"));
        Assert.IsFalse(done, "a failed stream does not end with [DONE]");
        Assert.IsGreaterThan(1, events.Count, "chunks went out before the failure");
        var error = events[^1]["error"];
        Assert.IsNotNull(error, events[^1].ToJsonString());
        Assert.AreEqual("server_error", (string?)error["type"]);
        StringAssert.Contains((string?)error["message"], "injected step failure");
        Assert.AreEqual(0, server.Client.Scheduler.RunningCount);
        Assert.AreEqual(server.Client.Scheduler.Blocks.TotalBlocks, server.Client.Scheduler.Blocks.FreeBlocks);

        var (status, body) = await server.ChatAsync(TestServer.Body("hi", 3));
        Assert.AreEqual(HttpStatusCode.OK, status, body?.ToJsonString());
        Assert.AreEqual(3, (int)body!["usage"]!["completion_tokens"]!);
    }

    [TestMethod]
    public async Task StepFailureBeforeAnyOutput_IsA500WithOpenAIsErrorObject()
    {
        await using var server = await TestServer.StartAsync(failForward: 1);
        var (status, body) = await server.ChatAsync(TestServer.Body("hi", 3));
        Assert.AreEqual(HttpStatusCode.InternalServerError, status);
        Assert.AreEqual("server_error", (string?)body!["error"]!["type"]);
        (status, body) = await server.ChatAsync(TestServer.Body("hi", 3));
        Assert.AreEqual(HttpStatusCode.OK, status, body?.ToJsonString());
    }

    [TestMethod]
    public async Task Metrics_ArePrometheusText_FromTheDeepSeekCudaMeter()
    {
        await using var server = await TestServer.StartAsync();
        var (status, body) = await server.ChatAsync(TestServer.Body("hello", 3));
        Assert.AreEqual(HttpStatusCode.OK, status);
        using var response = await server.Http.GetAsync("/metrics");
        Assert.AreEqual("text/plain", response.Content.Headers.ContentType?.MediaType);
        var text = await response.Content.ReadAsStringAsync();
        StringAssert.Contains(text, "# TYPE deepseekcuda_tokens_output_total counter");
        StringAssert.Contains(text, $"deepseekcuda_tokens_output_total{{model=\"{ServeModel.Id}\"}} 3\n");
        StringAssert.Contains(text, $"deepseekcuda_tokens_input_total{{model=\"{ServeModel.Id}\"}} {(long)body!["usage"]!["prompt_tokens"]!}\n");
        StringAssert.Contains(text, "# TYPE deepseekcuda_time_to_first_token summary");
        StringAssert.Contains(text, $"deepseekcuda_time_to_first_token_count{{model=\"{ServeModel.Id}\"}} 1\n");
        StringAssert.Contains(text, "# TYPE deepseekcuda_batch_running gauge");
        StringAssert.Contains(text, "# TYPE deepseekcuda_kv_blocks_free gauge");
        // Every sample line is "name{labels} value" with a number.
        foreach (var line in text.Split('\n', StringSplitOptions.RemoveEmptyEntries).Where(l => !l.StartsWith('#')))
        {
            Assert.IsTrue(double.TryParse(line[(line.LastIndexOf(' ') + 1)..], System.Globalization.CultureInfo.InvariantCulture, out _), line);
        }
    }

    private static async Task<string> ScrapeAsync(TestServer server) => await server.Http.GetStringAsync("/metrics");

    private static long KvGauge(string metrics, string which)
    {
        var prefix = $"deepseekcuda_kv_blocks_{which}{{model=\"{ServeModel.Id}\"}} ";
        var line = metrics.Split('\n').Single(l => l.StartsWith(prefix, StringComparison.Ordinal));
        return long.Parse(line[prefix.Length..], System.Globalization.CultureInfo.InvariantCulture);
    }
}
