using System.Diagnostics;
using DeepSeekCuda.Cuda;
using CudaRt = DeepSeekCuda.Cuda.Cuda;

namespace DeepSeekCuda.Bench.Harness;

/// <summary>
/// What every GPU bench shares: one device, stream and kernel compiler; the same-run device-to-device copy
/// bandwidth (the memory baseline); event timing after warm-up with L2 flushed before every timed run,
/// median of the runs; and the number of input copies to rotate through so that they exceed L2.
/// </summary>
internal sealed class GpuBench : IDisposable
{
    private readonly DeviceBuffer<byte> _flush;

    private GpuBench(CudaDevice device, int runs)
    {
        Device = device;
        Stream = new CudaStream(device);
        Compiler = new NvrtcCompiler(cache: new KernelCache(KernelCache.DefaultDirectory));
        Runs = runs;
        _flush = DeviceBuffer<byte>.Allocate(device, Math.Max(2L * device.L2CacheSize, 1L << 20));
        CopyGbs = MeasureCopyBandwidth();
    }

    /// <summary>The device measured.</summary>
    public CudaDevice Device { get; }

    /// <summary>The stream every timed call runs on.</summary>
    public CudaStream Stream { get; }

    /// <summary>Compiler (with the on-disk kernel cache) for the kernels under test.</summary>
    public NvrtcCompiler Compiler { get; }

    /// <summary>Timed runs per measurement.</summary>
    public int Runs { get; }

    /// <summary>Same-run device-to-device copy bandwidth, GB/s counting read and write.</summary>
    public double CopyGbs { get; }

    /// <summary>
    /// Opens device <paramref name="ordinal"/> and measures the copy bandwidth, or prints one line and returns
    /// null with <paramref name="reason"/> when there is no CUDA device (the bench then reports no numbers).
    /// </summary>
    public static GpuBench? TryOpen(string bench, int ordinal, int runs, out string reason)
    {
        reason = "";
        if (!CudaRt.IsAvailable)
        {
            reason = $"no CUDA device: {CudaRt.UnavailableReason}";
            Console.Error.WriteLine($"run-bench {bench}: {reason}; nothing measured");
            return null;
        }

        CudaDevice? device = null;
        GpuBench gpu;
        try
        {
            device = CudaDevice.Open(ordinal);
            gpu = new GpuBench(device, runs);
        }
        catch (Exception e) when (e is CudaException or ArgumentOutOfRangeException)
        {
            device?.Dispose();
            reason = $"device {ordinal} could not be opened: {e.Message}";
            Console.Error.WriteLine($"run-bench {bench}: {reason}; nothing measured");
            return null;
        }

        Console.WriteLine($"device {gpu.Device.Name}, driver CUDA {CudaRt.DriverVersion}, copy {gpu.CopyGbs:F0} GB/s (read + write)");
        return gpu;
    }

    /// <summary>Microseconds the same-run copy bandwidth needs to move <paramref name="bytes"/> (read + write counted).</summary>
    public double CopyUs(double bytes) => bytes / (CopyGbs * 1e9) * 1e6;

    /// <summary>Copies of an input set of <paramref name="bytesPerCopy"/> bytes whose total exceeds twice L2.</summary>
    public int Copies(long bytesPerCopy) =>
        (int)Math.Clamp(2L * Device.L2CacheSize / Math.Max(1, bytesPerCopy) + 1, 1, 64);

    /// <summary>
    /// Median microseconds of <paramref name="call"/> (given the run index, to rotate inputs) over
    /// <see cref="Runs"/> event-timed runs after three warm-up calls, with L2 flushed before each timed run.
    /// </summary>
    public double Measure(Action<int> call)
    {
        for (var i = 0; i < 3; i++)
        {
            call(i);
        }

        using var start = new CudaEvent(Device);
        using var stop = new CudaEvent(Device);
        var r = 0;
        return Median(Runs, () =>
        {
            _flush.Fill8((byte)r, Stream);
            start.Record(Stream);
            call(r++);
            stop.Record(Stream);
            stop.Synchronize();
            return stop.ElapsedSince(start) * 1000.0;
        });
    }

    /// <summary>
    /// Median host wall-clock microseconds of <paramref name="call"/>, which must wait for its own work (for
    /// operations spanning several streams or the host), over <see cref="Runs"/> runs after three warm-up calls.
    /// </summary>
    public double MeasureHost(Action call)
    {
        for (var i = 0; i < 3; i++)
        {
            call();
        }

        return Median(Runs, () =>
        {
            var clock = Stopwatch.StartNew();
            call();
            return clock.Elapsed.TotalMicroseconds;
        });
    }

    /// <summary>The median of <paramref name="runs"/> values of <paramref name="measure"/>.</summary>
    public static double Median(int runs, Func<double> measure)
    {
        var values = Enumerable.Range(0, runs).Select(_ => measure()).Order().ToArray();
        return values[runs / 2];
    }

    /// <inheritdoc />
    public void Dispose()
    {
        _flush.Dispose();
        Stream.Dispose();
        Device.Dispose();
    }

    private double MeasureCopyBandwidth()
    {
        const long bytes = 256L << 20;
        using var a = DeviceBuffer<byte>.Allocate(Device, bytes);
        using var b = DeviceBuffer<byte>.Allocate(Device, bytes);
        var us = Measure(_ => b.CopyFrom(a, Stream));
        return 2.0 * bytes / (us * 1e-6) / 1e9;
    }
}
