using System.Net;
using System.Text;
using System.Text.Json.Nodes;
using DeepSeekCuda.Cli;
using DeepSeekCuda.Tests.Cli;

namespace DeepSeekCuda.Tests.Serve;

/// <summary><c>dscuda serve</c> in-process through <see cref="CliApp.RunAsync"/>: the listening line, a request, a clean exit on cancellation.</summary>
[TestClass]
public sealed class ServeCommandTests
{
    /// <remarks>
    /// Also the model options shared with generate and chat (<c>--ctx-size</c>, <c>--mtp</c>, <c>-v</c>) and
    /// <c>--max-batch</c>: the context given is the one enforced, and the log says what was chosen.
    /// </remarks>
    [TestMethod]
    public async Task ServePortZero_PrintsTheUrl_ServesARequest_AndExitsZeroWhenCancelled()
    {
        using var cancel = new CancellationTokenSource();
        var output = new LineWriter();
        var error = new StringWriter();
        var run = Task.Run(() => CliApp.RunAsync(["serve", "--port", "0", "--device", "cpu", "--model-id", "cli-demo", "--ctx-size", "64", "--mtp", "off", "--max-batch", "2", "-v"], TextReader.Null, output, TextWriter.Synchronized(error), cancel.Token));
        string url;
        try
        {
            var line = await output.FirstLineAsync.WaitAsync(TimeSpan.FromSeconds(60));
            StringAssert.Matches(line, new System.Text.RegularExpressions.Regex(@"^listening on http://127\.0\.0\.1:\d+$"));
            url = line["listening on ".Length..];
            using var http = new HttpClient { BaseAddress = new Uri(url) };
            var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(60);
            while ((await http.GetAsync("/health")).StatusCode != HttpStatusCode.OK && DateTime.UtcNow < deadline)
            {
                await Task.Delay(50);
            }

            var body = "{\"model\":\"cli-demo\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":3,\"temperature\":0}";
            using var response = await http.PostAsync("/v1/chat/completions", new StringContent(body, Encoding.UTF8, "application/json"));
            var json = JsonNode.Parse(await response.Content.ReadAsStringAsync())!;
            Assert.AreEqual(HttpStatusCode.OK, response.StatusCode, json.ToJsonString());
            Assert.AreEqual(3, (int)json["usage"]!["completion_tokens"]!);
            Assert.AreEqual("cli-demo", (string?)json["model"]);

            // 100 words are more than 64 tokens with any tokenizer: the context --ctx-size set is the one enforced.
            var longPrompt = string.Join(' ', Enumerable.Repeat("sky", 100));
            var tooLong = "{\"model\":\"cli-demo\",\"messages\":[{\"role\":\"user\",\"content\":\"" + longPrompt + "\"}],\"max_tokens\":3}";
            using var refused = await http.PostAsync("/v1/chat/completions", new StringContent(tooLong, Encoding.UTF8, "application/json"));
            var refusal = JsonNode.Parse(await refused.Content.ReadAsStringAsync())!;
            Assert.AreEqual(HttpStatusCode.BadRequest, refused.StatusCode, refusal.ToJsonString());
            Assert.AreEqual("context_length_exceeded", (string?)refusal["error"]!["code"], refusal.ToJsonString());
        }
        finally
        {
            await cancel.CancelAsync();
        }

        var code = await run.WaitAsync(TimeSpan.FromSeconds(30));
        Assert.AreEqual(0, code, error.ToString());
        StringAssert.Contains(error.ToString(), "draining");
        StringAssert.Contains(error.ToString(), "info: DeepSeekCuda.Hosting.LocalModel: Context length 64 tokens per request");
        using var after = new HttpClient();
        await Assert.ThrowsAsync<HttpRequestException>(() => after.GetAsync(url + "/health"), "the port is closed after exit");
    }

    [TestMethod]
    public void BadHost_IsOneLineAndExit1()
    {
        var result = CliRunner.Run("serve", "--host", "example.com", "--port", "0");
        Assert.AreEqual(1, result.ExitCode, result.Error);
        StringAssert.Contains(result.Error, "--host");
    }

    /// <summary>Collects output and completes <see cref="FirstLineAsync"/> with the first whole line.</summary>
    private sealed class LineWriter : TextWriter
    {
        private readonly StringBuilder _text = new();
        private readonly TaskCompletionSource<string> _first = new(TaskCreationOptions.RunContinuationsAsynchronously);

        public override Encoding Encoding => Encoding.UTF8;

        public Task<string> FirstLineAsync => _first.Task;

        public override void Write(char value)
        {
            lock (_text)
            {
                _text.Append(value);
                var text = _text.ToString();
                if (value == '\n')
                {
                    _first.TrySetResult(text[..text.IndexOf('\n')].TrimEnd('\r'));
                }
            }
        }
    }
}
