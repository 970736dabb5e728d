using System.Collections.Immutable;
using DeepSeekCuda.Loader;

namespace DeepSeekCuda.Loading;

/// <summary>Where one checkpoint tensor goes: its raw bytes are copied to <paramref name="Destination"/> (a device address).</summary>
/// <param name="Name">Checkpoint tensor name.</param>
/// <param name="Destination">Device address of the first byte; the caller owns the memory (at least the tensor's byte length).</param>
internal readonly record struct WeightTarget(string Name, ulong Destination);

/// <summary>
/// One contiguous byte range of one weight: bytes <c>[Offset, Offset + Length)</c> of the view <see cref="Source"/>
/// travel through staging slot bytes <c>[StagingOffset, StagingOffset + Length)</c> to <see cref="Destination"/>
/// (already offset by <see cref="Offset"/>).
/// </summary>
/// <param name="Source">The weight's bytes (a tensor, a rectangle of one, or bytes converted on the host).</param>
/// <param name="Shard">Index of the view's shard in the plan's shard order; -1 for converted bytes (no shard).</param>
/// <param name="Offset">First byte within the view.</param>
/// <param name="Length">Bytes (at least 1).</param>
/// <param name="StagingOffset">First byte within the staging slot.</param>
/// <param name="Destination">Device address the range goes to.</param>
internal readonly record struct UploadPiece(HostView Source, int Shard, long Offset, int Length, int StagingOffset, ulong Destination)
{
    /// <summary>Where the first byte lies in the shard's data section (what orders the reads).</summary>
    public long SourceOffset => Source.FileOffset(Offset);
}

/// <summary>One fill of a staging slot: pieces packed back to back from offset 0, then copied out together.</summary>
/// <param name="Index">Position in the plan.</param>
/// <param name="Slot">Staging slot: <c>Index % slots</c>, so consecutive chunks alternate and the fill of one overlaps the copy of the previous.</param>
/// <param name="Bytes">Bytes used in the slot (the chunk size except for the last chunk).</param>
/// <param name="Pieces">The ranges, in read order.</param>
internal sealed record UploadChunk(int Index, int Slot, int Bytes, ImmutableArray<UploadPiece> Pieces);

/// <summary>
/// The schedule of a weight upload, pure (no file or device is touched): the requested views (bytes converted on
/// the host first, then by shard order, then file offset within a shard) concatenated into one byte stream that is
/// cut into chunks of <see cref="ChunkBytes"/>; chunk k fills staging slot <c>k % slots</c>. So every shard is read
/// once, front to back; small weights share a chunk; a weight larger than a chunk spans several; every chunk but
/// the last is full; empty views need no piece.
/// </summary>
internal sealed class UploadPlan
{
    private UploadPlan(ImmutableArray<string> shards, ImmutableArray<UploadChunk> chunks, int chunkBytes, int slots, long totalBytes, int tensors)
    {
        Shards = shards;
        Chunks = chunks;
        ChunkBytes = chunkBytes;
        Slots = slots;
        TotalBytes = totalBytes;
        TensorCount = tensors;
    }

    /// <summary>Shards holding requested views, in read order (a subsequence of the checkpoint's shard order).</summary>
    public ImmutableArray<string> Shards { get; }

    /// <summary>The chunks, in order.</summary>
    public ImmutableArray<UploadChunk> Chunks { get; }

    /// <summary>Capacity of one staging slot.</summary>
    public int ChunkBytes { get; }

    /// <summary>Number of staging slots the chunks rotate over.</summary>
    public int Slots { get; }

    /// <summary>Bytes to upload (sum of the requested views' lengths).</summary>
    public long TotalBytes { get; }

    /// <summary>Number of requested views (empty ones included).</summary>
    public int TensorCount { get; }

    /// <summary>Plans the upload of <paramref name="targets"/> from <paramref name="checkpoint"/>.</summary>
    /// <exception cref="CheckpointException">A name the checkpoint lacks.</exception>
    public static UploadPlan Create(Checkpoint checkpoint, IEnumerable<WeightTarget> targets, int chunkBytes, int slots)
    {
        ArgumentNullException.ThrowIfNull(checkpoint);
        ArgumentNullException.ThrowIfNull(targets);
        return Create(checkpoint.ShardFiles.ToList(), targets.Select(t => (HostView.Of(checkpoint.Get(t.Name)), t.Destination)), chunkBytes, slots);
    }

    /// <summary>Plans the upload of <paramref name="requests"/> whose shards appear in <paramref name="shardOrder"/>.</summary>
    /// <param name="shardOrder">Shard file paths in read order.</param>
    /// <param name="requests">Views and their device destinations.</param>
    /// <param name="chunkBytes">Staging slot capacity (at least 1).</param>
    /// <param name="slots">Staging slots (at least 1; 2 is double buffering).</param>
    /// <exception cref="ArgumentException">The same bytes of a tensor requested twice, a tensor of an unknown shard, or destinations that overlap.</exception>
    public static UploadPlan Create(IReadOnlyList<string> shardOrder, IEnumerable<(HostView Source, ulong Destination)> requests, int chunkBytes, int slots)
    {
        ArgumentNullException.ThrowIfNull(shardOrder);
        ArgumentNullException.ThrowIfNull(requests);
        ArgumentOutOfRangeException.ThrowIfLessThan(chunkBytes, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(slots, 1);

        var shardIndex = new Dictionary<string, int>(StringComparer.Ordinal);
        for (var i = 0; i < shardOrder.Count; i++)
        {
            shardIndex.TryAdd(shardOrder[i], i);
        }

        // The same bytes twice is a placement bug upstream (two rectangles of one tensor are not).
        var seen = new HashSet<(string, long, long, long, int)>();
        var ordered = new List<(HostView Source, ulong Destination, int Shard)>();
        foreach (var (source, destination) in requests)
        {
            ArgumentNullException.ThrowIfNull(source);
            if (!seen.Add((source.Name, source.Start, source.RowBytes, source.RowStride, source.Rows)))
            {
                throw new ArgumentException($"tensor '{source.Name}' is requested twice", nameof(requests));
            }

            var shard = -1;
            if (source.Tensor is { } tensor && !shardIndex.TryGetValue(tensor.FilePath, out shard))
            {
                throw new ArgumentException($"tensor '{tensor.Name}' lives in {tensor.FilePath}, which is not among the plan's shards", nameof(requests));
            }

            ordered.Add((source, destination, shard));
        }

        CheckDestinationsDisjoint(ordered.Select(r => (r.Source, r.Destination)));
        ordered.Sort((a, b) => a.Shard != b.Shard ? a.Shard.CompareTo(b.Shard) : a.Source.FileOffset(0).CompareTo(b.Source.FileOffset(0)));

        var chunks = ImmutableArray.CreateBuilder<UploadChunk>();
        var pieces = ImmutableArray.CreateBuilder<UploadPiece>();
        var used = 0;
        long total = 0;

        void Close()
        {
            if (used > 0)
            {
                chunks.Add(new UploadChunk(chunks.Count, chunks.Count % slots, used, pieces.ToImmutable()));
                pieces.Clear();
                used = 0;
            }
        }

        foreach (var (source, destination, shard) in ordered)
        {
            total += source.Length;
            for (long offset = 0; offset < source.Length;)
            {
                var length = (int)Math.Min(chunkBytes - used, source.Length - offset);
                pieces.Add(new UploadPiece(source, shard, offset, length, used, destination + (ulong)offset));
                used += length;
                offset += length;
                if (used == chunkBytes)
                {
                    Close();
                }
            }
        }

        Close();
        var shards = ordered.Where(r => r.Shard >= 0).Select(r => r.Shard).Distinct().Select(i => shardOrder[i]).ToImmutableArray();
        return new UploadPlan(shards, chunks.ToImmutable(), chunkBytes, slots, total, ordered.Count);
    }

    // Two weights written over each other would be a placement bug upstream; name both.
    private static void CheckDestinationsDisjoint(IEnumerable<(HostView Source, ulong Destination)> requests)
    {
        (HostView Source, ulong Destination)? previous = null;
        foreach (var r in requests.Where(r => r.Source.Length > 0).OrderBy(r => r.Destination))
        {
            if (previous is { } p && p.Destination + (ulong)p.Source.Length > r.Destination)
            {
                throw new ArgumentException(
                    $"destinations overlap: '{p.Source.Name}' at 0x{p.Destination:x} ({p.Source.Length} bytes) and '{r.Source.Name}' at 0x{r.Destination:x}", nameof(requests));
            }

            previous = r;
        }
    }
}
