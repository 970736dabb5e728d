using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Backends.Cuda;
using DeepSeekCuda.Kernels;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Numerics;
using DeepSeekCuda.Model;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>
/// <see cref="CudaBackend"/>'s tensor views, latent pools, block tables and paged cache views against
/// <see cref="CpuBackend"/> in <see cref="CpuNumerics.GpuEmulation"/>, with tiny-a's kv_b (FP8) and latent norm and
/// fresh random inputs (seed logged): three requests appended in decode (1 and 2 rows) and prefill chunks into one pool
/// through a permuted block table that grows between steps must attend as the same requests over contiguous caches on
/// the CPU; a view written by Linear changes only its rows; a table uploaded between two launches is the one the second
/// launch reads. Outputs are poisoned with NaN before the GPU writes them. Tolerances are those of
/// <see cref="CudaBackendGpuTests"/> for the same operations.
/// </summary>
[TestClass]
[TestCategory("Gpu")]
public sealed class PagedCacheGpuTests : TinyABackendsGpuTests
{
    private MlaDims Dims => new(Config.NumAttentionHeads, Config.QkNopeHeadDim, Config.QkRopeHeadDim, Config.VHeadDim, Config.KvLoraRank);

    private static float[] Read(IBackend b, Tensor t)
    {
        var a = new float[t.Length];
        b.Download(t, a);
        return a;
    }

    private static Tensor Poisoned(IBackend b, int rows, int cols) => b.Upload(Enumerable.Repeat(float.NaN, rows * cols).ToArray(), rows, cols);

    private void Close(string what, float[] got, float[] want, double relToMax, double rtol, double rmsRel)
    {
        what = $"{what} (seed {Seed})";
        var maxRef = want.Where(float.IsFinite).Select(Math.Abs).DefaultIfEmpty(0f).Max();
        Tolerance.AssertClose(got, want, Math.Max(1e-6, relToMax * maxRef), rtol, what);
        var c = Tolerance.AssertRmsRel(got, want, rmsRel, what);
        TestContext.WriteLine(Tolerance.Describe(what, c));
    }

    /// <summary>Layer 0's latent norm (kv_a_layernorm) on one backend.</summary>
    private NormWeight LatentNorm(IBackend b) =>
        b.UploadNorm(Checkpoint, "model.layers.0.self_attn.kv_a_layernorm.weight", Dims.KvLora, (float)Config.RmsNormEps);

    /// <summary>Layer 0's kv_b (FP8) on one backend.</summary>
    private LinearWeight KvB(IBackend b) =>
        b.UploadLinear(Checkpoint, new LinearSpec("model.layers.0.self_attn.kv_b_proj.weight", Dims.Heads * Dims.KvBHead, Dims.KvLora, true));

    /// <summary>One chunk of one request: its kv rows and queries, the same on both backends.</summary>
    private sealed record Chunk(int Request, int Start, int Rows, float[] Kv, float[] Q);

    /// <summary>
    /// <see cref="IBackend.CopyLatentCache"/> on the device (a session growing its caches): a copy of 70 positions holds, bit
    /// for bit, the source's first two blocks and zeros after them; a copy of 30 takes the first block alone (zeros in the
    /// second until the rest is appended, then the source's rows 0..69); and the copy attends as the source, both forms,
    /// within the device's own tolerance against the CPU emulation over the source.
    /// </summary>
    [TestMethod]
    public void ACopiedCacheHoldsItsSourcesRowsAndNoOthers()
    {
        var dims = Dims;
        int lora = dims.KvLora, rope = dims.QkRope, row = lora + rope, qWidth = dims.Heads * dims.QkHead, oWidth = dims.Heads * dims.V;
        const int Length = 70;
        var (cos, sin) = YarnRope.Table(Config, 200);
        var scale = (float)Config.SoftmaxScale;
        var kv = Bf16Normal(Length * row);
        var q = Bf16Normal(qWidth);
        var width = new LatentShape(lora, rope).RowWidth;
        var block = PagedLatentCache.BlockSize * width;

        using var norm = LatentNorm(Cuda);
        using var kvB = KvB(Cuda);
        using var ropeTable = Cuda.UploadRope(cos, sin, 200, rope / 2);
        using var source = Cuda.AllocateLatentCache(100, lora, rope);
        using (var kvt = Cuda.Upload(kv, Length, row))
        {
            Cuda.AppendLatent(kvt, norm, ropeTable, source, 0);
        }

        using var whole = Cuda.AllocateLatentCache(200, lora, rope);
        Cuda.CopyLatentCache(source, whole, Length);
        using var part = Cuda.AllocateLatentCache(128, lora, rope);
        Cuda.CopyLatentCache(source, part, 30);
        static ushort[] Raw(LatentCache c) => ((CudaLatentCache)c).Pool!.Cache.ToArray();
        var src = Raw(source);
        var copied = Raw(whole);
        var partial = Raw(part);
        CollectionAssert.AreEqual(src[..(2 * block)], copied[..(2 * block)], "the source's two blocks");
        Assert.IsTrue(copied[(2 * block)..].All(x => x == 0), "nothing after them");
        Assert.IsTrue(src[..(Length * width)].Any(x => x != 0), "the source holds rows");
        CollectionAssert.AreEqual(src[..block], partial[..block], "30 positions copied: the first block");
        Assert.IsTrue(partial[block..].All(x => x == 0), "30 positions copied: nothing in the second block");
        using (var rest = Cuda.Upload(kv.AsSpan(30 * row).ToArray(), Length - 30, row))
        {
            Cuda.AppendLatent(rest, norm, ropeTable, part, 30);
        }

        CollectionAssert.AreEqual(src[..(Length * width)], Raw(part)[..(Length * width)], "30 copied and 40 appended: the source's rows");

        using var qt = Cuda.Upload(q, 1, qWidth);
        var got = new List<float[]>();
        foreach (var cache in new[] { whole, part })
        {
            using var naive = Poisoned(Cuda, 1, oWidth);
            using var absorbed = Poisoned(Cuda, 1, oWidth);
            Cuda.MlaAttentionNaive(qt, cache, kvB, dims, Length - 1, scale, naive);
            Cuda.MlaAttentionAbsorbed(qt, cache, kvB, dims, Length - 1, scale, absorbed);
            got.Add(Read(Cuda, naive));
            got.Add(Read(Cuda, absorbed));
        }

        using var cpuNorm = LatentNorm(Cpu);
        using var cpuKvB = KvB(Cpu);
        using var cpuRope = Cpu.UploadRope(cos, sin, 200, rope / 2);
        using var cpuCache = Cpu.AllocateLatentCache(Length, lora, rope);
        using (var kvt = Cpu.Upload(kv, Length, row))
        {
            Cpu.AppendLatent(kvt, cpuNorm, cpuRope, cpuCache, 0);
        }

        using var cq = Cpu.Upload(q, 1, qWidth);
        using var wantNaive = Cpu.Allocate(1, oWidth);
        using var wantAbsorbed = Cpu.Allocate(1, oWidth);
        Cpu.MlaAttentionNaive(cq, cpuCache, cpuKvB, dims, Length - 1, scale, wantNaive);
        Cpu.MlaAttentionAbsorbed(cq, cpuCache, cpuKvB, dims, Length - 1, scale, wantAbsorbed);
        float[][] want = [Read(Cpu, wantNaive), Read(Cpu, wantAbsorbed)];
        string[] names = ["whole copy naive", "whole copy absorbed", "30 copied naive", "30 copied absorbed"];
        for (var i = 0; i < names.Length; i++)
        {
            Close(names[i], got[i], want[i % 2], 0.03, 0.05, rmsRel: 0.02);
        }
    }

    /// <summary>
    /// Request lengths 70 and 130 cross block boundaries, 23 does not; chunks of 1 and 2 rows take the absorbed decode
    /// kernel, longer ones the prefill kernel over a cached prefix. Requests take turns, so their blocks interleave in
    /// the pool; each request's new blocks come from a permuted free list, and the whole table is uploaded (without a
    /// synchronization) before each chunk.
    /// </summary>
    [TestMethod]
    public void PagedAttentionThroughAPermutedTableMatchesContiguousCachesOnTheCpu()
    {
        var dims = Dims;
        int lora = dims.KvLora, rope = dims.QkRope, row = lora + rope, qWidth = dims.Heads * dims.QkHead, oWidth = dims.Heads * dims.V;
        int[] lengths = [70, 130, 23];
        int[][] chunkSizes = [[5, 1, 2, 60, 1, 1], [64, 2, 1, 40, 23], [1, 1, 2, 19]];
        var maxLength = lengths.Max();
        var maxBlocks = PagedLatentCache.BlocksFor(maxLength) + 1;
        var poolBlocks = lengths.Sum(PagedLatentCache.BlocksFor) + 2;
        var (cos, sin) = YarnRope.Table(Config, maxLength);
        var scale = (float)Config.SoftmaxScale;

        // The schedule: round-robin over requests, one chunk each, with the table as it stands before each chunk.
        var schedule = new List<(Chunk Chunk, int[] Table)>();
        var entries = Enumerable.Repeat(-1, lengths.Length * maxBlocks).ToArray();
        var free = new Queue<int>(Enumerable.Range(0, poolBlocks).OrderBy(_ => Random.Next()));
        var position = new int[lengths.Length];
        var next = new int[lengths.Length];
        while (Enumerable.Range(0, lengths.Length).Any(q => next[q] < chunkSizes[q].Length))
        {
            for (var q = 0; q < lengths.Length; q++)
            {
                if (next[q] == chunkSizes[q].Length)
                {
                    continue;
                }

                var n = chunkSizes[q][next[q]++];
                for (var blk = PagedLatentCache.BlocksFor(position[q]); blk < PagedLatentCache.BlocksFor(position[q] + n); blk++)
                {
                    entries[q * maxBlocks + blk] = free.Dequeue();
                }

                schedule.Add((new Chunk(q, position[q], n, Bf16Normal(n * row), Bf16Normal(n * qWidth)), (int[])entries.Clone()));
                position[q] += n;
            }
        }

        CollectionAssert.AreEqual(lengths, position);
        TestContext.WriteLine($"table [{string.Join(",", entries)}]");

        // CUDA: one pool, paged views, the table uploaded before each chunk.
        var got = new List<float[]>();
        {
            using var norm = LatentNorm(Cuda);
            using var kvB = KvB(Cuda);
            using var ropeTable = Cuda.UploadRope(cos, sin, maxLength, rope / 2);
            using var pool = Cuda.AllocateLatentPool(poolBlocks, lora, rope);
            using var table = Cuda.AllocateBlockTable(lengths.Length, maxBlocks);
            var caches = Enumerable.Range(0, lengths.Length).Select(q => Cuda.PagedCache(pool, table, q)).ToArray();
            var outputs = new List<Tensor>();
            foreach (var (c, t) in schedule)
            {
                Cuda.UploadBlockTable(t, table);
                using var kv = Cuda.Upload(c.Kv, c.Rows, row);
                using var qt = Cuda.Upload(c.Q, c.Rows, qWidth);
                Cuda.AppendLatent(kv, norm, ropeTable, caches[c.Request], c.Start);
                var naive = Poisoned(Cuda, c.Rows, oWidth);
                var absorbed = Poisoned(Cuda, c.Rows, oWidth);
                Cuda.MlaAttentionNaive(qt, caches[c.Request], kvB, dims, c.Start, scale, naive);
                Cuda.MlaAttentionAbsorbed(qt, caches[c.Request], kvB, dims, c.Start, scale, absorbed);
                outputs.Add(naive);
                outputs.Add(absorbed);
            }

            got.AddRange(outputs.Select(o => Read(Cuda, o)));
            foreach (var o in outputs)
            {
                o.Dispose();
            }

            foreach (var c in caches)
            {
                c.Dispose();
            }
        }

        // CPU emulation: a contiguous cache per request.
        var want = new List<float[]>();
        {
            using var norm = LatentNorm(Cpu);
            using var kvB = KvB(Cpu);
            using var ropeTable = Cpu.UploadRope(cos, sin, maxLength, rope / 2);
            var caches = lengths.Select(l => Cpu.AllocateLatentCache(l, lora, rope)).ToArray();
            foreach (var (c, _) in schedule)
            {
                using var kv = Cpu.Upload(c.Kv, c.Rows, row);
                using var qt = Cpu.Upload(c.Q, c.Rows, qWidth);
                Cpu.AppendLatent(kv, norm, ropeTable, caches[c.Request], c.Start);
                using var naive = Cpu.Allocate(c.Rows, oWidth);
                using var absorbed = Cpu.Allocate(c.Rows, oWidth);
                Cpu.MlaAttentionNaive(qt, caches[c.Request], kvB, dims, c.Start, scale, naive);
                Cpu.MlaAttentionAbsorbed(qt, caches[c.Request], kvB, dims, c.Start, scale, absorbed);
                want.Add(Read(Cpu, naive));
                want.Add(Read(Cpu, absorbed));
            }

            foreach (var c in caches)
            {
                c.Dispose();
            }
        }

        for (var i = 0; i < got.Count; i++)
        {
            var c = schedule[i / 2].Chunk;
            var what = $"request {c.Request} positions {c.Start}..{c.Start + c.Rows - 1} {(i % 2 == 0 ? "naive" : "absorbed")}";
            Close(what, got[i], want[i], 0.03, 0.05, rmsRel: 0.02);
        }
    }

    [TestMethod]
    public void LinearIntoAViewChangesOnlyItsRows()
    {
        var qLora = Config.QLoraRank ?? throw new InvalidOperationException("tiny-a has q_lora_rank");
        const int Out = 512;
        var x = Bf16Normal(3 * qLora);
        var before = Bf16Normal(6 * Out);
        var spec = new LinearSpec("model.layers.0.self_attn.q_b_proj.weight", Out, qLora, true);

        float[] parent, viewed;
        using (var w = Cuda.UploadLinear(Checkpoint, spec))
        using (var xt = Cuda.Upload(x, 3, qLora))
        using (var y = Cuda.Upload(before, 6, Out))
        using (var view = Cuda.View(y, 2, 3))
        {
            Assert.AreEqual(3, view.Rows);
            Cuda.Linear(xt, w, view);
            parent = Read(Cuda, y);
            viewed = Read(Cuda, view);
        }

        float[] reference;
        using (var w = Cpu.UploadLinear(Checkpoint, spec))
        using (var xt = Cpu.Upload(x, 3, qLora))
        using (var y = Cpu.Allocate(3, Out))
        {
            Cpu.Linear(xt, w, y);
            reference = Read(Cpu, y);
        }

        for (var i = 0; i < parent.Length; i++)
        {
            var r = i / Out;
            if (r is < 2 or > 4 && BitConverter.SingleToInt32Bits(parent[i]) != BitConverter.SingleToInt32Bits(before[i]))
            {
                Assert.Fail($"row {r} outside the view changed at column {i % Out}: {before[i]:g9} → {parent[i]:g9}");
            }
        }

        CollectionAssert.AreEqual(parent.AsSpan(2 * Out, 3 * Out).ToArray(), viewed, "the view downloads the parent's rows 2..4");
        Close("q_b into rows 2..4", viewed, reference, 0.01, 2 * Bf16Step, rmsRel: 4e-3);
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() =>
        {
            using var t = Cuda.Allocate(6, 4);
            Cuda.View(t, 4, 3);
        });
    }

    /// <summary>
    /// One host array for the table, changed in place between uploads, and no synchronization anywhere: table A puts the
    /// request in block 1, B in block 3, each appended with different rows; attention launched after re-uploading A must
    /// see A's rows and after B B's. A copy that ran late (or read the host array late) would show the other's.
    /// </summary>
    [TestMethod]
    public void AnUploadedTableIsTheOneTheNextLaunchReads()
    {
        var dims = Dims;
        int lora = dims.KvLora, rope = dims.QkRope, row = lora + rope, qWidth = dims.Heads * dims.QkHead, oWidth = dims.Heads * dims.V;
        const int Length = 40;
        var (cos, sin) = YarnRope.Table(Config, Length);
        var scale = (float)Config.SoftmaxScale;
        var kvA = Bf16Normal(Length * row);
        var kvB2 = Bf16Normal(Length * row);
        var q = Bf16Normal(2 * qWidth);

        float[][] got;
        {
            using var norm = LatentNorm(Cuda);
            using var kvB = KvB(Cuda);
            using var ropeTable = Cuda.UploadRope(cos, sin, Length, rope / 2);
            using var pool = Cuda.AllocateLatentPool(4, lora, rope);
            using var table = Cuda.AllocateBlockTable(2, 2);
            using var cache = Cuda.PagedCache(pool, table, 1);
            using var a = Cuda.Upload(kvA, Length, row);
            using var b = Cuda.Upload(kvB2, Length, row);
            using var qt = Cuda.Upload(q, 2, qWidth);
            var entries = new[] { 0, -1, 1, -1 };
            Cuda.UploadBlockTable(entries, table);
            Cuda.AppendLatent(a, norm, ropeTable, cache, 0);
            entries[2] = 3;
            Cuda.UploadBlockTable(entries, table);
            Cuda.AppendLatent(b, norm, ropeTable, cache, 0);
            var outputs = new List<Tensor>();
            foreach (var block in new[] { 1, 3 })
            {
                entries[2] = block;
                Cuda.UploadBlockTable(entries, table);
                var naive = Poisoned(Cuda, 2, oWidth);
                var absorbed = Poisoned(Cuda, 2, oWidth);
                Cuda.MlaAttentionNaive(qt, cache, kvB, dims, Length - 2, scale, naive);
                Cuda.MlaAttentionAbsorbed(qt, cache, kvB, dims, Length - 2, scale, absorbed);
                outputs.Add(naive);
                outputs.Add(absorbed);
            }

            got = [.. outputs.Select(o => Read(Cuda, o))];
            foreach (var o in outputs)
            {
                o.Dispose();
            }
        }

        var want = new float[4][];
        {
            using var norm = LatentNorm(Cpu);
            using var kvB = KvB(Cpu);
            using var ropeTable = Cpu.UploadRope(cos, sin, Length, rope / 2);
            using var qt = Cpu.Upload(q, 2, qWidth);
            var i = 0;
            foreach (var kv in new[] { kvA, kvB2 })
            {
                using var cache = Cpu.AllocateLatentCache(Length, lora, rope);
                using var kvt = Cpu.Upload(kv, Length, row);
                Cpu.AppendLatent(kvt, norm, ropeTable, cache, 0);
                using var naive = Cpu.Allocate(2, oWidth);
                using var absorbed = Cpu.Allocate(2, oWidth);
                Cpu.MlaAttentionNaive(qt, cache, kvB, dims, Length - 2, scale, naive);
                Cpu.MlaAttentionAbsorbed(qt, cache, kvB, dims, Length - 2, scale, absorbed);
                want[i++] = Read(Cpu, naive);
                want[i++] = Read(Cpu, absorbed);
            }
        }

        // The two tables must give clearly different outputs, or this test could not tell them apart.
        var apart = Tolerance.Compare(want[2], want[0], "B vs A");
        Assert.IsGreaterThan(0.2, apart.RmsRel, Tolerance.Describe("the outputs over A's and B's rows differ", apart));
        string[] names = ["table A naive", "table A absorbed", "table B naive", "table B absorbed"];
        for (var i = 0; i < names.Length; i++)
        {
            Close(names[i], got[i], want[i], 0.03, 0.05, rmsRel: 0.02);
        }
    }
}
