// What the FP8 block-scaled GEMM families share (fp8_gemm_gemv.cu, fp8_gemm_mma.cu): the params struct
// and the epilogue. Semantics (MODEL.md 7, the official fp8_gemm):
//   Y[m, n] = sum_kb sa[m, kb] * sb[n / 128, kb] * sum_{k in block kb} e4m3(xq[m, k]) * e4m3(w[n, k])  (+ residual[m, n])
// W is e4m3 [N, K] row-major with fp32 weight_scale_inv sb [ceil(N/128), ceil(K/128)] (edge blocks partial).
// X arrives PRE-QUANTIZED by the act_quant family (codes [m, x_stride] e4m3, scales sa [m, x_scales_stride],
// one per 128 channels, s = max(amax, 1e-4) / 448 with a true division): that is what the official kernel
// takes, and act_quant is already tested bit-exact against the CPU rule, so the GEMM has one job.
// N and K are template constants (the weights fix them); M is a run-time argument.
#pragma once
#include "common.cuh"

constexpr int kFp8Block = 128;

struct Fp8GemmParams
{
    const u8* x_codes;      // [m, x_stride] e4m3 activation codes
    const float* x_scales;  // [m, x_scales_stride] one per 128 channels
    const u8* w;            // [N, K] e4m3 weight codes, row-major, rows contiguous (stride K)
    const float* w_scales;  // [ceil(N/128), ceil(K/128)] weight_scale_inv
    void* y;                // [m, y_stride] bf16 (out_bf16) or f32
    const void* residual;   // null or [m, residual_stride], same type as y; may alias y (in-place y += X·Wᵀ)
    float* partial;         // gemv split-K workspace [splits, m, N] fp32; null: no split
    i64 x_stride;           // elements (bytes) between activation rows
    i64 x_scales_stride;
    i64 y_stride;
    i64 residual_stride;
    i32 m;
    i32 out_bf16;           // 1: y is bf16, 0: f32
    i32 splits;             // gemv: number of K splits (1: none)
    i32 split_k;            // gemv: K elements per split, a multiple of 512
};

// y[row, col] = v (+ residual[row, col]) in the output type; fp32 add, one rounding at the store.
DSC_DEVICE void fp8_gemm_store(const Fp8GemmParams& p, i64 row, i64 col, float v)
{
    if (p.out_bf16)
    {
        if (p.residual) v += bf16_to_float(((const u16*)p.residual)[row * p.residual_stride + col]);
        ((u16*)p.y)[row * p.y_stride + col] = float_to_bf16(v);
    }
    else
    {
        if (p.residual) v += ((const float*)p.residual)[row * p.residual_stride + col];
        ((float*)p.y)[row * p.y_stride + col] = v;
    }
}

// 16 e4m3 bytes of a row starting at element k (k a multiple of 16), zero beyond `end`. VEC: one 16-byte
// load (the caller guarantees 16-byte alignment and k + 16 <= end); otherwise a byte-wise tail path.
DSC_DEVICE uint4 fp8_load16(const u8* row, int k, int end, bool vec)
{
    if (vec && k + 16 <= end) return *(const uint4*)(row + k);
    u32 w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int j = 0; j < 16; j++)
        if (k + j < end) w[j >> 2] |= (u32)row[k + j] << (8 * (j & 3));
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// e4m3 code -> float without branches on the exponent: the 7 magnitude bits shifted into float's
// exponent/mantissa position give 2^-120 times the value (normal and subnormal codes alike), and the
// multiply by 2^120 is exact (no --use_fast_math, so float denormals are kept). 0x7F/0xFF are NaN.
// Same values as e4m3_to_float (common.cuh), far less code per byte.
DSC_DEVICE float e4m3_fast(u32 c)
{
    const u32 a = c & 0x7fu;
    float mag = __uint_as_float(a << 20) * __uint_as_float(0x7b800000u); // * 2^120
    if (a == 0x7fu) mag = f32_nan();
    return (c & 0x80u) ? -mag : mag;
}

// sum_j e4m3(a_j) * e4m3(b_j) over the 4 bytes of a and b, fp32, fixed order.
DSC_DEVICE float fp8_dot4(u32 a, u32 b, float acc)
{
#pragma unroll
    for (int j = 0; j < 4; j++) acc = fmaf(e4m3_fast((a >> (8 * j)) & 0xffu), e4m3_fast((b >> (8 * j)) & 0xffu), acc);
    return acc;
}
