using System.ClientModel;
using DeepSeekCuda.Text;
using Microsoft.Extensions.AI;
using OpenAI;
using OpenAI.Chat;
using ChatMessage = Microsoft.Extensions.AI.ChatMessage;

namespace DeepSeekCuda.Tests.Serve;

#pragma warning disable OPENAI001 // ChatCompletionOptions.Seed is marked experimental by the OpenAI library

/// <summary>
/// <c>dscuda serve</c> through the official OpenAI .NET library (a real client over real HTTP), held to the chat client
/// called directly with the same options. The server runs the V3 template (no forced <c>&lt;think&gt;</c>), so the demo's
/// output is answer text, which this library exposes (it has no field for DeepSeek's <c>reasoning_content</c>; see
/// <see cref="ServeHttpTests"/> for that).
/// </summary>
[TestClass]
public sealed class ServeOpenAIClientTests
{
    private static TestServer s_server = null!;
    private static ChatClient s_openai = null!;

    // The reference: a chat client of its own (its own scheduler and sessions), called directly, not over HTTP.
    private static DeepSeekCuda.Hosting.DeepSeekChatClient s_reference = null!;

    [ClassInitialize]
    public static async Task Init(TestContext _)
    {
        s_reference = ServeModel.CreateClient(ChatTemplateKind.V3);
        s_server = await TestServer.StartAsync(ChatTemplateKind.V3);
        s_openai = new ChatClient(ServeModel.Id, new ApiKeyCredential("unused"), new OpenAIClientOptions { Endpoint = s_server.V1 });
    }

    [ClassCleanup]
    public static async Task Cleanup()
    {
        await s_server.DisposeAsync();
        s_reference.Dispose();
    }

    private const string Question = "Why is the sky blue?";

    private static async Task<(string Text, ChatResponse Response)> DirectAsync(ChatOptions options)
    {
        var response = await s_reference.GetResponseAsync([new ChatMessage(ChatRole.User, Question)], options);
        return (string.Concat(response.Messages.SelectMany(m => m.Contents).OfType<TextContent>().Select(t => t.Text)), response);
    }

    private static async Task<(string Text, OpenAI.Chat.ChatFinishReason? Finish, ChatTokenUsage? Usage)> StreamAsync(ChatCompletionOptions options)
    {
        var text = "";
        OpenAI.Chat.ChatFinishReason? finish = null;
        ChatTokenUsage? usage = null;
        await foreach (var update in s_openai.CompleteChatStreamingAsync([new UserChatMessage(Question)], options))
        {
            text += string.Concat(update.ContentUpdate.Select(p => p.Text));
            finish = update.FinishReason ?? finish;
            usage = update.Usage ?? usage;
        }

        return (text, finish, usage);
    }

    private static string Text(ChatCompletion completion) => string.Concat(completion.Content.Select(p => p.Text));

    [TestMethod]
    public async Task Greedy_WholeAndStreamed_EqualTheChatClientCalledDirectly_WithItsUsage()
    {
        var (expected, direct) = await DirectAsync(new ChatOptions { Temperature = 0, MaxOutputTokens = 12 });
        Assert.IsGreaterThan(0, expected.Length, "the demo's greedy answer is not empty");

        ChatCompletion whole = await s_openai.CompleteChatAsync([new UserChatMessage(Question)], new ChatCompletionOptions { Temperature = 0, MaxOutputTokenCount = 12 });
        Assert.AreEqual(expected, Text(whole));
        Assert.AreEqual(OpenAI.Chat.ChatFinishReason.Length, whole.FinishReason);
        Assert.AreEqual(ServeModel.Id, whole.Model);
        StringAssert.StartsWith(whole.Id, "chatcmpl-");
        Assert.AreEqual(direct.Usage!.InputTokenCount, whole.Usage.InputTokenCount);
        Assert.AreEqual(direct.Usage.OutputTokenCount, whole.Usage.OutputTokenCount);
        Assert.AreEqual(direct.Usage.TotalTokenCount, whole.Usage.TotalTokenCount);
        Assert.AreEqual(12, whole.Usage.OutputTokenCount);

        var streamed = await StreamAsync(new ChatCompletionOptions { Temperature = 0, MaxOutputTokenCount = 12 });
        Assert.AreEqual(expected, streamed.Text);
        Assert.AreEqual(OpenAI.Chat.ChatFinishReason.Length, streamed.Finish);
        Assert.IsNotNull(streamed.Usage, "the library asks for include_usage; the last chunk carries it");
        Assert.AreEqual(direct.Usage.InputTokenCount, streamed.Usage.InputTokenCount);
        Assert.AreEqual(direct.Usage.OutputTokenCount, streamed.Usage.OutputTokenCount);
    }

    [TestMethod]
    public async Task StopSequence_EndsTheAnswerBeforeIt_WithFinishReasonStop()
    {
        var (full, _) = await DirectAsync(new ChatOptions { Temperature = 0, MaxOutputTokens = 16 });
        Assert.IsGreaterThanOrEqualTo(6, full.Length, $"the demo's answer is long enough to cut: '{full}'");
        // A two-character stop from the middle of the greedy answer: the answer must end where it first appears.
        var stop = full.Substring(4, 2);
        var cut = full.IndexOf(stop, StringComparison.Ordinal);
        foreach (var stops in new[] { [stop], new[] { "\u0001never", stop } })
        {
            var options = new ChatCompletionOptions { Temperature = 0, MaxOutputTokenCount = 16 };
            foreach (var s in stops)
            {
                options.StopSequences.Add(s);
            }

            ChatCompletion whole = await s_openai.CompleteChatAsync([new UserChatMessage(Question)], options);
            Assert.AreEqual(full[..cut], Text(whole), $"stops {string.Join(",", stops)}");
            Assert.AreEqual(OpenAI.Chat.ChatFinishReason.Stop, whole.FinishReason);
            var streamed = await StreamAsync(options);
            Assert.AreEqual(full[..cut], streamed.Text);
            Assert.AreEqual(OpenAI.Chat.ChatFinishReason.Stop, streamed.Finish);
        }
    }

    [TestMethod]
    public async Task SameSeed_GivesTheSameText_AndMatchesTheChatClient()
    {
        ChatCompletionOptions Seeded() => new() { Temperature = 1, TopP = 1, Seed = 1234, MaxOutputTokenCount = 12 };
        ChatCompletion first = await s_openai.CompleteChatAsync([new UserChatMessage(Question)], Seeded());
        ChatCompletion second = await s_openai.CompleteChatAsync([new UserChatMessage(Question)], Seeded());
        Assert.AreEqual(Text(first), Text(second));
        Assert.AreEqual(Text(first), (await StreamAsync(Seeded())).Text);
        var (direct, _) = await DirectAsync(new ChatOptions { Temperature = 1, TopP = 1, Seed = 1234, MaxOutputTokens = 12 });
        Assert.AreEqual(direct, Text(first));
    }

    [TestMethod]
    public async Task UnknownModel_IsA404ClientResultException()
    {
        var other = new ChatClient("gpt-4o", new ApiKeyCredential("unused"), new OpenAIClientOptions { Endpoint = s_server.V1 });
        var e = await Assert.ThrowsAsync<ClientResultException>(() => other.CompleteChatAsync([new UserChatMessage(Question)]));
        Assert.AreEqual(404, e.Status);
        StringAssert.Contains(e.Message, "model_not_found");
    }
}
