using DeepSeekCuda.Distributed;
using DeepSeekCuda.Hosting;
using DeepSeekCuda.Model;
using DeepSeekCuda.Tests.Cuda;
using CudaRt = DeepSeekCuda.Cuda.Cuda;

namespace DeepSeekCuda.Tests.Hosting;

/// <summary>
/// <see cref="LocalModel.Load"/> with several <see cref="LocalModelOptions.Gpus"/> on CUDA: the demo checkpoint over three
/// logical ranks of one GPU (<see cref="CudaParallel.Logical"/>, through the internal devices factory) against the same
/// checkpoint on one GPU, and over every physical GPU when there are two or more. A pipeline runs the single GPU's kernels
/// on the same values in the same order, so its greedy answer is identical; tensor/expert parallelism rounds each rank's
/// partial sums to BF16 (<see cref="DeepSeekCuda.Tests.Distributed.CudaParallelGpuTests"/> bounds its logits), so here it
/// must answer the full length with the placement it was asked for.
/// </summary>
[TestClass]
[TestCategory("Gpu")]
public sealed class LocalModelDevicesGpuTests
{
    private const int MaxTokens = 20;
    private static string s_dir = null!;

    public TestContext TestContext { get; set; } = null!;

    [ClassInitialize]
    public static void Init(TestContext _)
    {
        s_dir = Path.Combine(Path.GetTempPath(), "dscuda-devices-gpu-" + Guid.NewGuid().ToString("N"));
        DemoModel.WriteTo(s_dir);
    }

    [ClassCleanup]
    public static void Cleanup() => Directory.Delete(s_dir, true);

    [TestInitialize]
    public void RequireDevice() => GpuGuard.Require();

    [TestCleanup]
    public void CheckContext() => GpuGuard.After(TestContext);

    private static (string Text, int Tokens) Answer(LocalModel local) => LocalModelDevicesTests.Answer(local, MaxTokens);

    private static (string Text, int Tokens) OneGpu()
    {
        using var one = LocalModel.Load(s_dir, new LocalModelOptions { Gpus = [0], MaxSequenceLength = 256 });
        Assert.IsNull(one.Placement);
        return Answer(one);
    }

    [TestMethod]
    [DataRow(PlacementKind.Pipeline)]
    [DataRow(PlacementKind.TensorExpertParallel)]
    public void ThreeLogicalRanksAnswerAsOneGpu(PlacementKind kind)
    {
        var expected = OneGpu();
        Assert.AreEqual(MaxTokens, expected.Tokens);
        using var spread = LocalModel.Load(s_dir, new LocalModelOptions
        {
            Gpus = [0, 1, 2],
            Placement = kind,
            MaxSequenceLength = 256,
            DevicesFactory = n => DeviceGroup.Of(CudaParallel.Logical(n)),
        });
        Assert.AreEqual(kind, spread.Placement!.Kind);
        var actual = Answer(spread);
        Assert.AreEqual(MaxTokens, actual.Tokens);
        if (kind == PlacementKind.Pipeline)
        {
            Assert.AreEqual(expected.Text, actual.Text);
        }
    }

    [TestMethod]
    public void EveryPhysicalGpuServesThePipeline()
    {
        if (CudaRt.DeviceCount < 2)
        {
            Assert.Inconclusive($"needs 2 or more physical GPUs; this machine has {CudaRt.DeviceCount}");
        }

        var expected = OneGpu();
        var gpus = Enumerable.Range(0, Math.Min(CudaRt.DeviceCount, 3)).ToArray();
        using var spread = LocalModel.Load(s_dir, new LocalModelOptions { Gpus = gpus, Placement = PlacementKind.Pipeline, MaxSequenceLength = 256 });
        Assert.AreEqual(gpus.Length, spread.Placement!.DeviceCount);
        Assert.AreEqual(expected.Text, Answer(spread).Text);
    }
}
