using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Cli;

[TestClass]
public sealed class InspectCommandTests
{
    [TestMethod]
    public void InspectsTinyA()
    {
        var r = CliRunner.Run("inspect", "--model", SharedData.TinyAModel);
        Assert.AreEqual(0, r.ExitCode, r.Error);
        StringAssert.Contains(r.Output, "383 tensors");
        StringAssert.Contains(r.Output, "valid for its config");
        StringAssert.Contains(r.Output, "3 (1 dense, 2 MoE) + 1 MTP");
        StringAssert.Contains(r.Output, "softmax scale 0.1656269");
        foreach (var dtype in new[] { "F8_E4M3", "BF16", "F32" })
        {
            StringAssert.Contains(r.Output, dtype);
        }

        foreach (var gpus in new[] { "  1 ", "  2 ", "  4 ", "  8 " })
        {
            StringAssert.Contains(r.Output, gpus);
        }
    }

    [TestMethod]
    public void MissingFolderIsOneLineAndExitCodeOne()
    {
        var missing = Path.Combine(Path.GetTempPath(), "dscuda-no-such-" + Guid.NewGuid().ToString("N"));
        var r = CliRunner.Run("inspect", "--model", missing);
        Assert.AreEqual(1, r.ExitCode);
        StringAssert.StartsWith(r.Error, "dscuda: error: ");
        StringAssert.Contains(r.Error, missing);
        Assert.AreEqual(1, r.Error.TrimEnd().Split('\n').Length, r.Error);
        Assert.DoesNotContain(" at DeepSeekCuda", r.Error, "no stack trace for a user error");
    }

    [TestMethod]
    public void CorruptShardNamesFileAndTensor()
    {
        var dir = Directory.CreateTempSubdirectory("dscuda-cli-").FullName;
        try
        {
            foreach (var f in Directory.GetFiles(SharedData.TinyAModel))
            {
                File.Copy(f, Path.Combine(dir, Path.GetFileName(f)));
            }

            // Cut the second shard inside its data section: the last tensors' ranges now run past the end.
            var shard = Path.Combine(dir, "model-00002-of-00002.safetensors");
            var bytes = File.ReadAllBytes(shard);
            File.WriteAllBytes(shard, bytes[..(bytes.Length - 1000)]);
            var r = CliRunner.Run("inspect", "--model", dir);
            Assert.AreEqual(1, r.ExitCode, r.Output);
            StringAssert.Contains(r.Error, "model-00002-of-00002.safetensors");
            StringAssert.Contains(r.Error, "tensor '");
            StringAssert.Contains(r.Error, "past the data section");
        }
        finally
        {
            Directory.Delete(dir, true);
        }
    }
}

[TestClass]
public sealed class CliParseErrorTests
{
    [TestMethod]
    [DataRow(new[] { "logits", "--tokens", "0,1" }, "--out")]
    [DataRow(new[] { "inspect", "--no-such-option" }, "--no-such-option")]
    [DataRow(new[] { "frobnicate" }, "frobnicate")]
    public void ParseErrorsAreOneLineNamingTheProblem(string[] args, string named)
    {
        var r = CliRunner.Run(args);
        Assert.AreEqual(1, r.ExitCode);
        Assert.AreEqual(1, r.Error.TrimEnd().Split('\n').Length, r.Error);
        StringAssert.StartsWith(r.Error, "dscuda: error: ");
        StringAssert.Contains(r.Error, named);
        StringAssert.Contains(r.Error, "--help");
    }
}
