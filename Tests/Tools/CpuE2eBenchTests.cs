using System.CommandLine;
using System.Text.Json;
using DeepSeekCuda.Bench.Benches;
using DeepSeekCuda.Hosting;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Serving;
using DeepSeekCuda.Tests.Loader;

namespace DeepSeekCuda.Tests.Tools;

/// <summary>
/// <c>run-bench cpu-e2e</c> parsed and run in-process with tiny sizes on a demo checkpoint: the file is the harness's
/// format, every rate is positive and finite, and the numbers agree with one another (ratio = baseline µs / µs, the
/// floor is the step cost at the file's copy bandwidth, the mean rate is at least tokens / mean time). Speed itself is
/// never asserted.
/// </summary>
[TestClass]
public sealed class CpuE2eBenchTests
{
    [TestMethod]
    public void QuickRunWritesSaneRatesInTheHarnessFormat()
    {
        using var dir = new TempDir();
        var model = Path.Combine(dir.Path, "demo");
        DemoModel.WriteTo(model);
        var outDir = Path.Combine(dir.Path, "out");
        using var doc = BenchFile.Run(CpuE2eBench.Create(), ["cpu-e2e", "--quick", "--model", model, "--pp", "12", "--tg", "5", "--reps", "3", "--threads", "1", "--out", outDir], outDir, "cpu-e2e.json");
        var file = doc.RootElement;
        StringAssert.StartsWith(file.GetProperty("device").GetString(), "cpu (");
        var copyGbs = file.GetProperty("copy_gbs").GetDouble();
        Assert.IsTrue(double.IsFinite(copyGbs) && copyGbs > 0, $"copy_gbs {copyGbs}");

        ModelConfig config;
        using (var checkpoint = Checkpoint.Open(model))
        {
            config = checkpoint.Config;
        }

        var rows = file.GetProperty("results").EnumerateArray().ToArray();
        CollectionAssert.AreEqual(new[] { "cpu_pp", "cpu_tg" }, rows.Select(r => r.GetProperty("bench").GetString()).ToArray());
        foreach (var (row, tokens) in rows.Zip(new[] { 12, 5 }))
        {
            var shape = row.GetProperty("shape");
            Assert.AreEqual(tokens, shape.GetProperty("tokens").GetInt32());
            Assert.AreEqual(1, shape.GetProperty("threads").GetInt32());
            Assert.AreEqual(3, shape.GetProperty("reps").GetInt32());
            Assert.AreEqual("demo", shape.GetProperty("model").GetString());

            var us = row.GetProperty("us").GetDouble();
            var rate = row.GetProperty("tokens_per_s").GetDouble();
            var sd = row.GetProperty("tokens_per_s_sd").GetDouble();
            var baselineUs = row.GetProperty("baseline_us").GetDouble();
            Assert.IsTrue(double.IsFinite(us) && us > 0, $"us {us}");
            Assert.IsTrue(double.IsFinite(rate) && rate > 0, $"tokens/s {rate}");
            Assert.IsTrue(double.IsFinite(sd) && sd >= 0, $"sd {sd}");
            Assert.AreEqual("floor", row.GetProperty("baseline").GetString());
            // The mean of the runs' rates is at least the rate of the mean time (AM-HM), and within the runs' spread of it.
            Assert.IsGreaterThanOrEqualTo(tokens / (us * 1e-6) * 0.999, rate, row.ToString());
            Assert.AreEqual(baselineUs / us, row.GetProperty("ratio").GetDouble(), 1e-5 + 1e-3 * baselineUs / us, row.ToString());
            // The floor: the run's bytes in the checkpoint format at the file's copy bandwidth (both rounded in the file).
            var bytes = row.GetProperty("bench").GetString() == "cpu_pp"
                ? StepCost.PrefillBytes(config, tokens)
                : Enumerable.Range(0, tokens).Sum(context => StepCost.DecodeBytes(config, 1, context));
            Assert.AreEqual(bytes / (copyGbs * 1e9) * 1e6, baselineUs, 0.01 + baselineUs * (0.051 / copyGbs + 1e-3), row.ToString());
            Assert.AreEqual(StepCost.PrefillFlops(config, tokens) / (us * 1e-6) / 1e12, row.GetProperty("tflops").GetDouble(), 1e-6 + 1e-3 * row.GetProperty("tflops").GetDouble());
        }
    }

    [TestMethod]
    public void RefusedSizeEndsWithTheErrorInTheFile()
    {
        using var dir = new TempDir();
        var model = Path.Combine(dir.Path, "demo");
        DemoModel.WriteTo(model);
        var outDir = Path.Combine(dir.Path, "out");
        var root = new RootCommand { CpuE2eBench.Create() };
        // The demo model has 1024 positions.
        var code = root.Parse(["cpu-e2e", "--model", model, "--pp", "4096", "--tg", "2", "--reps", "1", "--out", outDir]).Invoke();
        Assert.AreEqual(1, code);
        using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(outDir, "cpu-e2e.json")));
        StringAssert.Contains(doc.RootElement.GetProperty("error").GetString(), "4096 tokens do not fit the model's 1024 positions");
        Assert.AreEqual(0, doc.RootElement.GetProperty("results").GetArrayLength());
    }
}
