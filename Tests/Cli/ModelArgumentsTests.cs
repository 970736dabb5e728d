using System.Text.RegularExpressions;
using DeepSeekCuda.Hosting;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Cli;

/// <summary>The model options shared by generate and chat (--tokenizer, --ctx-size, --mtp, --device) and the root's -v / --log-level.</summary>
[TestClass]
public sealed partial class ModelArgumentsTests
{
    private static string _dir = null!;

    [ClassInitialize]
    public static void Init(TestContext _)
    {
        _dir = Path.Combine(Path.GetTempPath(), "dscuda-cli-args-" + Guid.NewGuid().ToString("N"));
        DemoModel.WriteTo(_dir);
    }

    [ClassCleanup]
    public static void Cleanup() => Directory.Delete(_dir, true);

    private static CliRunner.Result Generate(params string[] extra) =>
        CliRunner.Run(["generate", "--model", _dir, "--prompt", "Why is the sky blue?", "--max-tokens", "12", "--temperature", "0", .. extra]);

    [GeneratedRegex(@"^\[(\d+) prompt tokens, (\d+) generated", RegexOptions.Multiline)]
    private static partial Regex Usage();

    [TestMethod]
    public void VerboseLogsTheBackendChoiceAndTheContextLengthWithWhy_DefaultLogsNothing()
    {
        var quiet = Generate();
        Assert.AreEqual(0, quiet.ExitCode, quiet.Error);
        Assert.DoesNotContain("info:", quiet.Error);

        var verbose = Generate("-v");
        Assert.AreEqual(0, verbose.ExitCode, verbose.Error);
        Assert.AreEqual(quiet.Output, verbose.Output, "logging goes to stderr only");
        StringAssert.Contains(verbose.Error, "info: DeepSeekCuda.Hosting.LocalModel: Backend cpu (Float32) (auto: ");
        StringAssert.Contains(verbose.Error, "info: DeepSeekCuda.Hosting.LocalModel: Context length 1024 tokens per request: max_position_embeddings 1024; memory would allow ");
        StringAssert.Contains(verbose.Error, "info: DeepSeekCuda.Hosting.DeepSeekChatClient: Generation finished (Length)");

        // The option is recursive: it may come before the command too; --log-level wins over -v.
        var before = CliRunner.Run("-v", "generate", "--model", _dir, "--prompt", "x", "--max-tokens", "2");
        StringAssert.Contains(before.Error, "info: DeepSeekCuda.Hosting.LocalModel: Loaded ");
        Assert.DoesNotContain("info:", Generate("-v", "--log-level", "none").Error);
        var debug = Generate("--log-level", "debug");
        StringAssert.Contains(debug.Error, "dbug: DeepSeekCuda.Hosting.DeepSeekChatClient: Request 1 finished: 12 tokens");
        var bad = Generate("--log-level", "loud");
        Assert.AreEqual(1, bad.ExitCode);
        StringAssert.Contains(bad.Error, "loud");
    }

    [TestMethod]
    public void CtxSizeLimitsTheRequestAndTooLargeIsOneLineNamingTheLimit()
    {
        // A request holds ctx-size tokens: the token sampled at the last position is the last one.
        var r = CliRunner.Run("generate", "--model", _dir, "--prompt", "Why is the sky blue?", "--max-tokens", "50", "--temperature", "0", "--ctx-size", "16");
        Assert.AreEqual(0, r.ExitCode, r.Error);
        var usage = Usage().Match(r.Error);
        Assert.IsTrue(usage.Success, r.Error);
        Assert.AreEqual(17, int.Parse(usage.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture) + int.Parse(usage.Groups[2].Value, System.Globalization.CultureInfo.InvariantCulture), r.Error);
        StringAssert.Contains(r.Error, "finish: length");

        var tooLong = Generate("--ctx-size", "5000");
        Assert.AreEqual(1, tooLong.ExitCode);
        Assert.AreEqual("dscuda: error: --ctx-size 5000: must be within 1..1024 (max_position_embeddings)", tooLong.Error.Split('\n', StringSplitOptions.RemoveEmptyEntries)[^1]);
        var zero = Generate("--ctx-size", "0");
        Assert.AreEqual($"dscuda: error: --ctx-size 0: must be at least 1{Environment.NewLine}", zero.Error);
    }

    [TestMethod]
    public void MtpModesGiveTheSameGreedyOutput_OnlyDraftingDiffers()
    {
        var off = Generate("--mtp", "off", "-v");
        var on = Generate("--mtp", "on", "-v");
        var auto = Generate("-v");
        Assert.AreEqual(0, off.ExitCode, off.Error);
        Assert.AreEqual(off.Output, on.Output);
        Assert.AreEqual(off.Output, auto.Output);
        Assert.DoesNotContain("MTP drafts", off.Error);
        StringAssert.Contains(on.Error, "Speculative decoding: 12 tokens in ");
        StringAssert.Contains(auto.Error, "Speculative decoding: 12 tokens in ");
        var bad = Generate("--mtp", "maybe");
        Assert.AreEqual(1, bad.ExitCode);
        StringAssert.Contains(bad.Error, "maybe");
    }

    [TestMethod]
    public void MtpOnWithoutAnMtpModuleIsOneLineNamingTheOption_AutoDecodesPlainly()
    {
        var dir = Path.Combine(Path.GetTempPath(), "dscuda-cli-no-mtp-" + Guid.NewGuid().ToString("N"));
        DeepSeekCuda.Loader.Synthetic.SyntheticCheckpoint.Write(dir, DemoModel.Config with { NumNextNPredictLayers = 0 }, seed: 1);
        DemoTokenizer.Write(dir, DemoModel.Config.VocabSize);
        try
        {
            string[] common = ["generate", "--model", dir, "--prompt", "x", "--max-tokens", "6", "--temperature", "0", "-v"];
            var on = CliRunner.Run([.. common, "--mtp", "on"]);
            Assert.AreEqual(1, on.ExitCode);
            Assert.AreEqual($"dscuda: error: --mtp on: {dir} has no MTP module (num_nextn_predict_layers is 0); use --mtp auto or off",
                on.Error.Split('\n', StringSplitOptions.RemoveEmptyEntries)[^1]);
            var auto = CliRunner.Run(common);
            Assert.AreEqual(0, auto.ExitCode, auto.Error);
            StringAssert.Contains(auto.Error, "6 generated");
            Assert.DoesNotContain("Speculative decoding:", auto.Error);
        }
        finally
        {
            Directory.Delete(dir, true);
        }
    }

    /// <summary>
    /// tiny-a ships weights without a tokenizer. The shared DeepSeek-V3 tokenizer (128815 tokens) does not fit
    /// its 1024-token vocabulary and is refused; the demo's byte-level tokenizer (512) does, and
    /// <c>--tokenizer</c> gives exactly what a folder holding the same weights and that tokenizer gives.
    /// </summary>
    [TestMethod]
    public void TokenizerFromAnotherFolderEqualsTheTokenizerBesideTheWeights()
    {
        var tinyA = SharedData.TinyAModel;
        var missing = CliRunner.Run("generate", "--model", tinyA, "--prompt", "x", "--max-tokens", "2");
        Assert.AreEqual(1, missing.ExitCode);
        StringAssert.Contains(missing.Error, $"tokenizer.json not found in {tinyA}: give the folder that has it with --tokenizer DIR");

        var tooBig = CliRunner.Run("generate", "--model", tinyA, "--tokenizer", SharedData.Tokenizer, "--prompt", "x", "--max-tokens", "2");
        Assert.AreEqual(1, tooBig.ExitCode);
        StringAssert.Contains(tooBig.Error, "tokenizer has 128815 tokens, more than the model's vocab_size 1024");

        var together = Path.Combine(Path.GetTempPath(), "dscuda-tiny-a-tok-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(together);
        try
        {
            foreach (var f in Directory.GetFiles(tinyA))
            {
                File.Copy(f, Path.Combine(together, Path.GetFileName(f)));
            }

            foreach (var f in Directory.GetFiles(_dir, "tokenizer*.json"))
            {
                File.Copy(f, Path.Combine(together, Path.GetFileName(f)));
            }

            string[] common = ["--prompt", "Why is the sky blue?", "--max-tokens", "10", "--temperature", "0"];
            var separate = CliRunner.Run(["generate", "--model", tinyA, "--tokenizer", _dir, .. common]);
            var beside = CliRunner.Run(["generate", "--model", together, .. common]);
            Assert.AreEqual(0, separate.ExitCode, separate.Error);
            Assert.AreEqual(0, beside.ExitCode, beside.Error);
            Assert.IsGreaterThan(12, separate.Output.Length, separate.Output);
            Assert.AreEqual(beside.Output, separate.Output);
            StringAssert.Contains(separate.Error, "10 generated");
        }
        finally
        {
            Directory.Delete(together, true);
        }
    }

    [TestMethod]
    public void EveryModelCommandTakesDevice()
    {
        foreach (var command in new[] { "generate", "chat", "logits" })
        {
            var help = CliRunner.Run(command, "--help");
            StringAssert.Contains(help.Output, "--device", command);
        }

        Assert.AreEqual(0, Generate("--device", "cpu").ExitCode);
    }
}
