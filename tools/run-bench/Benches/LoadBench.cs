using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using DeepSeekCuda.Backends.Cuda;
using DeepSeekCuda.Bench.Harness;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Cuda.Native;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Synthetic;
using DeepSeekCuda.Loading;
using DeepSeekCuda.Model;

namespace DeepSeekCuda.Bench.Benches;

/// <summary>
/// Weight loading: a synthetic checkpoint written to local disk (full: DeepSeek-V3 slice 1, one dense
/// layer at full width plus embedding and lm_head, about 4.3 GB in 4 shards; quick: the same with a
/// 16384-token vocabulary, about 1.05 GB in 2 shards), then uploaded whole by <see cref="WeightUploader"/>
/// into a device arena. Rows <c>load</c> (wall time of the whole call: plan, pinned slots, reads and
/// copies) against two baselines measured in the same run on the same bytes:
/// <list type="bullet">
/// <item><c>read</c>: a plain sequential read of every shard file (FileStream, 64 MiB reads), scaled to
/// the tensor bytes; ratio = read time / load time (1: loading is as fast as reading the files).</item>
/// <item><c>h2d</c>: pinned host-to-device copies of the same byte count (a 256 MiB pinned buffer copied
/// over the arena, event-timed); ratio = copy time / load time.</item>
/// </list>
/// Each is measured cold and warm. Cold: after fsync, <c>posix_fadvise(DONTNEED)</c> asks the kernel to
/// drop the shards' cached pages (no root needed; the shape says <c>cache=cold</c> only when every call
/// succeeded, else <c>cold?</c>). Warm: right after a full read, from the page cache. The folder is
/// <c>$DSCUDA_LOAD_BENCH_DIR</c> or, by default, a fresh folder under the current directory (so a tmpfs
/// /tmp does not pass for a disk; the file system type is printed), deleted afterwards.
/// </summary>
internal static partial class LoadBench
{
    private const int ReadBufferBytes = 64 << 20;
    private const int H2dBufferBytes = 256 << 20;

    public static void Run(GpuBench gpu, bool quick, BenchReport report)
    {
        var config = quick ? ModelPresets.DeepSeekV3Slice(1) with { VocabSize = 16384 } : ModelPresets.DeepSeekV3Slice(1);
        var shards = quick ? 2 : 4;
        var runs = quick ? 1 : 3;
        var root = Environment.GetEnvironmentVariable("DSCUDA_LOAD_BENCH_DIR") is { Length: > 0 } env ? env : Environment.CurrentDirectory;
        var dir = Path.Combine(root, ".load-bench-" + Guid.NewGuid().ToString("N")[..8]);
        try
        {
            var written = Stopwatch.StartNew();
            SyntheticCheckpoint.Write(dir, config.Validate(), seed: 1, shards);
            var files = Directory.GetFiles(dir, "*.safetensors").Order(StringComparer.Ordinal).ToArray();
            var fileBytes = files.Sum(f => new FileInfo(f).Length);
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"checkpoint: {fileBytes / 1e9:F2} GB in {files.Length} shards under {dir} ({FileSystemType(dir)}), written in {written.Elapsed.TotalSeconds:F1} s"));

            long tensorBytes;
            List<TensorInfo> tensors;
            using (var probe = Checkpoint.Open(dir))
            {
                tensorBytes = probe.TotalTensorBytes;
                tensors = [.. probe.Tensors.Values];
            }

            using var arena = new DeviceArena(gpu.Device, WeightUploader.ArenaBytes(tensors));
            var h2dUs = GpuBench.Median(runs, () => TimeH2d(gpu, arena, tensorBytes));
            foreach (var cold in new[] { true, false })
            {
                var dropped = true;
                var readUs = GpuBench.Median(runs, () =>
                {
                    dropped &= !cold || DropCache(files);
                    return TimeRead(files) * tensorBytes / fileBytes;
                });
                UploadReport? last = null;
                var loadUs = GpuBench.Median(runs, () =>
                {
                    dropped &= !cold || DropCache(files);
                    var (us, upload) = TimeLoad(gpu, dir, arena);
                    last = upload;
                    return us;
                });
                var shape = new Dictionary<string, object>
                {
                    ["bytes"] = tensorBytes,
                    ["shards"] = files.Length,
                    ["cache"] = cold ? (dropped ? "cold" : "cold?") : "warm",
                };
                var gbs = tensorBytes / (loadUs * 1e-6) / 1e9;
                report.Add(new BenchResult("load", shape, loadUs, 0, gbs, "read", readUs));
                report.Add(new BenchResult("load", shape, loadUs, 0, gbs, "h2d", h2dUs));
                Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                    $"  {shape["cache"]}: read {tensorBytes / (readUs * 1e-6) / 1e9:F1} GB/s; last load {last!.GigabytesPerSecond:F1} GB/s inside the pipeline, host reading {last.ReadSeconds:F2} s, waiting for copies {last.WaitSeconds:F2} s of {last.Seconds:F2} s"));
            }

            Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"baselines alone: h2d {tensorBytes / (h2dUs * 1e-6) / 1e9:F1} GB/s (pinned, 256 MiB copies)"));
            ModelLoad(gpu, dir, config, arena, runs, report);
        }
        finally
        {
            try
            {
                Directory.Delete(dir, recursive: true);
            }
            catch (DirectoryNotFoundException)
            {
                // Writing failed before the folder existed.
            }
        }
    }

    /// <summary>
    /// Row <c>model_load</c>, warm: the model loaded on a <see cref="CudaBackend"/> the way <c>LocalModel</c> loads it
    /// (weight by weight through <see cref="WeightReader"/> and the backend's <see cref="WeightUploader"/> staging, the
    /// MTP layer left out), against the same run's whole-checkpoint upload of the bytes it reads (<c>load</c>, timed
    /// here again right before, warm as well); ratio = upload time / model load time (1: the per-weight path costs nothing extra).
    /// </summary>
    private static void ModelLoad(GpuBench gpu, string dir, ModelConfig config, DeviceArena arena, int runs, BenchReport report)
    {
        using var backend = new CudaBackend(new CudaBackendOptions { Device = gpu.Device.Ordinal });
        var mtp = CheckpointLayout.LayerPrefix(config.NumHiddenLayers);
        long bytes = 0;
        var uploadUs = GpuBench.Median(runs, () =>
        {
            var (us, upload) = TimeLoad(gpu, dir, arena, t => !t.Name.StartsWith(mtp, StringComparison.Ordinal));
            bytes = upload.Bytes;
            return us;
        });
        var loadUs = GpuBench.Median(runs, () =>
        {
            var clock = Stopwatch.StartNew();
            using var checkpoint = Checkpoint.Open(dir);
            using var model = DeepSeekModel.Load(checkpoint, backend, new ModelOptions { MaxSequenceLength = 16, LoadMtp = false });
            backend.Synchronize();
            return clock.Elapsed.TotalMicroseconds;
        });
        var shape = new Dictionary<string, object> { ["bytes"] = bytes, ["cache"] = "warm", ["layers"] = config.NumHiddenLayers };
        report.Add(new BenchResult("model_load", shape, loadUs, 0, bytes / (loadUs * 1e-6) / 1e9, "load", uploadUs));
    }

    /// <summary>Microseconds to read every file front to back (no parsing, no copy beyond the read).</summary>
    private static double TimeRead(string[] files)
    {
        var buffer = GC.AllocateUninitializedArray<byte>(ReadBufferBytes, pinned: true);
        var clock = Stopwatch.StartNew();
        foreach (var f in files)
        {
            using var stream = new FileStream(f, FileMode.Open, FileAccess.Read, FileShare.Read, 1, FileOptions.SequentialScan);
            while (stream.Read(buffer) > 0)
            {
            }
        }

        return clock.Elapsed.TotalMicroseconds;
    }

    /// <summary>
    /// Microseconds of one whole upload (of the tensors <paramref name="take"/> keeps, all by default), checkpoint opened
    /// and closed around it (so the maps start cold too), and the pipeline's own report.
    /// </summary>
    private static (double Us, UploadReport Report) TimeLoad(GpuBench gpu, string dir, DeviceArena arena, Func<TensorInfo, bool>? take = null)
    {
        var clock = Stopwatch.StartNew();
        using var checkpoint = Checkpoint.Open(dir);
        arena.Reset();
        var (_, targets) = WeightUploader.PlaceInArena(arena, checkpoint.Tensors.Values.Where(t => take?.Invoke(t) ?? true).OrderBy(t => t.Name, StringComparer.Ordinal));
        var upload = WeightUploader.Upload(gpu.Device, checkpoint, targets);
        return (clock.Elapsed.TotalMicroseconds, upload);
    }

    /// <summary>Event-timed microseconds of pinned host-to-device copies totalling <paramref name="bytes"/>, into the arena.</summary>
    private static double TimeH2d(GpuBench gpu, DeviceArena arena, long bytes)
    {
        using var pinned = new PinnedBuffer<byte>(gpu.Device, H2dBufferBytes);
        pinned.Span.Fill(0x5A);
        arena.Reset();
        using var target = arena.Take<byte>(bytes);
        void CopyAll()
        {
            for (long at = 0; at < bytes; at += H2dBufferBytes)
            {
                var n = (int)Math.Min(H2dBufferBytes, bytes - at);
                using var slice = DeviceBuffer<byte>.View(gpu.Device, target.At(at), n);
                CopySlice(pinned, slice, n, gpu.Stream);
            }
        }

        CopyAll(); // warm-up: first touch of the device pages and of the copy engines
        gpu.Stream.Synchronize();
        using var start = new CudaEvent(gpu.Device);
        using var stop = new CudaEvent(gpu.Device);
        start.Record(gpu.Stream);
        CopyAll();
        stop.Record(gpu.Stream);
        stop.Synchronize();
        return stop.ElapsedSince(start) * 1000.0;
    }

    private static unsafe void CopySlice(PinnedBuffer<byte> pinned, DeviceBuffer<byte> destination, int bytes, CudaStream stream)
    {
        fixed (byte* source = pinned.Span)
        {
            CudaCheck.Driver(CuDriver.cuMemcpyHtoDAsync(destination.Pointer, source, (nuint)bytes, stream.Handle), destination.Device.Ordinal);
        }
    }

    /// <summary>Flushes and drops the files' cached pages; false if the kernel refused for any file.</summary>
    private static bool DropCache(string[] files)
    {
        if (!OperatingSystem.IsLinux())
        {
            return false;
        }

        try
        {
            var ok = true;
            foreach (var f in files)
            {
                using var handle = File.OpenHandle(f, FileMode.Open, FileAccess.Read);
                var fd = (int)handle.DangerousGetHandle();
                ok &= Fsync(fd) == 0 && PosixFadvise(fd, 0, 0, FadviseDontNeed) == 0;
            }

            return ok;
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException)
        {
            // No glibc to ask: the read is whatever the cache holds, and the shape says "cold?".
            return false;
        }
    }

    /// <summary>The type of the file system holding <paramref name="path"/> (longest mount point prefix in /proc/mounts).</summary>
    private static string FileSystemType(string path)
    {
        try
        {
            var best = (Mount: "", Type: "unknown file system");
            foreach (var line in File.ReadLines("/proc/mounts"))
            {
                var parts = line.Split(' ');
                if (parts.Length > 2 && (path == parts[1] || path.StartsWith(parts[1].TrimEnd('/') + "/", StringComparison.Ordinal)) && parts[1].Length >= best.Mount.Length)
                {
                    best = (parts[1], parts[2]);
                }
            }

            return best.Type is "tmpfs" or "ramfs" ? $"{best.Type}: in memory, not a disk" : best.Type;
        }
        catch (IOException)
        {
            return "unknown file system";
        }
    }

    private const int FadviseDontNeed = 4; // POSIX_FADV_DONTNEED on Linux

    [LibraryImport("libc.so.6", EntryPoint = "posix_fadvise")]
    private static partial int PosixFadvise(int fd, long offset, long length, int advice);

    [LibraryImport("libc.so.6", EntryPoint = "fsync")]
    private static partial int Fsync(int fd);
}
