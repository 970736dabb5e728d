using System.Collections.Immutable;
using DeepSeekCuda.Loader;

namespace DeepSeekCuda.Loading;

/// <summary>Where one checkpoint tensor goes: its raw bytes are copied to <paramref name="Destination"/> (a device address).</summary>
/// <param name="Name">Checkpoint tensor name.</param>
/// <param name="Destination">Device address of the first byte; the caller owns the memory (at least the tensor's byte length).</param>
internal readonly record struct WeightTarget(string Name, ulong Destination);

/// <summary>
/// One contiguous byte range of one tensor: bytes <c>[TensorOffset, TensorOffset + Length)</c> of
/// <see cref="Tensor"/> travel through staging slot bytes <c>[StagingOffset, StagingOffset + Length)</c>
/// to <see cref="Destination"/> (already offset by <see cref="TensorOffset"/>).
/// </summary>
/// <param name="Tensor">The tensor (its shard is <see cref="TensorInfo.FilePath"/>).</param>
/// <param name="Shard">Index of the shard in the plan's shard order.</param>
/// <param name="TensorOffset">First byte within the tensor.</param>
/// <param name="Length">Bytes (at least 1).</param>
/// <param name="StagingOffset">First byte within the staging slot.</param>
/// <param name="Destination">Device address the range goes to.</param>
internal readonly record struct UploadPiece(TensorInfo Tensor, int Shard, long TensorOffset, int Length, int StagingOffset, ulong Destination)
{
    /// <summary>Offset of the first byte in the shard's data section (what orders the reads).</summary>
    public long SourceOffset => Tensor.Begin + TensorOffset;
}

/// <summary>One fill of a staging slot: pieces packed back to back from offset 0, then copied out together.</summary>
/// <param name="Index">Position in the plan.</param>
/// <param name="Slot">Staging slot: <c>Index % slots</c>, so consecutive chunks alternate and the fill of one overlaps the copy of the previous.</param>
/// <param name="Bytes">Bytes used in the slot (the chunk size except for the last chunk).</param>
/// <param name="Pieces">The ranges, in read order.</param>
internal sealed record UploadChunk(int Index, int Slot, int Bytes, ImmutableArray<UploadPiece> Pieces);

/// <summary>
/// The schedule of a weight upload, pure (no file or device is touched): the requested tensors in shard
/// order, then file-offset order within a shard, concatenated into one byte stream that is cut into
/// chunks of <see cref="ChunkBytes"/>; chunk k fills staging slot <c>k % slots</c>. So every shard is read
/// once, front to back; small tensors share a chunk; a tensor larger than a chunk spans several; every
/// chunk but the last is full; zero-length tensors need no piece.
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

    /// <summary>Shards holding requested tensors, in read order (a subsequence of the checkpoint's shard order).</summary>
    public ImmutableArray<string> Shards { get; }

    /// <summary>The chunks, in order.</summary>
    public ImmutableArray<UploadChunk> Chunks { get; }

    /// <summary>Capacity of one staging slot.</summary>
    public int ChunkBytes { get; }

    /// <summary>Number of staging slots the chunks rotate over.</summary>
    public int Slots { get; }

    /// <summary>Bytes to upload (sum of the requested tensors' lengths).</summary>
    public long TotalBytes { get; }

    /// <summary>Number of requested tensors (zero-length ones included).</summary>
    public int TensorCount { get; }

    /// <summary>Plans the upload of <paramref name="targets"/> from <paramref name="checkpoint"/>.</summary>
    /// <exception cref="CheckpointException">A name the checkpoint lacks.</exception>
    public static UploadPlan Create(Checkpoint checkpoint, IEnumerable<WeightTarget> targets, int chunkBytes, int slots)
    {
        ArgumentNullException.ThrowIfNull(checkpoint);
        ArgumentNullException.ThrowIfNull(targets);
        return Create(checkpoint.ShardFiles.ToList(), targets.Select(t => (checkpoint.Get(t.Name), t.Destination)), chunkBytes, slots);
    }

    /// <summary>Plans the upload of <paramref name="requests"/> whose shards appear in <paramref name="shardOrder"/>.</summary>
    /// <param name="shardOrder">Shard file paths in read order.</param>
    /// <param name="requests">Tensors and their device destinations.</param>
    /// <param name="chunkBytes">Staging slot capacity (at least 1).</param>
    /// <param name="slots">Staging slots (at least 1; 2 is double buffering).</param>
    /// <exception cref="ArgumentException">A tensor requested twice, a tensor of an unknown shard, or destinations that overlap.</exception>
    public static UploadPlan Create(IReadOnlyList<string> shardOrder, IEnumerable<(TensorInfo Tensor, ulong Destination)> requests, int chunkBytes, int slots)
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

        var seen = new HashSet<string>(StringComparer.Ordinal);
        var ordered = new List<(TensorInfo Tensor, ulong Destination, int Shard)>();
        foreach (var (tensor, destination) in requests)
        {
            ArgumentNullException.ThrowIfNull(tensor);
            if (!seen.Add(tensor.Name))
            {
                throw new ArgumentException($"tensor '{tensor.Name}' is requested twice", nameof(requests));
            }

            if (!shardIndex.TryGetValue(tensor.FilePath, out var shard))
            {
                throw new ArgumentException($"tensor '{tensor.Name}' lives in {tensor.FilePath}, which is not among the plan's shards", nameof(requests));
            }

            ordered.Add((tensor, destination, shard));
        }

        CheckDestinationsDisjoint(ordered.Select(r => (r.Tensor, r.Destination)));
        ordered.Sort((a, b) => a.Shard != b.Shard ? a.Shard.CompareTo(b.Shard) : a.Tensor.Begin.CompareTo(b.Tensor.Begin));

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

        foreach (var (tensor, destination, shard) in ordered)
        {
            total += tensor.ByteLength;
            for (long offset = 0; offset < tensor.ByteLength;)
            {
                var length = (int)Math.Min(chunkBytes - used, tensor.ByteLength - offset);
                pieces.Add(new UploadPiece(tensor, shard, offset, length, used, destination + (ulong)offset));
                used += length;
                offset += length;
                if (used == chunkBytes)
                {
                    Close();
                }
            }
        }

        Close();
        var shards = ordered.Select(r => r.Shard).Distinct().Select(i => shardOrder[i]).ToImmutableArray();
        return new UploadPlan(shards, chunks.ToImmutable(), chunkBytes, slots, total, ordered.Count);
    }

    // Two tensors written over each other would be a placement bug upstream; name both.
    private static void CheckDestinationsDisjoint(IEnumerable<(TensorInfo Tensor, ulong Destination)> requests)
    {
        (TensorInfo Tensor, ulong Destination)? previous = null;
        foreach (var r in requests.Where(r => r.Tensor.ByteLength > 0).OrderBy(r => r.Destination))
        {
            if (previous is { } p && p.Destination + (ulong)p.Tensor.ByteLength > r.Destination)
            {
                throw new ArgumentException(
                    $"destinations overlap: '{p.Tensor.Name}' at 0x{p.Destination:x} ({p.Tensor.ByteLength} bytes) and '{r.Tensor.Name}' at 0x{r.Destination:x}", nameof(requests));
            }

            previous = r;
        }
    }
}
