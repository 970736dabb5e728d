using DeepSeekCuda.Hosting;

namespace DeepSeekCuda.Tests.Cli;

[TestClass]
public sealed class GenerateCommandTests
{
    private static string _dir = null!;

    [ClassInitialize]
    public static void Init(TestContext _)
    {
        _dir = Path.Combine(Path.GetTempPath(), "dscuda-cli-demo-" + Guid.NewGuid().ToString("N"));
        DemoModel.WriteTo(_dir);
    }

    [ClassCleanup]
    public static void Cleanup() => Directory.Delete(_dir, true);

    [TestMethod]
    public void SeededGenerationIsReproducibleWithReasoningUnderItsHeading()
    {
        string[] args = ["generate", "--model", _dir, "--prompt", "Why is the sky blue?", "--max-tokens", "16", "--seed", "5", "--temperature", "0.9"];
        var first = CliRunner.Run(args);
        var second = CliRunner.Run(args);
        Assert.AreEqual(0, first.ExitCode, first.Error);
        Assert.AreEqual(first.Output, second.Output);
        // R1 format forces <think>: generation starts inside reasoning, shown under a heading when not a terminal.
        StringAssert.StartsWith(first.Output, "Reasoning:\n");
        StringAssert.Contains(first.Error, "16 generated");
        StringAssert.Contains(first.Error, "finish: length");
    }

    [TestMethod]
    public void ChatKeepsHistoryAcrossTurns()
    {
        var r = CliRunner.RunWithInput("Hello\nAnd then?\n/exit\n", "chat", "--model", _dir, "--max-tokens", "4", "--temperature", "0");
        Assert.AreEqual(0, r.ExitCode, r.Error);
        var usage = r.Error.Split('\n').Where(l => l.StartsWith('[')).ToArray();
        Assert.HasCount(2, usage, r.Error);
        var promptTokens = usage.Select(l => int.Parse(l[1..l.IndexOf(' ')], System.Globalization.CultureInfo.InvariantCulture)).ToArray();
        // The second prompt holds the first exchange too.
        Assert.IsGreaterThan(promptTokens[0] + 4, promptTokens[1], r.Error);
    }

    [TestMethod]
    [DataRow("--temperature", "-1", "temperature must be finite and >= 0")]
    [DataRow("--top-p", "2", "top-p must be in (0, 1]")]
    [DataRow("--top-p", "0", "top-p must be in (0, 1]")]
    [DataRow("--top-k", "-3", "top-k must be >= 0")]
    [DataRow("--stop", "", "stop sequences must not be empty")]
    public void BadSamplingFlagIsOneLineNamingTheFlag_BeforeAnyModelIsLoaded(string flag, string value, string reason)
    {
        // The folder does not exist: reaching the loader would report that instead of the flag.
        var missing = Path.Combine(Path.GetTempPath(), "dscuda-no-such-model-" + Guid.NewGuid().ToString("N"));
        var r = CliRunner.Run("generate", "--model", missing, "--prompt", "x", flag, value);
        Assert.AreEqual(1, r.ExitCode, r.Error);
        var shownValue = value.Length == 0 ? "\"\"" : value;
        Assert.AreEqual($"dscuda: error: {flag} {shownValue}: {reason}{Environment.NewLine}", r.Error);
        Assert.AreEqual("", r.Output);
    }

    [TestMethod]
    public void CudaDeviceWithoutCudaIsRefusedClearly()
    {
        if (DeepSeekCuda.Backends.Cuda.CudaBackend.IsSupported(out _))
        {
            Assert.Inconclusive("CUDA is usable here: --device cuda loads the model instead of refusing");
        }

        var r = CliRunner.Run("generate", "--model", _dir, "--prompt", "x", "--device", "cuda");
        Assert.AreEqual(1, r.ExitCode);
        StringAssert.Contains(r.Error, "--device cuda");
        StringAssert.Contains(r.Error, "unavailable");
    }
}
