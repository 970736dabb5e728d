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
    [TestMethod]
    public async Task ServePortZero_PrintsTheUrl_ServesARequest_AndExitsZeroWhenCancelled()
    {
        using var cancel = new CancellationTokenSource();
        var output = new LineWriter();
        var error = new StringWriter();
        var run = Task.Run(() => CliApp.RunAsync(["serve", "--port", "0", "--device", "cpu", "--model-id", "cli-demo"], TextReader.Null, output, TextWriter.Synchronized(error), cancel.Token));
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
        }
        finally
        {
            await cancel.CancelAsync();
        }

        var code = await run.WaitAsync(TimeSpan.FromSeconds(30));
        Assert.AreEqual(0, code, error.ToString());
        StringAssert.Contains(error.ToString(), "draining");
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
