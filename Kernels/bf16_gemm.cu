// BF16-weight GEMM for the unquantized linears (lm_head, BF16 checkpoints): y[m, n] = sum_k x[m, k] * w[n, k]
// with x f32 or bf16, w bf16 [n, k] (the checkpoint's row order), fp32 accumulation, f32 or bf16 output.
// One warp per output column and ROWS activation rows, so each weight row is read once per ROWS rows; lanes
// stride over k (16-byte pieces of 8 weights when k, the x stride and both pointers allow, else one element)
// and the 32 partial sums are reduced by a fixed butterfly (deterministic). No tensor cores: a
// correctness-first kernel for the backend (the head is one GEMV per decode step); to be tuned on a GPU.
#pragma once
#include "common.cuh"

struct Bf16GemmParams
{
    const void* x;   // [m, x_stride] (IN_BF16 ? bf16 : f32)
    const u16* w;    // [n, k] bf16
    void* y;         // [m, y_stride] (OUT_BF16 ? bf16 : f32)
    i64 x_stride;
    i64 y_stride;
    i32 m;
    i32 n;
    i32 k;
    i32 pad0;
};

// grid = (ceil(n / WARPS), ceil(m / ROWS)), block = WARPS * 32
template <int ROWS, int WARPS, int IN_BF16, int OUT_BF16>
__global__ void __launch_bounds__(WARPS * 32) bf16_gemm_kernel(const __grid_constant__ Bf16GemmParams p)
{
    typedef typename ElemOf<IN_BF16>::type TIn;
    typedef typename ElemOf<OUT_BF16>::type TOut;
    const int lane = threadIdx.x & 31;
    const i64 col = (i64)blockIdx.x * WARPS + (threadIdx.x >> 5);
    const i64 row0 = (i64)blockIdx.y * ROWS;
    if (col >= p.n) return;
    float acc[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; r++) acc[r] = 0.0f;
    const u16* wr = p.w + col * (i64)p.k;
    const bool vec = (p.k & 7) == 0 && (p.x_stride & 7) == 0 && ((((u64)p.x) | ((u64)p.w)) & 15) == 0;
    if (vec)
    {
        for (i32 kk = lane * 8; kk < p.k; kk += 256)
        {
            const uint4 w4 = *(const uint4*)(wr + kk);
            const u32 wbits[4] = {w4.x, w4.y, w4.z, w4.w};
            float wf[8];
#pragma unroll
            for (int j = 0; j < 4; j++)
            {
                wf[2 * j] = bf16_to_float((u16)(wbits[j] & 0xffffu));
                wf[2 * j + 1] = bf16_to_float((u16)(wbits[j] >> 16));
            }
#pragma unroll
            for (int r = 0; r < ROWS; r++)
            {
                if (row0 + r >= p.m) continue;
                const TIn* xr = (const TIn*)p.x + (row0 + r) * p.x_stride + kk;
#pragma unroll
                for (int j = 0; j < 8; j++) acc[r] = fmaf(wf[j], load_f32<TIn>(xr, j), acc[r]);
            }
        }
    }
    else
    {
        for (i32 kk = lane; kk < p.k; kk += 32)
        {
            const float wv = bf16_to_float(wr[kk]);
#pragma unroll
            for (int r = 0; r < ROWS; r++)
            {
                if (row0 + r < p.m) acc[r] = fmaf(wv, load_f32<TIn>((const TIn*)p.x + (row0 + r) * p.x_stride, kk), acc[r]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; r++)
    {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
    }
    if (lane == 0)
    {
#pragma unroll
        for (int r = 0; r < ROWS; r++)
        {
            if (row0 + r < p.m) store_f32<TOut>((TOut*)p.y + (row0 + r) * p.y_stride, col, acc[r]);
        }
    }
}
