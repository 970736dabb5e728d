using DeepSeekCuda.Backends.Cuda;
using DeepSeekCuda.Cli;
using DeepSeekCuda.Hosting;

namespace DeepSeekCuda.Tests.Cli;

/// <summary><c>--gpus</c> and <c>--placement</c> of generate, chat and serve: the list syntax, and every mistake a one-line error naming the option.</summary>
[TestClass]
public sealed class GpuOptionTests
{
    private static string s_dir = null!;

    [ClassInitialize]
    public static void Init(TestContext _)
    {
        s_dir = Path.Combine(Path.GetTempPath(), "dscuda-cli-gpus-" + Guid.NewGuid().ToString("N"));
        DemoModel.WriteTo(s_dir);
    }

    [ClassCleanup]
    public static void Cleanup() => Directory.Delete(s_dir, true);

    [TestMethod]
    [DataRow("3", new[] { 3 })]
    [DataRow("0,1", new[] { 0, 1 })]
    [DataRow("0-7", new[] { 0, 1, 2, 3, 4, 5, 6, 7 })]
    [DataRow(" 4-5 , 0 ,2", new[] { 4, 5, 0, 2 })]
    [DataRow("6-6", new[] { 6 })]
    public void ListsAndRangesNameTheGpusInOrder(string value, int[] expected) =>
        CollectionAssert.AreEqual(expected, GpuOption.ParseList(value.Trim()).ToArray());

    [TestMethod]
    [DataRow("0,x", "--gpus 0,x: 'x' is not a GPU ordinal or an ascending range such as 0-7")]
    [DataRow("3-1", "--gpus 3-1: '3-1' is not a GPU ordinal or an ascending range such as 0-7")]
    [DataRow("-1", "--gpus -1: '-1' is not a GPU ordinal or an ascending range such as 0-7")]
    [DataRow("0,,1", "--gpus 0,,1: '' is not a GPU ordinal or an ascending range such as 0-7")]
    [DataRow("0-3,2", "--gpus 0-3,2: GPU 2 is named twice")]
    public void MalformedListsAreRefusedNamingTheItem(string value, string message)
    {
        var e = Assert.ThrowsExactly<UserErrorException>(() => GpuOption.ParseList(value));
        Assert.AreEqual(message, e.Message);

        // The same through the command, before any CUDA check or model load.
        var r = CliRunner.Run("generate", "--model", s_dir, "--prompt", "x", "--gpus", value);
        Assert.AreEqual(1, r.ExitCode);
        Assert.AreEqual($"dscuda: error: {message}{Environment.NewLine}", r.Error);
    }

    [TestMethod]
    public void GpusWithTheCpuBackendAreRefused()
    {
        var r = CliRunner.Run("generate", "--model", s_dir, "--prompt", "x", "--device", "cpu", "--gpus", "0,1");
        Assert.AreEqual(1, r.ExitCode);
        Assert.AreEqual($"dscuda: error: --gpus 0,1: runs on the CUDA backend; drop --device cpu or --gpus{Environment.NewLine}", r.Error);
    }

    [TestMethod]
    public void GpusWithoutCudaAreRefusedWithTheReasonAlsoBeforeServeBindsItsPort()
    {
        if (CudaBackend.IsSupported(out _))
        {
            Assert.Inconclusive("CUDA is usable here: --gpus loads the model instead of refusing");
        }

        foreach (var args in new[] { new[] { "generate", "--prompt", "x" }, ["serve", "--port", "0"], ["chat"] })
        {
            var r = CliRunner.RunWithInput("", [.. args, "--model", s_dir, "--gpus", "all"]);
            Assert.AreEqual(1, r.ExitCode, string.Join(' ', args));
            StringAssert.StartsWith(r.Error, "dscuda: error: --gpus all: ");
            StringAssert.Contains(r.Error, "; leave --gpus out to run on the CPU");
            Assert.DoesNotContain("listening on", r.Output, "serve refuses before it binds");
        }
    }

    [TestMethod]
    public void PlacementTakesAutoTensorOrPipeline()
    {
        Assert.IsNull(GpuOption.Placement("auto"));
        Assert.AreEqual(DeepSeekCuda.Model.PlacementKind.TensorExpertParallel, GpuOption.Placement("tensor"));
        Assert.AreEqual(DeepSeekCuda.Model.PlacementKind.Pipeline, GpuOption.Placement("pipeline"));
        var r = CliRunner.Run("generate", "--model", s_dir, "--prompt", "x", "--placement", "sideways");
        Assert.AreEqual(1, r.ExitCode);
        StringAssert.Contains(r.Error, "sideways");
        foreach (var command in new[] { "generate", "chat", "serve" })
        {
            var help = CliRunner.Run(command, "--help");
            StringAssert.Contains(help.Output, "--gpus", command);
            StringAssert.Contains(help.Output, "--placement", command);
        }
    }
}
