using System.Diagnostics.Metrics;
using DeepSeekCuda.Hosting;
using DeepSeekCuda.Inference;
using DeepSeekCuda.Serving;
using DeepSeekCuda.Tests.Inference;
using DeepSeekCuda.Tests.Support;
using DeepSeekCuda.Text;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.DependencyInjection;

namespace DeepSeekCuda.Tests.Hosting;

[TestClass]
public sealed class ChatClientTests
{
    private static readonly FakeTokenizer Tok = new();
    private static readonly ChatMessage[] Hi = [new(ChatRole.User, "Hi")];

    private static IChatClient Client(ILanguageModel model, ChatTemplateKind kind = ChatTemplateKind.R1, IMeterFactory? meters = null)
        => new DeepSeekChatClient(model, Tok, new DeepSeekChatClientOptions { TemplateKind = kind, ModelId = "fake" }, meterFactory: meters);

    /// <summary>The prompt the client must send, built by hand from the R1 rules rather than by ChatTemplate.</summary>
    private static int[] R1PromptIds(string user) =>
        [FakeTokenizer.Bos, FakeTokenizer.UserId, .. Tok.Encode(user, false), FakeTokenizer.AssistantId, FakeTokenizer.Think, '\n'];

    private static async Task<string> StreamText(IChatClient client, IEnumerable<ChatMessage> messages, ChatOptions options)
    {
        var text = "";
        await foreach (var u in client.GetStreamingResponseAsync(messages, options))
        {
            // R1 output stays in reasoning here (the bigram never writes </think>), so take both kinds.
            text += string.Concat(u.Contents.Select(c => c switch { TextContent t => t.Text, TextReasoningContent r => r.Text, _ => "" }));
        }

        return text;
    }

    [TestMethod]
    public async Task Greedy_EqualsGeneratorAndIndependentLoop()
    {
        var model = FakeModel.Bigram(seed: 3);
        using var client = Client(model, ChatTemplateKind.V3);
        var response = await client.GetResponseAsync(Hi, new ChatOptions { Temperature = 0, MaxOutputTokens = 25 });

        int[] prompt = [FakeTokenizer.Bos, FakeTokenizer.UserId, 'H', 'i', FakeTokenizer.AssistantId];
        var expected = Reference.Greedy(model, prompt, FakeTokenizer.Eos, 25);
        var expectedText = Tok.Decode(expected.Where(t => t != FakeTokenizer.Eos).ToArray());
        var direct = await new TextGenerator(model, Tok).GenerateTextAsync(prompt, SamplingOptions.Greedy with { MaxTokens = 25 });

        Assert.AreEqual(expectedText, response.Text);
        Assert.AreEqual(expectedText, direct.Answer);
        Assert.AreEqual(prompt.Length, response.Usage!.InputTokenCount);
        Assert.AreEqual(expected.Count, response.Usage.OutputTokenCount);
        Assert.AreEqual(prompt.Length + expected.Count, response.Usage.TotalTokenCount);
    }

    [TestMethod]
    public async Task Seed_DeterminesText()
    {
        using var client = Client(FakeModel.Bigram(seed: 4));
        ChatOptions Opts(long seed) => new() { Temperature = 1, Seed = seed, MaxOutputTokens = 40 };
        var a = await StreamText(client, Hi, Opts(10));
        var b = await StreamText(client, Hi, Opts(10));
        var c = await StreamText(client, Hi, Opts(11));
        Assert.AreEqual(a, b);
        Assert.AreNotEqual(a, c);
        Assert.IsGreaterThan(10, a.Length);
    }

    [TestMethod]
    public async Task Reasoning_BecomesTextReasoningContent_WithUsageAndStop()
    {
        var prompt = R1PromptIds("Hi");
        var script = Tok.Encode("ponder</think>Answer.", false);
        var model = FakeModel.Scripted(script, prompt.Length);
        using var client = Client(model);
        var updates = new List<ChatResponseUpdate>();
        await foreach (var u in client.GetStreamingResponseAsync(Hi))
        {
            updates.Add(u);
        }

        var contents = updates.SelectMany(u => u.Contents).ToList();
        Assert.AreEqual("ponder", string.Concat(contents.OfType<TextReasoningContent>().Select(r => r.Text)));
        Assert.AreEqual("Answer.", string.Concat(contents.OfType<TextContent>().Select(t => t.Text)));
        var usage = contents.OfType<UsageContent>().Single().Details;
        Assert.AreEqual(prompt.Length, usage.InputTokenCount);
        Assert.AreEqual(script.Length + 1, usage.OutputTokenCount); // + EOS
        Assert.AreEqual(ChatFinishReason.Stop, updates[^1].FinishReason);
        Assert.IsTrue(updates.All(u => u.ModelId == "fake" && u.Role == ChatRole.Assistant));

        var response = await client.GetResponseAsync(Hi);
        Assert.AreEqual("Answer.", response.Text);
        Assert.AreEqual("ponder", response.Messages.Single().Contents.OfType<TextReasoningContent>().Single().Text);
        Assert.AreEqual(ChatFinishReason.Stop, response.FinishReason);
    }

    [TestMethod]
    public async Task StopSequence_EndsBeforeIt_FinishStop()
    {
        var prompt = R1PromptIds("Hi");
        using var client = Client(FakeModel.Scripted(Tok.Encode("x</think>one two END three", false), prompt.Length));
        var response = await client.GetResponseAsync(Hi, new ChatOptions { StopSequences = ["END"] });
        Assert.AreEqual("one two ", response.Text);
        Assert.AreEqual(ChatFinishReason.Stop, response.FinishReason);
    }

    [TestMethod]
    public async Task MaxOutputTokens_FinishLength()
    {
        var prompt = R1PromptIds("Hi");
        using var client = Client(FakeModel.Scripted(Tok.Encode("r</think>abcdefghijklmnop", false), prompt.Length));
        var response = await client.GetResponseAsync(Hi, new ChatOptions { MaxOutputTokens = 12 });
        Assert.AreEqual("abcdefghij", response.Text); // 12 tokens: 'r' and the </think> token, then 10 letters
        Assert.AreEqual(ChatFinishReason.Length, response.FinishReason);
        Assert.AreEqual(12, response.Usage!.OutputTokenCount);
    }

    [TestMethod]
    public async Task CancelMidStream_Throws_DisposesSession_AndFreesTheModel()
    {
        var model = FakeModel.Bigram(seed: 5, eosLogit: float.NegativeInfinity);
        using var client = Client(model);
        using var cts = new CancellationTokenSource();
        var n = 0;
        await Assert.ThrowsAsync<OperationCanceledException>(async () =>
        {
            await foreach (var _ in client.GetStreamingResponseAsync(Hi, new ChatOptions { Seed = 1 }, cts.Token))
            {
                if (++n == 3)
                {
                    await cts.CancelAsync();
                }
            }
        });
        Assert.AreEqual(1, model.SessionsCreated);
        Assert.AreEqual(1, model.SessionsDisposed);

        // The gate was released: a second request runs.
        var again = await client.GetResponseAsync(Hi, new ChatOptions { MaxOutputTokens = 4 });
        Assert.AreEqual(ChatFinishReason.Length, again.FinishReason);
    }

    /// <summary>Concurrent requests share the scheduler's batch up to MaxBatch sessions at once; MaxBatch 1 serializes them.</summary>
    [TestMethod]
    [DataRow(1)]
    [DataRow(16)]
    public async Task ConcurrentRequests_RunUpToMaxBatchAtOnce(int maxBatch)
    {
        var model = FakeModel.Bigram(seed: 6, eosLogit: float.NegativeInfinity);
        var maxActive = 0;
        model.OnForward = _ =>
        {
            // Sessions alive at once = created - disposed (the runner opens one per admitted request).
            var alive = model.SessionsCreated - model.SessionsDisposed;
            maxActive = Math.Max(maxActive, alive);
            Thread.Sleep(1);
        };
        using var client = new DeepSeekChatClient(model, Tok, new DeepSeekChatClientOptions { ModelId = "fake", MaxBatch = maxBatch });
        var tasks = Enumerable.Range(0, 4).Select(i => client.GetResponseAsync(Hi, new ChatOptions { Seed = i, MaxOutputTokens = 5 })).ToArray();
        await Task.WhenAll(tasks);
        if (maxBatch == 1)
        {
            Assert.AreEqual(1, maxActive);
        }
        else
        {
            // Submission is synchronous in GetResponseAsync, so the later three join while the first decodes.
            Assert.IsGreaterThan(1, maxActive);
        }

        Assert.AreEqual(4, model.SessionsDisposed);
    }

    [TestMethod]
    public async Task DisposeMidStream_RunningRequestFinishes_ModelReleasedAfterIt_LaterRequestsThrow()
    {
        var model = FakeModel.Bigram(seed: 7, eosLogit: float.NegativeInfinity);
        var forwardsOnDisposedModel = 0;
        model.OnForward = _ =>
        {
            if (model.Disposed)
            {
                Interlocked.Increment(ref forwardsOnDisposedModel);
            }
        };
        var client = new DeepSeekChatClient(model, Tok, new DeepSeekChatClientOptions { ModelId = "fake" }, disposeModel: true);
        var text = "";
        ChatFinishReason? finish = null;
        var n = 0;
        await foreach (var u in client.GetStreamingResponseAsync(Hi, new ChatOptions { Seed = 1, MaxOutputTokens = 10 }))
        {
            if (++n == 2)
            {
                client.Dispose();
                Assert.IsFalse(model.Disposed, "the model was disposed under a running request");
            }

            text += string.Concat(u.Contents.Select(c => c switch { TextContent t => t.Text, TextReasoningContent r => r.Text, _ => "" }));
            finish ??= u.FinishReason;
        }

        Assert.AreEqual(0, forwardsOnDisposedModel);
        Assert.AreEqual(ChatFinishReason.Length, finish);
        Assert.AreEqual(10, text.Length); // the bigram writes one ASCII character per token
        Assert.IsTrue(model.Disposed, "the model was not released when the running request ended");
        await Assert.ThrowsAsync<ObjectDisposedException>(() => client.GetResponseAsync(Hi));
    }

    [TestMethod]
    public async Task DisposeWhileIdle_ReleasesModelAtOnce()
    {
        var model = FakeModel.Bigram(seed: 7);
        var client = new DeepSeekChatClient(model, Tok, disposeModel: true);
        client.Dispose();
        client.Dispose();
        Assert.IsTrue(model.Disposed);
        await Assert.ThrowsAsync<ObjectDisposedException>(() => client.GetResponseAsync(Hi));
    }

    [TestMethod]
    public void GetService_ReturnsSelfAndMetadata()
    {
        var model = FakeModel.Bigram(1);
        using var client = Client(model);
        var meta = client.GetService<ChatClientMetadata>();
        Assert.IsNotNull(meta);
        Assert.AreEqual("DeepSeekCuda", meta.ProviderName);
        Assert.AreEqual("fake", meta.DefaultModelId);
        Assert.AreSame(client, client.GetService<DeepSeekChatClient>());
        Assert.AreSame(model, client.GetService<ILanguageModel>());
        Assert.IsNull(client.GetService<ChatClientMetadata>("some key"));
    }

    [TestMethod]
    public void Messages_MapToTurns_IncludingToolsAndInstructions()
    {
        var messages = new List<ChatMessage>
        {
            new(ChatRole.System, "sys"),
            new(ChatRole.User, "q"),
            new(ChatRole.Assistant, [new TextReasoningContent("hidden"), new FunctionCallContent("c1", "get", new Dictionary<string, object?> { ["city"] = "Paris" })]),
            new(ChatRole.Tool, [new FunctionResultContent("c1", "20C")]),
            new(ChatRole.Assistant, "It is 20C."),
        };
        var turns = DeepSeekChatClient.ToTurns(messages, new ChatOptions { Instructions = "be brief" });
        var expected = new[]
        {
            ChatTurn.System("be brief"),
            ChatTurn.System("sys"),
            ChatTurn.User("q"),
            ChatTurn.Tool("20C"),
            ChatTurn.Assistant("It is 20C."),
        };
        Assert.HasCount(6, turns);
        Assert.AreEqual(expected[0], turns[0]);
        Assert.AreEqual(expected[1], turns[1]);
        Assert.AreEqual(expected[2], turns[2]);
        Assert.AreEqual(ChatTurnRole.Assistant, turns[3].Role);
        Assert.IsNull(turns[3].Content);
        Assert.AreEqual(new ChatToolCall("get", "{\"city\":\"Paris\"}"), turns[3].ToolCalls!.Single());
        Assert.AreEqual(expected[3], turns[4]);
        Assert.AreEqual(expected[4], turns[5]);
    }

    [TestMethod]
    public async Task Metrics_RecordTokensAndTimes()
    {
        var prompt = R1PromptIds("Hi");
        var script = Tok.Encode("r</think>hello", false);
        using var meters = new TestMeterFactory();
        using var client = Client(FakeModel.Scripted(script, prompt.Length), meters: meters);

        var longs = new List<(string, long)>();
        var doubles = new List<(string, double)>();
        using var listener = new MeterListener();
        listener.InstrumentPublished = (inst, l) =>
        {
            if (meters.Created.Contains(inst.Meter))
            {
                l.EnableMeasurementEvents(inst);
            }
        };
        listener.SetMeasurementEventCallback<long>((inst, v, _, _) => longs.Add((inst.Name, v)));
        listener.SetMeasurementEventCallback<double>((inst, v, _, _) => doubles.Add((inst.Name, v)));
        listener.Start();

        await client.GetResponseAsync(Hi);

        Assert.AreEqual("DeepSeekCuda", meters.Created.Single().Name);
        CollectionAssert.AreEquivalent(new[] { ("deepseekcuda.tokens.input", (long)prompt.Length), ("deepseekcuda.tokens.output", (long)script.Length + 1) }, longs);
        var ttft = doubles.Where(d => d.Item1 == "deepseekcuda.time_to_first_token").Select(d => d.Item2).Single();
        Assert.IsTrue(ttft is > 0 and < 60);
        var tps = doubles.Where(d => d.Item1 == "deepseekcuda.tokens_per_second").Select(d => d.Item2).Single();
        Assert.IsGreaterThan(0, tps);
    }

    [TestMethod]
    public async Task DependencyInjection_ResolvesIChatClient_AndDisposesModel()
    {
        var prompt = R1PromptIds("Hi");
        var model = FakeModel.Scripted(Tok.Encode("r</think>ok", false), prompt.Length);
        var services = new ServiceCollection();
        services.AddLogging();
        services.AddDeepSeekCuda(o =>
        {
            o.ModelFactory = _ => (model, Tok);
            o.Chat.ModelId = "di-model";
        });
        await using (var provider = services.BuildServiceProvider())
        {
            var client = provider.GetRequiredService<IChatClient>();
            Assert.AreSame(client, provider.GetRequiredService<DeepSeekChatClient>());
            Assert.AreEqual("di-model", client.GetService<ChatClientMetadata>()!.DefaultModelId);
            var response = await client.GetResponseAsync(Hi);
            Assert.AreEqual("ok", response.Text);
        }

        Assert.IsTrue(model.Disposed);
    }

    [TestMethod]
    public void DependencyInjection_WithoutModelSource_FailsOnFirstUseNamingTheField()
    {
        var services = new ServiceCollection();
        services.AddDeepSeekCuda(_ => { });
        using var provider = services.BuildServiceProvider();
        var e = Assert.ThrowsExactly<Microsoft.Extensions.Options.OptionsValidationException>(() => provider.GetRequiredService<IChatClient>());
        StringAssert.Contains(e.Message, "DeepSeekCudaOptions.ModelPath: set a checkpoint folder (or DeepSeekCudaOptions.ModelFactory)");
    }
}
