// Shared device helpers for every kernel family. No CUDA toolkit headers: NVRTC on our machines has
// none, so fixed-width types, bf16 and e4m3 are defined here by bit operations. The conversions match
// Loader/Numerics/BFloat16.cs and Fp8E4M3.cs bit for bit (those are the CPU references).
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef signed char i8;
typedef int i32;
typedef long long i64;

#define DSC_DEVICE __device__ __forceinline__
// NVRTC has no <cstddef> and no __builtin_offsetof, and from 12.0 on it no longer takes the null-pointer
// form as a constant expression. __INTADDR__ is the EDG front end's own offsetof primitive: it turns the
// address arithmetic into an integral constant expression.
#define DSC_OFFSETOF(T, f) ((unsigned long long)__INTADDR__(&(((T*)0)->f)))
#define DSC_STATIC_ASSERT_OFFSET(T, f, n) static_assert(DSC_OFFSETOF(T, f) == (n), #T "." #f " offset differs from C#")

constexpr float kFp8E4M3Max = 448.0f;

DSC_DEVICE float f32_inf() { return __int_as_float(0x7f800000); }
DSC_DEVICE float f32_nan() { return __int_as_float(0x7fc00000); }
DSC_DEVICE bool is_nan(float x) { return (__float_as_uint(x) & 0x7fffffffu) > 0x7f800000u; }

// The shared-window address of a generic pointer into shared memory (what shared-memory PTX operands take).
DSC_DEVICE u32 smem_addr(const void* p)
{
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// ---- bfloat16 -------------------------------------------------------------------------------------

DSC_DEVICE float bf16_to_float(u16 b) { return __uint_as_float(((u32)b) << 16); }

// Round to nearest even; NaN stays a quiet NaN with its sign and top payload bits (as BFloat16.FromFloat).
DSC_DEVICE u16 float_to_bf16(float f)
{
    u32 bits = __float_as_uint(f);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (u16)((bits >> 16) | 0x40u);
    u32 rounding = 0x7fffu + ((bits >> 16) & 1u);
    return (u16)((bits + rounding) >> 16);
}

// Storage types: kernels templated on an element type load and store through these.
template <typename T> DSC_DEVICE float load_f32(const T* p, i64 i);
template <> DSC_DEVICE float load_f32<float>(const float* p, i64 i) { return p[i]; }
template <> DSC_DEVICE float load_f32<u16>(const u16* p, i64 i) { return bf16_to_float(p[i]); }
template <typename T> DSC_DEVICE void store_f32(T* p, i64 i, float v);
template <> DSC_DEVICE void store_f32<float>(float* p, i64 i, float v) { p[i] = v; }
template <> DSC_DEVICE void store_f32<u16>(u16* p, i64 i, float v) { p[i] = float_to_bf16(v); }

// Element type selected by a template flag: 1 = bf16 (stored as u16), 0 = float.
template <int BF16> struct ElemOf { typedef float type; };
template <> struct ElemOf<1> { typedef u16 type; };

// The nearest bf16 value, kept as a float: what an f32 tensor holding bf16-rounded values stores (the CPU
// backend's GpuEmulation Store).
DSC_DEVICE float bf16_round(float v) { return bf16_to_float(float_to_bf16(v)); }

// Stores v as T; with ROUND, first rounded to the nearest bf16 value (for f32 storage of bf16 activations; a
// bf16 store rounds anyway, and rounding twice gives the same bits).
template <typename T, int ROUND> DSC_DEVICE void store_rounded(T* p, i64 i, float v) { store_f32<T>(p, i, ROUND ? bf16_round(v) : v); }

// ---- rotary embedding -----------------------------------------------------------------------------

// One interleaved pair (x0 + j·x1) times (c + j·s): each product and each sum rounded on its own (no FMA
// contraction), as CpuBackend.Rotate computes them, so a rotation from the same cos/sin table is exact.
DSC_DEVICE void rope_pair(float x0, float x1, float c, float s, float& y0, float& y1)
{
    y0 = __fadd_rn(__fmul_rn(x0, c), -__fmul_rn(x1, s));
    y1 = __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));
}

// ---- FP8 e4m3fn -----------------------------------------------------------------------------------

// Round to nearest even, saturate to +-448, NaN -> 0x7F (Fp8E4M3.FromFloat). Infinities saturate.
DSC_DEVICE u8 float_to_e4m3(float x)
{
    u32 bits = __float_as_uint(x);
    u32 sign = (bits >> 24) & 0x80u;
    u32 abits = bits & 0x7fffffffu;
    if (abits > 0x7f800000u) return 0x7f;
    float a = __uint_as_float(abits);
    if (a >= kFp8E4M3Max) return (u8)(sign | 0x7eu);
    if (a < 0.015625f)
    {
        // Subnormal range: spacing 2^-9. a * 512 is exact (power-of-two scaling); rint rounds to even.
        // A result of 8 is the smallest normal, whose code is also 8.
        u32 q = (u32)rintf(a * 512.0f);
        return (u8)(sign | q);
    }
    // Normal: keep 3 of float's 23 mantissa bits with round-to-nearest-even; a carry moves into the
    // exponent correctly. Rebias 127 -> 7 (subtract 120 << 3 from the shifted exponent|mantissa).
    u32 r = (abits + 0x7ffffu + ((abits >> 20) & 1u)) >> 20;
    u32 code = r - (120u << 3);
    if (code > 0x7eu) code = 0x7eu; // cannot happen below 448, kept as the saturation guarantee
    return (u8)(sign | code);
}

DSC_DEVICE float e4m3_to_float(u8 c)
{
    u32 e = (c >> 3) & 0xfu, m = c & 7u;
    float mag;
    if (e == 0xfu && m == 7u) mag = f32_nan();
    else if (e == 0) mag = (float)m * 0.001953125f; // m * 2^-9, exact
    else mag = __uint_as_float(((e + 120u) << 23) | (m << 20));
    return (c & 0x80u) ? -mag : mag;
}

// ---- reductions -----------------------------------------------------------------------------------

DSC_DEVICE float warp_sum(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// NaN-propagating max, so a NaN anywhere in the reduced range reaches the result (as torch.amax).
DSC_DEVICE float nan_max(float a, float b) { return (is_nan(a) || a >= b) ? a : b; }

DSC_DEVICE float warp_max(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block of BLOCK threads (a multiple of 32). Every thread gets the total. Uses 32 floats of
// shared memory and ends with a barrier so the scratch can be reused at once.
template <int BLOCK>
DSC_DEVICE float block_sum(float v, float* scratch)
{
    static_assert(BLOCK % 32 == 0 && BLOCK <= 1024, "block must be whole warps");
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (BLOCK == 32) return v;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < BLOCK / 32 ? scratch[lane] : 0.0f;
    t = warp_sum(t);
    __syncthreads();
    return t;
}

template <int BLOCK>
DSC_DEVICE float block_max(float v, float* scratch)
{
    static_assert(BLOCK % 32 == 0 && BLOCK <= 1024, "block must be whole warps");
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    if (BLOCK == 32) return v;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < BLOCK / 32 ? scratch[lane] : -f32_inf();
    t = warp_max(t);
    __syncthreads();
    return t;
}
