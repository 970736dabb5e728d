// RMSNorm over the last dimension, fp32 math (MODEL.md 9): y = x * (1 / sqrt(mean(x^2) + eps)) * w.
// Fused variant: h += x (the residual add) first, h written back in x's storage type, then y = norm(h). A bf16 h is
// rounded by its store, and the norm reads the stored value (CpuBackend.AddRmsNorm in GpuEmulation).
// ROUND (f32 storage holding bf16 values, the CPU GpuEmulation): an f32 h is rounded to bf16 after the add,
// before the norm reads it, and y is rounded to bf16 values (CpuBackend.AddRmsNorm and RmsNorm's Store).
// One block per row; the row is read twice (sum of squares, then scale) because at the model's widths
// (<= 7168 floats) the second read hits L1/L2.
#pragma once
#include "common.cuh"

struct RmsNormParams
{
    const void* x;        // [rows, x_stride] input (IN_BF16 ? bf16 : f32); fused: the update added to h
    void* residual;       // [rows, residual_stride] residual stream h, of x's type (fused only, else null)
    const u16* weight;    // [dim] bf16
    void* y;              // [rows, y_stride] output (OUT_BF16 ? bf16 : f32)
    i64 x_stride;         // elements between rows
    i64 residual_stride;
    i64 y_stride;
    i32 rows;
    i32 dim;
    float eps;
    i32 pad0;
};

template <int BLOCK, int FUSE_RESIDUAL, int IN_BF16, int OUT_BF16, int ROUND>
__global__ void __launch_bounds__(BLOCK) rmsnorm_kernel(const __grid_constant__ RmsNormParams p)
{
    typedef typename ElemOf<IN_BF16>::type TIn;
    typedef typename ElemOf<OUT_BF16>::type TOut;
    __shared__ float scratch[32];
    const i64 row = blockIdx.x;
    if (row >= p.rows) return;
    const TIn* x = (const TIn*)p.x + row * p.x_stride;
    TOut* y = (TOut*)p.y + row * p.y_stride;
    TIn* h = FUSE_RESIDUAL ? (TIn*)p.residual + row * p.residual_stride : nullptr;

    float ss = 0.0f;
    for (int i = threadIdx.x; i < p.dim; i += BLOCK)
    {
        float v = load_f32<TIn>(x, i);
        if (FUSE_RESIDUAL)
        {
            v = __fadd_rn(load_f32<TIn>(h, i), v);
            if (ROUND || IN_BF16) v = bf16_round(v); // what a bf16 h stores
            store_f32<TIn>(h, i, v); // the same thread reads it back below: no barrier needed
        }
        ss = fmaf(v, v, ss);
    }
    ss = block_sum<BLOCK>(ss, scratch);
    const float inv = 1.0f / sqrtf(ss / (float)p.dim + p.eps);
    for (int i = threadIdx.x; i < p.dim; i += BLOCK)
    {
        float v = load_f32<TIn>(FUSE_RESIDUAL ? h : x, i);
        store_rounded<TOut, ROUND>(y, i, v * inv * bf16_to_float(p.weight[i]));
    }
}
