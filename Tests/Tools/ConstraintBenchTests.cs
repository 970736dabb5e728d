using System.Text.Json;
using DeepSeekCuda.Bench.Benches;
using DeepSeekCuda.Hosting;
using DeepSeekCuda.Tests.Loader;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Tools;

/// <summary>
/// <c>run-bench constraint</c> parsed and run in-process once on the DeepSeek-V3 tokenizer, with a demo checkpoint as
/// the baseline: the file is the harness's format, the four rows are there with positive finite times, and ratio =
/// baseline µs / µs. Speed itself is never asserted.
/// </summary>
[TestClass]
public sealed class ConstraintBenchTests
{
    [TestMethod]
    public void OneRepetitionWritesTheRowsInTheHarnessFormat()
    {
        using var dir = new TempDir();
        var model = Path.Combine(dir.Path, "demo");
        DemoModel.WriteTo(model);
        var outDir = Path.Combine(dir.Path, "out");
        using var doc = BenchFile.Run(ConstraintBench.Create(), ["constraint", "--tokenizer", SharedData.Tokenizer, "--reps", "1", "--model", model, "--out", outDir], outDir, "constraint.json");
        var file = doc.RootElement;
        var rows = file.GetProperty("results").EnumerateArray().ToArray();
        CollectionAssert.AreEqual(new[] { "constraint_vocab", "constraint_first_mask", "constraint_cached_mask", "constraint_token" },
            rows.Select(r => r.GetProperty("bench").GetString()).ToArray());
        foreach (var row in rows)
        {
            var us = row.GetProperty("us").GetDouble();
            var baselineUs = row.GetProperty("baseline_us").GetDouble();
            Assert.IsTrue(double.IsFinite(us) && us > 0, row.ToString());
            Assert.AreEqual("cpu_step", row.GetProperty("baseline").GetString());
            Assert.IsTrue(double.IsFinite(baselineUs) && baselineUs > 0, row.ToString());
            Assert.AreEqual(baselineUs / us, row.GetProperty("ratio").GetDouble(), 1e-5 + 1e-3 * baselineUs / us, row.ToString());
            Assert.IsGreaterThan(0, row.GetProperty("shape").GetProperty("samples").GetInt32(), row.ToString());
        }
    }
}
