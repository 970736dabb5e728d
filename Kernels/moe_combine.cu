// MoE combine: y[t, c] = Σ_j w[t, j] · expert_out[inv[t·k + j], c]  (+ shared[t, c])  (+ residual[t, c])
// accumulated in fp32 in that fixed order (j = 0..k-1, then the shared expert, then the residual), one
// rounding at the store: deterministic, no atomics. The expert sum and the shared add follow
// CpuBackend.MoeExperts; the residual add is the layer's skip connection fused here. Slots whose inv is
// negative (not routed, or dropped by a masked layout's capacity) contribute nothing. expert_out and shared
// are bf16 (what the grouped GEMM and the shared expert store); residual has y's type.
#pragma once
#include "common.cuh"

struct MoeCombineParams
{
    const u16* expert_out;   // bf16 [rows, expert_stride], row = grouped row
    const i32* inv;          // [tokens * k] slot -> grouped row
    const float* weights;    // [tokens, k] routing weights
    const u16* shared;       // null or bf16 [tokens, shared_stride]
    const void* residual;    // null or [tokens, residual_stride], y's type; may alias y
    void* y;                 // [tokens, y_stride] bf16 or f32
    i64 expert_stride;
    i64 shared_stride;
    i64 residual_stride;
    i64 y_stride;
    i32 tokens;
    i32 k;
    i32 hidden;
    i32 pad0;
};

// blockIdx.x = token, blockIdx.y * BLOCK + threadIdx.x = channel.
template <int BLOCK, int OUT_BF16>
__global__ void __launch_bounds__(BLOCK) moe_combine_kernel(const __grid_constant__ MoeCombineParams p)
{
    const i64 t = blockIdx.x;
    const int c = blockIdx.y * BLOCK + threadIdx.x;
    if (c >= p.hidden) return;
    float acc = 0.0f;
    for (int j = 0; j < p.k; j++)
    {
        const int row = p.inv[t * p.k + j];
        if (row >= 0) acc = fmaf(p.weights[t * p.k + j], bf16_to_float(p.expert_out[(i64)row * p.expert_stride + c]), acc);
    }
    if (p.shared) acc += bf16_to_float(p.shared[t * p.shared_stride + c]);
    if (OUT_BF16)
    {
        if (p.residual) acc += bf16_to_float(((const u16*)p.residual)[t * p.residual_stride + c]);
        ((u16*)p.y)[t * p.y_stride + c] = float_to_bf16(acc);
    }
    else
    {
        if (p.residual) acc += ((const float*)p.residual)[t * p.residual_stride + c];
        ((float*)p.y)[t * p.y_stride + c] = acc;
    }
}
