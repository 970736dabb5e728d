using System.Diagnostics;
using System.Text;
using System.Text.Json;
using DeepSeekCuda.Tests.Loader;
using DeepSeekCuda.Tests.Support;
using static DeepSeekCuda.Tests.Tools.DeviceRunSupport;

namespace DeepSeekCuda.Tests.Tools;

/// <summary>
/// tools/gpu/device-run.sh over a stand-in bundle whose test runner, run-bench and compute-sanitizer are small shell
/// scripts acting out what a GPU run can do: a class that passes, one that fails, one that hangs in a test, one whose
/// process dies, one without a device, one whose test hit the per-test timeout; a bench that works, one that hangs,
/// one that fails part way. The script must kill what hangs at its limit, score every class from its TRX report or,
/// without one, from its log, re-run the faulting (not hanging) classes' culprits under memcheck, keep going after
/// every failure, return non-zero, and leave OUT within the device tool's limits. No GPU and no .NET publish: seconds.
/// </summary>
[TestClass]
public sealed class DeviceRunScoringTests
{
    public TestContext TestContext { get; set; } = null!;

    private const string Ns = "Fake.Tests";

    // The runner: lists five classes as `--list-tests json` does; for a class run, writes its TRX or acts out a hang or crash.
    private const string FakeRunner = """
        #!/usr/bin/env bash
        here="$(cd "$(dirname "$0")" && pwd)"
        case " $* " in *" --list-tests "*) echo; cat "$here/list.json"; exit 0;; esac
        filter=""; trx=""
        while [ $# -gt 0 ]; do
          case "$1" in --filter) filter="$2"; shift;; --report-trx-filename) trx="$2"; shift;; esac
          shift
        done
        trx_of() { # NAME:OUTCOME[:MESSAGE] ...
          {
            echo '<?xml version="1.0" encoding="utf-8"?>'
            echo '<TestRun xmlns="http://microsoft.com/schemas/VisualStudio/TeamTest/2010"><Results>'
            for r in "$@"; do
              IFS=: read -r name outcome message <<< "$r"
              echo "<UnitTestResult testName=\"$name\" outcome=\"$outcome\" duration=\"00:00:01.5000000\"><Output><ErrorInfo><Message>$message
        second line of the message</Message></ErrorInfo></Output></UnitTestResult>"
            done
            echo '</Results></TestRun>'
          } > "$trx"
        }
        case "$filter" in
          *ClassName=Fake.Tests.PassingGpuTests|*ClassName=Fake.Tests.KernelGpuTests) echo "passed A (1ms)"; trx_of "A:Passed" "B (1,2):Passed";;
          *ClassName=Fake.Tests.FailingGpuTests) trx_of "A:Passed" "B:Failed:Assert.AreEqual failed. wrong value at 3"; exit 2;;
          *ClassName=Fake.Tests.HangingGpuTests|*ClassName=Fake.Tests.CudaParallelGpuTests) echo "passed A (12ms)"; sleep 600;;
          *ClassName=Fake.Tests.CrashingGpuTests) echo "Fatal error. Internal CLR error."; exit 134;;
          *ClassName=Fake.Tests.TimedOutGpuTests) trx_of "A:Failed:Test 'A' timed out after 3000ms"; exit 2;;
          *ClassName=Fake.Tests.NoDeviceGpuTests) trx_of "A:NotExecuted:Initialization method Fake.Tests.NoDeviceGpuTests.OpenDevice threw exception. Assert.Inconclusive. no CUDA device: cuInit failed";;
          *) echo "unexpected filter $filter"; exit 9;;
        esac
        """;

    private const string FakeBench = """
        #!/usr/bin/env bash
        cmd="$1"; shift; out=""
        while [ $# -gt 0 ]; do case "$1" in --out) out="$2"; shift;; esac; shift; done
        row='{"bench": "x", "shape": {"M": 1}, "us": 2.0, "tflops": 0, "gbs": 1, "baseline": "copy", "baseline_us": 1.0, "ratio": 0.5}'
        case "$cmd" in
          list) printf 'fast\nslow\nbroken\n';;
          preflight) mkdir -p "$out"; cat > "$out/preflight.json" <<'EOF'
        {"devices": [{"ordinal": 0, "name": "Fake H200", "arch": "sm_90", "multiprocessors": 132, "memory_mib": 143771, "target": "sm_90a"}],
         "driver": {"path": "/fake/libcuda.so.1", "version": null, "error": null}, "driver_cuda": "13.0",
         "nvrtc": {"path": "/fake/libnvrtc.so.13", "version": "13.0", "error": null},
         "cublas": {"path": "/fake/libcublas.so.13", "version": "13.0.0", "error": null},
         "smoke": [{"step": "compile allreduce for sm_90a", "ok": true, "ms": 900, "detail": "ok"}], "problems": []}
        EOF
          ;;
          fast) mkdir -p "$out"; echo "{\"device\": \"Fake H200\", \"results\": [$row], \"error\": null}" > "$out/fast.json";;
          slow) sleep 600;;
          broken) mkdir -p "$out"; echo "{\"device\": \"Fake H200\", \"results\": [$row, $row], \"error\": \"CudaException: CUDA_ERROR_ILLEGAL_ADDRESS\"}" > "$out/broken.json"; exit 1;;
          kernels) echo "gate ok";;
        esac
        """;

    private const string FakeSanitizer = """
        #!/usr/bin/env bash
        log=""
        while [ $# -gt 0 ]; do case "$1" in --log-file) log="$2"; shift;; esac; shift; done
        printf '========= Invalid __global__ write of size 4 bytes\n=========     at fake_kernel+0x70\n========= ERROR SUMMARY: 1 error\n' > "$log"
        exit 99
        """;

    [TestMethod]
    public void HangsCrashesAndFailuresAreScoredPerClassAndTheRunGoesOn()
    {
        using var dir = new TempDir();
        var (env, outDir) = FakeRun(dir,
            ("PassingGpuTests", ["A", "B (1,2)"]), ("FailingGpuTests", ["A", "B"]), ("HangingGpuTests", ["A", "B"]),
            ("CrashingGpuTests", ["A"]), ("NoDeviceGpuTests", ["A"]), ("TimedOutGpuTests", ["A"]));
        var run = Run("bash", [Script, outDir], env, TimeSpan.FromSeconds(110));

        TestContext.WriteLine(run.Output);
        Assert.AreEqual(1, run.ExitCode, run.Output);
        Assert.IsLessThan(60, run.Elapsed.TotalSeconds, "the hanging class and bench were killed at their limits");
        var files = AssertWithinDeviceLimits(outDir);
        CollectionAssert.AreEquivalent(new[] { "results.tgz", "summary.json", "summary.txt" }, files.Select(Path.GetFileName).ToArray());

        var s = JsonFile(Path.Combine(outDir, "summary.json"));
        var classes = s.GetProperty("tests").GetProperty("classes").EnumerateArray().ToDictionary(c => c.GetProperty("class").GetString()!);
        // Classes outside the script's order lists run by name.
        CollectionAssert.AreEqual(new[] { "CrashingGpuTests", "FailingGpuTests", "HangingGpuTests", "NoDeviceGpuTests", "PassingGpuTests", "TimedOutGpuTests" },
            classes.Keys.ToArray());

        AssertClass(classes["PassingGpuTests"], "ok", passed: 2, failed: 0, inconclusive: 0, notRun: 0);
        AssertClass(classes["FailingGpuTests"], "failed", passed: 1, failed: 1, inconclusive: 0, notRun: 0);
        var failure = classes["FailingGpuTests"].GetProperty("failures")[0];
        Assert.AreEqual("B", failure.GetProperty("test").GetString());
        Assert.AreEqual("Assert.AreEqual failed. wrong value at 3", failure.GetProperty("message").GetString(), "the first line of the message");

        AssertClass(classes["HangingGpuTests"], "timeout", passed: 0, failed: 0, inconclusive: 0, notRun: 1);
        Assert.AreEqual("B", classes["HangingGpuTests"].GetProperty("first_unfinished").GetString(), "A finished by the log; B hung");
        StringAssert.Contains(classes["HangingGpuTests"].GetProperty("note").GetString(), "killed at its timeout");
        AssertClass(classes["CrashingGpuTests"], "crashed", passed: 0, failed: 0, inconclusive: 0, notRun: 1);
        StringAssert.Contains(classes["CrashingGpuTests"].GetProperty("note").GetString(), "exited 134");
        AssertClass(classes["NoDeviceGpuTests"], "inconclusive", passed: 0, failed: 0, inconclusive: 1, notRun: 0);

        var reasons = s.GetProperty("inconclusive_reasons").EnumerateArray().ToArray();
        Assert.AreEqual("no CUDA device: cuInit failed", reasons.Single().GetProperty("reason").GetString(), "MSTest's wrapper is cut off");

        AssertClass(classes["TimedOutGpuTests"], "failed", passed: 0, failed: 1, inconclusive: 0, notRun: 0);

        // Memcheck re-runs faulting classes in run order, each at its culprit; not hangs (Hanging was killed, TimedOut's test hit its
        // timeout): they would only hang again.
        var sanitizer = s.GetProperty("sanitizer").EnumerateArray().ToArray();
        CollectionAssert.AreEqual(new[] { "CrashingGpuTests:A", "FailingGpuTests:B" },
            sanitizer.Select(e => $"{e.GetProperty("class").GetString()}:{e.GetProperty("test").GetString()}").ToArray());
        Assert.IsTrue(sanitizer.All(e => e.GetProperty("status").GetString() == "errors" && e.GetProperty("errors").GetInt32() == 1));
        StringAssert.Contains(sanitizer[0].GetProperty("first_error").GetString(), "Invalid __global__ write");

        var benches = s.GetProperty("benches").EnumerateArray().ToDictionary(b => b.GetProperty("name").GetString()!);
        Assert.AreEqual("ok", benches["fast"].GetProperty("status").GetString());
        Assert.AreEqual(1, benches["fast"].GetProperty("rows").GetInt32());
        Assert.AreEqual("timeout", benches["slow"].GetProperty("status").GetString());
        Assert.AreEqual("failed", benches["broken"].GetProperty("status").GetString(), "a bench failing part way is not ok");
        Assert.AreEqual(2, benches["broken"].GetProperty("rows").GetInt32(), "its rows before the failure are kept");
        Assert.AreEqual("gate passed", s.GetProperty("kernels").GetProperty("status").GetString());
        Assert.IsTrue(s.GetProperty("device_ran").GetBoolean());
        var verdict = s.GetProperty("verdict").GetString()!;
        foreach (var c in new[] { "FailingGpuTests", "HangingGpuTests", "CrashingGpuTests", "TimedOutGpuTests", "slow", "broken" })
        {
            StringAssert.Contains(verdict, c);
        }

        var packed = ReadTgz(Path.Combine(outDir, "results.tgz"));
        foreach (var f in new[] { "preflight.json", "environment.txt", "gpu-tests.json", "tests/FailingGpuTests.trx", "tests/HangingGpuTests.log",
                     "sanitizer/FailingGpuTests.txt", "bench/fast.json", "bench/broken.json", "bench/slow.log" })
        {
            Assert.IsTrue(packed.ContainsKey(f), $"results.tgz lacks {f}; it has {string.Join(", ", packed.Keys)}");
        }

        StringAssert.Contains(Encoding.UTF8.GetString(packed["tests/HangingGpuTests.log"]), "killed after");
        var text = File.ReadAllText(Path.Combine(outDir, "summary.txt"));
        StringAssert.Contains(run.Output, text.TrimEnd(), "the summary is printed last, so the call's output tail holds it");
        StringAssert.Contains(text, "FailingGpuTests.B: Assert.AreEqual failed. wrong value at 3");
    }

    [TestMethod]
    public void AKilledRunStillReturnsWhatRanBeforeTheKill()
    {
        using var dir = new TempDir();
        // Listed hanging class first: the script's order puts the simplest kernels (KernelGpuTests) first, multi-rank ones last.
        var (env, outDir) = FakeRun(dir, ("CudaParallelGpuTests", ["A", "B"]), ("KernelGpuTests", ["A", "B (1,2)"]));
        env["DSCUDA_CLASS_S"] = "100";
        using var p = Process.Start(StartInfo("bash", [Script, outDir], env))!;
        p.OutputDataReceived += (_, _) => { };
        p.ErrorDataReceived += (_, _) => { };
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();
        try
        {
            // While the second class hangs, the first one's results are already in OUT.
            var results = Path.Combine(outDir, "results.tgz");
            var clock = Stopwatch.StartNew();
            while (!(File.Exists(results) && ReadTgz(results).ContainsKey("tests/KernelGpuTests.trx")))
            {
                Assert.IsLessThan(60, clock.Elapsed.TotalSeconds, "the first class's results never reached OUT");
                Thread.Sleep(200);
            }
        }
        finally
        {
            // What the device tool does at its limit: everything killed, no time to clean up.
            p.Kill(entireProcessTree: true);
            p.WaitForExit();
        }

        AssertWithinDeviceLimits(outDir);
        var s = JsonFile(Path.Combine(outDir, "summary.json"));
        var first = s.GetProperty("tests").GetProperty("classes")[0];
        Assert.AreEqual("KernelGpuTests", first.GetProperty("class").GetString());
        AssertClass(first, "ok", passed: 2, failed: 0, inconclusive: 0, notRun: 0);
        StringAssert.Contains(File.ReadAllText(Path.Combine(outDir, "summary.txt")), "KernelGpuTests");
        Assert.IsTrue(ReadTgz(Path.Combine(outDir, "results.tgz")).ContainsKey("preflight.json"));
    }

    private static string Script => Path.Combine(SharedData.Checkout, "tools", "gpu", "device-run.sh");

    /// <summary>A stand-in bundle with the given classes, its fake tools on PATH, and short limits; the environment and OUT.</summary>
    private static (Dictionary<string, string?> Env, string Out) FakeRun(TempDir dir, params (string Class, string[] Tests)[] classes)
    {
        var bundle = Path.Combine(dir.Path, "bundle");
        var fakeBin = Path.Combine(dir.Path, "bin");
        Directory.CreateDirectory(Path.Combine(bundle, "tests"));
        Directory.CreateDirectory(Path.Combine(bundle, "bench"));
        Directory.CreateDirectory(fakeBin);
        Executable(Path.Combine(bundle, "tests", "DeepSeekCuda.Tests"), FakeRunner);
        Executable(Path.Combine(bundle, "bench", "run-bench"), FakeBench);
        Executable(Path.Combine(fakeBin, "compute-sanitizer"), FakeSanitizer);
        File.WriteAllText(Path.Combine(bundle, "tests", "list.json"), Listing(classes));
        File.WriteAllText(Path.Combine(bundle, "COMMIT"), "0123456789abcdef\n");
        var env = new Dictionary<string, string?>
        {
            ["DSCUDA_BUNDLE"] = bundle,
            ["TMPDIR"] = dir.Path, // the script's work folder, left behind by the killed run, goes with the test's
            ["PATH"] = fakeBin + ":" + Environment.GetEnvironmentVariable("PATH"),
            ["DSCUDA_DEADLINE_S"] = "120", ["DSCUDA_CLASS_S"] = "6", ["DSCUDA_TEST_S"] = "3", ["DSCUDA_TESTS_UNTIL_S"] = "90",
            ["DSCUDA_SANITIZER_CLASSES"] = "3", ["DSCUDA_SANITIZER_S"] = "10", ["DSCUDA_BENCH_S"] = "4", ["DSCUDA_KERNELS_S"] = "10",
            ["DSCUDA_RESERVE_S"] = "2",
        };
        return (env, Path.Combine(dir.Path, "out"));
    }

    private static void AssertClass(JsonElement c, string status, int passed, int failed, int inconclusive, int notRun)
    {
        var name = c.GetProperty("class").GetString();
        Assert.AreEqual(status, c.GetProperty("status").GetString(), $"{name} status; note: {c.GetProperty("note").GetString()}");
        Assert.AreEqual(passed, c.GetProperty("passed").GetInt32(), $"{name} passed");
        Assert.AreEqual(failed, c.GetProperty("failed").GetInt32(), $"{name} failed");
        Assert.AreEqual(inconclusive, c.GetProperty("inconclusive").GetInt32(), $"{name} inconclusive");
        Assert.AreEqual(notRun, c.GetProperty("not_run").GetInt32(), $"{name} not run");
    }

    private static void Executable(string path, string script)
    {
        File.WriteAllText(path, script.Replace("\r\n", "\n") + "\n");
        if (!OperatingSystem.IsWindows())
        {
            File.SetUnixFileMode(path, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
        }
    }

    /// <summary>The runner's <c>--list-tests json</c> document for the given classes.</summary>
    private static string Listing(params (string Class, string[] Tests)[] classes) => JsonSerializer.Serialize(new
    {
        schemaVersion = 1,
        tests = classes.SelectMany(c => c.Tests.Select(t => new
        {
            uid = Guid.NewGuid().ToString(),
            displayName = t,
            type = new { @namespace = Ns, typeName = c.Class, methodName = t.Split(' ')[0] },
        })).ToArray(),
    });
}
