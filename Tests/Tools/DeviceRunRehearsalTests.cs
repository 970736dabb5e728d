using DeepSeekCuda.Tests.Loader;
using DeepSeekCuda.Tests.Support;
using static DeepSeekCuda.Tests.Tools.DeviceRunSupport;
using CudaRt = DeepSeekCuda.Cuda.Cuda;

namespace DeepSeekCuda.Tests.Tools;

/// <summary>
/// The GPU call rehearsed here, as the server will see it: tools/gpu/pack.sh publishes the trimmed, self-contained
/// bundle, the tarball is unpacked into a fresh folder, and tools/gpu/device-run.sh runs it with every limit at its
/// default. Without a device the script must still finish inside its deadline, keep OUT within the device tool's
/// limits, name every GPU test class (found here by reflection) with the reason it did not run, have the trimmed
/// run-bench write every bench's JSON and the preflight's (with NVRTC compiling sm_90a), and exit 3: nothing ran on a
/// device. About two minutes, most of it the two publishes.
/// </summary>
[TestClass]
[TestCategory("Bundle")]
public sealed class DeviceRunRehearsalTests
{
    public TestContext TestContext { get; set; } = null!;

    private const int DefaultDeadlineSeconds = 480;

    [TestMethod]
    public void PackedBundleRunsTheDeviceScriptWithinTheDeviceToolsLimits()
    {
        using var dir = new TempDir();
        var packed = Path.Combine(dir.Path, "packed");
        var server = Path.Combine(dir.Path, "server");
        var outDir = Path.Combine(dir.Path, "out");
        var pack = Run("bash", [Path.Combine(SharedData.Checkout, "tools", "gpu", "pack.sh")],
            new Dictionary<string, string?> { ["DSCUDA_BUNDLE_OUT"] = packed, ["DSCUDA_SHARED"] = SharedData.Dir }, TimeSpan.FromMinutes(15));
        Assert.AreEqual(0, pack.ExitCode, pack.Output);
        var tarball = Path.Combine(packed, "gpu-bundle.tar.gz");
        Assert.IsLessThan(64L << 20, new FileInfo(tarball).Length, "the tarball travels under the device tool's 64 MiB carry limit");

        Directory.CreateDirectory(server);
        var untar = Run("tar", ["xzf", tarball, "-C", server], new Dictionary<string, string?>(), TimeSpan.FromMinutes(2));
        Assert.AreEqual(0, untar.ExitCode, untar.Output);
        // Every limit at device-run.sh's default, whatever this environment sets.
        var env = new Dictionary<string, string?> { ["DSCUDA_BUNDLE"] = Path.Combine(server, "gpu-bundle") };
        foreach (var limit in new[] { "DEADLINE_S", "PREFLIGHT_S", "TESTS_UNTIL_S", "CLASS_S", "TEST_S", "SANITIZER_CLASSES", "SANITIZER_S", "BENCH_S", "KERNELS_S", "RESERVE_S" })
        {
            env["DSCUDA_" + limit] = null;
        }

        var run = Run("bash", [Path.Combine(SharedData.Checkout, "tools", "gpu", "device-run.sh"), outDir], env, TimeSpan.FromSeconds(DefaultDeadlineSeconds + 60));
        Assert.IsLessThan(DefaultDeadlineSeconds, run.Elapsed.TotalSeconds, "the run ends inside its deadline");
        Assert.AreEqual(CudaRt.IsAvailable ? run.ExitCode : 3, run.ExitCode, run.Output);

        TestContext.WriteLine(run.Output);
        var files = AssertWithinDeviceLimits(outDir);
        CollectionAssert.AreEquivalent(new[] { "results.tgz", "summary.json", "summary.txt" }, files.Select(Path.GetFileName).ToArray());
        var s = JsonFile(Path.Combine(outDir, "summary.json"));
        Assert.AreEqual(DefaultDeadlineSeconds, s.GetProperty("deadline_s").GetInt32());
        Assert.IsLessThan(DefaultDeadlineSeconds, s.GetProperty("elapsed_s").GetDouble());

        // Every GPU test class, as reflection finds them, is in the summary; without a device each is Inconclusive with the reason.
        var classes = s.GetProperty("tests").GetProperty("classes").EnumerateArray().ToDictionary(c => c.GetProperty("class").GetString()!);
        CollectionAssert.AreEquivalent(GpuTestClasses(), classes.Keys.ToArray(), "the summary names every TestCategory(\"Gpu\") class");
        Assert.AreEqual(s.GetProperty("tests").GetProperty("discovered").GetInt32(), classes.Values.Sum(c => c.GetProperty("tests").GetInt32()));
        var preflight = s.GetProperty("preflight");
        var smoke = preflight.GetProperty("smoke").EnumerateArray().ToArray();
        Assert.IsTrue(smoke.Any(step => step.GetProperty("step").GetString()!.EndsWith("for sm_90a", StringComparison.Ordinal) && step.GetProperty("ok").GetBoolean()),
            $"the trimmed run-bench compiled for sm_90a: {preflight}");
        if (!CudaRt.IsAvailable)
        {
            foreach (var c in classes.Values)
            {
                Assert.AreEqual("inconclusive", c.GetProperty("status").GetString(), c.ToString());
                Assert.IsGreaterThan(0, c.GetProperty("tests").GetInt32());
                Assert.AreEqual(c.GetProperty("tests").GetInt32(), c.GetProperty("inconclusive").GetInt32(), c.ToString());
            }

            var reasons = s.GetProperty("inconclusive_reasons").EnumerateArray().ToArray();
            var named = reasons.SelectMany(r => r.GetProperty("classes").EnumerateArray().Select(c => c.GetString()!)).ToHashSet();
            CollectionAssert.IsSubsetOf(classes.Keys.ToArray(), named.ToArray(), "every class's Inconclusive reason is grouped");
            Assert.IsTrue(reasons.All(r => r.GetProperty("reason").GetString()!.StartsWith("no CUDA device", StringComparison.Ordinal)), s.GetProperty("inconclusive_reasons").ToString());
            Assert.IsFalse(s.GetProperty("device_ran").GetBoolean());
            StringAssert.StartsWith(s.GetProperty("verdict").GetString(), "nothing ran on a device");
        }

        // The trimmed run-bench wrote every bench's file through its source-generated JSON, with the reason when it measured nothing.
        var results = ReadTgz(Path.Combine(outDir, "results.tgz"));
        var commit = File.ReadAllText(Path.Combine(server, "gpu-bundle", "COMMIT")).Split()[0];
        var benches = s.GetProperty("benches").EnumerateArray().Select(b => b.GetProperty("name").GetString()!).ToArray();
        CollectionAssert.IsSubsetOf(new[] { "gemm", "mla", "moe", "load", "e2e" }, benches);
        foreach (var name in benches)
        {
            Assert.IsTrue(results.TryGetValue($"bench/{name}.json", out var bytes), $"bench/{name}.json missing from results.tgz");
            var bench = Json(bytes);
            Assert.AreEqual(commit[..12], bench.GetProperty("commit").GetString(), $"bench/{name}.json names the bundle's commit");
            if (!CudaRt.IsAvailable)
            {
                Assert.AreEqual(0, bench.GetProperty("results").GetArrayLength());
                StringAssert.StartsWith(bench.GetProperty("error").GetString(), "no CUDA device");
            }
        }

        var nvrtc = Json(results["preflight.json"]).GetProperty("nvrtc");
        Assert.IsTrue(Version.TryParse(nvrtc.GetProperty("version").GetString(), out var version) && version >= new Version(12, 4),
            $"preflight.json reports the NVRTC it loaded: {nvrtc}");
        foreach (var c in classes.Keys)
        {
            Assert.IsTrue(results.ContainsKey($"tests/{c}.trx"), $"tests/{c}.trx missing from results.tgz");
        }

        var text = File.ReadAllText(Path.Combine(outDir, "summary.txt"));
        StringAssert.Contains(run.Output, text.TrimEnd(), "the summary is printed last, so the call's output tail holds it");
    }
}
