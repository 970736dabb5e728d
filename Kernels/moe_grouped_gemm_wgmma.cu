// Grouped FP8 expert GEMM for Hopper (sm_90a only): the semantics, layouts and epilogues of moe_grouped_gemm.cu
// (contiguous for prefill, masked for decode; gate/up with SiLU(gate)·up fused, or down), on the pipeline of
// fp8_gemm_wgmma.cu: FP8 wgmma m64n128k32 from shared memory, a producer warpgroup, two consumer warpgroups,
// FP32 promotion with the block scales every 128 of K.
//
// Block: one 64-row tile of one expert (moe_tile) x 256 weight rows. Per stage:
//   - A, the tile's 64 activation rows x 128 bytes of K. Rows come through the dispatch perm (gather), which
//     TMA cannot follow, so the producer warpgroup's 128 threads copy them with cp.async, 16 bytes each, into
//     the 128-byte swizzled layout wgmma reads (zeros for empty rows and past K); each thread's copies then
//     arrive on the stage's full barrier (cp.async.mbarrier.arrive.noinc).
//   - B, four 64-row boxes of the expert's weights by TMA from a 3-D map {K, N, E} (zeros past N and K within
//     each expert). Gate/up: consumer warpgroup w owns output columns c0 + 64w .. + 63, its B rows are gate rows
//     c0 + 64w .. and up rows I + c0 + 64w .., so its wgmma columns 0-63 are gate and 64-127 up for the same
//     output columns, and SiLU(gate)·up is formed in registers. Down: warpgroup w owns output columns
//     n0 + 128w .. + 127.
// The full barrier completes on 129 arrivals (the producer thread's expect_tx arrive for the 32 KiB of B, and
// one cp.async arrive per producer thread) plus B's bytes. Consumers fence the generic proxy (cp.async) against
// the async proxy (wgmma) after the wait. Epilogues as moe_grouped_gemm.cu: gate and up rounded to bf16, h in
// fp32, stored bf16; down stored bf16. N and K are template constants; K a multiple of 16 (the launcher checks).
#pragma once
#include "moe_grouped.cuh"
#include "hopper.cuh"

constexpr int kMoeWgmmaThreads = 384;
constexpr int kMoeWgmmaConsumerWarps = 8;
constexpr int kMoeWgmmaBoxRows = 64;                                    // weight rows per TMA box
constexpr int kMoeWgmmaABytes = kMoeTile * kFp8Block;                   // 8 KiB
constexpr int kMoeWgmmaBBytes = 4 * kMoeWgmmaBoxRows * kFp8Block;       // 32 KiB
constexpr int kMoeWgmmaStageBytes = kMoeWgmmaABytes + kMoeWgmmaBBytes;
constexpr int kMoeWgmmaStages = 5;
constexpr int kMoeWgmmaProducerThreads = 128;
constexpr int kMoeWgmmaSharedBytes = 1024 + kMoeWgmmaStages * kMoeWgmmaStageBytes + 2 * kMoeWgmmaStages * 8;
constexpr int kMoeWgmmaSwigluColumns = 128; // output columns per block: gate/up
constexpr int kMoeWgmmaDownColumns = 256;   // down
static_assert(kMoeWgmmaStageBytes % 1024 == 0 && kMoeWgmmaABytes % 1024 == 0, "every box must stay 1024-byte aligned");
static_assert(kMoeTile * kFp8Block / 16 == 4 * kMoeWgmmaProducerThreads, "each producer thread copies 4 chunks of A per stage");

struct MoeWgmmaParams
{
    TmaMap w_map;            // weight codes [E, N, K]: dims {K, N, E}, box {128, 64, 1}, 128-byte swizzle
    MoeGroupedGemmParams g;  // as moe_grouped_gemm.cu (w unused: the map holds it)
};

template <int N, int K, int SWIGLU, int MASKED>
__global__ void __launch_bounds__(kMoeWgmmaThreads, 1) moe_grouped_gemm_wgmma_kernel(const __grid_constant__ MoeWgmmaParams p)
{
#if DSC_HOPPER
    constexpr int KB = (K + kFp8Block - 1) / kFp8Block;
    constexpr int I = SWIGLU ? N / 2 : N; // output columns
    constexpr int IB = (I + kFp8Block - 1) / kFp8Block;
    constexpr int SROWS = SWIGLU ? 2 * IB : IB;
    static_assert(!SWIGLU || N % 2 == 0, "W13 stacks gate and up: N = 2 * inter");
    static_assert(K % 16 == 0, "activation rows are copied in 16-byte chunks");
    const MoeGroupedGemmParams& g = p.g;
    int e, row0, live;
    if (!moe_tile<MASKED>(g, e, row0, live)) return; // the same for every thread of the block

    extern __shared__ u8 moe_wgmma_smem[];
    auto ring = WgmmaRing<kMoeWgmmaStages, kMoeWgmmaStageBytes>::open(moe_wgmma_smem, 1 + kMoeWgmmaProducerThreads, kMoeWgmmaConsumerWarps);
    const int c0 = blockIdx.x * (SWIGLU ? kMoeWgmmaSwigluColumns : kMoeWgmmaDownColumns);

    if (threadIdx.x >= kMoeWgmmaConsumerWarps * 32)
    {
        warpgroup_registers_dec<56>();
        const int pt = threadIdx.x - kMoeWgmmaConsumerWarps * 32;
        const int chunk = pt & 7; // this thread's 16-byte chunk of K in rows pt / 8 + 16 i
        const u8* src[4];
        u32 dst[4];
#pragma unroll
        for (int i = 0; i < 4; i++)
        {
            const int r = (pt >> 3) + 16 * i;
            const i64 a = moe_activation_row(g, row0, r, live);
            src[i] = a < 0 ? nullptr : g.x_codes + a * g.x_stride + chunk * 16;
            dst[i] = swizzle128_offset(r, chunk);
        }
        // B's four boxes: gate/up rows for warpgroup 0's then 1's columns, or four consecutive 64-row boxes.
        i32 brow[4];
#pragma unroll
        for (int b = 0; b < 4; b++) brow[b] = SWIGLU ? (b & 1) * I + c0 + (b >> 1) * 64 : c0 + 64 * b;
        if (pt == 0) tma_prefetch_map(&p.w_map);

        for (int kb = 0; kb < KB; kb++)
        {
            mbar_wait_watchdog(ring.empty(), ring.phase ^ 1u);
            const u32 a_smem = ring.smem(), b_smem = ring.smem() + kMoeWgmmaABytes;
            if (pt == 0)
            {
                mbar_arrive_expect_tx(ring.full(), kMoeWgmmaBBytes);
#pragma unroll
                for (int b = 0; b < 4; b++) tma_load_3d(b_smem + b * kMoeWgmmaBoxRows * kFp8Block, &p.w_map, ring.full(), kb * kFp8Block, brow[b], e);
            }
            const int k = kb * kFp8Block + chunk * 16;
#pragma unroll
            for (int i = 0; i < 4; i++)
            {
                const bool in = src[i] != nullptr && k < K;
                cp_async16_zfill(a_smem + dst[i], in ? src[i] + kb * kFp8Block : g.x_codes, in ? 16u : 0u);
            }
            cp_async_arrive(ring.full());
            ring.next();
        }
        wgmma_drain(ring);
        return;
    }

    warpgroup_registers_inc<224>();
    const int wg = threadIdx.x >> 7, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r0 = (warp & 3) * 16 + (lane >> 2), r1 = r0 + 8; // this thread's tile rows (both warpgroups share A)
    const int col = 2 * (lane & 3);
    const i64 a0 = moe_activation_row(g, row0, r0, live), a1 = moe_activation_row(g, row0, r1, live);
    const float* se = g.w_scales + (i64)e * SROWS * KB;
    // Scale rows of this warpgroup's B rows (-1: past the weight, never stored): gate / up, or down.
    const int first = c0 + (SWIGLU ? 64 : 128) * wg;
    const int sr_lo = first < I ? first / kFp8Block : -1;            // gate rows, or down's rows
    const int sr_hi = SWIGLU ? (first < I ? IB + first / kFp8Block : -1) : sr_lo; // up rows

    float acc[64], part[64];
#pragma unroll
    for (int i = 0; i < 64; i++) acc[i] = 0.0f;

    for (int kb = 0; kb < KB; kb++)
    {
        const float x0 = a0 < 0 ? 0.0f : g.x_scales[a0 * g.x_scales_stride + kb];
        const float x1 = a1 < 0 ? 0.0f : g.x_scales[a1 * g.x_scales_stride + kb];
        const float w_lo = sr_lo < 0 ? 0.0f : se[sr_lo * KB + kb];
        const float w_hi = sr_hi < 0 ? 0.0f : se[sr_hi * KB + kb];
        const u32 a = ring.smem();
        const u32 b = ring.smem() + kMoeWgmmaABytes + wg * 2 * kMoeWgmmaBoxRows * kFp8Block;
        mbar_wait(ring.full(), ring.phase);
        fence_proxy_async_shared();
        wgmma_k128_e4m3<128>(part, a, b);
        if (lane == 0) mbar_arrive(ring.empty());
        ring.next();

        // Rows r0 and r1; columns 0-63 of the warpgroup's 128 take w_lo (gate, or down's), 64-127 w_hi (up, or down's again).
        wgmma_promote_n128(acc, part, x0 * w_lo, x1 * w_lo, x0 * w_hi, x1 * w_hi);
    }

#pragma unroll
    for (int h = 0; h < 2; h++)
    {
        const int r = h ? r1 : r0;
        if (r >= live) continue;
        u16* out = g.y + (i64)(row0 + r) * g.y_stride;
#pragma unroll
        for (int j = 0; j < (SWIGLU ? 8 : 16); j++)
#pragma unroll
            for (int c = 0; c < 2; c++)
            {
                const int n = first + 8 * j + col + c;
                if (n >= I) continue;
                const float v = acc[4 * j + 2 * h + c];
                if (SWIGLU)
                {
                    const float gv = bf16_to_float(float_to_bf16(v));
                    const float uv = bf16_to_float(float_to_bf16(acc[4 * (j + 8) + 2 * h + c]));
                    out[n] = float_to_bf16(gv / (1.0f + expf(-gv)) * uv);
                }
                else
                {
                    out[n] = float_to_bf16(v);
                }
            }
    }
#endif
}
