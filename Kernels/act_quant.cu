// FP8 e4m3 activation quantization per token per 128 channels, the official act_quant rule (MODEL.md 7):
// amax = max |x| over the group (NaN propagates), raised to at least 1e-4; s = amax / 448 (fp32);
// UE8M0: s = 2^ceil(log2 s); q = e4m3(x / s) with a true division (not a reciprocal multiply: that can
// move a rare tie by one code). The last group is narrower when cols % 128 != 0.
#pragma once
#include "common.cuh"

constexpr int kActQuantGroup = 128;

struct ActQuantParams
{
    const void* x;      // [rows, x_stride] (IN_BF16 ? bf16 : f32)
    u8* codes;          // [rows, codes_stride] e4m3 bytes
    float* scales;      // [rows, scales_stride] one per group
    i64 x_stride;
    i64 codes_stride;
    i64 scales_stride;
    i32 rows;
    i32 cols;
    i32 groups;         // ceil(cols / 128)
    i32 pad0;
};

// Rounds a positive normal float up to a power of two (exact 2^ceil(log2 s)); NaN stays NaN.
DSC_DEVICE float ceil_pow2(float s)
{
    u32 b = __float_as_uint(s);
    if (is_nan(s) || (b & 0x7fffffu) == 0) return s;
    return __uint_as_float((b & 0xff800000u) + 0x800000u);
}

// One warp per (row, group); WARPS groups per block. Lane l handles channels l, l+32, l+64, l+96 of its
// group, so each load instruction of the warp is contiguous.
template <int WARPS, int IN_BF16, int UE8M0>
__global__ void __launch_bounds__(WARPS * 32) act_quant_kernel(const __grid_constant__ ActQuantParams p)
{
    typedef typename ElemOf<IN_BF16>::type TIn;
    const i64 item = (i64)blockIdx.x * WARPS + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (item >= (i64)p.rows * p.groups) return;
    const i64 row = item / p.groups;
    const int g = (int)(item % p.groups);
    const int c0 = g * kActQuantGroup;
    const int width = min(kActQuantGroup, p.cols - c0);
    const TIn* x = (const TIn*)p.x + row * p.x_stride + c0;

    float v[4];
    float amax = 0.0f;
#pragma unroll
    for (int k = 0; k < 4; k++)
    {
        const int c = lane + 32 * k;
        v[k] = c < width ? load_f32<TIn>(x, c) : 0.0f;
        amax = nan_max(fabsf(v[k]), amax);
    }
    amax = warp_max(amax);
    amax = nan_max(amax, 1e-4f);
    float s = amax / kFp8E4M3Max;
    if (UE8M0) s = ceil_pow2(s);

    u8* q = p.codes + row * p.codes_stride + c0;
#pragma unroll
    for (int k = 0; k < 4; k++)
    {
        const int c = lane + 32 * k;
        if (c < width) q[c] = float_to_e4m3(v[k] / s);
    }
    if (lane == 0) p.scales[row * p.scales_stride + g] = s;
}
