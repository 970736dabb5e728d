// FP8 block-scaled GEMM for Hopper (sm_90a only): wgmma on e4m3 straight from shared memory, TMA loads into
// a multi-stage mbarrier pipeline, warp specialization, a persistent grid. Semantics: fp8_gemm.cuh (the same
// Y = X·Wᵀ with 1x128 activation and 128x128 weight scales, BF16 or FP32 output, optional residual).
//
// Block: 384 threads in three warpgroups.
//   - Warpgroups 0 and 1 (consumers) each own 64 rows of a 128 x 128 output tile. Per 128-wide K block (one
//     scale block) a consumer waits for the stage, runs 4 wgmma m64n128k32 from zero into `part`, releases
//     the stage, and promotes: acc += part * sa[row, kb] * sb[n / 128, kb] in fp32 on the CUDA cores. The
//     tensor cores accumulate FP8 products with fewer bits than fp32 (about 14, DeepSeek-V3 report 3.3.2),
//     so promoting every 128 of K is what keeps the result close to an fp32 sum.
//   - Warpgroup 2 (producer) gives its registers to the consumers (setmaxnreg) and one of its threads issues
//     the TMA loads: per stage a 128 x 128-byte box of the activation codes and one of the weight codes, both
//     with the 128-byte swizzle wgmma reads (hopper.cuh), completing on the stage's full barrier. Boxes past
//     M, N or K read zeros, so ragged shapes need no special path; K and the activation row stride must be
//     multiples of 16 bytes (TMA strides), which the launcher checks before choosing this kernel.
// Persistent grid: one block per SM walks the tiles blockIdx.x, blockIdx.x + gridDim.x, ... in the grouped
// order of fp8_wgmma_tile; the pipeline runs on across tiles, so the next tile's loads overlap this tile's
// epilogue. N and K are template constants, M is a run-time value.
#pragma once
#include "fp8_gemm.cuh"
#include "hopper.cuh"

constexpr int kWgmmaTile = 128;      // tile edge in M and N; BK = kFp8Block
constexpr int kWgmmaStages = 6;
constexpr int kWgmmaThreads = 384;
constexpr int kWgmmaConsumerWarps = 8;
constexpr int kWgmmaBoxBytes = kWgmmaTile * kFp8Block;          // one operand's box per stage (16 KiB)
constexpr int kWgmmaStageBytes = 2 * kWgmmaBoxBytes;
// Dynamic shared memory: the stages (1024-byte aligned for the swizzle, hence 1 KiB of slack) and two
// 8-byte mbarriers per stage. Mirrored by Fp8GemmKernel.WgmmaSharedBytes.
constexpr int kWgmmaSharedBytes = 1024 + kWgmmaStages * kWgmmaStageBytes + 2 * kWgmmaStages * 8;

struct Fp8WgmmaParams
{
    TmaMap x_map;        // activation codes: dims {K, m}, row stride x_stride, box {128, 128}, 128-byte swizzle
    TmaMap w_map;        // weight codes: dims {K, N}, row stride K, box {128, 128}, 128-byte swizzle
    Fp8GemmParams gemm;  // scales, output, residual, strides, m, out_bf16 (code pointers and split-K fields unused)
    i32 tiles_m;         // ceil(m / 128)
    i32 tiles_n;         // ceil(N / 128)
    i32 group_m;         // M tiles per group of the tile order
};

struct WgmmaTileIndex
{
    int m;
    int n;
};

// Tile t of the persistent order: groups of group_m M tiles; inside a group M runs fastest, then N. Blocks
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

template <int N, int K>
__global__ void __launch_bounds__(kWgmmaThreads, 1) fp8_gemm_wgmma_kernel(const __grid_constant__ Fp8WgmmaParams p)
{
#if DSC_HOPPER
    constexpr int KB = (K + kFp8Block - 1) / kFp8Block;
    static_assert(kWgmmaTile == kFp8Block, "a tile's columns must share one weight-scale block");
    extern __shared__ u8 wgmma_smem[];
    const u32 base = (smem_addr(wgmma_smem) + 1023u) & ~1023u;
    const u32 bars = base + kWgmmaStages * kWgmmaStageBytes;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int tiles = p.tiles_m * p.tiles_n;

    if (tid == 0)
    {
        for (int s = 0; s < kWgmmaStages; s++)
        {
            mbar_init(bars + 8 * s, 1);                                          // full: the producer's arrive + bytes
            mbar_init(bars + 8 * (kWgmmaStages + s), kWgmmaConsumerWarps);       // empty: one arrive per consumer warp
        }
        mbar_fence_init();
    }
    __syncthreads();

    if (warp >= kWgmmaConsumerWarps)
    {
        warpgroup_registers_dec<40>();
        if (tid != kWgmmaConsumerWarps * 32) return;
        tma_prefetch_map(&p.x_map);
        tma_prefetch_map(&p.w_map);
        int stage = 0;
        u32 phase = 0;
        for (int t = blockIdx.x; t < tiles; t += gridDim.x)
        {
            const WgmmaTileIndex tile = fp8_wgmma_tile(t, p.tiles_m, p.tiles_n, p.group_m);
            for (int kb = 0; kb < KB; kb++)
            {
                const u32 full = bars + 8 * stage, empty = bars + 8 * (kWgmmaStages + stage);
                const u32 a = base + stage * kWgmmaStageBytes;
                mbar_wait(empty, phase ^ 1u);
                mbar_arrive_expect_tx(full, kWgmmaStageBytes);
                tma_load_2d(a, &p.x_map, full, kb * kFp8Block, tile.m * kWgmmaTile);
                tma_load_2d(a + kWgmmaBoxBytes, &p.w_map, full, kb * kFp8Block, tile.n * kWgmmaTile);
                if (++stage == kWgmmaStages) { stage = 0; phase ^= 1u; }
            }
        }
        return;
    }

    warpgroup_registers_inc<232>();
    const int wg = warp >> 2;
    const int row = wg * 64 + (warp & 3) * 16 + (lane >> 2); // this thread's rows in the tile: row and row + 8
    const int col = 2 * (lane & 3);                           // and columns 8 * j + col, + 1 (j < 16)
    const Fp8GemmParams& g = p.gemm;
    int stage = 0;
    u32 phase = 0;
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
            const u32 full = bars + 8 * stage, empty = bars + 8 * (kWgmmaStages + stage);
            const u32 a = base + stage * kWgmmaStageBytes + wg * 64 * kFp8Block;
            const u32 b = base + stage * kWgmmaStageBytes + kWgmmaBoxBytes;
            mbar_wait(full, phase);
#pragma unroll
            for (int i = 0; i < 64; i++) wgmma_fence_operand(part[i]);
            wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < kFp8Block / 32; ks++)
                wgmma_m64n128k32_e4m3(part, wgmma_desc_sw128(a + 32 * ks), wgmma_desc_sw128(b + 32 * ks), ks > 0 ? 1u : 0u);
            wgmma_commit();
#pragma unroll
            for (int i = 0; i < 64; i++) wgmma_fence_operand(part[i]);
            wgmma_wait<0>();
            if (lane == 0) mbar_arrive(empty);
            if (++stage == kWgmmaStages) { stage = 0; phase ^= 1u; }

            // Promote: registers 4j, 4j+1 are row `row`, 4j+2, 4j+3 row `row + 8`.
#pragma unroll
            for (int j = 0; j < 16; j++)
            {
                acc[4 * j] = fmaf(part[4 * j], s0, acc[4 * j]);
                acc[4 * j + 1] = fmaf(part[4 * j + 1], s0, acc[4 * j + 1]);
                acc[4 * j + 2] = fmaf(part[4 * j + 2], s1, acc[4 * j + 2]);
                acc[4 * j + 3] = fmaf(part[4 * j + 3], s1, acc[4 * j + 3]);
            }
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
