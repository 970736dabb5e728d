using System.Diagnostics;
using System.Text.Json.Nodes;
using Microsoft.Extensions.AI;

namespace DeepSeekCuda.Tests.Serve;

/// <summary>
/// The <c>openai</c> npm package (the version pinned in Tests/Clients/node/package-lock.json) as a real client of the
/// server: whole and streamed completions, DeepSeek's <c>reasoning_content</c>, usage, and a bad request seen as a 400
/// <c>APIError</c> naming the field; tool calls both ways and a json_schema response format. Needs node and npm; the package is installed once with <c>npm ci</c> into the
/// (git-ignored) node_modules beside the script. Without node, npm or the registry the test fails saying so: it
/// never passes or skips silently.
/// </summary>
[TestClass]
public sealed class NodeClientTests
{
    private static string ClientDir
    {
        get
        {
            // The test binaries run from Tests/bin/...; the script lives in the source tree.
            for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            {
                var candidate = Path.Combine(dir.FullName, "Tests", "Clients", "node");
                if (File.Exists(Path.Combine(candidate, "client.mjs")))
                {
                    return candidate;
                }
            }

            throw new AssertFailedException($"Tests/Clients/node/client.mjs not found above {AppContext.BaseDirectory}");
        }
    }

    private static async Task<(int Code, string Output, string Error)> RunAsync(string file, string directory, TimeSpan timeout, params string[] args)
    {
        var start = new ProcessStartInfo(file) { WorkingDirectory = directory, RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in args)
        {
            start.ArgumentList.Add(a);
        }

        Process process;
        try
        {
            process = Process.Start(start)!;
        }
        catch (System.ComponentModel.Win32Exception e)
        {
            throw new AssertFailedException($"'{file}' could not be started ({e.Message}): this test needs node and npm on PATH");
        }

        using (process)
        {
            var output = process.StandardOutput.ReadToEndAsync();
            var error = process.StandardError.ReadToEndAsync();
            using var cancel = new CancellationTokenSource(timeout);
            try
            {
                await process.WaitForExitAsync(cancel.Token);
            }
            catch (OperationCanceledException)
            {
                process.Kill(entireProcessTree: true);
                throw new AssertFailedException($"'{file} {string.Join(' ', args)}' ran over {timeout.TotalSeconds} s");
            }

            return (process.ExitCode, await output, await error);
        }
    }

    /// <summary>The client folder, with the pinned openai package installed (once, with <c>npm ci</c>).</summary>
    private static async Task<string> InstalledClientDirAsync()
    {
        var dir = ClientDir;
        if (!File.Exists(Path.Combine(dir, "node_modules", "openai", "package.json")))
        {
            var (code, output, error) = await RunAsync("npm", dir, TimeSpan.FromMinutes(3), "ci", "--no-audit", "--no-fund");
            if (code != 0)
            {
                Assert.Fail($"'npm ci' in {dir} failed (exit {code}); the openai package could not be installed (no network or registry?):\n{error}\n{output}");
            }
        }

        return dir;
    }

    [TestMethod]
    public async Task OpenAINpmPackage_GetsToolCalls_SendsToolResults_AndJsonSchemaOutput()
    {
        var dir = await InstalledClientDirAsync();
        await using var scripted = await TestServer.StartAsync(script: ServeToolTests.Script);
        await using var free = await TestServer.StartAsync(DeepSeekCuda.Text.ChatTemplateKind.V3);
        var run = await RunAsync("node", dir, TimeSpan.FromMinutes(2), "tools.mjs", scripted.V1.ToString(), free.V1.ToString(), ServeModel.Id);
        Assert.AreEqual(0, run.Code, $"node tools.mjs failed:\n{run.Error}\n{run.Output}");
        var seen = JsonNode.Parse(run.Output.Trim().Split('\n')[^1])!;

        var whole = seen["whole"]!;
        Assert.AreEqual("tool_calls", (string?)whole["finish"]);
        Assert.IsNull(whole["content"], "a message of tool calls only has null content");
        var call = whole["toolCalls"]!.AsArray().Single()!;
        Assert.AreEqual("function", (string?)call["type"]);
        Assert.AreEqual("get_weather", (string?)call["function"]!["name"]);
        Assert.AreEqual(ServeToolTests.Arguments, (string?)call["function"]!["arguments"]);

        var streamed = seen["streamed"]!;
        Assert.AreEqual("tool_calls", (string?)streamed["finish"]);
        var streamedCall = streamed["calls"]!.AsArray().Single()!;
        Assert.AreEqual("get_weather", (string?)streamedCall["name"]);
        Assert.AreEqual(ServeToolTests.Arguments, (string?)streamedCall["arguments"]);
        StringAssert.StartsWith((string?)streamedCall["id"], "call_");

        Assert.AreEqual("stop", (string?)seen["answer"]!["finish"]);
        Assert.AreEqual("It is sunny for 2 days in Paris.", (string?)seen["answer"]!["content"]);

        Assert.AreEqual("stop", (string?)seen["json"]!["finish"]);
        var json = JsonNode.Parse((string)seen["json"]!["content"]!)!.AsObject();
        CollectionAssert.AreEqual(new[] { "unit", "windy" }, json.Select(p => p.Key).ToArray());
        CollectionAssert.Contains(new[] { "celsius", "fahrenheit" }, (string?)json["unit"]);
    }

    [TestMethod]
    public async Task OpenAINpmPackage_StreamsAndNot_AndSeesA400WithTheParam()
    {
        var dir = await InstalledClientDirAsync();
        await using var server = await TestServer.StartAsync();

        var run = await RunAsync("node", dir, TimeSpan.FromMinutes(2), "client.mjs", server.V1.ToString(), ServeModel.Id);
        Assert.AreEqual(0, run.Code, $"node client.mjs failed:\n{run.Error}\n{run.Output}");
        var seen = JsonNode.Parse(run.Output.Trim().Split('\n')[^1])!;

        var direct = await server.Client.GetResponseAsync([new ChatMessage(ChatRole.User, "Why is the sky blue?")], new ChatOptions { Temperature = 0, MaxOutputTokens = 8 });
        var reasoning = string.Concat(direct.Messages.SelectMany(m => m.Contents).OfType<TextReasoningContent>().Select(r => r.Text));
        var answer = string.Concat(direct.Messages.SelectMany(m => m.Contents).OfType<TextContent>().Select(t => t.Text));
        Assert.IsGreaterThan(0, reasoning.Length);

        var whole = seen["whole"]!;
        Assert.AreEqual("chat.completion", (string?)whole["object"]);
        Assert.AreEqual(reasoning, (string?)whole["reasoning"]);
        Assert.AreEqual(answer, (string?)whole["content"]);
        Assert.AreEqual("length", (string?)whole["finish"]);
        Assert.AreEqual(direct.Usage!.InputTokenCount, (long)whole["usage"]!["prompt_tokens"]!);
        Assert.AreEqual(8, (long)whole["usage"]!["completion_tokens"]!);

        var streamed = seen["streamed"]!;
        Assert.AreEqual(reasoning, (string?)streamed["reasoning"]);
        Assert.AreEqual(answer, (string?)streamed["content"]);
        Assert.AreEqual("length", (string?)streamed["finish"]);
        Assert.AreEqual(8, (long)streamed["usage"]!["completion_tokens"]!);
        Assert.IsGreaterThan(2, (int)streamed["chunks"]!);

        var bad = seen["bad"]!;
        Assert.IsTrue((bool)bad["isApiError"]!, bad.ToJsonString());
        Assert.AreEqual(400, (int)bad["status"]!);
        Assert.AreEqual("max_tokens", (string?)bad["param"]);
    }
}
