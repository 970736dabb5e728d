using System.Runtime.InteropServices;
using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Kernels;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Numerics;
using DeepSeekCuda.Loader.Synthetic;
using DeepSeekCuda.Model;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>
/// Cache append, then fold → decode (split-KV + combine) → unfold, against the CPU backend on fresh random inputs:
/// a batch of requests with ragged lengths (1, not multiples of 64, past original_max_position_embeddings),
/// physical blocks in shuffled order, tokens appended in shuffled order, s_q 1 and 2, F32 and BF16 inputs,
/// one split, the device's default and a forced 7. The paged cache is gathered into the CPU backend's contiguous
/// CpuLatentCache, so the reference attends over exactly the BF16 values the kernel reads.
/// </summary>
[TestClass]
[TestCategory("Gpu")]
public sealed class MlaGpuTests : GpuTestBase
{
    public static IEnumerable<object[]> Cases =>
        from name in new[] { "tiny", "tiny-a", "v3-16", "v3-128" }
        from qTokens in new[] { 1, 2 }
        from type in new[] { ElementType.BF16, ElementType.F32 }
        where name != "v3-128" || type == ElementType.BF16
        select new object[] { name, qTokens, type.ToString() };

    private static (ModelConfig Config, int Heads, int[] Lengths) Shape(string name) => name switch
    {
        // Tiny preset: original_max_position_embeddings 128, latent 80 (10 column tiles), rope 16, 3 heads.
        "tiny" => (ModelPresets.Tiny, 3, [1, 63, 130, 300, 64, 2]),
        // tiny-a: original 64, latent 128, rope 64, 4 heads.
        "tiny-a" => (ModelConfig.Load(Path.Combine(SharedData.TinyAModel, "config.json")), 4, [1, 200, 64, 129]),
        // DeepSeek-V3 widths, 16 heads (one 16-row group per request) and 128 heads (64-row groups); 4097 > 4096.
        "v3-16" => (ModelPresets.DeepSeekV3, 16, [1, 65, 700, 4097]),
        "v3-128" => (ModelPresets.DeepSeekV3, 128, [3, 1000, 4100]),
        _ => throw new ArgumentException(name),
    };

    [TestMethod]
    [DynamicData(nameof(Cases))]
    public void AppendThenDecodeMatchesCpu(string name, int qTokens, string typeName)
    {
        var type = Enum.Parse<ElementType>(typeName);
        var (config, heads, lengths) = Shape(name);
        Run(config, heads, [.. lengths.Select(l => Math.Max(l, qTokens))], qTokens, type, seed: name.Length * 100 + qTokens * 10 + (int)type, nanRequest: -1);
    }

    [TestMethod]
    public void NaNAndInfInTheCacheStayInTheirRowsAsOnTheCpu() =>
        Run(ModelPresets.Tiny, 3, [40, 100, 7], 2, ElementType.BF16, seed: 5, nanRequest: 1);

    private void Run(ModelConfig config, int heads, int[] lengths, int qTokens, ElementType type, int seed, int nanRequest)
    {
        var shape = LatentShape.Of(config);
        int d = shape.RowWidth, lora = shape.Latent, rope = shape.Rope, nope = config.QkNopeHeadDim, v = config.VHeadDim;
        var what = $"latent {lora}+{rope} heads {heads} s_q {qTokens} {type} lengths [{string.Join(",", lengths)}]";
        var r = Rng(seed);
        var batch = lengths.Length;

        // Block table: every request's logical blocks get physical blocks in a shuffled order; 2 blocks stay unused.
        var maxBlocks = lengths.Max(PagedLatentCache.BlocksFor) + 1;
        var numBlocks = lengths.Sum(PagedLatentCache.BlocksFor) + 2;
        var perm = Enumerable.Range(0, numBlocks).OrderBy(_ => r.Next()).ToArray();
        var table = Enumerable.Repeat(-1, batch * maxBlocks).ToArray();
        var next = 0;
        for (var q = 0; q < batch; q++)
        {
            for (var b = 0; b < PagedLatentCache.BlocksFor(lengths[q]); b++)
            {
                table[q * maxBlocks + b] = perm[next++];
            }
        }

        // ---- append: every token of every request, in shuffled order
        var tokens = (from q in Enumerable.Range(0, batch) from p in Enumerable.Range(0, lengths[q]) select (Req: q, Pos: p)).OrderBy(_ => r.Next()).ToArray();
        var kv = Normal(r, tokens.Length * d);
        var normW = Normal(r, lora, 0.1f).Select(x => 1 + x).ToArray();
        var maxLen = lengths.Max();
        var (cos, sin) = YarnRope.Table(config, maxLen);
        using var cacheK = new MlaCacheKernel(Device, Compiler);
        using var dec = new MlaDecodeKernel(Device, Compiler);
        using var kvD = Upload(kv, type);
        using var normD = Upload(normW, ElementType.BF16);
        using var cosD = DeviceBuffer<float>.From(Device, cos, Stream);
        using var sinD = DeviceBuffer<float>.From(Device, sin, Stream);
        using var reqD = DeviceBuffer<int>.From(Device, tokens.Select(t => t.Req).ToArray(), Stream);
        using var posD = DeviceBuffer<int>.From(Device, tokens.Select(t => t.Pos).ToArray(), Stream);
        using var tableD = DeviceBuffer<int>.From(Device, table, Stream);
        using var lengthsD = DeviceBuffer<int>.From(Device, lengths, Stream);
        // NaN everywhere first: rows the append must write, and unused rows (block tails, spare blocks) that the decode
        // kernel must never read.
        using var cache = Poisoned((long)numBlocks * PagedLatentCache.BlockSize * d, ElementType.BF16);
        cacheK.Append(Stream, shape, Rows(kvD, type, tokens.Length, d), Rows(normD, ElementType.BF16, 1, lora), (float)config.RmsNormEps,
            new RopeTableView(cosD.Pointer, sinD.Pointer, maxLen, rope / 2), new DeviceInts(reqD.Pointer, tokens.Length), new DeviceInts(posD.Pointer, tokens.Length),
            new LatentPages(cache.Pointer, tableD.Pointer, maxBlocks));
        var paged = MemoryMarshal.Cast<byte, ushort>(cache.ToArray(Stream)).ToArray();

        var cpu = new CpuBackend();
        var ropeTable = cpu.UploadRope(cos, sin, maxLen, rope / 2);
        var norm = new CpuNormWeight(lora, (float)config.RmsNormEps, normW);
        var rowOf = new Dictionary<(int, int), int>();
        for (var i = 0; i < tokens.Length; i++)
        {
            rowOf[tokens[i]] = i;
        }

        var gathered = new float[batch][];
        for (var q = 0; q < batch; q++)
        {
            var len = lengths[q];
            var kvRows = new float[len * d];
            for (var p = 0; p < len; p++)
            {
                kv.AsSpan(rowOf[(q, p)] * d, d).CopyTo(kvRows.AsSpan(p * d));
            }

            var c = (CpuLatentCache)cpu.AllocateLatentCache(len, lora, rope);
            cpu.AppendLatent(cpu.Upload(kvRows, len, d), norm, ropeTable, c, 0);
            var expected = new float[len * d];
            for (var p = 0; p < len; p++)
            {
                c.Latent(p).CopyTo(expected.AsSpan(p * d));
                c.Rope(p).CopyTo(expected.AsSpan(p * d + lora));
            }

            BFloat16.Round(expected);
            gathered[q] = new float[len * d];
            PagedLatentCache.Gather(paged, table, maxBlocks, q, len, shape, gathered[q]);
            // The GPU sums squares in another order and may contract to FMA: one BF16 step (2^-8 relative) at most.
            Tolerance.AssertClose(gathered[q], expected, 1e-6, 1.0 / 128, $"append request {q} {what}");
        }

        if (nanRequest >= 0)
        {
            // Key 0 is visible to every query of a request. A NaN latent value poisons every score and value of request
            // nanRequest; +Inf in a rope value of the next request makes a row's score at key 0 +Inf (whole row NaN, as
            // softmax gives inf - inf) or -Inf (weight 0, the row stays finite) by the sign of the row's q_pe element.
            var offset = PagedLatentCache.RowOffset(table, maxBlocks, nanRequest, 0, d) + 3;
            paged[offset] = 0x7FC0;
            gathered[nanRequest][3] = float.NaN;
            offset = PagedLatentCache.RowOffset(table, maxBlocks, nanRequest + 1, 0, d) + lora + 1;
            paged[offset] = 0x7F80;
            gathered[nanRequest + 1][lora + 1] = float.PositiveInfinity;
            cache.Upload(MemoryMarshal.AsBytes(paged.AsSpan()), Stream);
        }

        // ---- attention inputs: q [batch, s_q, heads, nope + rope] (rope part taken as rotated), kv_b BF16
        var rowsTotal = batch * qTokens * heads;
        var qv = Normal(r, rowsTotal * (nope + rope));
        var wkvb = Normal(r, heads * (nope + v) * lora, 1f / MathF.Sqrt(nope));
        using var qD = Upload(qv, type);
        using var wD = Upload(wkvb, ElementType.BF16);
        using var qAbs = Poisoned((long)rowsTotal * d, ElementType.BF16);
        int queries = batch * qTokens;
        var projections = new MlaHeadDims(heads, nope, v);
        var weight = Rows(wD, ElementType.BF16, heads * (nope + v), lora);
        var pages = new LatentPages(cache.Pointer, tableD.Pointer, maxBlocks);
        var lengthsView = new DeviceInts(lengthsD.Pointer, batch);
        var qAbsRows = Rows(qAbs, ElementType.BF16, queries, heads * d);
        dec.Fold(Stream, shape, projections, Rows(qD, type, queries, heads * (nope + rope)), weight, qAbsRows);
        var qAbsHost = Read(qAbs, ElementType.BF16, Stream);
        AssertFold(qv, wkvb, qAbsHost, heads, nope, v, shape, what);

        var scale = (float)config.SoftmaxScale;
        var dims = new MlaDims(heads, nope, rope, v, lora);
        var kvB = new CpuLinearWeight(heads * (nope + v), lora, false, wkvb);
        var refOut = new float[rowsTotal * v];
        var refLatent = new float[rowsTotal * lora];
        var refLse = new float[rowsTotal];
        for (var q = 0; q < batch; q++)
        {
            var len = lengths[q];
            var c = new CpuLatentCache(len, lora, rope);
            for (var p = 0; p < len; p++)
            {
                gathered[q].AsSpan(p * d, lora).CopyTo(c.Latent(p, write: true));
                gathered[q].AsSpan(p * d + lora, rope).CopyTo(c.Rope(p, write: true));
            }

            var qRows = cpu.Upload(qv.AsSpan(q * qTokens * heads * (nope + rope), qTokens * heads * (nope + rope)), qTokens, heads * (nope + rope));
            var o = cpu.Allocate(qTokens, heads * v);
            cpu.MlaAttentionAbsorbed(qRows, c, kvB, dims, len - qTokens, scale, o);
            cpu.Download(o, refOut.AsSpan(q * qTokens * heads * v, qTokens * heads * v));
            for (var i = 0; i < qTokens; i++)
            {
                for (var h = 0; h < heads; h++)
                {
                    var row = (q * qTokens + i) * heads + h;
                    refLse[row] = Attend(qAbsHost.AsSpan(row * d, d), gathered[q], len - qTokens + i + 1, d, lora, scale, refLatent.AsSpan(row * lora, lora));
                }
            }
        }

        // ---- decode with one split, the device's choice, and 7 (more than the short requests can fill: empty splits)
        var auto = dec.DefaultSplits(shape, batch, heads, qTokens, maxLen);
        foreach (var splits in new[] { 1, auto, 7 }.Distinct())
        {
            var sw = $"{what} splits {splits}";
            using var latent = Poisoned((long)rowsTotal * lora, ElementType.F32);
            using var lse = Poisoned(rowsTotal, ElementType.F32);
            using var outV = Poisoned((long)rowsTotal * v, ElementType.F32);
            using var workspace = DeviceBuffer<byte>.Allocate(Device, Math.Max(4, MlaDecodeKernel.WorkspaceBytes(shape, batch, heads, qTokens, splits)));
            workspace.Fill32(NaNPattern, Stream);
            var latentRows = Rows(latent, ElementType.F32, queries, heads * lora);
            dec.Decode(Stream, shape, heads, qAbsRows, pages, lengthsView, null, scale, latentRows, Rows(lse, ElementType.F32, queries, heads), splits,
                workspace.Pointer);
            dec.Unfold(Stream, shape, projections, latentRows, weight, Rows(outV, ElementType.F32, queries, heads * v));

            // Against an fp64 softmax over the same BF16 q_abs and cache values: the kernel differs by P rounded to
            // BF16 before P·V (2^-9 relative per weight) and fp32 accumulation.
            Tolerance.AssertRmsRel(Read(latent, ElementType.F32, Stream), refLatent, 4e-3, $"latent output {sw}");
            Tolerance.AssertMaxRel(Read(latent, ElementType.F32, Stream), refLatent, 1e-2, $"latent output {sw}");
            Tolerance.AssertClose(Read(lse, ElementType.F32, Stream), refLse, 1e-3, 1e-4, $"lse {sw}");

            // Against CpuBackend.MlaAttentionAbsorbed (fp32 fold, fp32 P): adds q_abs rounded to BF16 (2^-9 relative per
            // element, moving scores by about 2^-9·|score|/sqrt(latent)) to the differences above.
            var outHost = Read(outV, ElementType.F32, Stream);
            Tolerance.AssertRmsRel(outHost, refOut, 1e-2, $"attention output {sw}");
            Tolerance.AssertMaxRel(outHost, refOut, 3e-2, $"attention output {sw}");
            if (nanRequest >= 0)
            {
                for (var row = 0; row < rowsTotal; row++)
                {
                    var q = row / (qTokens * heads);
                    var expectNaN = q == nanRequest || (q == nanRequest + 1 && qAbsHost[row * d + lora + 1] > 0);
                    var nans = outHost.AsSpan(row * v, v).ToArray().Count(float.IsNaN);
                    Assert.AreEqual(expectNaN ? v : 0, nans, $"NaN outputs of request {q} row {row} {sw}");
                }
            }
        }

        // The unfold's BF16 store (what o_proj's activation quantizer may read): the F32 result rounded once more.
        using var latentB = Poisoned((long)rowsTotal * lora, ElementType.F32);
        using var lseB = Poisoned(rowsTotal, ElementType.F32);
        using var outB = Poisoned((long)rowsTotal * v, ElementType.BF16);
        var lseRows = Rows(lseB, ElementType.F32, queries, heads);
        dec.Decode(Stream, shape, heads, qAbsRows, pages, lengthsView, null, scale, Rows(latentB, ElementType.F32, queries, heads * lora), lseRows);
        dec.Unfold(Stream, shape, projections, Rows(latentB, ElementType.F32, queries, heads * lora), weight, Rows(outB, ElementType.BF16, queries, heads * v));
        Tolerance.AssertRmsRel(Read(outB, ElementType.BF16, Stream), refOut, 1.2e-2, $"attention output bf16 {what}");

        // The decode kernel also takes F32 queries (rounded to BF16 on load): same q_abs values, same result.
        using var qAbsF = Upload(qAbsHost, ElementType.F32);
        using var latentF = Poisoned((long)rowsTotal * lora, ElementType.F32);
        dec.Decode(Stream, shape, heads, Rows(qAbsF, ElementType.F32, queries, heads * d), pages, lengthsView, null, scale,
            Rows(latentF, ElementType.F32, queries, heads * lora), lseRows);
        Tolerance.AssertClose(Read(latentF, ElementType.F32, Stream), Read(latentB, ElementType.F32, Stream), 0, 0, $"f32 queries {what}");
    }

    /// <summary>q_abs = [q_nope · W_UK | q_pe] in fp64 against the kernel's BF16 store: one BF16 rounding (2^-8 relative, with
    /// an absolute floor for sums that cancel).</summary>
    internal static void AssertFold(float[] q, float[] w, float[] qAbs, int heads, int nope, int v, LatentShape shape, string what)
    {
        int qw = nope + shape.Rope, d = shape.RowWidth;
        var expected = new float[qAbs.Length];
        for (var row = 0; row < qAbs.Length / d; row++)
        {
            var h = row % heads;
            for (var c = 0; c < shape.Latent; c++)
            {
                double acc = 0;
                for (var k = 0; k < nope; k++)
                {
                    acc += (double)q[row * qw + k] * w[((long)h * (nope + v) + k) * shape.Latent + c];
                }

                expected[row * d + c] = (float)acc;
            }

            for (var e = 0; e < shape.Rope; e++)
            {
                expected[row * d + shape.Latent + e] = BFloat16.Round(q[row * qw + nope + e]);
            }
        }

        Tolerance.AssertClose(qAbs, expected, 1e-4, 1.0 / 128, $"fold {what}");
    }

    /// <summary>fp64 softmax attention of one absorbed query over the first <paramref name="visible"/> rows; writes the
    /// latent output and returns the natural-log LSE of the scaled scores. NaN propagates as in the kernel.</summary>
    private static float Attend(ReadOnlySpan<float> q, float[] rows, int visible, int d, int lora, float scale, Span<float> latent)
    {
        var s = new double[visible];
        var max = double.NegativeInfinity;
        for (var j = 0; j < visible; j++)
        {
            double acc = 0;
            for (var c = 0; c < d; c++)
            {
                acc += (double)q[c] * rows[j * d + c];
            }

            s[j] = acc * scale;
            max = Math.Max(max, s[j]);
        }

        double sum = 0;
        var o = new double[lora];
        for (var j = 0; j < visible; j++)
        {
            var e = Math.Exp(s[j] - max);
            sum += e;
            for (var c = 0; c < lora; c++)
            {
                o[c] += e * rows[j * d + c];
            }
        }

        for (var c = 0; c < lora; c++)
        {
            latent[c] = (float)(o[c] / sum);
        }

        return (float)(max + Math.Log(sum));
    }
}
