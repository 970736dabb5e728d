// SwiGLU's elementwise part: out = silu(gate) * up, silu(g) = g / (1 + exp(-g)), in fp32. ROUND (f32 output holding
// bf16 values, the CPU GpuEmulation's Store): out rounded to bf16 values.
#pragma once
#include "common.cuh"

struct SiluMulParams
{
    const void* gate;   // [rows, gate_stride] (IN_BF16 ? bf16 : f32)
    const void* up;     // [rows, up_stride]; may point into the same rows as gate (fused gate|up)
    void* out;          // [rows, out_stride] (OUT_BF16 ? bf16 : f32)
    i64 gate_stride;
    i64 up_stride;
    i64 out_stride;
    i32 rows;
    i32 cols;
};

// grid = (ceil(cols / BLOCK), rows)
template <int BLOCK, int IN_BF16, int OUT_BF16, int ROUND>
__global__ void __launch_bounds__(BLOCK) silu_mul_kernel(const __grid_constant__ SiluMulParams p)
{
    typedef typename ElemOf<IN_BF16>::type TIn;
    typedef typename ElemOf<OUT_BF16>::type TOut;
    const i64 row = blockIdx.y;
    const i64 col = (i64)blockIdx.x * BLOCK + threadIdx.x;
    if (row >= p.rows || col >= p.cols) return;
    const float g = load_f32<TIn>((const TIn*)p.gate + row * p.gate_stride, col);
    const float u = load_f32<TIn>((const TIn*)p.up + row * p.up_stride, col);
    const float s = g / (1.0f + expf(-g));
    store_rounded<TOut, ROUND>((TOut*)p.out + row * p.out_stride, col, s * u);
}
