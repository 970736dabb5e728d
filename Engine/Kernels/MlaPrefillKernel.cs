using System.Runtime.InteropServices;
using DeepSeekCuda.Cuda;

namespace DeepSeekCuda.Kernels;

/// <summary>Mirror of <c>MlaPrefillParams</c> in Kernels/mla_prefill.cu.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct MlaPrefillParams
{
    public ulong Q;
    public ulong Cache;
    public ulong BlockTable;
    public ulong CuQ;
    public ulong CuKv;
    public ulong Kv;
    public ulong Latent;
    public ulong Out;
    public float Scale;
    public int Requests;
    public int MaxBlocks;
    public int Heads;
}

/// <summary>
/// The compile-time head geometry of MLA prefill: q_nope/k_nope width, rope width, v width, latent width
/// (kv_lora_rank). Heads are a run-time argument.
/// </summary>
internal readonly record struct MlaPrefillShape(int QkNope, int QkRope, int V, int KvLora)
{
    /// <summary>DeepSeek-V3/R1: 128 + 64 q.k, v 128, latent 512.</summary>
    public static MlaPrefillShape V3 => new(128, 64, 128, 512);

    /// <summary>The tiny-a fixture: 64 + 64, v 64, latent 128.</summary>
    public static MlaPrefillShape TinyA => new(64, 64, 64, 128);

    /// <summary>The Tiny synthetic preset: 32 + 16, v 40, latent 80.</summary>
    public static MlaPrefillShape TinyPreset => new(32, 16, 40, 80);

    /// <summary>The shapes <see cref="MlaPrefillKernel.AllInstances"/> lists (any valid shape compiles on demand).</summary>
    public static IReadOnlyList<MlaPrefillShape> Known => [V3, TinyA, TinyPreset];


    /// <summary>Row width of the paged latent cache: latent then rotated k_pe.</summary>
    public int CacheRow => KvLora + QkRope;

    /// <summary>q/k width per head.</summary>
    public int QkHead => QkNope + QkRope;

    /// <summary>kv_b output per head: k_nope then v.</summary>
    public int KvHead => QkNope + V;

    /// <summary>Throws unless the kernel's static_asserts will hold (even widths; K and transposed V tiles in 48 KiB).</summary>
    public void Validate()
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(QkNope);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(QkRope);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(V);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(KvLora);
        if (QkNope % 2 != 0 || QkRope % 2 != 0 || V % 2 != 0 || KvLora % 2 != 0)
        {
            throw new ArgumentException($"MLA prefill needs even widths (bf16 pairs): {this}");
        }

        int qkp = (QkHead + 15) / 16 * 16, vp = (V + 7) / 8 * 8;
        if ((PagedLatentCache.BlockSize * (qkp + 8) + vp * (PagedLatentCache.BlockSize + 8)) * 2 > 48 * 1024)
        {
            throw new ArgumentException($"MLA prefill head dims too large for the kernel's 48 KiB of static shared memory: {this}");
        }
    }
}

/// <summary>
/// MLA prefill attention over the paged latent cache, naive (decompressed) form. One layer's cache is
/// bf16 <c>[numBlocks, 64, KvLora + QkRope]</c> (latent, then rotated k_pe); token p of request r lives in
/// block <c>blockTable[r·maxBlocks + p/64]</c>, row <c>p % 64</c>. A chunk of request r holds queries at
/// positions <c>start_r .. start_r + len_r − 1</c> whose keys the append kernel has already written, so
/// the context is positions <c>0 .. ctx_r − 1</c>, ctx_r = start_r + len_r. Requests are packed like
/// FlashAttention's varlen: <c>cuQ</c> [R+1] (query rows) and <c>cuKv</c> [R+1] (context rows) are prefix
/// sums on the device. The pipeline per layer:
/// <list type="number">
/// <item><see cref="Gather"/>: paged latents → contiguous <c>latent [cuKv[R], KvLora]</c>;</item>
/// <item>kv_b on it (<see cref="ActQuantKernel"/> + <see cref="Fp8GemmKernel"/>, N = H·(QkNope+V), K = KvLora)
/// → <c>kv [cuKv[R], H, QkNope + V]</c> bf16 (k_nope | v per head), the same values CpuBackend.MlaAttentionNaive computes;</item>
/// <item><see cref="Attention"/>: causal flash attention per head, K = [k_nope | k_pe from the cache],
/// V from kv, online softmax in fp32, mma.sync m16n8k16 bf16 tensor cores → <c>out [cuQ[R], H, V]</c> bf16.</item>
/// </list>
/// <para>
/// <b>Why naive, by arithmetic</b> (H = 128, per layer, chunk of T queries over a context of N keys, causal
/// fresh prompt T = N: N²/2 (query, key) pairs per head). Naive: q.k 192 + p.v 128 = 320 MAC per pair and head,
/// plus the kv_b decompression 512·256 = 131,072 MAC per key and head: 160·H·N² + 131,072·H·N MAC.
/// Absorbed: q̃.c 576 + p.c 512 = 1,088 MAC per pair and head, plus folding q and unfolding o through W_UK/W_UV
/// (2·128·512 per query and head): 544·H·N² + 262,144·H·N. The ratio absorbed/naive is 2.3× at N = 256,
/// 2.8× at 1K and 3.3× at 16K (never below 2×): for prefill, naive does a third of the tensor-core work.
/// Absorbed reads less: a 1,152-byte cache row shared by all heads against naive's 64 KiB of decompressed
/// k_nope/v per key (a 16K-token context decompresses to 1 GiB of scratch, written once, then re-read per
/// 64-query tile, mostly from L2 because the tiles of one head run together). At ~300 flop/byte of
/// H100 balance, a 64×64 naive tile does 64·320·2 flop per 640 bytes of K/V = 64 flop/byte from global memory,
/// so it leans on L2 hits as FlashAttention-2 does; absorbed would be compute-bound at 3× the flops.
/// For a chunk over a long cached prefix the decompression (131,072·H·N) is paid per chunk, and naive
/// wins when T·N·H·(1,088 − 320) &gt; 131,072·H·N, i.e. chunks longer than about 170 tokens; shorter chunks
/// and decode belong to the absorbed kernel (mla_decode). Hence naive here. The kernel has no cp.async
/// pipelining or ldmatrix yet (16-byte loads into padded shared memory, one K/V tile at a time; 206 registers,
/// 43 KiB of shared memory for V3 under ptxas, no spills): correct first, to be tuned on a GPU.
/// </para>
/// </summary>
internal sealed class MlaPrefillKernel(CudaDevice device, NvrtcCompiler compiler) : KernelLauncher(device, compiler, FamilyName)
{
    /// <summary>Kernels/mla_prefill.cu.</summary>
    public const string FamilyName = "mla_prefill";

    /// <summary>CUDA name of the params struct.</summary>
    public const string ParamsType = "MlaPrefillParams";


    /// <summary>Query rows per attention block (4 warps × 16).</summary>
    public const int QueryTile = 64;

    /// <summary>Threads per block of both kernels.</summary>
    public const int Threads = 128;

    /// <summary>The attention specialization of a shape.</summary>
    public static KernelInstance AttentionInstance(MlaPrefillShape s) =>
        new($"mla_prefill_attn_kernel<{s.QkNope}, {s.QkRope}, {s.V}, {s.KvLora}>", ParamsType);

    /// <summary>The gather specialization of a shape.</summary>
    public static KernelInstance GatherInstance(MlaPrefillShape s) => new($"mla_prefill_gather_kernel<{s.KvLora}, {s.QkRope}>", ParamsType);

    /// <summary>Every specialization of the known shapes.</summary>
    public static IReadOnlyList<KernelInstance> AllInstances() =>
        [.. MlaPrefillShape.Known.SelectMany(s => new[] { AttentionInstance(s), GatherInstance(s) })];

    /// <summary>
    /// Copies the latent part of each request's context rows (positions 0 .. cuKv[r+1] − cuKv[r] − 1) from the paged cache
    /// into <paramref name="latent"/> (bf16 [cuKv[R], KvLora], dense), R = cuKv.Length − 1 requests, request r reading row r of
    /// the block table. <paramref name="maxContext"/> bounds the longest context (host value; rows beyond a request's own
    /// context are skipped on the device).
    /// </summary>
    public void Gather(CudaStream stream, MlaPrefillShape shape, LatentPages pages, DeviceInts cuKv, int maxContext, DeviceRows latent)
    {
        var p = GatherParams(shape, pages, cuKv, maxContext, latent);
        if (p.Requests == 0 || maxContext == 0)
        {
            return;
        }

        Get(GatherInstance(shape)).Launch(new Dim3((uint)Math.Min(maxContext, 65535), checked((uint)p.Requests)), Threads, 0, stream, in p);
    }

    /// <summary>The gather kernel's arguments, the views checked against the shape.</summary>
    public static MlaPrefillParams GatherParams(MlaPrefillShape shape, LatentPages pages, DeviceInts cuKv, int maxContext, DeviceRows latent)
    {
        const string what = "MLA prefill gather";
        shape.Validate();
        var requests = Requests(cuKv, nameof(cuKv));
        ArgumentOutOfRangeException.ThrowIfNegative(maxContext);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(maxContext, latent.Rows);
        ViewCheck.Is(latent, latent.Rows, shape.KvLora, what, nameof(latent), ElementType.BF16, dense: true);
        if (maxContext > 0)
        {
            CheckBlocks(pages.MaxBlocks, maxContext);
        }

        return new MlaPrefillParams
        {
            Cache = pages.Cache, BlockTable = pages.BlockTable, CuKv = cuKv.Pointer, Latent = latent.Pointer, Requests = requests, MaxBlocks = pages.MaxBlocks,
        };
    }

    /// <summary>
    /// Causal attention of every request's chunk: <paramref name="q"/> bf16 [cuQ[R], heads·(QkNope + QkRope)] (rotated q_pe),
    /// <paramref name="kv"/> bf16 [cuKv[R], heads·(QkNope + V)] = kv_b(latent), k_pe from the paged cache; writes
    /// <paramref name="output"/> bf16 [cuQ[R], heads·V]; all dense, R = cuQ.Length − 1 requests. <paramref name="scale"/> is the
    /// model's softmax scale (qk_head_dim^−½ · YaRN mscale²). <paramref name="maxChunk"/> bounds the longest chunk (host
    /// value). Request r's chunk length must not exceed its context length (cuKv[r+1] − cuKv[r] ≥ cuQ[r+1] − cuQ[r]); that
    /// holds on the device and is not checked here.
    /// </summary>
    public void Attention(CudaStream stream, MlaPrefillShape shape, int heads, DeviceRows q, LatentPages pages, DeviceInts cuQ, DeviceInts cuKv,
        DeviceRows kv, int maxChunk, float scale, DeviceRows output)
    {
        var p = AttentionParams(shape, heads, q, pages, cuQ, cuKv, kv, maxChunk, scale, output);
        if (p.Requests == 0 || maxChunk == 0)
        {
            return;
        }

        var grid = new Dim3(Blocks(maxChunk, QueryTile), (uint)heads, (uint)p.Requests);
        Get(AttentionInstance(shape)).Launch(grid, Threads, 0, stream, in p);
    }

    /// <summary>The attention kernel's arguments, the views checked against the shape and each other.</summary>
    public static MlaPrefillParams AttentionParams(MlaPrefillShape shape, int heads, DeviceRows q, LatentPages pages, DeviceInts cuQ, DeviceInts cuKv,
        DeviceRows kv, int maxChunk, float scale, DeviceRows output)
    {
        const string what = "MLA prefill attention";
        shape.Validate();
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(heads);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(heads, 65535);
        var requests = Requests(cuQ, nameof(cuQ));
        ArgumentOutOfRangeException.ThrowIfGreaterThan(requests, 65535, nameof(cuQ));
        if (cuKv.Length != cuQ.Length)
        {
            throw new ArgumentException($"{what}: {cuKv.Length} KV offsets for {cuQ.Length} query offsets", nameof(cuKv));
        }

        ArgumentOutOfRangeException.ThrowIfNegative(maxChunk);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(maxChunk, q.Rows);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(pages.MaxBlocks);
        ViewCheck.Is(q, q.Rows, heads * shape.QkHead, what, nameof(q), ElementType.BF16, dense: true);
        ViewCheck.Is(kv, kv.Rows, heads * shape.KvHead, what, nameof(kv), ElementType.BF16, dense: true);
        ViewCheck.Is(output, q.Rows, heads * shape.V, what, nameof(output), ElementType.BF16, dense: true);
        if ((q.Pointer | pages.Cache | kv.Pointer | output.Pointer) % 16 != 0)
        {
            throw new ArgumentException($"{what}: q, cache, kv and output must be 16-byte aligned (the kernel loads 8 bf16 at a time)", nameof(q));
        }

        if (!float.IsFinite(scale) || scale <= 0)
        {
            throw new ArgumentOutOfRangeException(nameof(scale), scale, "the softmax scale must be positive and finite");
        }

        return new MlaPrefillParams
        {
            Q = q.Pointer, Cache = pages.Cache, BlockTable = pages.BlockTable, CuQ = cuQ.Pointer, CuKv = cuKv.Pointer, Kv = kv.Pointer, Out = output.Pointer,
            Scale = scale, Requests = requests, MaxBlocks = pages.MaxBlocks, Heads = heads,
        };
    }

    /// <summary>Requests of a varlen offset array: one fewer than its entries (cu[0] = 0, cu[r + 1] − cu[r] rows each).</summary>
    private static int Requests(DeviceInts offsets, string name) =>
        offsets.Length >= 1 ? offsets.Length - 1 : throw new ArgumentException("a varlen offset array holds at least its leading 0", name);

    private static void CheckBlocks(int maxBlocks, int maxContext)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(maxBlocks);
        if ((long)maxBlocks * PagedLatentCache.BlockSize < maxContext)
        {
            throw new ArgumentOutOfRangeException(nameof(maxBlocks), $"{maxBlocks} blocks of {PagedLatentCache.BlockSize} rows cannot hold a context of {maxContext} tokens");
        }
    }
}
