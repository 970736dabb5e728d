using DeepSeekCuda.Loader;
using DeepSeekCuda.Loading;

namespace DeepSeekCuda.Tests.Loading;

[TestClass]
public sealed class UploadPlanTests
{
    private static readonly string[] ShardPaths = ["/ckpt/a.safetensors", "/ckpt/b.safetensors", "/ckpt/c.safetensors"];

    /// <summary>Tensors laid back to back in each shard (with a gap now and then), sizes from <paramref name="sizes"/>, shard by round robin of runs.</summary>
    private static List<TensorInfo> Layout(IReadOnlyList<long> sizes, Random rng)
    {
        var next = new long[ShardPaths.Length];
        var tensors = new List<TensorInfo>();
        for (var i = 0; i < sizes.Count; i++)
        {
            var shard = Math.Min(ShardPaths.Length - 1, i * ShardPaths.Length / sizes.Count);
            var begin = next[shard] + (rng.Next(4) == 0 ? rng.Next(1, 50) : 0);
            tensors.Add(new TensorInfo($"t{i}", DType.U8, [sizes[i]], begin, begin + sizes[i], ShardPaths[shard]));
            next[shard] = begin + sizes[i];
        }

        return tensors;
    }

    /// <summary>Destinations packed in request order, 256-aligned like the device arena, from a non-zero base.</summary>
    private static List<(HostView, ulong)> Place(IEnumerable<TensorInfo> tensors) => Place(tensors.Select(HostView.Of));

    private static List<(HostView, ulong)> Place(IEnumerable<HostView> views)
    {
        var at = 0x10000UL;
        var result = new List<(HostView, ulong)>();
        foreach (var v in views)
        {
            result.Add((v, at));
            at += ((ulong)v.Length + 255) / 256 * 256;
        }

        return result;
    }

    /// <summary>Every invariant a plan promises, checked from the outside.</summary>
    private static void AssertValid(UploadPlan plan, IReadOnlyList<(HostView Source, ulong Destination)> requests, int chunkBytes, int slots)
    {
        Assert.AreEqual(requests.Sum(r => r.Source.Length), plan.TotalBytes);
        Assert.AreEqual(requests.Count, plan.TensorCount);
        Assert.AreEqual(chunkBytes, plan.ChunkBytes);
        Assert.AreEqual(slots, plan.Slots);
        Assert.AreEqual((plan.TotalBytes + chunkBytes - 1) / chunkBytes, plan.Chunks.Length, "every chunk but the last is full");

        var covered = new Dictionary<HostView, List<UploadPiece>>();
        (int Shard, long Source)? previous = null;
        for (var k = 0; k < plan.Chunks.Length; k++)
        {
            var chunk = plan.Chunks[k];
            Assert.AreEqual(k, chunk.Index);
            Assert.AreEqual(k % slots, chunk.Slot);
            Assert.IsTrue(chunk.Bytes >= 1 && chunk.Bytes <= chunkBytes, $"chunk {k} has {chunk.Bytes} bytes");
            if (k < plan.Chunks.Length - 1)
            {
                Assert.AreEqual(chunkBytes, chunk.Bytes, $"chunk {k} not full");
            }

            var staging = 0;
            foreach (var p in chunk.Pieces)
            {
                Assert.IsGreaterThanOrEqualTo(1, p.Length, "empty piece");
                Assert.AreEqual(staging, p.StagingOffset, "pieces packed back to back");
                staging += p.Length;
                Assert.AreEqual(p.Source.Tensor is null ? -1 : Array.IndexOf(ShardPaths, p.Source.Tensor.FilePath), p.Shard);
                // Converted bytes first, then shards in order, each once, and front to back inside a shard.
                if (previous is { } q)
                {
                    Assert.IsTrue(p.Shard > q.Shard || (p.Shard == q.Shard && (p.Shard < 0 || p.SourceOffset > q.Source)),
                        $"read order broken at {p.Source.Name}+{p.Offset}: shard {p.Shard} offset {p.SourceOffset} after shard {q.Shard} offset {q.Source}");
                }

                previous = (p.Shard, p.SourceOffset);
                covered.TryAdd(p.Source, []);
                covered[p.Source].Add(p);
            }

            Assert.AreEqual(chunk.Bytes, staging);
        }

        foreach (var (source, destination) in requests)
        {
            var pieces = covered.GetValueOrDefault(source) ?? [];
            long at = 0;
            foreach (var p in pieces.OrderBy(p => p.Offset))
            {
                Assert.AreEqual(at, p.Offset, $"{source.Name}: gap or overlap at byte {at}");
                Assert.AreEqual(destination + (ulong)p.Offset, p.Destination, $"{source.Name}: destination of byte {at}");
                at += p.Length;
            }

            Assert.AreEqual(source.Length, at, $"{source.Name}: bytes covered");
        }

        Assert.IsTrue(covered.Keys.All(requests.Select(r => r.Source).Contains), "a piece of an unrequested view");
        var read = requests.Where(r => r.Source is { Tensor: not null, Length: > 0 }).Select(r => r.Source.Tensor!.FilePath).ToHashSet();
        CollectionAssert.AreEqual(ShardPaths.Where(read.Contains).ToList(), plan.Shards.Where(read.Contains).ToList());
    }

    [TestMethod]
    [DataRow(1, 2)]
    [DataRow(7, 2)]
    [DataRow(64, 2)]
    [DataRow(1000, 3)]
    [DataRow(1 << 20, 2)]
    public void RandomLayoutsAreCoveredOnceInReadOrder(int chunkBytes, int slots)
    {
        for (var seed = 0; seed < 5; seed++)
        {
            var rng = new Random(seed * 31 + chunkBytes);
            // Mostly small, some zero-length, some several chunks long.
            var sizes = Enumerable.Range(0, 60).Select(_ => rng.Next(6) switch
            {
                0 => 0L,
                1 => rng.Next(1, 3 * chunkBytes + 2),
                _ => rng.Next(1, 40),
            }).ToList();
            var tensors = Layout(sizes, rng);
            // Request a random subset, in shuffled order: the plan must sort by shard and offset itself.
            var requested = tensors.Where(_ => rng.Next(5) != 0).OrderBy(_ => rng.Next()).ToList();
            var requests = Place(requested);
            var plan = UploadPlan.Create(ShardPaths, requests, chunkBytes, slots);
            AssertValid(plan, requests, chunkBytes, slots);
        }
    }

    [TestMethod]
    public void TensorLargerThanAChunkSpansConsecutiveChunks()
    {
        const int chunk = 1000;
        List<TensorInfo> tensors =
        [
            new("t0", DType.U8, [10], 0, 10, ShardPaths[0]),
            new("t1", DType.U8, [4500], 10, 4510, ShardPaths[0]),
            new("t2", DType.U8, [10], 4510, 4520, ShardPaths[0]),
        ];
        var requests = Place(tensors);
        var plan = UploadPlan.Create(ShardPaths, requests, chunk, 2);
        AssertValid(plan, requests, chunk, 2);
        Assert.HasCount(5, plan.Chunks);
        // The big tensor touches every chunk: 990 bytes after the first small one, then full chunks.
        CollectionAssert.AreEqual(new[] { 990, 1000, 1000, 1000, 510 },
            plan.Chunks.Select(c => c.Pieces.Where(p => p.Source.Name == "t1").Sum(p => p.Length)).ToArray());
    }

    [TestMethod]
    public void ManyTinyTensorsArePackedIntoFewChunks()
    {
        var rng = new Random(2);
        var tensors = Layout(Enumerable.Repeat(4L, 10_000).ToList(), rng);
        var requests = Place(tensors);
        var plan = UploadPlan.Create(ShardPaths, requests, 64 << 10, 2);
        AssertValid(plan, requests, 64 << 10, 2);
        Assert.HasCount(1, plan.Chunks, "40,000 bytes fit one 64 KiB chunk");
        Assert.HasCount(10_000, plan.Chunks[0].Pieces);
        CollectionAssert.AreEqual(ShardPaths, plan.Shards.ToArray());
    }

    [TestMethod]
    public void ZeroLengthTensorsNeedNoPieceAndAnEmptyRequestNoChunk()
    {
        var tensors = Layout([0, 0, 5, 0], new Random(3));
        var requests = Place(tensors);
        var plan = UploadPlan.Create(ShardPaths, requests, 16, 2);
        AssertValid(plan, requests, 16, 2);
        Assert.HasCount(1, plan.Chunks);
        Assert.AreEqual(4, plan.TensorCount);

        var empty = UploadPlan.Create(ShardPaths, Place(tensors.Where(t => t.ByteLength == 0)), 16, 2);
        Assert.IsEmpty(empty.Chunks);
        Assert.AreEqual(0, empty.TotalBytes);

        var none = UploadPlan.Create(ShardPaths, [], 16, 2);
        Assert.IsEmpty(none.Chunks);
        Assert.IsEmpty(none.Shards);
    }

    [TestMethod]
    public void RefusesDuplicatesUnknownShardsOverlapsAndBadSizes()
    {
        var tensors = Layout([10, 20], new Random(4));
        var dup = Assert.ThrowsExactly<ArgumentException>(() => UploadPlan.Create(ShardPaths, [(HostView.Of(tensors[0]), 0x1000UL), (HostView.Of(tensors[0]), 0x2000UL)], 64, 2));
        StringAssert.Contains(dup.Message, "'t0' is requested twice");

        var stray = tensors[1] with { FilePath = "/elsewhere.safetensors" };
        var unknown = Assert.ThrowsExactly<ArgumentException>(() => UploadPlan.Create(ShardPaths, [(HostView.Of(stray), 0x1000UL)], 64, 2));
        StringAssert.Contains(unknown.Message, "/elsewhere.safetensors");

        // t0 is 10 bytes at 0x1000: t1 at 0x1009 overlaps its last byte; at 0x100A it does not.
        var overlap = Assert.ThrowsExactly<ArgumentException>(() => UploadPlan.Create(ShardPaths, [(HostView.Of(tensors[0]), 0x1000UL), (HostView.Of(tensors[1]), 0x1009UL)], 64, 2));
        StringAssert.Contains(overlap.Message, "'t0'");
        StringAssert.Contains(overlap.Message, "'t1'");
        _ = UploadPlan.Create(ShardPaths, [(HostView.Of(tensors[0]), 0x1000UL), (HostView.Of(tensors[1]), 0x100AUL)], 64, 2);

        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => UploadPlan.Create(ShardPaths, [], 0, 2));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => UploadPlan.Create(ShardPaths, [], 64, 0));
    }

    /// <summary>
    /// Views other than whole tensors: bytes converted on the host go first (no shard to read), rectangles are read
    /// where they lie (a strided piece starts at its run's file offset), two rectangles of one tensor may both be
    /// requested, and the same rectangle twice may not.
    /// </summary>
    [TestMethod]
    public void RectanglesAndConvertedBytesArePlannedInReadOrder()
    {
        List<TensorInfo> tensors =
        [
            new("a", DType.U8, [20, 30], 100, 700, ShardPaths[0]),
            new("b", DType.U8, [10, 8], 0, 80, ShardPaths[1]),
            new("c", DType.U8, [16, 16], 900, 1156, ShardPaths[0]),
        ];
        // Two rectangles of one tensor that do not interleave in the file (columns of the same rows would).
        var left = HostView.Rectangle(tensors[0], new TensorSlice(20, 30, 2, 5, 0, 12));
        var right = HostView.Rectangle(tensors[0], new TensorSlice(20, 30, 10, 8, 12, 18));
        var band = HostView.Rectangle(tensors[2], new TensorSlice(16, 16, 4, 8, 0, 16));
        var converted = HostView.Converted("n", new byte[70]);
        var whole = HostView.Of(tensors[1]);
        var requests = Place(new[] { band, whole, right, converted, left });
        var plan = UploadPlan.Create(ShardPaths, requests, 64, 2);
        AssertValid(plan, requests, 64, 2);

        Assert.AreEqual((5, 12L, 30L), (left.Rows, left.RowBytes, left.RowStride));
        Assert.AreEqual((1, 128L), (band.Rows, band.RowBytes), "whole rows are one run");
        var pieces = plan.Chunks.SelectMany(c => c.Pieces).ToList();
        CollectionAssert.AreEqual(new[] { converted, left, right, band, whole }, pieces.Select(p => p.Source).Distinct().ToArray());
        Assert.AreEqual(-1, pieces[0].Shard);
        var second = pieces.First(p => p.Source == left && p.Offset > 0);
        Assert.AreEqual(100 + (2 * 30) + (second.Offset / 12 * 30) + (second.Offset % 12), second.SourceOffset);

        var twice = Assert.ThrowsExactly<ArgumentException>(() => UploadPlan.Create(ShardPaths, Place(new[] { left, HostView.Rectangle(tensors[0], new TensorSlice(20, 30, 2, 5, 0, 12)) }), 64, 2));
        StringAssert.Contains(twice.Message, "'a' is requested twice");
    }

    [TestMethod]
    public void ShardsWithoutRequestedTensorsAreNotRead()
    {
        var tensors = Layout([10, 10, 10, 10, 10, 10], new Random(5));
        var requests = Place(tensors.Where(t => t.FilePath != ShardPaths[1]));
        var plan = UploadPlan.Create(ShardPaths, requests, 8, 2);
        AssertValid(plan, requests, 8, 2);
        CollectionAssert.AreEqual(new[] { ShardPaths[0], ShardPaths[2] }, plan.Shards.ToArray());
        Assert.IsTrue(plan.Chunks.SelectMany(c => c.Pieces).All(p => p.Shard != 1));
    }
}
