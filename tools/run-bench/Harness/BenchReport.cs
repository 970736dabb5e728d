using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using DeepSeekCuda.Cuda;
using CudaRt = DeepSeekCuda.Cuda.Cuda;

namespace DeepSeekCuda.Bench.Harness;

/// <summary>
/// One measured row: our kernel <paramref name="Bench"/> on <paramref name="Shape"/> against one baseline.
/// <see cref="Ratio"/> = baseline_us / us (above 1: faster than the baseline; against <c>copy</c>, the
/// fraction of the same-run copy bandwidth reached).
/// </summary>
internal sealed record BenchResult(string Bench, IReadOnlyDictionary<string, object> Shape, double Us, double Tflops, double Gbs, string Baseline, double BaselineUs)
{
    public double Ratio => BaselineUs / Us;
}

/// <summary>
/// The results of one run in the format every benchmark of the project shares:
/// <c>{"device", "driver", "cuda", "commit", "date", "copy_gbs", "results": [{"bench", "shape", "us",
/// "tflops", "gbs", "baseline", "baseline_us", "ratio"}]}</c>, written as one JSON file per run, and
/// echoed as a Markdown table on the console as rows arrive.
/// </summary>
internal sealed class BenchReport(GpuBench gpu)
{
    private readonly List<BenchResult> _results = [];
    private bool _headerPrinted;

    /// <summary>Rows so far.</summary>
    public IReadOnlyList<BenchResult> Results => _results;

    /// <summary>Records a row and prints it.</summary>
    public void Add(BenchResult result)
    {
        if (!_headerPrinted)
        {
            Console.WriteLine("| bench | shape | µs | TFLOP/s | GB/s | baseline | baseline µs | ratio |");
            Console.WriteLine("|---|---|---:|---:|---:|---|---:|---:|");
            _headerPrinted = true;
        }

        var shape = string.Join(" ", result.Shape.Select(kv => $"{kv.Key}={kv.Value}"));
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"| {result.Bench} | {shape} | {result.Us:F1} | {result.Tflops:F1} | {result.Gbs:F0} | {result.Baseline} | {result.BaselineUs:F1} | {result.Ratio:F2} |"));
        _results.Add(result);
    }

    /// <summary>
    /// Writes <c>OUTDIR/NAME.json</c> when an output folder was asked for, with <paramref name="error"/> (null: the
    /// bench ran to the end) and the rows measured so far.
    /// </summary>
    public void Write(string? outDir, string name, string? error = null)
    {
        var (major, minor) = NvrtcCompiler.Version;
        WriteFile(outDir, name, new BenchFile(gpu.Device.Name, CudaRt.DriverVersion, $"nvrtc {major}.{minor}", Commit, Now,
            Math.Round(gpu.CopyGbs, 1), [.. _results.Select(Row)], error));
    }

    /// <summary>Writes <c>OUTDIR/NAME.json</c> for a bench that could not start (no device): no rows, and why.</summary>
    public static void WriteNotRun(string? outDir, string name, string error) =>
        WriteFile(outDir, name, new BenchFile(null, null, null, Commit, Now, null, [], error));

    private static BenchRow Row(BenchResult r) => new(r.Bench, r.Shape, Math.Round(r.Us, 2), Math.Round(r.Tflops, 3), Math.Round(r.Gbs, 1),
        r.Baseline, Math.Round(r.BaselineUs, 2), Math.Round(r.Ratio, 4));

    internal static void WriteFile(string? outDir, string name, BenchFile file)
    {
        if (outDir is null)
        {
            return;
        }

        Directory.CreateDirectory(outDir);
        var path = Path.Combine(outDir, name + ".json");
        File.WriteAllText(path, JsonSerializer.Serialize(file, BenchJson.Default.BenchFile));
        Console.WriteLine($"wrote {path}");
    }

    internal static string Now => DateTime.UtcNow.ToString("yyyy-MM-ddTHH:mm:ssZ", CultureInfo.InvariantCulture);

    /// <summary>The commit measured: <c>$DSCUDA_COMMIT</c> (the GPU bundle sets it; it has no git), else git's.</summary>
    internal static string? Commit =>
        Environment.GetEnvironmentVariable("DSCUDA_COMMIT") is { Length: > 0 } c ? c : Git("rev-parse --short HEAD");

    private static string? Git(string args)
    {
        try
        {
            using var p = Process.Start(new ProcessStartInfo("git", args) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false });
            var s = p?.StandardOutput.ReadToEnd().Trim();
            p?.WaitForExit();
            return p?.ExitCode == 0 && !string.IsNullOrEmpty(s) ? s : null;
        }
        catch (System.ComponentModel.Win32Exception)
        {
            return null;
        }
    }
}
