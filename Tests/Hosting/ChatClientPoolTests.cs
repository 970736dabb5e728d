using DeepSeekCuda.Backends;
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
/// The chat client's cache pool by default is what the device holds when the client is created (measured after the weights
/// and the step buffers, beside a reserve), never more than its requests can use; a pool that does not fit is refused with
/// nothing left allocated, and requests that outgrow the pool together still answer as alone. The device is the demo
/// checkpoint on a recording CPU backend that simulates a GPU's memory.
/// </summary>
[TestClass]
public sealed class ChatClientPoolTests
{
    private const int Context = 256; // 4 blocks per request
    private const int MaxBatch = 4;

    private static string s_dir = null!;
    private static BpeTokenizer s_tokenizer = null!;

    [ClassInitialize]
    public static void Init(TestContext context)
    {
        s_dir = DemoModel.Ensure(out _);
        s_tokenizer = BpeTokenizer.Load(s_dir);
    }

    /// <summary>The reserve left on a simulated GPU: 5% of its 16 GiB (above the 512 MiB minimum).</summary>
    private static long Reserve => SimulatedGpu.Reserve();

    private static DeepSeekModel Load(IBackend backend)
    {
        using var checkpoint = Checkpoint.Open(s_dir);
        return DeepSeekModel.Load(checkpoint, backend, new ModelOptions { MaxSequenceLength = Context });
    }

    /// <summary>Bytes of one cache block over every pool of the one device (a BF16 row of latent and rotated key per position, per layer and MTP layer).</summary>
    private static long BlockBytes(DeepSeekModel model) => SimulatedGpu.BlockBytes(model.Config, model.Config.NumHiddenLayers + (model.HasMtp ? 1 : 0));

    /// <summary>
    /// A GPU with room for exactly <paramref name="blocks"/> blocks (and the padding block) beside the step buffers of a client of
    /// <paramref name="maxBatch"/> requests and the reserve: the step buffers measured by a client with a pool of one.
    /// </summary>
    private static SimulatedGpu Holding(RecordingBackend device, DeepSeekModel model, int blocks, int maxBatch = MaxBatch)
    {
        var steps = SimulatedGpu.StepBytes([device], [BlockBytes(model)],
            () => new DeepSeekChatClient(model, s_tokenizer, new DeepSeekChatClientOptions { MaxBatch = maxBatch, KvCacheBlocks = 1 }));
        return SimulatedGpu.Holding("gpu:0", blocks, BlockBytes(model), steps[0]);
    }

    [TestMethod]
    [DataRow(null, null, 16, "room for 4 full-length requests", DisplayName = "memory not measured (the CPU backend): 4 full-length requests")]
    [DataRow(9, null, 9, "what the devices hold beside the weights, the step buffers and a reserve",
        DisplayName = "the device holds fewer than 4 full-length requests: what it holds")]
    [DataRow(40, null, 16, "room for 4 full-length requests", DisplayName = "the device holds more than 4 requests can use: what they can use")]
    [DataRow(40, 30, 30, "KvCacheBlocks", DisplayName = "KvCacheBlocks given: that")]
    public void DefaultPoolIsWhatTheDeviceHoldsAtMostWhatMaxBatchRequestsUse(int? holds, int? given, int expected, string why)
    {
        using var device = new RecordingBackend(new CpuBackend(maxDegreeOfParallelism: 2));
        using var model = Load(device);
        if (holds is { } n)
        {
            device.Gpu = Holding(device, model, n);
        }

        var log = new ListLogger();
        using var client = new DeepSeekChatClient(model, s_tokenizer, new DeepSeekChatClientOptions { MaxBatch = MaxBatch, KvCacheBlocks = given },
            new ListLogger<DeepSeekChatClient>(log));
        Assert.AreEqual(expected, client.Scheduler.Blocks.TotalBlocks);
        CollectionAssert.Contains(log.Entries.Select(e => e.Message).ToList(),
            $"Cache pool: {expected} blocks ({expected * 64} tokens) shared by up to 4 requests of at most 256 tokens: {why}");
        Assert.AreEqual(expected, client.Scheduler.Blocks.FreeBlocks);
        Assert.AreEqual(Context / KvBlockManager.BlockTokens, client.Scheduler.Blocks.MaxBlocksPerRequest);
        if (device.Memory() is { } left)
        {
            // What is left covers the reserve; where the device bounded the pool, one block more would not have.
            Assert.IsGreaterThanOrEqualTo(Reserve, left.FreeBytes);
            if (expected == holds)
            {
                Assert.IsLessThan(Reserve + BlockBytes(model), left.FreeBytes);
            }
        }
    }

    [TestMethod]
    public void APoolTheDeviceCannotHoldIsRefusedNamingTheDeviceWithNothingLeftAllocated()
    {
        using var device = new RecordingBackend(new CpuBackend(maxDegreeOfParallelism: 2));
        using var model = Load(device);
        var memory = Holding(device, model, 9);

        device.Gpu = memory;
        device.Allocated = [];
        var e = Assert.ThrowsExactly<InsufficientDeviceMemoryException>(() =>
            new DeepSeekChatClient(model, s_tokenizer, new DeepSeekChatClientOptions { MaxBatch = MaxBatch, KvCacheBlocks = 10 }));
        StringAssert.Contains(e.Message, "device 0 (gpu:0) holds 9 cache blocks beside the weights and the step buffers");
        StringAssert.Contains(e.Message, "the pool asked for is 10 blocks");
        Assert.IsNotEmpty(device.Allocated);
        Assert.IsTrue(device.Allocated.All(r => r.IsDisposed), "the step buffers and the table are freed");

        // A default pool shorter than one full-length request (4 blocks).
        device.Gpu = Holding(device, model, 3);
        device.Allocated = [];
        e = Assert.ThrowsExactly<InsufficientDeviceMemoryException>(() =>
            new DeepSeekChatClient(model, s_tokenizer, new DeepSeekChatClientOptions { MaxBatch = MaxBatch }));
        StringAssert.Contains(e.Message, "device 0 (gpu:0) holds 3 cache blocks");
        StringAssert.Contains(e.Message, "one request of 256 tokens needs 4");
        Assert.IsTrue(device.Allocated.All(r => r.IsDisposed));

        // The same device with the room for exactly one request more than that.
        device.Gpu = Holding(device, model, 4);
        using var client = new DeepSeekChatClient(model, s_tokenizer, new DeepSeekChatClientOptions { MaxBatch = MaxBatch });
        Assert.AreEqual(4, client.Scheduler.Blocks.TotalBlocks);
    }

    /// <summary>Three greedy requests at once on a device that holds five blocks (less than they hold together) answer as each alone, in a pool of its own.</summary>
    [TestMethod]
    public async Task RequestsThatOutgrowTheDevicesPoolTogetherAnswerAsAlone()
    {
        string[] questions = ["Why is the sky blue?", "Name three colours.", "What is two plus two?"];
        var options = new ChatOptions { Temperature = 0, MaxOutputTokens = 90 };
        using var device = new RecordingBackend(new CpuBackend(maxDegreeOfParallelism: 2));
        using var model = Load(device);
        var alone = new List<string>();
        using (var client = new DeepSeekChatClient(model, s_tokenizer, new DeepSeekChatClientOptions { MaxBatch = 1 }))
        {
            foreach (var q in questions)
            {
                alone.Add(Text(await client.GetResponseAsync([new ChatMessage(ChatRole.User, q)], options)));
            }
        }

        device.Gpu = Holding(device, model, 5, maxBatch: 3);
        using (var client = new DeepSeekChatClient(model, s_tokenizer, new DeepSeekChatClientOptions { MaxBatch = 3 }))
        {
            Assert.AreEqual(5, client.Scheduler.Blocks.TotalBlocks);
            var together = await Task.WhenAll(questions.Select(q => client.GetResponseAsync([new ChatMessage(ChatRole.User, q)], options)));
            CollectionAssert.AreEqual(alone, together.Select(Text).ToList());
            Assert.IsGreaterThan(0L, client.Scheduler.Preemptions, "the pool was too small for the three together");
        }
    }

    private static string Text(ChatResponse response) =>
        ChatText.Marked(response.Messages.SelectMany(m => m.Contents)) + $" ({response.Usage?.OutputTokenCount} tokens)";
}
