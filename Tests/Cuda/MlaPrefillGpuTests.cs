using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Kernels;
using DeepSeekCuda.Loader.Numerics;
using DeepSeekCuda.Loader.Synthetic;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>
/// MLA prefill on the GPU (gather → act_quant → kv_b fp8_gemm → attention, the launcher's pipeline) against
/// CpuBackend.MlaAttentionNaive in GpuEmulation, per request, over the paged cache gathered back into a
/// contiguous CpuLatentCache. Fresh random inputs; blocks randomly permuted; unused cache rows and block-table
/// entries poisoned (NaN rows, -1 entries) so a read past a context shows; outputs poisoned with NaN first.
/// Without a device every test ends Inconclusive (GpuTestBase).
/// </summary>
[TestClass]
[TestCategory("Gpu")]
public sealed class MlaPrefillGpuTests : GpuTestBase
{
    // Both sides see the same bf16 q and cache and the same fp8-quantized latents; kv = bf16(kv_b(latent)) may
    // differ by one bf16 step (2^-8 relative) where the two fp32 GEMM orders straddle a rounding tie
    // (Fp8GemmGpuTests). The softmax differs in where P is rounded to bf16: the reference rounds the normalized
    // probabilities, the kernel the unnormalized exp(s - running max) (each 2^-9 relative), and the output is
    // rounded to bf16 on both sides (2^-9). An output element is a convex combination of v (|v| ≲ 5 here), so
    // the worst element is bounded by a few bf16 steps of |v|: atol 0.03 + rtol 1/64 per element, and the
    // independent per-term roundings average out to rms_rel ≈ 2e-3, asserted ≤ 6e-3. A masking error (one key
    // too many or too few) or a wrong block moves rows of short contexts by O(|v|), far past both bounds.
    private const double Atol = 0.03;
    private const double Rtol = 1.0 / 64;
    private const double RmsRel = 6e-3;

    private static readonly MlaPrefillShape OddShape = new(30, 14, 38, 70); // q.k 44 → padded to 48, v 38 → 40

    [TestMethod]
    public void FreshPromptsOfRaggedLengths() =>
        Check(MlaPrefillShape.TinyPreset, 3, ModelPresets.Tiny.SoftmaxScale, [(0, 1), (0, 63), (0, 65), (0, 200)], seed: 1);

    [TestMethod]
    public void ChunksOverCachedPrefixesBeyondTheOriginalContext() =>
        // Tiny's original_max_position_embeddings is 128: positions here reach 314.
        Check(MlaPrefillShape.TinyPreset, 3, ModelPresets.Tiny.SoftmaxScale, [(250, 65), (64, 64), (1, 130), (127, 1), (200, 3)], seed: 2);

    [TestMethod]
    public void NonFiniteValuesReachExactlyTheQueriesThatSeeThem() =>
        Check(MlaPrefillShape.TinyPreset, 3, ModelPresets.Tiny.SoftmaxScale, [(10, 90), (0, 70)], seed: 3, injectNaN: true);

    [TestMethod]
    public void TinyAGeometry() =>
        Check(MlaPrefillShape.TinyA, 4, 0.2f, [(0, 100), (37, 91), (5, 1)], seed: 4);

    [TestMethod]
    public void PaddedHeadDims() =>
        Check(OddShape, 2, 0.15f, [(0, 129), (70, 20)], seed: 5, injectNaN: true);

    [TestMethod]
    public void DeepSeekV3GeometryAtASmallContext() =>
        // 128 heads, q.k 192, v 128, latent 512, the model's softmax scale (mscale² included).
        Check(MlaPrefillShape.V3, 128, ModelPresets.DeepSeekV3.SoftmaxScale, [(0, 70), (60, 9)], seed: 6);

    private void Check(MlaPrefillShape shape, int heads, double scaleD, (int Start, int Len)[] requests, int seed, bool injectNaN = false)
    {
        var scale = (float)scaleD;
        var r = Rng(seed);
        int nReq = requests.Length, lora = shape.KvLora, ropeDim = shape.QkRope, row = shape.CacheRow;
        int qkHead = shape.QkHead, kvHead = shape.KvHead, dv = shape.V, page = PagedLatentCache.BlockSize;

        var ctx = requests.Select(q => q.Start + q.Len).ToArray();
        var cuQ = new int[nReq + 1];
        var cuKv = new int[nReq + 1];
        for (var i = 0; i < nReq; i++)
        {
            cuQ[i + 1] = cuQ[i] + requests[i].Len;
            cuKv[i + 1] = cuKv[i] + ctx[i];
        }

        // Blocks: each request's blocks drawn from a random permutation, plus spare blocks nobody owns.
        var maxBlocks = ctx.Max(c => PagedLatentCache.BlocksFor(c)) + 1;
        var used = ctx.Sum(c => PagedLatentCache.BlocksFor(c));
        var numBlocks = used + 3;
        var perm = Enumerable.Range(0, numBlocks).ToArray();
        r.Shuffle(perm);
        var table = new int[nReq * maxBlocks];
        Array.Fill(table, -1); // entries past a context: reading one faults
        var next = 0;
        for (var i = 0; i < nReq; i++)
        {
            for (var b = 0; b < PagedLatentCache.BlocksFor(ctx[i]); b++)
            {
                table[i * maxBlocks + b] = perm[next++];
            }
        }

        // The paged cache: NaN everywhere, then each context row random (latent, rotated k_pe).
        var cache = new float[(long)numBlocks * page * row];
        Array.Fill(cache, float.NaN);
        long RowOf(int req, int pos) => PagedLatentCache.RowOffset(table, maxBlocks, req, pos, row);
        for (var i = 0; i < nReq; i++)
        {
            for (var j = 0; j < ctx[i]; j++)
            {
                Normal(r, row).CopyTo(cache.AsSpan((int)RowOf(i, j), row));
            }
        }

        var q = Normal(r, cuQ[nReq] * heads * qkHead);
        int nanReq = 0, nanPos = -1;
        if (injectNaN)
        {
            // A NaN in one key's k_pe: every query at or after it (all heads) is NaN, every earlier one finite,
            // including earlier queries of the same 64-key tile (the mask is a select, not an add).
            nanPos = requests[nanReq].Start + requests[nanReq].Len / 2;
            cache[RowOf(nanReq, nanPos) + lora + 1] = float.NaN;
            // And one q element (last request, its first query, head heads-1): that (token, head) row is NaN.
            q[(cuQ[nReq - 1] * heads + heads - 1) * qkHead + 3] = float.NaN;
            // And +Inf in head 0 of the same query: ±Inf scores (NaN where a k_nope is 0), whose softmax is
            // NaN on both sides (Inf − Inf, or −Inf − (−Inf) when every visible score is −Inf).
            q[cuQ[nReq - 1] * heads * qkHead + 5] = float.PositiveInfinity;
        }

        // kv_b: fp8 codes of normal values with 128x128 block scales ~ 1/sqrt(latent), so kv ~ N(0, 1).
        int n = heads * kvHead, kb = Fp8GemmKernel.BlocksFor(lora), nb = Fp8GemmKernel.BlocksFor(n);
        var codes = new byte[(long)n * lora];
        var gauss = Normal(r, 4096);
        for (long i = 0; i < codes.Length; i++)
        {
            codes[i] = Fp8E4M3.FromFloat(2f * gauss[(int)(i % 4093)] * (float)(0.5 + r.NextDouble()));
        }

        var sb = new float[nb * kb];
        for (var i = 0; i < sb.Length; i++)
        {
            sb[i] = (float)((0.35 + 0.3 * r.NextDouble()) / Math.Sqrt(lora));
        }

        var w = new float[(long)n * lora];
        Dequantize.Fp8Blocks(codes, sb, n, lora, 128, 128, w);

        // ---- GPU (uploads round cache and q to bf16 in place: the reference then sees the same values).
        using var cacheD = Upload(cache, ElementType.BF16);
        using var qD = Upload(q, ElementType.BF16);
        using var tableD = DeviceBuffer<int>.From(Device, table, Stream);
        using var cuQD = DeviceBuffer<int>.From(Device, cuQ, Stream);
        using var cuKvD = DeviceBuffer<int>.From(Device, cuKv, Stream);
        using var codesD = DeviceBuffer<byte>.From(Device, codes, Stream);
        using var sbD = DeviceBuffer<float>.From(Device, sb, Stream);
        using var kernel = new MlaPrefillKernel(Device, Compiler);
        using var quant = new ActQuantKernel(Device, Compiler);
        using var gemm = new Fp8GemmKernel(Device, Compiler);

        var totalKv = cuKv[nReq];
        using var latentD = Poisoned((long)totalKv * lora, ElementType.BF16);
        var pages = new LatentPages(cacheD.Pointer, tableD.Pointer, maxBlocks);
        kernel.Gather(Stream, shape, pages, new DeviceInts(cuKvD.Pointer, nReq + 1), ctx.Max(), Rows(latentD, ElementType.BF16, totalKv, lora));
        var latent = Read(latentD, ElementType.BF16, Stream);
        var expectLatent = new float[(long)totalKv * lora];
        for (var i = 0; i < nReq; i++)
        {
            for (var j = 0; j < ctx[i]; j++)
            {
                cache.AsSpan((int)RowOf(i, j), lora).CopyTo(expectLatent.AsSpan((cuKv[i] + j) * lora));
            }
        }

        CollectionAssert.AreEqual(expectLatent, latent, "gathered latents differ from the paged rows (bit-exact copy expected)");

        using var xq = DeviceBuffer<byte>.Allocate(Device, (long)totalKv * lora);
        using var xs = DeviceBuffer<float>.Allocate(Device, (long)totalKv * kb);
        var latentQ = new Fp8Rows(xq.Pointer, xs.Pointer, totalKv, lora);
        quant.Launch(Stream, Rows(latentD, ElementType.BF16, totalKv, lora), latentQ);
        using var kvD = Poisoned((long)totalKv * n, ElementType.BF16);
        gemm.Launch(Stream, latentQ, new Fp8Linear(codesD.Pointer, sbD.Pointer, n, lora), Rows(kvD, ElementType.BF16, totalKv, n));

        var outElems = cuQ[nReq] * heads * dv;
        using var outD = Poisoned(outElems, ElementType.BF16);
        kernel.Attention(Stream, shape, heads, Rows(qD, ElementType.BF16, cuQ[nReq], heads * shape.QkHead), pages, new DeviceInts(cuQD.Pointer, nReq + 1),
            new DeviceInts(cuKvD.Pointer, nReq + 1), Rows(kvD, ElementType.BF16, totalKv, n), requests.Max(x => x.Len), scale, Rows(outD, ElementType.BF16, cuQ[nReq], heads * dv));
        var got = Read(outD, ElementType.BF16, Stream);

        // ---- CPU reference per request over the gathered contiguous cache.
        var cpu = new CpuBackend(CpuNumerics.GpuEmulation);
        var dims = new MlaDims(heads, shape.QkNope, ropeDim, dv, lora);
        var kvB = new CpuLinearWeight(n, lora, true, w);
        var expected = new float[outElems];
        for (var i = 0; i < nReq; i++)
        {
            var (start, len) = requests[i];
            var lc = new CpuLatentCache(ctx[i], lora, ropeDim);
            for (var j = 0; j < ctx[i]; j++)
            {
                cache.AsSpan((int)RowOf(i, j), lora).CopyTo(lc.Latent(j, write: true));
                cache.AsSpan((int)RowOf(i, j) + lora, ropeDim).CopyTo(lc.Rope(j, write: true));
            }

            var qt = cpu.Upload(q.AsSpan(cuQ[i] * heads * qkHead, len * heads * qkHead), len, heads * qkHead);
            var ot = cpu.Allocate(len, heads * dv);
            cpu.MlaAttentionNaive(qt, lc, kvB, dims, start, scale, ot);
            cpu.Download(ot, expected.AsSpan(cuQ[i] * heads * dv, len * heads * dv));
        }

        var what = $"mla_prefill {shape} H={heads} requests [{string.Join(", ", requests)}]";
        if (injectNaN)
        {
            // The reference itself must show the intended pattern, or the test proves nothing.
            var (s0, l0) = requests[nanReq];
            Assert.IsTrue(float.IsNaN(expected[(nanPos - s0) * heads * dv]), "reference: the NaN key's own query is NaN");
            Assert.IsTrue(float.IsFinite(expected[(nanPos - s0 - 1) * heads * dv]), "reference: the query before the NaN key is finite");
            Assert.IsTrue(l0 > 0);
            Assert.IsTrue(float.IsNaN(expected[cuQ[nReq - 1] * heads * dv]), "reference: the query with an Inf element is NaN in head 0");
            Assert.IsTrue(float.IsFinite(expected[(cuQ[nReq - 1] * heads + 1) * dv]) || heads - 1 == 1, "reference: head 1 of that query is finite");
        }

        Tolerance.AssertClose(got, expected, Atol, Rtol, what);
        var c = Tolerance.AssertRmsRel(got, expected, RmsRel, what);
        Console.WriteLine($"{what}: max_abs {c.MaxAbs:g3}, rms_rel {c.RmsRel:g3}");
    }
}
