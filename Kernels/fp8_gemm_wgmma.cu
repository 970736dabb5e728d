// FP8 block-scaled GEMM for Hopper (sm_90a only): wgmma on e4m3 straight from shared memory, TMA loads into
// a multi-stage mbarrier pipeline, warp specialization, a persistent grid. Semantics: fp8_gemm.cuh (the same
// Y = X·Wᵀ with 1x128 activation and 128x128 weight scales, BF16 or FP32 output, optional residual).
//
// Block: 384 threads in three warpgroups.
//   - Warpgroups 0 and 1 (consumers) each own 64 rows of the wgmma's A side. Per 128-wide K block (one scale
//     block) a consumer waits for the stage, runs 4 wgmma k32 from zero into `part`, releases the stage, and
//     promotes: acc += part * sa[m, kb] * sb[n / 128, kb] in fp32 on the CUDA cores. The tensor cores add
//     FP8 products with fewer bits than fp32 (about 14, DeepSeek-V3 report 3.3.2), so promoting every 128 of
//     K is what keeps the result close to an fp32 sum.
//   - Warpgroup 2 (producer) gives its registers to the consumers (setmaxnreg) and one of its threads issues
//     the TMA loads: per stage a box of the activation codes and one of the weight codes, 128 bytes of K
//     wide, with the 128-byte swizzle wgmma reads (hopper.cuh), completing on the stage's full barrier.
//     Its waits carry a watchdog (hopper.cuh), and it waits for the last stages to be released before it
//     exits, so a pipeline that deadlocks traps within seconds instead of hanging the GPU.
//     Boxes past M, N or K read zeros, so ragged shapes need no special path; K and the activation row stride
//     must be multiples of 16 bytes (TMA strides), which the launcher checks before choosing these kernels.
// Two variants share that pipeline (the launcher picks one by M, Fp8GemmKernel.WgmmaVariantFor):
//   - prefill (fp8_gemm_wgmma_kernel, M above 64): 128 x 128 output tiles, A = activations, B = weights,
//     m64n128k32; a persistent grid walks the tiles in the grouped order of fp8_wgmma_tile, the pipeline
//     running on across tiles so the next tile's loads overlap this tile's epilogue.
//   - decode (fp8_gemm_wgmma_decode_kernel, M up to 64): A and B swapped so the weight is the wide side:
//     A = 128 weight rows, B = the (at most) 64 activation rows, m64n64k32. Each weight byte is read once;
//     the tensor cores have ~4x the time the weight stream takes, so padding M to 64 costs nothing. When the
//     weight tiles cannot fill the GPU, K is split (work unit = weight tile x K split) and fp32 partials go to
//     a workspace that fp8_gemv_reduce_kernel sums in a fixed order (deterministic, as the gemv's split-K).
// N and K are template constants, M is a run-time value.
#pragma once
#include "fp8_gemm.cuh"
#include "hopper.cuh"

constexpr int kWgmmaTile = 128;       // prefill tile edge in M and N; the decode weight tile; BK = kFp8Block
constexpr int kWgmmaDecodeRows = 64;  // most activation rows of the decode variant (its wgmma N)
constexpr int kWgmmaThreads = 384;
constexpr int kWgmmaConsumerWarps = 8;
constexpr int kWgmmaBoxBytes = kWgmmaTile * kFp8Block;                              // a 128-row box (16 KiB)
constexpr int kWgmmaStages = 6;
constexpr int kWgmmaStageBytes = 2 * kWgmmaBoxBytes;                                // prefill: X box + W box
constexpr int kWgmmaDecodeStages = 8;
constexpr int kWgmmaDecodeStageBytes = kWgmmaBoxBytes + kWgmmaDecodeRows * kFp8Block; // decode: W box + X box
// Dynamic shared memory: the stages (1024-byte aligned for the swizzle, hence 1 KiB of slack) and two 8-byte
// mbarriers per stage. Mirrored by Fp8GemmKernel.WgmmaSharedBytes / WgmmaDecodeSharedBytes.
constexpr int kWgmmaSharedBytes = 1024 + kWgmmaStages * kWgmmaStageBytes + 2 * kWgmmaStages * 8;
constexpr int kWgmmaDecodeSharedBytes = 1024 + kWgmmaDecodeStages * kWgmmaDecodeStageBytes + 2 * kWgmmaDecodeStages * 8;
static_assert(kWgmmaDecodeStageBytes % 1024 == 0, "every box must stay 1024-byte aligned");

struct Fp8WgmmaParams
{
    TmaMap x_map;        // activation codes: dims {K, m}, row stride x_stride, box {128, 128 (prefill) or 64 (decode)}
    TmaMap w_map;        // weight codes: dims {K, N}, row stride K, box {128, 128}; both with the 128-byte swizzle
    Fp8GemmParams gemm;  // scales, output, residual, strides, m, out_bf16; decode split-K: partial, splits,
                         // split_k (K per split, a multiple of 128); the code pointers are unused
    i32 tiles_m;         // prefill: ceil(m / 128); decode: 1
    i32 tiles_n;         // ceil(N / 128)
    i32 group_m;         // prefill: M tiles per group of the tile order
};

struct WgmmaTileIndex
{
    int m;
    int n;
};

// Tile t of the prefill order: groups of group_m M tiles; inside a group M runs fastest, then N. Blocks
// running at the same time then share a few weight tiles and a few activation tiles in L2 instead of each
// streaming its own. The last group may hold fewer M tiles. constexpr, so the tests check it against its C#
// mirror (Fp8GemmKernel.WgmmaTileAt) at compile time.
__device__ constexpr WgmmaTileIndex fp8_wgmma_tile(int t, int tiles_m, int tiles_n, int group_m)
{
    const int per_group = group_m * tiles_n;
    const int g = t / per_group;
    const int first = g * group_m;
    const int rows = group_m < tiles_m - first ? group_m : tiles_m - first;
    const int r = t - g * per_group;
    return WgmmaTileIndex{first + r % rows, r / rows};
}

// The consumer's rows of the A side (row and row + 8 of its 64) and columns of the B side (8 j + col, + 1).
DSC_DEVICE int wgmma_consumer_row() { return (threadIdx.x >> 7) * 64 + ((threadIdx.x >> 5) & 3) * 16 + ((threadIdx.x & 31) >> 2); }
DSC_DEVICE int wgmma_consumer_col() { return 2 * (threadIdx.x & 3); }

// Loads `blocks` K blocks starting at kb0 of one work unit: A box at (kb, a_row), B box at (kb, b_row), each
// stage completing stage_bytes on its full barrier.
template <int STAGES, int STAGE_BYTES>
DSC_DEVICE void wgmma_produce(WgmmaRing<STAGES, STAGE_BYTES>& ring, const TmaMap* a_map, i32 a_row, const TmaMap* b_map, i32 b_row,
                              int kb0, int blocks)
{
    for (int kb = kb0; kb < kb0 + blocks; kb++)
    {
        mbar_wait_watchdog(ring.empty(), ring.phase ^ 1u);
        mbar_arrive_expect_tx(ring.full(), STAGE_BYTES);
        tma_load_2d(ring.smem(), a_map, ring.full(), kb * kFp8Block, a_row);
        tma_load_2d(ring.smem() + kWgmmaBoxBytes, b_map, ring.full(), kb * kFp8Block, b_row);
        ring.next();
    }
}

template <int N, int K>
__global__ void __launch_bounds__(kWgmmaThreads, 1) fp8_gemm_wgmma_kernel(const __grid_constant__ Fp8WgmmaParams p)
{
#if DSC_HOPPER
    constexpr int KB = (K + kFp8Block - 1) / kFp8Block;
    static_assert(kWgmmaTile == kFp8Block, "a tile's columns must share one weight-scale block");
    extern __shared__ u8 wgmma_smem[];
    auto ring = WgmmaRing<kWgmmaStages, kWgmmaStageBytes>::open(wgmma_smem, 1, kWgmmaConsumerWarps);
    const int tiles = p.tiles_m * p.tiles_n;

    if (threadIdx.x >= kWgmmaConsumerWarps * 32)
    {
        warpgroup_registers_dec<40>();
        if (threadIdx.x != kWgmmaConsumerWarps * 32) return;
        tma_prefetch_map(&p.x_map);
        tma_prefetch_map(&p.w_map);
        for (int t = blockIdx.x; t < tiles; t += gridDim.x)
        {
            const WgmmaTileIndex tile = fp8_wgmma_tile(t, p.tiles_m, p.tiles_n, p.group_m);
            wgmma_produce(ring, &p.x_map, tile.m * kWgmmaTile, &p.w_map, tile.n * kWgmmaTile, 0, KB);
        }
        wgmma_drain(ring);
        return;
    }

    warpgroup_registers_inc<232>();
    const int row = wgmma_consumer_row(), col = wgmma_consumer_col();
    const int lane = threadIdx.x & 31;
    const Fp8GemmParams& g = p.gemm;
    for (int t = blockIdx.x; t < tiles; t += gridDim.x)
    {
        const WgmmaTileIndex tile = fp8_wgmma_tile(t, p.tiles_m, p.tiles_n, p.group_m);
        const i64 m0 = (i64)tile.m * kWgmmaTile + row, m1 = m0 + 8;
        const bool in0 = m0 < g.m, in1 = m1 < g.m;
        const float* sa0 = g.x_scales + m0 * g.x_scales_stride;
        const float* sa1 = g.x_scales + m1 * g.x_scales_stride;
        const float* sb = g.w_scales + (i64)tile.n * KB;

        float acc[64], part[64];
#pragma unroll
        for (int i = 0; i < 64; i++) acc[i] = 0.0f;

        for (int kb = 0; kb < KB; kb++)
        {
            const float wscale = sb[kb];
            const float s0 = in0 ? sa0[kb] * wscale : 0.0f;
            const float s1 = in1 ? sa1[kb] * wscale : 0.0f;
            const u32 a = ring.smem() + (threadIdx.x >> 7) * 64 * kFp8Block;
            const u32 b = ring.smem() + kWgmmaBoxBytes;
            mbar_wait(ring.full(), ring.phase);
            wgmma_k128_e4m3<128>(part, a, b);
            if (lane == 0) mbar_arrive(ring.empty());
            ring.next();

            wgmma_promote_n128(acc, part, s0, s1, s0, s1); // one weight-scale block covers the tile's 128 columns
        }

#pragma unroll
        for (int j = 0; j < 16; j++)
        {
#pragma unroll
            for (int c = 0; c < 2; c++)
            {
                const int n = tile.n * kWgmmaTile + 8 * j + col + c;
                if (n >= N) continue;
                if (in0) fp8_gemm_store(g, m0, n, acc[4 * j + c]);
                if (in1) fp8_gemm_store(g, m1, n, acc[4 * j + 2 + c]);
            }
        }
    }
#endif
}

template <int N, int K>
__global__ void __launch_bounds__(kWgmmaThreads, 1) fp8_gemm_wgmma_decode_kernel(const __grid_constant__ Fp8WgmmaParams p)
{
#if DSC_HOPPER
    constexpr int KB = (K + kFp8Block - 1) / kFp8Block;
    extern __shared__ u8 wgmma_smem[];
    auto ring = WgmmaRing<kWgmmaDecodeStages, kWgmmaDecodeStageBytes>::open(wgmma_smem, 1, kWgmmaConsumerWarps);
    const Fp8GemmParams& g = p.gemm;
    const int split_blocks = g.split_k / kFp8Block;
    const int units = p.tiles_n * g.splits;

    if (threadIdx.x >= kWgmmaConsumerWarps * 32)
    {
        warpgroup_registers_dec<40>();
        if (threadIdx.x != kWgmmaConsumerWarps * 32) return;
        tma_prefetch_map(&p.x_map);
        tma_prefetch_map(&p.w_map);
        for (int u = blockIdx.x; u < units; u += gridDim.x)
        {
            const int tn = u / g.splits, kb0 = (u % g.splits) * split_blocks;
            wgmma_produce(ring, &p.w_map, tn * kWgmmaTile, &p.x_map, 0, kb0, min(split_blocks, KB - kb0));
        }
        wgmma_drain(ring);
        return;
    }

    warpgroup_registers_inc<232>();
    const int row = wgmma_consumer_row(), col = wgmma_consumer_col();
    const int lane = threadIdx.x & 31;
    for (int u = blockIdx.x; u < units; u += gridDim.x)
    {
        const int tn = u / g.splits, split = u % g.splits, kb0 = split * split_blocks;
        const int kb1 = min(KB, kb0 + split_blocks);
        const float* sb = g.w_scales + (i64)tn * KB;

        // Registers 4j + 2h + c: weight row `row + 8h`, activation row 8j + col + c.
        float acc[32], part[32];
#pragma unroll
        for (int i = 0; i < 32; i++) acc[i] = 0.0f;

        for (int kb = kb0; kb < kb1; kb++)
        {
            const float wscale = sb[kb];
            float s[16];
#pragma unroll
            for (int j = 0; j < 8; j++)
#pragma unroll
                for (int c = 0; c < 2; c++)
                {
                    const int m = 8 * j + col + c;
                    s[2 * j + c] = m < g.m ? g.x_scales[(i64)m * g.x_scales_stride + kb] * wscale : 0.0f;
                }
            const u32 a = ring.smem() + (threadIdx.x >> 7) * 64 * kFp8Block;
            const u32 b = ring.smem() + kWgmmaBoxBytes;
            mbar_wait(ring.full(), ring.phase);
            wgmma_k128_e4m3<kWgmmaDecodeRows>(part, a, b);
            if (lane == 0) mbar_arrive(ring.empty());
            ring.next();

#pragma unroll
            for (int j = 0; j < 8; j++)
#pragma unroll
                for (int h = 0; h < 2; h++)
#pragma unroll
                    for (int c = 0; c < 2; c++)
                        acc[4 * j + 2 * h + c] = fmaf(part[4 * j + 2 * h + c], s[2 * j + c], acc[4 * j + 2 * h + c]);
        }

#pragma unroll
        for (int h = 0; h < 2; h++)
        {
            const int n = tn * kWgmmaTile + row + 8 * h;
            if (n >= N) continue;
#pragma unroll
            for (int j = 0; j < 8; j++)
#pragma unroll
                for (int c = 0; c < 2; c++)
                {
                    const int m = 8 * j + col + c;
                    if (m >= g.m) continue;
                    const float v = acc[4 * j + 2 * h + c];
                    if (g.partial) g.partial[((i64)split * g.m + m) * N + n] = v;
                    else fp8_gemm_store(g, m, n, v);
                }
        }
    }
#endif
}
