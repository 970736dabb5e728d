using DeepSeekCuda.Hosting;
using DeepSeekCuda.Tests.Inference;
using Microsoft.Extensions.AI;

namespace DeepSeekCuda.Tests.Hosting;

/// <summary>
/// Options the engine would ignore or cannot enforce are refused by the chat client before any model work, naming the option
/// (the server refuses the same ones as 400s; a library caller must not get them silently dropped either).
/// </summary>
[TestClass]
public sealed class ChatClientUnsupportedOptionsTests
{
    public static IEnumerable<object[]> Unsupported =>
    [
        ["Tools", new ChatOptions { Tools = [new HostedWebSearchTool()] }],
        ["ResponseFormat", new ChatOptions { ResponseFormat = ChatResponseFormat.ForJsonSchema(System.Text.Json.JsonDocument.Parse("{\"not\":{\"type\":\"string\"}}").RootElement, "unenforceable") }],
        ["FrequencyPenalty", new ChatOptions { FrequencyPenalty = 0.5f }],
        ["PresencePenalty", new ChatOptions { PresencePenalty = -1f }],
    ];

    [TestMethod]
    [DynamicData(nameof(Unsupported))]
    public async Task UnsupportedOption_IsRefusedBeforeAnyForward_NamingIt(string name, ChatOptions options)
    {
        var model = FakeModel.Bigram(seed: 5);
        var forwards = 0;
        model.OnForward = _ => Interlocked.Increment(ref forwards);
        using var client = new DeepSeekChatClient(model, new FakeTokenizer(), new DeepSeekChatClientOptions { ModelId = "fake" });
        var e = Assert.Throws<NotSupportedException>(() => client.GetStreamingResponseAsync([new ChatMessage(ChatRole.User, "hi")], options));
        StringAssert.Contains(e.Message, name);
        await Assert.ThrowsAsync<NotSupportedException>(() => client.GetResponseAsync([new ChatMessage(ChatRole.User, "hi")], options));
        Assert.AreEqual(0, forwards);
    }

    [TestMethod]
    public async Task NeutralValues_AreAccepted()
    {
        using var client = new DeepSeekChatClient(FakeModel.Bigram(seed: 6), new FakeTokenizer(), new DeepSeekChatClientOptions { ModelId = "fake" });
        var options = new ChatOptions { Tools = [], ResponseFormat = ChatResponseFormat.Text, FrequencyPenalty = 0, PresencePenalty = 0, MaxOutputTokens = 2 };
        var response = await client.GetResponseAsync([new ChatMessage(ChatRole.User, "hi")], options);
        Assert.IsNotNull(response.FinishReason);
    }
}
