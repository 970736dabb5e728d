using DeepSeekCuda.Loader;

namespace DeepSeekCuda.Tests.Cli;

[TestClass]
public sealed class MakeModelCommandTests
{
    [TestMethod]
    public void WritesACheckpointThatInspectAccepts()
    {
        var dir = Path.Combine(Path.GetTempPath(), "dscuda-make-" + Guid.NewGuid().ToString("N"));
        try
        {
            var made = CliRunner.Run("make-model", "--out", dir, "--preset", "tiny", "--seed", "7");
            Assert.AreEqual(0, made.ExitCode, made.Error);
            using (var checkpoint = Checkpoint.Open(dir))
            {
                Assert.AreEqual(CheckpointLayout.Expected(checkpoint.Config).Count, checkpoint.Tensors.Count);
            }

            Assert.IsTrue(File.Exists(Path.Combine(dir, "tokenizer.json")));
            var inspected = CliRunner.Run("inspect", "--model", dir);
            Assert.AreEqual(0, inspected.ExitCode, inspected.Error);
            StringAssert.Contains(inspected.Output, "valid for its config");
        }
        finally
        {
            if (Directory.Exists(dir))
            {
                Directory.Delete(dir, true);
            }
        }
    }

    [TestMethod]
    public void UnknownPresetIsAUserError()
    {
        var r = CliRunner.Run("make-model", "--out", Path.Combine(Path.GetTempPath(), "never-" + Guid.NewGuid().ToString("N")), "--preset", "gpt-5");
        Assert.AreEqual(1, r.ExitCode);
        StringAssert.Contains(r.Error, "gpt-5");
        StringAssert.Contains(r.Error, "tiny");
    }
}
