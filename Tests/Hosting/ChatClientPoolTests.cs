using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Hosting;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Model;
using DeepSeekCuda.Serving;
using DeepSeekCuda.Tests.Distributed;
using DeepSeekCuda.Tests.Support;
using DeepSeekCuda.Text;
using Microsoft.Extensions.AI;

namespace DeepSeekCuda.Tests.Hosting;

/// <summary>
/// The chat client's cache pool by default is the one the model's memory plan left room for (<see cref="ModelOptions.CacheBlocks"/>),
/// never more than its requests can use, and requests that outgrow it together still answer as alone.
/// </summary>
[TestClass]
public sealed class ChatClientPoolTests
{
    private const int Context = 256; // 4 blocks per request

    private static string s_dir = null!;
    private static BpeTokenizer s_tokenizer = null!;

    [ClassInitialize]
    public static void Init(TestContext context)
    {
        s_dir = DemoModel.Ensure(out _);
        s_tokenizer = BpeTokenizer.Load(s_dir);
    }

    private static DeepSeekModel Load(CpuBackend backend, int? planned)
    {
        using var checkpoint = Checkpoint.Open(s_dir);
        return DeepSeekModel.Load(checkpoint, backend, new ModelOptions { MaxSequenceLength = Context, CacheBlocks = planned });
    }

    [TestMethod]
    [DataRow(null, null, 16, DisplayName = "nothing planned: 4 full-length requests")]
    [DataRow(9, null, 9, DisplayName = "planned below 4 full-length requests: the plan")]
    [DataRow(40, null, 16, DisplayName = "planned above what 4 requests can use: what they can use")]
    [DataRow(9, 30, 30, DisplayName = "KvCacheBlocks given: that")]
    public void DefaultPoolIsThePlannedOneAtMostWhatMaxBatchRequestsUse(int? planned, int? given, int expected)
    {
        using var backend = new CpuBackend(maxDegreeOfParallelism: 2);
        using var model = Load(backend, planned);
        using var client = new DeepSeekChatClient(model, s_tokenizer, new DeepSeekChatClientOptions { MaxBatch = 4, KvCacheBlocks = given });
        Assert.AreEqual(expected, client.Scheduler.Blocks.TotalBlocks);
        Assert.AreEqual(Context / KvBlockManager.BlockTokens, client.Scheduler.Blocks.MaxBlocksPerRequest);
    }

    /// <summary>Three greedy requests at once in a planned pool of five blocks (less than they hold together) answer as each alone, in a pool of its own.</summary>
    [TestMethod]
    public async Task RequestsThatOutgrowThePlannedPoolTogetherAnswerAsAlone()
    {
        string[] questions = ["Why is the sky blue?", "Name three colours.", "What is two plus two?"];
        var options = new ChatOptions { Temperature = 0, MaxOutputTokens = 90 };
        using var backend = new CpuBackend(maxDegreeOfParallelism: 2);
        var alone = new List<string>();
        using (var model = Load(backend, planned: null))
        {
            using var client = new DeepSeekChatClient(model, s_tokenizer, new DeepSeekChatClientOptions { MaxBatch = 1 });
            foreach (var q in questions)
            {
                alone.Add(Text(await client.GetResponseAsync([new ChatMessage(ChatRole.User, q)], options)));
            }
        }

        using (var model = Load(backend, planned: 5))
        {
            using var client = new DeepSeekChatClient(model, s_tokenizer, new DeepSeekChatClientOptions { MaxBatch = 3 });
            Assert.AreEqual(5, client.Scheduler.Blocks.TotalBlocks);
            var together = await Task.WhenAll(questions.Select(q => client.GetResponseAsync([new ChatMessage(ChatRole.User, q)], options)));
            CollectionAssert.AreEqual(alone, together.Select(Text).ToList());
            Assert.IsGreaterThan(0L, client.Scheduler.Preemptions, "the pool was too small for the three together");
        }
    }

    [TestMethod]
    public void APlannedPoolShorterThanOneRequestIsRefusedBeforeAnyUpload()
    {
        using var checkpoint = Checkpoint.Open(s_dir);
        using var backend = new RecordingBackend(new CpuBackend(maxDegreeOfParallelism: 2));
        var e = Assert.ThrowsExactly<ArgumentOutOfRangeException>(() =>
            DeepSeekModel.Load(checkpoint, backend, new ModelOptions { MaxSequenceLength = Context, CacheBlocks = 3 }));
        StringAssert.Contains(e.Message, "CacheBlocks 3 hold fewer tokens than one request of MaxSequenceLength 256 (4 blocks of 64)");
        Assert.IsEmpty(backend.Received);
        Assert.IsEmpty(backend.Weights);
    }

    private static string Text(ChatResponse response) =>
        ChatText.Marked(response.Messages.SelectMany(m => m.Contents)) + $" ({response.Usage?.OutputTokenCount} tokens)";
}
