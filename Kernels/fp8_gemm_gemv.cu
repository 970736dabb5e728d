// FP8 block-scaled GEMM, decode path (M from 1 to about 128: memory-bound on the weights).
// Semantics and params: fp8_gemm.cuh. Activations are pre-quantized by act_quant (codes + per-128 scales).
//
// Layout: one warp per output column n (a weight row, K contiguous bytes), WARPS warps per block, so each
// block streams WARPS weight rows. Per iteration a lane takes 16 consecutive bytes (one 16-byte load; a
// warp covers 512 bytes = four 128-blocks) and UNROLL iterations are loaded before any is used, so
// kGemvUnroll 16-byte loads per lane are in flight. A lane's 16 bytes never straddle a 128-block (16 | 128), so
// its fp32 partial dot of 16 products is scaled by sa[m, kb] * sb[n/128, kb] and added to an fp32
// accumulator: the promotion to scaled fp32 happens every 16 of K (the issue asks for at least every 128).
// MT activation rows are processed per weight load (the weight bytes are reused from registers); blockIdx.z
// walks M in tiles of MT, re-reading the weights (from L2 for the decode sizes).
//
// Split-K (N too small to fill the GPU): blockIdx.y = split s covers K [s*split_k, (s+1)*split_k) and
// writes its fp32 partial to partial[s, m, n]; fp8_gemv_reduce_kernel then sums the splits in a fixed
// order and applies the epilogue. A second pass instead of atomicAdd keeps the result deterministic
// (run-to-run identical) and needs no zeroed output; its cost is M*N*splits*4 bytes, tiny for decode.
//
// K % 16 != 0 (or an activation stride that is not a multiple of 16): byte-wise loads (fp8_load16 tail
// path) with the same arithmetic. N % 128 != 0: the last weight-scale row block is partial, handled by n/128.
#pragma once
#include "fp8_gemm.cuh"

constexpr int kGemvUnroll = 2;

template <int N, int K, int MT, int WARPS>
__global__ void __launch_bounds__(WARPS * 32) fp8_gemv_kernel(const __grid_constant__ Fp8GemmParams p)
{
    constexpr int KB = (K + kFp8Block - 1) / kFp8Block;
    constexpr int STEP = 32 * 16; // bytes of K per warp iteration
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.x * WARPS + (threadIdx.x >> 5);
    if (n >= N) return;
    const int m0 = blockIdx.z * MT;
    const int mt = min(MT, p.m - m0);
    if (mt <= 0) return;
    const int split = blockIdx.y;
    const int kbeg = split * p.split_k;
    const int kend = min(K, kbeg + p.split_k);
    const bool wvec = (K % 16) == 0;
    const bool xvec = wvec && (p.x_stride % 16) == 0 && ((u64)p.x_codes & 15u) == 0;

    const u8* wrow = p.w + (i64)n * K;
    const float* sb = p.w_scales + (i64)(n / kFp8Block) * KB;
    float acc[MT];
#pragma unroll
    for (int i = 0; i < MT; i++) acc[i] = 0.0f;

    for (int k0 = kbeg; k0 < kend; k0 += STEP * kGemvUnroll)
    {
        uint4 wv[kGemvUnroll];
#pragma unroll
        for (int u = 0; u < kGemvUnroll; u++)
        {
            const int k = k0 + u * STEP + lane * 16;
            wv[u] = k < kend ? fp8_load16(wrow, k, kend, wvec) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int u = 0; u < kGemvUnroll; u++)
        {
            const int k = k0 + u * STEP + lane * 16;
            if (k >= kend) break;
            const int kb = k / kFp8Block;
            const float wscale = sb[kb];
#pragma unroll
            for (int i = 0; i < MT; i++)
            {
                if (i < mt)
                {
                    const i64 row = m0 + i;
                    const uint4 xv = fp8_load16(p.x_codes + row * p.x_stride, k, kend, xvec);
                    float d = fp8_dot4(xv.x, wv[u].x, 0.0f);
                    d = fp8_dot4(xv.y, wv[u].y, d);
                    d = fp8_dot4(xv.z, wv[u].z, d);
                    d = fp8_dot4(xv.w, wv[u].w, d);
                    acc[i] = fmaf(d, p.x_scales[row * p.x_scales_stride + kb] * wscale, acc[i]);
                }
            }
        }
    }

#pragma unroll
    for (int i = 0; i < MT; i++)
    {
        const float v = warp_sum(acc[i]);
        if (lane == 0 && i < mt)
        {
            const i64 row = m0 + i;
            if (p.partial) p.partial[((i64)split * p.m + row) * N + n] = v;
            else fp8_gemm_store(p, row, n, v);
        }
    }
}

// Sums the split-K partials [splits, m, N] in split order and applies the epilogue. One thread per output.
template <int N>
__global__ void __launch_bounds__(256) fp8_gemv_reduce_kernel(const __grid_constant__ Fp8GemmParams p)
{
    const i64 i = (i64)blockIdx.x * 256 + threadIdx.x;
    if (i >= (i64)p.m * N) return;
    float v = 0.0f;
    for (int s = 0; s < p.splits; s++) v += p.partial[(i64)s * p.m * N + i];
    fp8_gemm_store(p, i / N, i % N, v);
}
