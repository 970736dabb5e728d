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

// ---- mma.sync building blocks (fp8_gemm_mma.cu, moe_grouped_gemm.cu) ----
// A 64 x 128 (M or N by one K scale block) operand tile lives in shared memory, rows kMmaRow bytes apart;
// 4 warps (2 x 2) each own a 32 x 32 output quarter. Two paths, chosen by the target alone:
//   FP8 path (sm_89 and sm_120: FP8 mma.sync in hardware):
//            mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 straight on the codes.
//   F16 path (every other target, sm_90/sm_90a included): Hopper has FP8 only in wgmma; its ptxas
//            emulates an FP8 mma.sync, and NVRTC 12.4's emulation of the accumulating form drops the
//            accumulator (it returns twice the last 32-wide K slice). Every e4m3 value is exact in f16
//            (3 mantissa bits, exponents 2^-9..2^8), so the codes are widened explicitly and
//            mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 computes the same exact products.
//            Widening: cvt.rn.f16x2.e4m3x2 where the ISA has it (sm_89+), arithmetic on sm_80.
// Both paths pass the accumulator as a separate input operand, never in place ("+f").
// The static resource gate (KernelInspector) fails any image with an FP8 mma.sync for a target that
// would emulate it.
constexpr int kMmaBM = 64;
constexpr int kMmaBN = 64;
constexpr int kMmaPad = 16; // bytes of padding per shared row (keeps 16-byte alignment, spreads banks)
constexpr int kMmaRow = kFp8Block + kMmaPad;

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 890 || (__CUDA_ARCH__ >= 1200 && __CUDA_ARCH__ < 1300))
#define DSC_FP8_MMA 1
#else
#define DSC_FP8_MMA 0
#endif

DSC_DEVICE u32 smem_u32(const u8* p) { return *(const u32*)p; }
DSC_DEVICE u16 smem_u16(const u8* p) { return *(const u16*)p; }

// d = a * b + c for one m16n8 tile; c and d are separate operands.
DSC_DEVICE void mma_f16_16816(float d[4], const u32 a[4], const u32 b[2], const float c[4])
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
                   "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

#if DSC_FP8_MMA
DSC_DEVICE void mma_e4m3_16832(float d[4], const u32 a[4], const u32 b[2], const float c[4])
{
    asm volatile("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
                   "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
#else
// Two e4m3 codes (element k in the low byte, k + 1 in the high byte) -> f16x2 (k low, k + 1 high), exact;
// NaN stays NaN.
DSC_DEVICE u32 e4m3x2_to_f16x2(u16 codes)
{
    u32 h;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h) : "h"(codes));
#else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(h) : "f"(e4m3_fast(codes >> 8)), "f"(e4m3_fast(codes & 0xffu)));
#endif
    return h;
}
#endif

// Stages one 64-row x 128-byte K block of an operand into shared memory s (rows kMmaRow apart) with 128
// threads, 4 chunks of 16 bytes each: row(r) is row r's first byte or null for a zero row; bytes at or
// past kend read as zero. vec: 16-byte loads allowed (rows 16-byte aligned, K a multiple of 16).
template <typename RowFn>
DSC_DEVICE void fp8_mma_stage(u8* s, int tid, int kbase, int kend, bool vec, RowFn row)
{
#pragma unroll
    for (int c = 0; c < 4; c++)
    {
        const int chunk = tid + c * 128;
        const int r = chunk >> 3, kc = (chunk & 7) * 16;
        const u8* src = row(r);
        *(uint4*)&s[r * kMmaRow + kc] = src ? fp8_load16(src, kbase + kc, kend, vec) : make_uint4(0u, 0u, 0u, 0u);
    }
}

// part = this warp's 32 x 32 quarter (rows wm*32.., columns wn*32..) of As · Bsᵀ over one staged 128-wide
// K block, from zero (the caller scales it and promotes it to fp32 accumulators).
// Accumulator layout of m16n8: c0, c1 at row g, columns 2t, 2t+1; c2, c3 at row g + 8 (g = lane/4, t = lane%4).
DSC_DEVICE void fp8_mma_block(const u8* As, const u8* Bs, int wm, int wn, int lane, float part[2][4][4])
{
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int a = 0; a < 2; a++)
#pragma unroll
        for (int b = 0; b < 4; b++)
#pragma unroll
            for (int c = 0; c < 4; c++) part[a][b][c] = 0.0f;
#if DSC_FP8_MMA
    // m16n8k32 on the codes: A registers hold 4 consecutive k of rows g / g+8, at k and k+16.
#pragma unroll
    for (int ks = 0; ks < kFp8Block; ks += 32)
    {
        u32 af[2][4], bfr[4][2];
#pragma unroll
        for (int mi = 0; mi < 2; mi++)
        {
            const u8* a0 = &As[(wm * 32 + mi * 16 + g) * kMmaRow + ks + t * 4];
            af[mi][0] = smem_u32(a0);
            af[mi][1] = smem_u32(a0 + 8 * kMmaRow);
            af[mi][2] = smem_u32(a0 + 16);
            af[mi][3] = smem_u32(a0 + 8 * kMmaRow + 16);
        }
#pragma unroll
        for (int ni = 0; ni < 4; ni++)
        {
            const u8* b0 = &Bs[(wn * 32 + ni * 8 + g) * kMmaRow + ks + t * 4];
            bfr[ni][0] = smem_u32(b0);
            bfr[ni][1] = smem_u32(b0 + 16);
        }
#pragma unroll
        for (int mi = 0; mi < 2; mi++)
#pragma unroll
            for (int ni = 0; ni < 4; ni++) mma_e4m3_16832(part[mi][ni], af[mi], bfr[ni], part[mi][ni]);
    }
#else
    // m16n8k16 on widened codes: A registers hold 2 consecutive k of rows g / g+8, at k and k+8.
#pragma unroll
    for (int ks = 0; ks < kFp8Block; ks += 16)
    {
        const int kk = ks + t * 2;
        u32 af[2][4], bfr[4][2];
#pragma unroll
        for (int mi = 0; mi < 2; mi++)
        {
            const u8* a0 = &As[(wm * 32 + mi * 16 + g) * kMmaRow + kk];
            const u8* a1 = a0 + 8 * kMmaRow;
            af[mi][0] = e4m3x2_to_f16x2(smem_u16(a0));
            af[mi][1] = e4m3x2_to_f16x2(smem_u16(a1));
            af[mi][2] = e4m3x2_to_f16x2(smem_u16(a0 + 8));
            af[mi][3] = e4m3x2_to_f16x2(smem_u16(a1 + 8));
        }
#pragma unroll
        for (int ni = 0; ni < 4; ni++)
        {
            const u8* b0 = &Bs[(wn * 32 + ni * 8 + g) * kMmaRow + kk];
            bfr[ni][0] = e4m3x2_to_f16x2(smem_u16(b0));
            bfr[ni][1] = e4m3x2_to_f16x2(smem_u16(b0 + 8));
        }
#pragma unroll
        for (int mi = 0; mi < 2; mi++)
#pragma unroll
            for (int ni = 0; ni < 4; ni++) mma_f16_16816(part[mi][ni], af[mi], bfr[ni], part[mi][ni]);
    }
#endif
}
