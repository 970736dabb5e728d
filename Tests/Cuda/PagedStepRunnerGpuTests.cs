using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Backends.Cuda;
using DeepSeekCuda.Inference;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Model;
using DeepSeekCuda.Serving;
using DeepSeekCuda.Tests.Serving;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>
/// <see cref="PagedStepRunner"/> on <see cref="CudaBackend"/> with tiny-a under <see cref="BatchScheduler"/>: eight
/// concurrent greedy requests of different lengths, prompts prefilled in chunks (a small step budget), give each request
/// the ids it gets alone through the same runner type on the same backend, and the ids plain session decoding on the CPU
/// backend in <see cref="CpuNumerics.GpuEmulation"/> gives it (no runner, no scheduler, no paging); every block is back
/// afterwards.
/// </summary>
[TestClass]
[TestCategory("Gpu")]
public sealed class PagedStepRunnerGpuTests
{
    private const int MaxLength = 256;
    private const int MaxTokens = 12;
    private const int StepBudget = 24;

    public TestContext TestContext { get; set; } = null!;

    [TestInitialize]
    public void RequireDevice() => GpuGuard.Require();

    [TestCleanup]
    public void CheckContext() => GpuGuard.After(TestContext);

    private static int[] Prompt(int vocab, int length, int salt) =>
        [.. Enumerable.Range(0, length).Select(i => (int)((i * 7919L + salt * 104729L + 13) % vocab))];

    /// <summary>
    /// Runs <paramref name="prompts"/> concurrently (all submitted before the first step) through a fresh paged runner, its
    /// decode steps as graphs when <paramref name="graphs"/>, drafting with the MTP module when <paramref name="speculative"/>;
    /// checks every block comes back.
    /// </summary>
    private static int[][] Run(DeepSeekModel model, int[][] prompts, string what, bool graphs = false, bool speculative = false)
    {
        var blocks = new KvBlockManager(8 * KvBlockManager.BlocksFor(MaxLength), 8, KvBlockManager.BlocksFor(MaxLength));
        using var runner = new PagedStepRunner(model) { DecodeGraphs = graphs };
        using var scheduler = new BatchScheduler(runner, blocks, new SchedulerOptions
        {
            MaxTokensPerStep = StepBudget,
            EosId = model.Config.EosTokenId,
            // Plain decoding unless asked: what is compared is the paged batch, not the drafts.
            SpeculativeDecoding = speculative ? SpeculativeDecodingMode.On : SpeculativeDecodingMode.Off,
        });
        var requests = prompts.Select(p => scheduler.Submit(p, SamplingOptions.Greedy with { MaxTokens = MaxTokens })).ToList();
        var steps = 0;
        while (requests.Any(r => !r.Completion.IsCompleted))
        {
            Assert.IsTrue(scheduler.Step(), $"{what}: work remains while a request is open");
            Assert.IsLessThan(10_000, ++steps, $"{what}: the run ends");
        }

        Assert.IsFalse(scheduler.Step(), $"{what}: idle after the run");
        Assert.AreEqual(blocks.TotalBlocks, blocks.FreeBlocks, $"{what}: every block is back");
        Assert.AreEqual(blocks.MaxRequests, blocks.FreeSlots, $"{what}: every slot is back");
        Assert.AreEqual(graphs, runner.CapturedGraphs > 0, $"{what}: {runner.CapturedGraphs} decode graphs captured");
        return [.. requests.Select(r => r.Completion.Result.Tokens.ToArray())];
    }

    [TestMethod]
    public void EightConcurrentGreedyRequestsEqualEachAloneAndTheEmulation()
    {
        using var checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        using var cuda = new CudaBackend();
        using var cpu = new CpuBackend(CpuNumerics.GpuEmulation);
        var options = new ModelOptions { MaxSequenceLength = MaxLength };
        using var model = DeepSeekModel.Load(checkpoint, cuda, options);
        using var emulated = DeepSeekModel.Load(checkpoint, cpu, options);
        // 1 and 2 fit in one step with the decode rows; 24 fills the budget exactly; 25, 64, 65, 90 and 130 are prefilled
        // over several steps (a chunk per step, beside the others' decode rows) and cross 64-position blocks.
        int[] lengths = [1, 2, 24, 25, 64, 65, 90, 130];
        var prompts = lengths.Select((n, i) => Prompt(model.VocabSize, n, i)).ToArray();

        var batch = Run(model, prompts, "cuda batch");
        var alone = prompts.Select((p, i) => Run(model, [p], $"cuda alone {i}")[0]).ToArray();
        var emulation = prompts.Select(p => Alone.Run(emulated, p, SamplingOptions.Greedy with { MaxTokens = MaxTokens }).ToArray()).ToArray();
        for (var i = 0; i < prompts.Length; i++)
        {
            TestContext.WriteLine($"request {i} ({lengths[i]} tokens): batch [{string.Join(",", batch[i])}] alone [{string.Join(",", alone[i])}] " +
                                  $"emulation [{string.Join(",", emulation[i])}]");
        }

        for (var i = 0; i < prompts.Length; i++)
        {
            Assert.IsNotEmpty(alone[i], $"request {i} generates");
            CollectionAssert.AreEqual(alone[i], batch[i], $"request {i} ({lengths[i]} prompt tokens): batched vs alone on CUDA");
            CollectionAssert.AreEqual(emulation[i], alone[i], $"request {i} ({lengths[i]} prompt tokens): CUDA paged runner vs CPU emulation session");
        }
    }

    /// <summary>
    /// The same eight requests with decode steps as CUDA graphs (each bucket's first step run eagerly and captured, later
    /// ones replayed after the rows' upload, steps padded to their row bucket): the ids of eager steps. With speculative
    /// decoding the graphs run the verify steps (each drafting entry a token and its draft) and the MTP passes follow them.
    /// </summary>
    [TestMethod]
    [DataRow(false)]
    [DataRow(true)]
    public void DecodeGraphStepsGiveTheIdsOfEagerSteps(bool speculative)
    {
        using var checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        using var cuda = new CudaBackend();
        using var model = DeepSeekModel.Load(checkpoint, cuda, new ModelOptions { MaxSequenceLength = MaxLength });
        int[] lengths = [1, 2, 24, 25, 64, 65, 90, 130];
        var prompts = lengths.Select((n, i) => Prompt(model.VocabSize, n, i)).ToArray();
        var eager = Run(model, prompts, "eager", speculative: speculative);
        var graphed = Run(model, prompts, "graphs", graphs: true, speculative: speculative);
        for (var i = 0; i < prompts.Length; i++)
        {
            TestContext.WriteLine($"request {i}: eager [{string.Join(",", eager[i])}] graphs [{string.Join(",", graphed[i])}]");
            CollectionAssert.AreEqual(eager[i], graphed[i], $"request {i} ({lengths[i]} prompt tokens): graph steps vs eager steps");
        }
    }
}
