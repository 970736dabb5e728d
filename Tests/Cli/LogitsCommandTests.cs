using DeepSeekCuda.Loader;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Cli;

[TestClass]
public sealed class LogitsCommandTests
{
    /// <summary>Issue 2's acceptance: <c>dscuda logits</c> on tiny-a reproduces the official reference.</summary>
    [TestMethod]
    [DataRow("p0")]
    [DataRow("p1")]
    [DataRow("p2")]
    public void ReproducesTheReferenceLogits(string prompt)
    {
        using var reference = SafetensorsFile.Open(Path.Combine(SharedData.TinyA, "reference.safetensors"));
        var ids = reference.GetSpan<long>(reference.Get(prompt + ".input_ids")).ToArray();
        var expected = reference.GetSpan<float>(reference.Get(prompt + ".logits")).ToArray();
        var dir = Directory.CreateTempSubdirectory("dscuda-logits-").FullName;
        try
        {
            var path = Path.Combine(dir, "logits.safetensors");
            var r = CliRunner.Run("logits", "--model", SharedData.TinyAModel, "--tokens", string.Join(",", ids), "--out", path, "--device", "cpu");
            Assert.AreEqual(0, r.ExitCode, r.Error);
            using var written = SafetensorsFile.Open(path);
            var logits = written.Get("logits");
            Assert.AreEqual(DType.F32, logits.DType);
            CollectionAssert.AreEqual(new long[] { ids.Length, 1024 }, logits.Shape.ToArray());
            Tolerance.AssertMaxRel(written.GetSpan<float>(logits), expected, 1e-4, prompt + ".logits");
        }
        finally
        {
            Directory.Delete(dir, true);
        }
    }

    /// <summary>Every malformed or out-of-range id is a one-line user error (exit 1), never an internal error (issue 19, class 4).</summary>
    [TestMethod]
    [DataRow("0,x7", "'x7' (entry 1) is not a non-negative integer token id")]
    [DataRow("0,abc", "'abc' (entry 1) is not a non-negative integer token id")]
    [DataRow("99999999999", "'99999999999' (entry 0) is not a non-negative integer token id")]
    [DataRow("-1", "'-1' (entry 0) is not a non-negative integer token id")]
    [DataRow("0,,1", "'' (entry 1) is not a non-negative integer token id")]
    [DataRow("0,1024", "token 1024 is outside the vocabulary (0..1023)")]
    [DataRow("99999999", "token 99999999 is outside the vocabulary (0..1023)")]
    [DataRow("2147483647", "token 2147483647 is outside the vocabulary (0..1023)")]
    public void RejectsBadTokenIds(string tokens, string expected)
    {
        var r = CliRunner.Run("logits", "--model", SharedData.TinyAModel, "--tokens", tokens, "--out", Path.Combine(Path.GetTempPath(), "unused.safetensors"), "--device", "cpu");
        Assert.AreEqual(1, r.ExitCode, r.Error);
        StringAssert.Contains(r.Error, expected);
    }
}
