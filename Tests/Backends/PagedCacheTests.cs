using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Kernels;
using DeepSeekCuda.Loader.Numerics;
using DeepSeekCuda.Tests.Support;
using static DeepSeekCuda.Tests.Backends.AttentionTestData;

namespace DeepSeekCuda.Tests.Backends;

/// <summary>
/// The CPU backend's tensor views, latent pools, block tables and paged cache views (the specification the CUDA backend
/// and <see cref="DeepSeekCuda.Serving.PagedStepRunner"/> are held to): a view writes its parent's rows and no others; requests whose
/// chunks are appended through a permuted block table into one shared pool attend bitwise as they do over caches of
/// their own; and the paged calls refuse what they cannot address.
/// </summary>
[TestClass]
public sealed class PagedCacheTests
{
    // ------------------------------------------------------------------ views

    [TestMethod]
    public void LinearAndRmsNormIntoAViewChangeExactlyItsRows()
    {
        using var b = new CpuBackend();
        var r = new Random(11);
        int rows = 6, inF = 40, outF = 24;
        var x = Normal(r, 3 * inF);
        var w = Normal(r, outF * inF, 0.2f);
        var before = Normal(r, rows * outF);
        var weight = new CpuLinearWeight(outF, inF, false, w);
        using var xt = b.Upload(x, 3, inF);
        using var y = b.Upload(before, rows, outF);
        using var view = b.View(y, 2, 3);
        Assert.AreEqual(3, view.Rows);
        Assert.AreEqual(outF, view.Cols);
        b.Linear(xt, weight, view);
        var got = Read(b, y);
        for (var row = 0; row < rows; row++)
        {
            for (var o = 0; o < outF; o++)
            {
                var i = row * outF + o;
                if (row is < 2 or > 4)
                {
                    Assert.AreEqual(before[i], got[i], $"row {row} outside the view is untouched");
                    continue;
                }

                double dot = 0;
                for (var k = 0; k < inF; k++)
                {
                    dot += (double)x[(row - 2) * inF + k] * w[o * inF + k];
                }

                Assert.AreEqual(dot, got[i], 1e-5 + 1e-5 * Math.Abs(dot), $"y[{row}, {o}] = x[{row - 2}]·w[{o}]");
            }
        }

        // Read back through the view: its row 0 is the parent's row 2.
        CollectionAssert.AreEqual(got.AsSpan(2 * outF, 3 * outF).ToArray(), Read(b, view), "a view downloads its own rows");

        // A view as input, and a view of a view (rows 1 + 2 .. 1 + 3 of the parent = 3..4), as RMSNorm's output.
        var norm = new CpuNormWeight(outF, 1e-6f, Normal(r, outF));
        using var outer = b.View(y, 1, 4);
        using var inner = b.View(outer, 2, 2);
        using var src = b.View(y, 0, 2);
        var parentBefore = Read(b, y);
        b.RmsNorm(src, norm, inner);
        var after = Read(b, y);
        for (var row = 0; row < rows; row++)
        {
            for (var c = 0; c < outF; c++)
            {
                var i = row * outF + c;
                if (row is not (3 or 4))
                {
                    Assert.AreEqual(parentBefore[i], after[i], $"row {row} outside the nested view is untouched");
                    continue;
                }

                var s = (row - 3) * outF;
                var ms = Enumerable.Range(0, outF).Sum(k => (double)parentBefore[s + k] * parentBefore[s + k]) / outF;
                var expected = parentBefore[s + c] / Math.Sqrt(ms + 1e-6) * norm.Data[c];
                Assert.AreEqual(expected, after[i], 1e-5 + 1e-5 * Math.Abs(expected), $"norm of row {row - 3} into row {row}, column {c}");
            }
        }
    }

    [TestMethod]
    public void ViewsOutsideTheTensorAreRefused()
    {
        using var b = new CpuBackend();
        using var t = b.Allocate(6, 5);
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => b.View(t, -1, 2));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => b.View(t, 0, -1));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => b.View(t, 5, 2));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => b.View(t, 7, 0));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => b.View(t, int.MaxValue, 2));
        using var v = b.View(t, 1, 4);
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => b.View(v, 2, 3), "a view's bounds are its own rows, not its parent's");
        using var whole = b.View(t, 0, 6);
        using var empty = b.View(t, 6, 0);
        Assert.AreEqual(0, empty.Rows);
    }

    // ------------------------------------------------------------------ paged = contiguous

    /// <summary>
    /// Three requests (70 and 130 positions cross block boundaries, 23 stays in one block) appended round-robin in
    /// chunks of 1, 2 and prefill sizes into one pool, each request's blocks taken as it grows from a permuted free list
    /// (so the requests' blocks interleave in the pool) and the table uploaded before each step. After each chunk both
    /// attention forms over the paged view must equal, bit for bit, the same calls over a cache of the request's own; and
    /// every row must sit in the physical block the table names.
    /// </summary>
    [TestMethod]
    [DataRow(CpuNumerics.Float32)]
    [DataRow(CpuNumerics.GpuEmulation)]
    public void PagedAttentionThroughAPermutedTableEqualsContiguousCaches(CpuNumerics numerics)
    {
        const int Seed = 20261204;
        using var b = new CpuBackend(numerics);
        var r = new Random(Seed);
        int[] lengths = [70, 130, 23];
        int[][] chunks = [[5, 1, 2, 60, 1, 1], [64, 2, 1, 40, 23], [1, 1, 2, 19]];
        for (var q = 0; q < lengths.Length; q++)
        {
            Assert.AreEqual(lengths[q], chunks[q].Sum(), $"chunks of request {q}");
        }

        int lora = Dims.KvLora, rope = Dims.QkRope, row = lora + rope, qWidth = Dims.Heads * Dims.QkHead, oWidth = Dims.Heads * Dims.V;
        var maxLength = lengths.Max();
        var maxBlocks = PagedLatentCache.BlocksFor(maxLength) + 1;
        var poolBlocks = lengths.Sum(PagedLatentCache.BlocksFor) + 2;
        var (ropeTable, kvNorm, kvB) = AttentionWeights(b, r, maxLength);
        using var _ = ropeTable;
        var scale = 1f / MathF.Sqrt(Dims.QkHead);

        using var pool = b.AllocateLatentPool(poolBlocks, lora, rope);
        using var table = b.AllocateBlockTable(lengths.Length, maxBlocks);
        var entries = Enumerable.Repeat(-1, lengths.Length * maxBlocks).ToArray();
        var free = new Queue<int>(Enumerable.Range(0, poolBlocks).OrderBy(_ => r.Next()));
        var paged = Enumerable.Range(0, lengths.Length).Select(q => b.PagedCache(pool, table, q)).ToArray();
        var own = lengths.Select(l => b.AllocateLatentCache(l, lora, rope)).ToArray();
        Assert.AreEqual(maxBlocks * PagedLatentCache.BlockSize, paged[0].Capacity, "a paged view holds a table row of blocks");

        var position = new int[lengths.Length];
        var next = new int[lengths.Length];
        var steps = 0;
        while (next.Select((c, q) => c < chunks[q].Length).Any(x => x))
        {
            for (var q = 0; q < lengths.Length; q++)
            {
                if (next[q] == chunks[q].Length)
                {
                    continue;
                }

                var n = chunks[q][next[q]++];
                var start = position[q];
                for (var blk = PagedLatentCache.BlocksFor(start); blk < PagedLatentCache.BlocksFor(start + n); blk++)
                {
                    entries[q * maxBlocks + blk] = free.Dequeue();
                }

                b.UploadBlockTable(entries, table);
                var what = $"{numerics} seed {Seed} request {q} positions {start}..{start + n - 1}";
                using var kv = b.Upload(Normal(r, n * row, 2f), n, row);
                using var qt = b.Upload(Normal(r, n * qWidth), n, qWidth);
                b.AppendLatent(kv, kvNorm, ropeTable, paged[q], start);
                b.AppendLatent(kv, kvNorm, ropeTable, own[q], start);
                foreach (var absorbed in new[] { false, true })
                {
                    using var got = b.Allocate(n, oWidth);
                    using var want = b.Allocate(n, oWidth);
                    if (absorbed)
                    {
                        b.MlaAttentionAbsorbed(qt, paged[q], kvB, Dims, start, scale, got);
                        b.MlaAttentionAbsorbed(qt, own[q], kvB, Dims, start, scale, want);
                    }
                    else
                    {
                        b.MlaAttentionNaive(qt, paged[q], kvB, Dims, start, scale, got);
                        b.MlaAttentionNaive(qt, own[q], kvB, Dims, start, scale, want);
                    }

                    var reference = Read(b, want);
                    Assert.IsTrue(reference.All(float.IsFinite) && reference.Any(v => v != 0), $"{what}: the reference output is finite and not all zero");
                    Bitwise(Read(b, got), reference, $"{what} {(absorbed ? "absorbed" : "naive")}");
                }

                position[q] += n;
                steps++;
            }
        }

        CollectionAssert.AreEqual(lengths, position);
        Assert.AreEqual(2, free.Count, "two spare blocks stay unused");
        // Round-robin growth interleaves the requests' blocks; the permuted free list makes them non-consecutive too.
        Assert.AreNotEqual(entries[1] - 1, entries[0], "request 0's two blocks are not neighbours in the pool");

        // Every row of every request lies in the physical block its table row names: a pool that ignored the table would
        // still agree with the attention above only if no two requests shared a block index.
        var cpuPool = (CpuLatentPool)pool;
        for (var q = 0; q < lengths.Length; q++)
        {
            var contiguous = (CpuLatentCache)own[q];
            for (var p = 0; p < lengths[q]; p++)
            {
                var physical = cpuPool.Row(entries[q * maxBlocks + p / PagedLatentCache.BlockSize], p % PagedLatentCache.BlockSize, write: false);
                CollectionAssert.AreEqual(contiguous.Latent(p).ToArray(), physical[..lora].ToArray(), $"request {q} position {p} latent");
                CollectionAssert.AreEqual(contiguous.Rope(p).ToArray(), physical[lora..].ToArray(), $"request {q} position {p} rope");
            }
        }

        foreach (var c in own)
        {
            c.Dispose();
        }

        foreach (var c in paged)
        {
            c.Dispose();
        }

        Assert.AreEqual(chunks.Sum(c => c.Length), steps, "every chunk ran");
    }

    /// <summary>
    /// One step's rows of three sequences in one stream, out of sequence order (slot 2; slot 0's token and draft, across a block
    /// boundary; slot 1): RoPE at each row's uploaded position, the append through the permuted table, and attention with each
    /// row a query of its own equal, bit for bit, the per-sequence calls over caches of the sequences' own (the absorbed form
    /// over each sequence's rows, as a decode step runs it).
    /// </summary>
    [TestMethod]
    [DataRow(CpuNumerics.Float32)]
    [DataRow(CpuNumerics.GpuEmulation)]
    public void RowOperationsOverOneStreamEqualEachSequenceOnItsOwn(CpuNumerics numerics)
    {
        const int Seed = 20261205;
        using var b = new CpuBackend(numerics);
        var r = new Random(Seed);
        int lora = Dims.KvLora, rope = Dims.QkRope, width = lora + rope, qWidth = Dims.Heads * Dims.QkHead, oWidth = Dims.Heads * Dims.V;
        int[] history = [63, 40, 7];   // positions each slot holds before the step
        int[] slots = [2, 0, 0, 1];    // the step's rows: slot 2, slot 0's token and draft (positions 63 and 64: two blocks), slot 1
        var positions = new int[slots.Length];
        var next = (int[])history.Clone();
        for (var t = 0; t < slots.Length; t++)
        {
            positions[t] = next[slots[t]]++;
        }

        const int Capacity = 128;
        var (ropeTable, kvNorm, kvB) = AttentionWeights(b, r, Capacity);
        using var _ = ropeTable;
        var scale = 1f / MathF.Sqrt(Dims.QkHead);

        // Slot s's blocks: a permuted share of the pool; its history appended both there and into a cache of its own.
        const int MaxBlocks = 2;
        using var pool = b.AllocateLatentPool(3 * MaxBlocks, lora, rope);
        using var table = b.AllocateBlockTable(3, MaxBlocks);
        int[] entries = [.. Enumerable.Range(0, 3 * MaxBlocks).OrderBy(_ => r.Next())];
        b.UploadBlockTable(entries, table);
        var own = history.Select(_ => b.AllocateLatentCache(Capacity, lora, rope)).ToArray();
        for (var s = 0; s < history.Length; s++)
        {
            using var paged = b.PagedCache(pool, table, s);
            using var kv = b.Upload(Normal(r, history[s] * width, 2f), history[s], width);
            b.AppendLatent(kv, kvNorm, ropeTable, paged, 0);
            b.AppendLatent(kv, kvNorm, ropeTable, own[s], 0);
        }

        var n = slots.Length;
        var kvValues = Normal(r, n * width, 2f);
        var qValues = Normal(r, n * qWidth);
        const int Vocab = 11, EmbedWidth = 6;
        var embedValues = Normal(r, Vocab * EmbedWidth);
        BFloat16.Round(embedValues); // a checkpoint's table is BF16
        int[] tokens = [.. slots.Select(_ => r.Next(Vocab))];
        using var rows = b.AllocateStepRows(8);
        b.UploadStepRows(tokens, slots, positions, rows);
        CollectionAssert.AreEqual(tokens, rows.Tokens.ToArray());
        CollectionAssert.AreEqual(slots, rows.Slots.ToArray());
        CollectionAssert.AreEqual(positions, rows.Positions.ToArray());

        // The rows' tokens, embedded where the rows are: row t is the table's row tokens[t].
        using var embed = new CpuEmbeddingWeight(Vocab, EmbedWidth, embedValues);
        using var embedded = b.Allocate(n, EmbedWidth);
        b.EmbeddingRows(embed, rows, embedded);
        Bitwise(Read(b, embedded), [.. tokens.SelectMany(id => embedValues.AsSpan(id * EmbedWidth, EmbedWidth).ToArray())], $"{numerics} embedded rows");

        // The stream.
        using var q = b.Upload(qValues, n, qWidth);
        using var kvRows = b.Upload(kvValues, n, width);
        using var got = b.Allocate(n, oWidth);
        b.ApplyRopeRows(q, ropeTable, rows, Dims.QkHead, Dims.QkNope);
        b.AppendLatentRows(kvRows, kvNorm, ropeTable, pool, table, rows);
        b.MlaAttentionRows(q, pool, table, rows, kvB, Dims, scale, got);

        // Each sequence on its own: its rows (consecutive positions) through the per-sequence calls.
        var rotated = new float[n * qWidth];
        var want = new float[n * oWidth];
        for (var s = 0; s < history.Length; s++)
        {
            var mine = Enumerable.Range(0, n).Where(t => slots[t] == s).ToArray();
            using var qs = b.Upload([.. mine.SelectMany(t => qValues.AsSpan(t * qWidth, qWidth).ToArray())], mine.Length, qWidth);
            using var kvs = b.Upload([.. mine.SelectMany(t => kvValues.AsSpan(t * width, width).ToArray())], mine.Length, width);
            using var os = b.Allocate(mine.Length, oWidth);
            b.ApplyRope(qs, ropeTable, history[s], Dims.QkHead, Dims.QkNope);
            b.AppendLatent(kvs, kvNorm, ropeTable, own[s], history[s]);
            b.MlaAttentionAbsorbed(qs, own[s], kvB, Dims, history[s], scale, os);
            var (qr, or) = (Read(b, qs), Read(b, os));
            for (var k = 0; k < mine.Length; k++)
            {
                qr.AsSpan(k * qWidth, qWidth).CopyTo(rotated.AsSpan(mine[k] * qWidth));
                or.AsSpan(k * oWidth, oWidth).CopyTo(want.AsSpan(mine[k] * oWidth));
            }
        }

        var what = $"{numerics} seed {Seed}";
        Bitwise(Read(b, q), rotated, $"{what} rotated q");
        Assert.IsTrue(want.All(float.IsFinite) && want.Any(v => v != 0), $"{what}: the reference output is finite and not all zero");
        Bitwise(Read(b, got), want, $"{what} attention");
        for (var t = 0; t < n; t++)
        {
            using var paged = b.PagedCache(pool, table, slots[t]);
            var (p, c) = ((CpuLatentCache)paged, (CpuLatentCache)own[slots[t]]);
            Bitwise(p.Latent(positions[t]).ToArray(), c.Latent(positions[t]).ToArray(), $"{what} row {t} latent");
            Bitwise(p.Rope(positions[t]).ToArray(), c.Rope(positions[t]).ToArray(), $"{what} row {t} rotated key");
        }

        foreach (var c in own)
        {
            c.Dispose();
        }
    }

    // ------------------------------------------------------------------ refusals

    [TestMethod]
    public void UploadBlockTableRefusesTheWrongNumberOfEntries()
    {
        using var b = new CpuBackend();
        using var table = b.AllocateBlockTable(3, 4);
        var e = Assert.ThrowsExactly<ArgumentException>(() => b.UploadBlockTable(new int[11], table));
        StringAssert.Contains(e.Message, "[3, 4]");
        StringAssert.Contains(e.Message, "11");
        Assert.ThrowsExactly<ArgumentException>(() => b.UploadBlockTable(new int[13], table));
        b.UploadBlockTable(new int[12], table);
    }

    /// <summary>
    /// A ring of rows per slot (<see cref="IBackend.ScatterRows"/>, <see cref="IBackend.GatherRows"/>): each step row lands on
    /// row slot·ringRows + position mod ringRows, the other ring rows keep their values, and a gather reads them back in
    /// any order; a slot past the ring, a ring of no rows, another width and rows never uploaded are refused by name.
    /// </summary>
    [TestMethod]
    public void RingRowsLandAtTheirSlotAndPositionAndRefuseWhatTheyCannotAddress()
    {
        using var b = new CpuBackend();
        var r = new Random(8);
        const int Width = 5, RingRows = 4, Slots = 3;
        using var rows = b.AllocateStepRows(6);
        int[] slots = [2, 0, 0, 1, 2], positions = [7, 3, 4, 0, 9];
        b.UploadStepRows(new int[slots.Length], slots, positions, rows);
        var before = Normal(r, Slots * RingRows * Width);
        var values = Normal(r, slots.Length * Width);
        using var ring = b.Upload(before, Slots * RingRows, Width);
        using var source = b.Upload(values, slots.Length, Width);
        b.ScatterRows(source, rows, RingRows, ring);
        var after = new float[before.Length];
        b.Download(ring, after);
        // Ring rows written: slot 2 at 7 and 9 → rows 11 and 9; slot 0 at 3 and 4 → 3 and 0; slot 1 at 0 → 4.
        int[] landed = [11, 3, 0, 4, 9];
        var expected = (float[])before.Clone();
        for (var t = 0; t < landed.Length; t++)
        {
            values.AsSpan(t * Width, Width).CopyTo(expected.AsSpan(landed[t] * Width));
        }

        CollectionAssert.AreEqual(expected, after, "each row at its slot's ring row of its position, the rest unchanged");

        b.UploadStepRows([0, 0, 0], [1, 2, 0], [8, 13, 5], rows);
        using var gathered = b.Allocate(3, Width);
        b.GatherRows(ring, RingRows, rows, gathered);
        var got = new float[3 * Width];
        b.Download(gathered, got);
        CollectionAssert.AreEqual(new[] { 4, 9, 1 }.SelectMany(row => expected.Skip(row * Width).Take(Width)).ToArray(), got, "ring rows 4, 9 and 1 read back");

        b.UploadStepRows([0, 0], [0, 3], [0, 0], rows);
        using var two = b.Allocate(2, Width);
        var past = Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => b.GatherRows(ring, RingRows, rows, two));
        StringAssert.Contains(past.Message, "slot 3 has no rows");
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => b.ScatterRows(two, rows, RingRows, ring));
        b.UploadStepRows([0, 0], [0, 1], [0, 0], rows);
        var none = Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => b.GatherRows(ring, 0, rows, two));
        StringAssert.Contains(none.Message, "at least one row");
        using var narrow = b.Allocate(2, Width - 1);
        Assert.ThrowsExactly<ArgumentException>(() => b.ScatterRows(narrow, rows, RingRows, ring));
        var unset = Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => b.GatherRows(ring, RingRows, rows, gathered));
        StringAssert.Contains(unset.Message, "last upload has 2");
        b.Download(ring, after);
        CollectionAssert.AreEqual(expected, after, "a refused scatter writes nothing");
    }

    /// <summary>
    /// Step rows refuse a negative token, slot or position, mismatched lengths and more rows than they hold, keeping the last
    /// upload; the row operations refuse rows never uploaded, a token outside the embedding table, a slot outside the block
    /// table, and positions beyond the cache or the rotary table.
    /// </summary>
    [TestMethod]
    public void StepRowsRefuseWhatTheyCannotAddress()
    {
        using var b = new CpuBackend();
        var r = new Random(5);
        int lora = Dims.KvLora, rope = Dims.QkRope, width = lora + rope, qWidth = Dims.Heads * Dims.QkHead, oWidth = Dims.Heads * Dims.V;
        using var rows = b.AllocateStepRows(3);
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => b.UploadStepRows([0, 0], [0, -1], [0, 1], rows));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => b.UploadStepRows([0], [0], [-2], rows));
        var token = Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => b.UploadStepRows([4, -3], [0, 0], [0, 1], rows));
        StringAssert.Contains(token.Message, "token -3");
        Assert.ThrowsExactly<ArgumentException>(() => b.UploadStepRows([0, 0], [0, 1], [0], rows));
        Assert.ThrowsExactly<ArgumentException>(() => b.UploadStepRows([0], [0, 1], [0, 1], rows));
        var many = Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => b.UploadStepRows([0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 2, 3], rows));
        StringAssert.Contains(many.Message, "at most 3 rows");
        Assert.AreEqual(0, rows.Count, "a refused upload keeps nothing");
        b.UploadStepRows([5], [1], [7], rows);
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => b.UploadStepRows([0, 1], [0, 0], [0, -1], rows));
        Assert.AreEqual((1, 5, 1, 7), (rows.Count, rows.Tokens[0], rows.Slots[0], rows.Positions[0]), "a refused upload keeps the last one");

        using var embed = new CpuEmbeddingWeight(5, 4, Normal(r, 20));
        using var embedded = b.Allocate(1, 4);
        var vocab = Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => b.EmbeddingRows(embed, rows, embedded));
        StringAssert.Contains(vocab.Message, "token id 5");
        b.UploadStepRows([4], [1], [7], rows);
        b.EmbeddingRows(embed, rows, embedded);
        using var two = b.Allocate(2, 4);
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => b.EmbeddingRows(embed, rows, two));

        var pairs = rope / 2;
        using var ropeTable = b.UploadRope(Enumerable.Repeat(1f, 100 * pairs).ToArray(), new float[100 * pairs], 100, pairs);
        var kvNorm = new CpuNormWeight(lora, 1e-6f, Enumerable.Repeat(1f, lora).ToArray());
        var kvB = new CpuLinearWeight(Dims.Heads * Dims.KvBHead, lora, false, Normal(r, Dims.Heads * Dims.KvBHead * lora, 0.1f));
        using var pool = b.AllocateLatentPool(4, lora, rope);
        using var table = b.AllocateBlockTable(2, 2);
        b.UploadBlockTable([0, 1, 2, 3], table);
        using var q = b.Upload(Normal(r, 2 * qWidth), 2, qWidth);
        using var kv = b.Upload(Normal(r, 2 * width), 2, width);
        using var o = b.Allocate(2, oWidth);

        b.UploadStepRows([0], [1], [0], rows);
        var unset = Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => b.ApplyRopeRows(q, ropeTable, rows, Dims.QkHead, Dims.QkNope));
        StringAssert.Contains(unset.Message, "last upload has 1");
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => b.AppendLatentRows(kv, kvNorm, ropeTable, pool, table, rows));

        b.UploadStepRows([0, 0], [0, 2], [0, 1], rows);
        var slot = Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => b.AppendLatentRows(kv, kvNorm, ropeTable, pool, table, rows));
        StringAssert.Contains(slot.Message, "slot 2");
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => b.MlaAttentionRows(q, pool, table, rows, kvB, Dims, 0.3f, o));

        b.UploadStepRows([0, 0], [0, 1], [0, 128], rows);
        var cache = Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => b.AppendLatentRows(kv, kvNorm, ropeTable, pool, table, rows));
        StringAssert.Contains(cache.Message, "cache capacity 128");

        b.UploadStepRows([0, 0], [0, 1], [0, 100], rows);
        var angles = Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => b.ApplyRopeRows(q, ropeTable, rows, Dims.QkHead, Dims.QkNope));
        StringAssert.Contains(angles.Message, "rotary table");

        // In range, the same rows run.
        b.UploadStepRows([0, 0], [0, 1], [0, 99], rows);
        b.ApplyRopeRows(q, ropeTable, rows, Dims.QkHead, Dims.QkNope);
        b.AppendLatentRows(kv, kvNorm, ropeTable, pool, table, rows);
    }

    /// <summary>
    /// A cache copied into a longer one (a session growing, <see cref="IBackend.CopyLatentCache"/>) attends, by both forms, bit
    /// for bit as its source; a copy of 30 positions takes the first block and no other (reading position 64 of it fails until
    /// the rest is appended, and then it attends as the source); what cannot be copied is refused.
    /// </summary>
    [TestMethod]
    [DataRow(CpuNumerics.Float32)]
    [DataRow(CpuNumerics.GpuEmulation)]
    public void ACopiedCacheAttendsAsItsSource(CpuNumerics numerics)
    {
        using var b = new CpuBackend(numerics);
        var r = new Random(20261206);
        int lora = Dims.KvLora, rope = Dims.QkRope, row = lora + rope, qWidth = Dims.Heads * Dims.QkHead, oWidth = Dims.Heads * Dims.V;
        var (ropeTable, kvNorm, kvB) = AttentionWeights(b, r, 200);
        using var _ = ropeTable;
        var scale = 1f / MathF.Sqrt(Dims.QkHead);
        var kvValues = Normal(r, 70 * row, 2f);
        using var source = b.AllocateLatentCache(100, lora, rope);
        using (var kv = b.Upload(kvValues, 70, row))
        {
            b.AppendLatent(kv, kvNorm, ropeTable, source, 0);
        }

        using var q = b.Upload(Normal(r, qWidth), 1, qWidth);
        float[] Attend(LatentCache cache, bool absorbed)
        {
            using var o = b.Allocate(1, oWidth);
            if (absorbed)
            {
                b.MlaAttentionAbsorbed(q, cache, kvB, Dims, 69, scale, o);
            }
            else
            {
                b.MlaAttentionNaive(q, cache, kvB, Dims, 69, scale, o);
            }

            return Read(b, o);
        }

        using var whole = b.AllocateLatentCache(200, lora, rope);
        b.CopyLatentCache(source, whole, 70);
        using var part = b.AllocateLatentCache(128, lora, rope);
        b.CopyLatentCache(source, part, 30);
        Assert.ThrowsExactly<InvalidOperationException>(() => Attend(part, absorbed: true), "position 64 was not copied");
        using (var kv = b.Upload(kvValues.AsSpan(30 * row).ToArray(), 40, row))
        {
            b.AppendLatent(kv, kvNorm, ropeTable, part, 30);
        }

        foreach (var absorbed in new[] { false, true })
        {
            var want = Attend(source, absorbed);
            CollectionAssert.AreEqual(want, Attend(whole, absorbed), $"{numerics}, absorbed {absorbed}: the whole copy");
            CollectionAssert.AreEqual(want, Attend(part, absorbed), $"{numerics}, absorbed {absorbed}: 30 copied, 40 appended");
        }

        using var empty = b.AllocateLatentCache(200, lora, rope);
        Assert.ThrowsExactly<InvalidOperationException>(() => b.CopyLatentCache(empty, whole, 1), "a position never written");
        var over = Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => b.CopyLatentCache(source, whole, 101), "more than the source holds");
        StringAssert.Contains(over.Message, "101 positions copied from a cache of 100 into one of 200");
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => b.CopyLatentCache(whole, part, 129), "more than the destination holds");
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => b.CopyLatentCache(source, whole, -1));
        using var narrow = b.AllocateLatentCache(200, lora, rope + 2);
        Assert.ThrowsExactly<ArgumentException>(() => b.CopyLatentCache(source, narrow, 10), "other widths");
        using var pool = b.AllocateLatentPool(4, lora, rope);
        using var table = b.AllocateBlockTable(1, 4);
        using var view = b.PagedCache(pool, table, 0);
        var e = Assert.ThrowsExactly<ArgumentException>(() => b.CopyLatentCache(source, view, 10));
        StringAssert.Contains(e.Message, "paged view");
        Assert.ThrowsExactly<ArgumentException>(() => b.CopyLatentCache(view, whole, 0));
    }

    [TestMethod]
    public void PagedCacheRefusesARequestOutsideTheTable()
    {
        using var b = new CpuBackend();
        using var pool = b.AllocateLatentPool(4, Dims.KvLora, Dims.QkRope);
        using var table = b.AllocateBlockTable(3, 2);
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => b.PagedCache(pool, table, 3));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => b.PagedCache(pool, table, -1));
        using var last = b.PagedCache(pool, table, 2);
        Assert.AreEqual(2 * PagedLatentCache.BlockSize, last.Capacity);
    }

    /// <summary>
    /// Request 0 owns block 1 for positions 0..63 and block 3 for 64..127 until the table drops the second: then attention
    /// over position 64+ and an append there fail plainly, as does reading an assigned block never written.
    /// </summary>
    [TestMethod]
    public void PositionsInNoBlockAndBlocksNeverWrittenAreRefused()
    {
        using var b = new CpuBackend();
        var r = new Random(3);
        int lora = Dims.KvLora, rope = Dims.QkRope, row = lora + rope, qWidth = Dims.Heads * Dims.QkHead, oWidth = Dims.Heads * Dims.V;
        var pairs = rope / 2;
        using var ropeTable = b.UploadRope(Enumerable.Repeat(1f, 256 * pairs).ToArray(), new float[256 * pairs], 256, pairs);
        var kvNorm = new CpuNormWeight(lora, 1e-6f, Enumerable.Repeat(1f, lora).ToArray());
        var kvB = new CpuLinearWeight(Dims.Heads * Dims.KvBHead, lora, false, Normal(r, Dims.Heads * Dims.KvBHead * lora, 0.1f));
        using var pool = b.AllocateLatentPool(4, lora, rope);
        using var table = b.AllocateBlockTable(2, 3);
        using var cache = b.PagedCache(pool, table, 0);
        int[] entries = [1, 3, -1, 0, -1, -1];
        b.UploadBlockTable(entries, table);
        using (var kv = b.Upload(Normal(r, 70 * row), 70, row))
        {
            b.AppendLatent(kv, kvNorm, ropeTable, cache, 0);
        }

        using var q1 = b.Upload(Normal(r, qWidth), 1, qWidth);
        using var o1 = b.Allocate(1, oWidth);
        b.MlaAttentionNaive(q1, cache, kvB, Dims, 69, 0.3f, o1);
        b.MlaAttentionAbsorbed(q1, cache, kvB, Dims, 69, 0.3f, o1);

        entries[1] = -1;
        b.UploadBlockTable(entries, table);
        Assert.ThrowsExactly<InvalidOperationException>(() => b.MlaAttentionNaive(q1, cache, kvB, Dims, 69, 0.3f, o1), "naive reads position 64");
        Assert.ThrowsExactly<InvalidOperationException>(() => b.MlaAttentionAbsorbed(q1, cache, kvB, Dims, 69, 0.3f, o1), "absorbed reads position 64");
        b.MlaAttentionAbsorbed(q1, cache, kvB, Dims, 63, 0.3f, o1); // positions 0..63 are still addressable
        using (var kv = b.Upload(Normal(r, row), 1, row))
        {
            Assert.ThrowsExactly<InvalidOperationException>(() => b.AppendLatent(kv, kvNorm, ropeTable, cache, 64), "append into no block");
        }

        // Request 1's block 0 is assigned but nothing was written to it.
        using var other = b.PagedCache(pool, table, 1);
        Assert.ThrowsExactly<InvalidOperationException>(() => b.MlaAttentionNaive(q1, other, kvB, Dims, 0, 0.3f, o1), "a block read before any write");
    }

    [TestMethod]
    public void MoeGateRefusesASmallerRoutingAndFillsTheFirstTokensOfALargerOne()
    {
        using var b = new CpuBackend();
        var r = new Random(9);
        int tokens = 3, width = 16;
        var options = new GateOptions(8, 2, 1, 2, Normalize: true, ScalingFactor: 1.5f);
        var gate = new CpuGateWeight(width, options, Normal(r, options.Experts * width), Normal(r, options.Experts, 0.1f));
        using var x = b.Upload(Normal(r, tokens * width), tokens, width);

        using var small = b.AllocateRouting(tokens - 1, options.Experts, options.TopK);
        var e = Assert.ThrowsExactly<ArgumentException>(() => b.MoeGate(x, gate, small));
        StringAssert.Contains(e.Message, "shape mismatch");

        using var exact = b.AllocateRouting(tokens, options.Experts, options.TopK);
        using var large = b.AllocateRouting(tokens + 4, options.Experts, options.TopK);
        b.MoeGate(x, gate, exact);
        b.MoeGate(x, gate, large);
        var (s1, i1, w1) = Download(b, exact, tokens + 0, options);
        var (s2, i2, w2) = Download(b, large, tokens + 4, options);
        CollectionAssert.AreEqual(s1, s2[..(tokens * options.Experts)], "scores of the first T tokens");
        CollectionAssert.AreEqual(i1, i2[..(tokens * options.TopK)], "experts of the first T tokens");
        CollectionAssert.AreEqual(w1, w2[..(tokens * options.TopK)], "weights of the first T tokens");
        Assert.IsTrue(s2[(tokens * options.Experts)..].All(v => v == 0), "rows past T are not written");

        // The expert picks are the router's own for each row.
        var xs = Read(b, x);
        for (var t = 0; t < tokens; t++)
        {
            var scores = new float[options.Experts];
            var idx = new int[options.TopK];
            var w = new float[options.TopK];
            Router.Route(xs.AsSpan(t * width, width), gate.Weight, gate.Bias, options, scores, idx, w);
            CollectionAssert.AreEqual(idx, i2[(t * options.TopK)..((t + 1) * options.TopK)], $"token {t} experts");
        }
    }

    private static (float[] Scores, int[] Indices, float[] Weights) Download(IBackend b, Routing routing, int tokens, GateOptions options)
    {
        var s = new float[tokens * options.Experts];
        var i = new int[tokens * options.TopK];
        var w = new float[tokens * options.TopK];
        b.DownloadRouting(routing, s, i, w);
        return (s, i, w);
    }
}
