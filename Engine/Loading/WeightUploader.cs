using System.Diagnostics;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Loader;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace DeepSeekCuda.Loading;

/// <summary>How a weight upload stages its bytes.</summary>
internal sealed record WeightUploadOptions
{
    /// <summary>Bytes per staging slot (one chunk). 64 MiB keeps per-copy overhead negligible and pinned memory small.</summary>
    public int ChunkBytes { get; init; } = 64 << 20;

    /// <summary>Staging slots the chunks rotate over: 2 is double buffering (fill one while the other is copied).</summary>
    public int Slots { get; init; } = 2;

    /// <summary>
    /// Threads copying one chunk out of the mapped shards: page faults on a memory map are served one
    /// at a time per thread, so a few threads read a cached or fast disk faster than one.
    /// </summary>
    public int ReadThreads { get; init; } = Math.Clamp(Environment.ProcessorCount / 2, 1, 4);

    /// <summary>A chunk's fill is split into slices of at most this many bytes for the read threads (small in tests).</summary>
    internal int ReadSliceBytes { get; init; } = 8 << 20;
}

/// <summary>What an upload did.</summary>
/// <param name="Bytes">Tensor bytes copied.</param>
/// <param name="Tensors">Tensors requested.</param>
/// <param name="Shards">Shards read.</param>
/// <param name="Chunks">Staging chunks used.</param>
/// <param name="Seconds">Wall time from the first read to the last copy done.</param>
/// <param name="ReadSeconds">Of <paramref name="Seconds"/>, time the host spent copying out of the mapped shards (file reads included).</param>
/// <param name="WaitSeconds">Of <paramref name="Seconds"/>, time the host spent waiting for copies to the device: large when the copy, not the read, bounds the load.</param>
internal sealed record UploadReport(long Bytes, int Tensors, int Shards, int Chunks, double Seconds, double ReadSeconds, double WaitSeconds)
{
    /// <summary>Throughput in GB/s (10^9 bytes).</summary>
    public double GigabytesPerSecond => Seconds > 0 ? Bytes / Seconds / 1e9 : 0;
}

/// <summary>
/// Uploads weights to device memory: whole checkpoint tensors, or the host views <see cref="WeightReader"/> yields (a
/// rectangle of a tensor, bytes converted on the host). Each shard is read once, front to back, through its memory
/// map; bytes go through pinned staging slots with double buffering (the host fills slot B while slot A's copy runs).
/// Nothing is converted here: FP8 e4m3 weights stay FP8, their <c>weight_scale_inv</c> stays float32, BF16 stays
/// BF16. The CUDA backend loads every weight this way.
/// </summary>
internal static partial class WeightUploader
{
    /// <summary>
    /// Uploads <paramref name="targets"/> to <paramref name="device"/> through a <see cref="CudaStagingCopier"/>
    /// it creates and frees (also on failure or cancellation, after the queued copies are done).
    /// </summary>
    public static UploadReport Upload(CudaDevice device, Checkpoint checkpoint, IEnumerable<WeightTarget> targets,
        WeightUploadOptions? options = null, IProgress<double>? progress = null, ILogger? logger = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(device);
        options ??= new WeightUploadOptions();
        var plan = UploadPlan.Create(checkpoint, targets, options.ChunkBytes, options.Slots);
        using var copier = new CudaStagingCopier(device, options.Slots, options.ChunkBytes);
        return Upload(checkpoint, plan, copier, options, progress, logger, cancellationToken);
    }

    /// <summary>
    /// Runs <paramref name="plan"/>: for each chunk, waits until its slot is free, copies the chunk's pieces
    /// from the mapped shards into the slot, queues the slot's copies. Progress is the fraction of bytes
    /// whose copy has completed, ending at exactly 1; throughput is logged at the end. Cancellation is
    /// checked between chunks; on any exception the queued copies are waited for before it propagates,
    /// so the caller may free the destinations and the staging at once.
    /// </summary>
    public static UploadReport Upload(Checkpoint checkpoint, UploadPlan plan, IStagingCopier copier, WeightUploadOptions? options = null,
        IProgress<double>? progress = null, ILogger? logger = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(checkpoint);
        ArgumentNullException.ThrowIfNull(plan);
        ArgumentNullException.ThrowIfNull(copier);
        if (copier.Slots != plan.Slots || copier.SlotBytes < plan.ChunkBytes)
        {
            throw new ArgumentException($"the plan needs {plan.Slots} slots of {plan.ChunkBytes} bytes; the copier has {copier.Slots} of {copier.SlotBytes}", nameof(copier));
        }

        options ??= new WeightUploadOptions();
        logger ??= NullLogger.Instance;
        LogStarting(logger, plan.TotalBytes / 1e9, plan.TensorCount, plan.Shards.Length, plan.Chunks.Length, plan.ChunkBytes >> 20, plan.Slots);
        var clock = Stopwatch.StartNew();
        var reading = new Stopwatch();
        var waiting = new Stopwatch();
        var chunks = plan.Chunks;
        long completed = 0;
        try
        {
            for (var i = 0; i < chunks.Length; i++)
            {
                cancellationToken.ThrowIfCancellationRequested();
                var chunk = chunks[i];
                waiting.Start();
                copier.WaitForSlot(chunk.Slot);
                waiting.Stop();
                if (i >= plan.Slots)
                {
                    // The slot's previous chunk is done, and the stream runs in order: so is every earlier one.
                    completed += chunks[i - plan.Slots].Bytes;
                    progress?.Report((double)completed / plan.TotalBytes);
                }

                reading.Start();
                Fill(checkpoint, chunk, copier.Slot(chunk.Slot), options.ReadThreads, options.ReadSliceBytes);
                reading.Stop();
                foreach (var piece in chunk.Pieces)
                {
                    copier.Copy(chunk.Slot, piece.StagingOffset, piece.Destination, piece.Length);
                }

                copier.Queued(chunk.Slot);
            }

            waiting.Start();
            copier.Finish();
            waiting.Stop();
        }
        catch (Exception e)
        {
            // Leave no copy in flight: the caller frees destinations and staging once this throws.
            copier.Finish();
            LogAborted(logger, e is OperationCanceledException ? "cancelled" : "failed", completed / 1e9, clock.Elapsed.TotalSeconds);
            throw;
        }

        progress?.Report(1.0);
        var report = new UploadReport(plan.TotalBytes, plan.TensorCount, plan.Shards.Length, chunks.Length, clock.Elapsed.TotalSeconds,
            reading.Elapsed.TotalSeconds, waiting.Elapsed.TotalSeconds);
        LogFinished(logger, report.Bytes / 1e9, report.Tensors, report.Seconds, report.GigabytesPerSecond, report.ReadSeconds, report.WaitSeconds);
        return report;
    }

    /// <summary>Device bytes <see cref="PlaceInArena"/> takes for <paramref name="tensors"/> (each rounded up to the arena's alignment).</summary>
    public static long ArenaBytes(IEnumerable<TensorInfo> tensors) =>
        tensors.Sum(t => (t.ByteLength + DeviceArena.Alignment - 1) / DeviceArena.Alignment * DeviceArena.Alignment);

    /// <summary>
    /// Carves one view per tensor out of <paramref name="arena"/> (raw bytes, the checkpoint's dtype) and
    /// returns the views by name with the matching upload targets.
    /// </summary>
    public static (IReadOnlyDictionary<string, DeviceBuffer<byte>> Views, IReadOnlyList<WeightTarget> Targets) PlaceInArena(DeviceArena arena, IEnumerable<TensorInfo> tensors)
    {
        ArgumentNullException.ThrowIfNull(arena);
        ArgumentNullException.ThrowIfNull(tensors);
        var views = new Dictionary<string, DeviceBuffer<byte>>(StringComparer.Ordinal);
        var targets = new List<WeightTarget>();
        foreach (var t in tensors)
        {
            var view = arena.Take<byte>(t.ByteLength);
            views.Add(t.Name, view);
            targets.Add(new WeightTarget(t.Name, t.ByteLength > 0 ? view.Pointer : 0));
        }

        return (views, targets);
    }

    /// <summary>Copies the chunk's pieces from the mapped shards into <paramref name="slot"/>, in slices spread over <paramref name="threads"/> threads.</summary>
    private static unsafe void Fill(Checkpoint checkpoint, UploadChunk chunk, Span<byte> slot, int threads, int sliceBytes)
    {
        if (threads <= 1 || chunk.Bytes <= sliceBytes)
        {
            foreach (var p in chunk.Pieces)
            {
                p.Source.CopyTo(checkpoint, p.Offset, slot.Slice(p.StagingOffset, p.Length));
            }

            return;
        }

        var slices = new List<(UploadPiece Piece, int Offset, int Length)>();
        foreach (var p in chunk.Pieces)
        {
            for (var offset = 0; offset < p.Length; offset += sliceBytes)
            {
                slices.Add((p, offset, Math.Min(sliceBytes, p.Length - offset)));
            }
        }

        fixed (byte* basePointer = slot)
        {
            var destination = (nint)basePointer;
            var length = slot.Length;
            ParallelLoad.For(0, slices.Count, new ParallelOptions { MaxDegreeOfParallelism = threads }, i =>
            {
                var (p, offset, bytes) = slices[i];
                var target = new Span<byte>((byte*)destination, length).Slice(p.StagingOffset + offset, bytes);
                p.Source.CopyTo(checkpoint, p.Offset + offset, target);
            });
        }
    }

    [LoggerMessage(EventId = 100, Level = LogLevel.Debug, Message = "Uploading {Gigabytes:F2} GB of weights: {Tensors} tensors from {Shards} shards in {Chunks} chunks of {ChunkMiB} MiB over {Slots} pinned slots")]
    private static partial void LogStarting(ILogger logger, double gigabytes, int tensors, int shards, int chunks, int chunkMiB, int slots);

    [LoggerMessage(EventId = 101, Level = LogLevel.Information, Message = "Uploaded {Gigabytes:F2} GB of weights ({Tensors} tensors) in {Seconds:F2} s: {GigabytesPerSecond:F2} GB/s (reading {ReadSeconds:F2} s, waiting for copies {WaitSeconds:F2} s)")]
    private static partial void LogFinished(ILogger logger, double gigabytes, int tensors, double seconds, double gigabytesPerSecond, double readSeconds, double waitSeconds);

    [LoggerMessage(EventId = 102, Level = LogLevel.Warning, Message = "Weight upload {Outcome} after {Gigabytes:F2} GB and {Seconds:F2} s")]
    private static partial void LogAborted(ILogger logger, string outcome, double gigabytes, double seconds);
}
