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
    private static List<(TensorInfo, ulong)> Place(IEnumerable<TensorInfo> tensors)
    {
        var at = 0x10000UL;
        var result = new List<(TensorInfo, ulong)>();
        foreach (var t in tensors)
        {
            result.Add((t, at));
            at += ((ulong)t.ByteLength + 255) / 256 * 256;
        }

        return result;
    }

    /// <summary>Every invariant a plan promises, checked from the outside.</summary>
    private static void AssertValid(UploadPlan plan, IReadOnlyList<(TensorInfo Tensor, ulong Destination)> requests, int chunkBytes, int slots)
    {
        Assert.AreEqual(requests.Sum(r => r.Tensor.ByteLength), plan.TotalBytes);
        Assert.AreEqual(requests.Count, plan.TensorCount);
        Assert.AreEqual(chunkBytes, plan.ChunkBytes);
        Assert.AreEqual(slots, plan.Slots);
        Assert.AreEqual((plan.TotalBytes + chunkBytes - 1) / chunkBytes, plan.Chunks.Length, "every chunk but the last is full");

        var covered = new Dictionary<string, List<UploadPiece>>();
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
                Assert.AreEqual(ShardPaths[p.Shard], p.Tensor.FilePath);
                // Shards in order, each once, and front to back inside a shard.
                if (previous is { } q)
                {
                    Assert.IsTrue(p.Shard > q.Shard || (p.Shard == q.Shard && p.SourceOffset > q.Source),
                        $"read order broken at {p.Tensor.Name}+{p.TensorOffset}: shard {p.Shard} offset {p.SourceOffset} after shard {q.Shard} offset {q.Source}");
                }

                previous = (p.Shard, p.SourceOffset);
                covered.TryAdd(p.Tensor.Name, []);
                covered[p.Tensor.Name].Add(p);
            }

            Assert.AreEqual(chunk.Bytes, staging);
        }

        foreach (var (tensor, destination) in requests)
        {
            var pieces = covered.GetValueOrDefault(tensor.Name) ?? [];
            long at = 0;
            foreach (var p in pieces.OrderBy(p => p.TensorOffset))
            {
                Assert.AreEqual(at, p.TensorOffset, $"{tensor.Name}: gap or overlap at byte {at}");
                Assert.AreEqual(destination + (ulong)p.TensorOffset, p.Destination, $"{tensor.Name}: destination of byte {at}");
                at += p.Length;
            }

            Assert.AreEqual(tensor.ByteLength, at, $"{tensor.Name}: bytes covered");
        }

        Assert.IsTrue(covered.Keys.All(requests.Select(r => r.Tensor.Name).Contains), "a piece of an unrequested tensor");
        CollectionAssert.AreEqual(
            requests.Where(r => r.Tensor.ByteLength > 0).Select(r => r.Tensor.FilePath).Distinct().OrderBy(p => Array.IndexOf(ShardPaths, p)).ToList(),
            plan.Shards.Where(s => requests.Any(r => r.Tensor.FilePath == s && r.Tensor.ByteLength > 0)).ToList());
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
            plan.Chunks.Select(c => c.Pieces.Where(p => p.Tensor.Name == "t1").Sum(p => p.Length)).ToArray());
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
        var dup = Assert.ThrowsExactly<ArgumentException>(() => UploadPlan.Create(ShardPaths, [(tensors[0], 0x1000UL), (tensors[0], 0x2000UL)], 64, 2));
        StringAssert.Contains(dup.Message, "'t0' is requested twice");

        var stray = tensors[1] with { FilePath = "/elsewhere.safetensors" };
        var unknown = Assert.ThrowsExactly<ArgumentException>(() => UploadPlan.Create(ShardPaths, [(stray, 0x1000UL)], 64, 2));
        StringAssert.Contains(unknown.Message, "/elsewhere.safetensors");

        // t0 is 10 bytes at 0x1000: t1 at 0x1009 overlaps its last byte; at 0x100A it does not.
        var overlap = Assert.ThrowsExactly<ArgumentException>(() => UploadPlan.Create(ShardPaths, [(tensors[0], 0x1000UL), (tensors[1], 0x1009UL)], 64, 2));
        StringAssert.Contains(overlap.Message, "'t0'");
        StringAssert.Contains(overlap.Message, "'t1'");
        _ = UploadPlan.Create(ShardPaths, [(tensors[0], 0x1000UL), (tensors[1], 0x100AUL)], 64, 2);

        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => UploadPlan.Create(ShardPaths, [], 0, 2));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => UploadPlan.Create(ShardPaths, [], 64, 0));
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
