using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Kernels;
using CudaRt = DeepSeekCuda.Cuda.Cuda;

namespace DeepSeekCuda.Bench.Benches;

/// <summary>
/// FP8 block-scaled GEMM (<see cref="Fp8GemmKernel"/>, automatic gemv/mma choice) on every DeepSeek-V3
/// linear shape at M = 1 … 4096, timed with CUDA events after warm-up (median of the runs), inputs and
/// weights rotated over enough copies to exceed L2. Baseline measured in the same run: device-to-device
/// copy bandwidth (cuMemcpyDtoDAsync); ratio = time the copy needs for the kernel's bytes / kernel time.
/// cuBLAS baselines are not included (no cuBLAS binding in the project yet). Without a GPU it exits non-zero.
/// </summary>
internal static class GemmBench
{
    private static readonly int[] Ms = [1, 4, 16, 64, 128, 512, 4096];

    public static Command Create()
    {
        var quick = new Option<bool>("--quick") { Description = "M = 1, 64, 4096 only and fewer runs" };
        var outOption = new Option<string?>("--out") { Description = "Folder to write fp8_gemm.json into" };
        var device = new Option<int>("--device") { Description = "CUDA device ordinal", DefaultValueFactory = _ => 0 };
        var command = new Command("gemm", "FP8 block-scaled GEMM vs same-run copy bandwidth");
        command.Options.Add(quick);
        command.Options.Add(outOption);
        command.Options.Add(device);
        command.SetAction(p => Run(p.GetValue(device), p.GetValue(quick), p.GetValue(outOption)));
        return command;
    }

    private static int Run(int ordinal, bool quick, string? outDir)
    {
        if (!CudaRt.IsAvailable)
        {
            Console.Error.WriteLine($"run-bench gemm: no CUDA device ({CudaRt.UnavailableReason}); nothing measured");
            return 2;
        }

        using var dev = CudaDevice.Open(ordinal);
        using var stream = new CudaStream(dev);
        var compiler = new NvrtcCompiler(cache: new KernelCache(KernelCache.DefaultDirectory));
        using var gemm = new Fp8GemmKernel(dev, compiler);
        var runs = quick ? 10 : 50;
        var copyGbs = CopyBandwidth(dev, stream, runs);
        Console.WriteLine($"device {dev.Name}, copy {copyGbs:F0} GB/s (read + write)");
        Console.WriteLine("| M | N | K | path | µs | TFLOP/s | GB/s | copy µs | ratio |");
        Console.WriteLine("|---:|---:|---:|---|---:|---:|---:|---:|---:|");
        var results = new List<Dictionary<string, object>>();
        var ms = quick ? new[] { 1, 64, 4096 } : Ms;
        foreach (var (n, k) in Fp8GemmKernel.DeepSeekV3Shapes)
        {
            foreach (var m in ms)
            {
                var us = Time(dev, stream, gemm, m, n, k, runs);
                var bytes = (double)n * k + (double)m * k + m * Fp8GemmKernel.BlocksFor(k) * 4.0 + (double)m * n * 2 + Fp8GemmKernel.BlocksFor(n) * Fp8GemmKernel.BlocksFor(k) * 4.0;
                var tflops = 2.0 * m * n * k / (us * 1e-6) / 1e12;
                var gbs = bytes / (us * 1e-6) / 1e9;
                var copyUs = bytes / (copyGbs * 1e9) * 1e6;
                Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                    $"| {m} | {n} | {k} | {Fp8GemmKernel.Choose(m)} | {us:F1} | {tflops:F1} | {gbs:F0} | {copyUs:F1} | {copyUs / us:F2} |"));
                results.Add(new Dictionary<string, object>
                {
                    ["bench"] = "fp8_gemm",
                    ["shape"] = new Dictionary<string, int> { ["M"] = m, ["N"] = n, ["K"] = k },
                    ["us"] = Math.Round(us, 2), ["tflops"] = Math.Round(tflops, 3), ["gbs"] = Math.Round(gbs, 1),
                    ["baseline"] = "copy", ["baseline_us"] = Math.Round(copyUs, 2), ["ratio"] = Math.Round(copyUs / us, 4),
                });
            }
        }

        if (outDir is not null)
        {
            Directory.CreateDirectory(outDir);
            var (major, minor) = NvrtcCompiler.Version;
            var json = JsonSerializer.Serialize(new Dictionary<string, object?>
            {
                ["device"] = dev.Name,
                ["driver"] = null, // not exposed by the engine's public API yet
                ["cuda"] = $"nvrtc {major}.{minor}",
                ["commit"] = Git("rev-parse --short HEAD"),
                ["date"] = DateTime.UtcNow.ToString("yyyy-MM-ddTHH:mm:ssZ", CultureInfo.InvariantCulture),
                ["copy_gbs"] = Math.Round(copyGbs, 1),
                ["results"] = results,
            }, new JsonSerializerOptions { WriteIndented = true });
            File.WriteAllText(Path.Combine(outDir, "fp8_gemm.json"), json);
        }

        return 0;
    }

    /// <summary>Copies of a buffer pair whose total exceeds twice L2, so rotating through them defeats the cache.</summary>
    private static int Copies(CudaDevice dev, long bytesPerCopy) =>
        (int)Math.Clamp(2L * dev.L2CacheSize / Math.Max(1, bytesPerCopy) + 1, 1, 64);

    private static double CopyBandwidth(CudaDevice dev, CudaStream stream, int runs)
    {
        const long bytes = 256L << 20;
        using var a = DeviceBuffer<byte>.Allocate(dev, bytes);
        using var b = DeviceBuffer<byte>.Allocate(dev, bytes);
        var times = Measure(dev, stream, runs, _ => b.CopyFrom(a, stream));
        return 2.0 * bytes / (times * 1e-6) / 1e9; // read + write
    }

    private static double Time(CudaDevice dev, CudaStream stream, Fp8GemmKernel gemm, int m, int n, int k, int runs)
    {
        var kb = Fp8GemmKernel.BlocksFor(k);
        var perCopy = (long)n * k + (long)m * k;
        var copies = Copies(dev, perCopy);
        var buffers = new List<IDisposable>();
        try
        {
            var w = new ulong[copies];
            var x = new ulong[copies];
            for (var c = 0; c < copies; c++)
            {
                var wb = DeviceBuffer<byte>.Allocate(dev, (long)n * k);
                var xb = DeviceBuffer<byte>.Allocate(dev, (long)m * k);
                wb.Fill8(0x38, stream); // 1.0
                xb.Fill8(0x38, stream);
                buffers.Add(wb);
                buffers.Add(xb);
                w[c] = wb.Pointer;
                x[c] = xb.Pointer;
            }

            var sa = DeviceBuffer<float>.Allocate(dev, (long)m * kb);
            var sb = DeviceBuffer<float>.Allocate(dev, (long)Fp8GemmKernel.BlocksFor(n) * kb);
            var y = DeviceBuffer<ushort>.Allocate(dev, (long)m * n);
            buffers.Add(sa);
            buffers.Add(sb);
            buffers.Add(y);
            sa.Fill32(0x3c000000, stream); // 2^-7
            sb.Fill32(0x3c000000, stream);
            return Measure(dev, stream, runs, i =>
                gemm.Launch(stream, x[i % copies], sa.Pointer, w[i % copies], sb.Pointer, y.Pointer, ElementType.BF16, m, n, k));
        }
        finally
        {
            foreach (var b in buffers)
            {
                b.Dispose();
            }
        }
    }

    /// <summary>Median microseconds of one call over <paramref name="runs"/> event-timed runs after warm-up.</summary>
    private static double Measure(CudaDevice dev, CudaStream stream, int runs, Action<int> call)
    {
        for (var i = 0; i < 3; i++)
        {
            call(i);
        }

        using var start = new CudaEvent(dev);
        using var stop = new CudaEvent(dev);
        var us = new double[runs];
        for (var r = 0; r < runs; r++)
        {
            start.Record(stream);
            call(r);
            stop.Record(stream);
            stop.Synchronize();
            us[r] = stop.ElapsedSince(start) * 1000.0;
        }

        Array.Sort(us);
        return us[runs / 2];
    }

    private static string? Git(string args)
    {
        try
        {
            using var p = Process.Start(new ProcessStartInfo("git", args) { RedirectStandardOutput = true, UseShellExecute = false });
            var s = p?.StandardOutput.ReadToEnd().Trim();
            p?.WaitForExit();
            return string.IsNullOrEmpty(s) ? null : s;
        }
        catch (System.ComponentModel.Win32Exception)
        {
            return null;
        }
    }
}
