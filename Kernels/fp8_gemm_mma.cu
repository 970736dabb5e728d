// FP8 block-scaled GEMM, portable tensor-core prefill path with mma.sync (no wgmma/TMA: those need a GPU
// to develop and tune; this is the correctness baseline and the path for non-Hopper cards).
// Semantics and params: fp8_gemm.cuh. Activations are pre-quantized by act_quant.
//
// Tile: 64 (M) x 64 (N) per block of 4 warps (2 x 2, 32 x 32 each), K in steps of 128 = one scale block.
// Per K block the warp's mma accumulators start from zero, run over the 128 channels, and are then
// multiplied by sa[m, kb] * sb[n/128, kb] and added to fp32 registers: the promotion every 128 of K the
// official kernel does (tensor-core accumulators of FP8 products may hold fewer bits than fp32).
//   (FP8 mma on sm_89+ with NVRTC >= 12.4, exact BF16 widening otherwise: fp8_gemm.cuh.)
// Tiles go global -> shared with 16-byte loads where K and the activation stride allow it, byte loads
// with zero fill otherwise (K % 16 != 0, the K tail, rows past M or N). One stage, no pipelining.
#pragma once
#include "fp8_gemm.cuh"

template <int N, int K>
__global__ void __launch_bounds__(128) fp8_gemm_mma_kernel(const __grid_constant__ Fp8GemmParams p)
{
    constexpr int KB = (K + kFp8Block - 1) / kFp8Block;
    __shared__ __align__(16) u8 As[kMmaBM * kMmaRow];
    __shared__ __align__(16) u8 Bs[kMmaBN * kMmaRow];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1;
    const int g = lane >> 2, t = lane & 3;
    const int n0 = blockIdx.x * kMmaBN;
    const int m0 = blockIdx.y * kMmaBM;
    const bool wvec = (K % 16) == 0;
    const bool xvec = wvec && (p.x_stride % 16) == 0 && ((u64)p.x_codes & 15u) == 0;
    const float* sb = p.w_scales + (i64)(n0 / kFp8Block) * KB; // a 64-wide tile lies inside one 128-block

    float acc[2][4][4];
#pragma unroll
    for (int a = 0; a < 2; a++)
#pragma unroll
        for (int b = 0; b < 4; b++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[a][b][c] = 0.0f;

    for (int kb = 0; kb < KB; kb++)
    {
        const int kbase = kb * kFp8Block;
        const int kend = min(K, kbase + kFp8Block);
        fp8_mma_stage(As, tid, kbase, kend, xvec, [&](int r) -> const u8* { return m0 + r < p.m ? p.x_codes + (i64)(m0 + r) * p.x_stride : nullptr; });
        fp8_mma_stage(Bs, tid, kbase, kend, wvec, [&](int r) -> const u8* { return n0 + r < N ? p.w + (i64)(n0 + r) * K : nullptr; });
        __syncthreads();

        float part[2][4][4];
        fp8_mma_block(As, Bs, wm, wn, lane, part);

        // Promote: scale this K block's partial products and add them to the fp32 accumulators.
        const float wscale = sb[kb];
#pragma unroll
        for (int mi = 0; mi < 2; mi++)
        {
#pragma unroll
            for (int h = 0; h < 2; h++)
            {
                const int gm = m0 + wm * 32 + mi * 16 + g + 8 * h;
                const float s = gm < p.m ? p.x_scales[(i64)gm * p.x_scales_stride + kb] * wscale : 0.0f;
#pragma unroll
                for (int ni = 0; ni < 4; ni++)
                {
                    acc[mi][ni][2 * h] = fmaf(part[mi][ni][2 * h], s, acc[mi][ni][2 * h]);
                    acc[mi][ni][2 * h + 1] = fmaf(part[mi][ni][2 * h + 1], s, acc[mi][ni][2 * h + 1]);
                }
            }
        }
        __syncthreads();
    }

    // Accumulator layout of m16n8: c0, c1 at row g, columns 2t, 2t+1; c2, c3 at row g + 8.
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int ni = 0; ni < 4; ni++)
#pragma unroll
            for (int c = 0; c < 4; c++)
            {
                const int gm = m0 + wm * 32 + mi * 16 + g + 8 * (c >> 1);
                const int gn = n0 + wn * 32 + ni * 8 + 2 * t + (c & 1);
                if (gm < p.m && gn < N) fp8_gemm_store(p, gm, gn, acc[mi][ni][c]);
            }
}
