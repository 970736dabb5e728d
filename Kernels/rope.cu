// Rotary embedding on interleaved pairs (x[2i], x[2i+1]) (the checkpoint's native layout, MODEL.md 4):
// y[2i] = x[2i] cos - x[2i+1] sin, y[2i+1] = x[2i] sin + x[2i+1] cos, angle = pos * inv_freq[i] in fp32.
// inv_freq already holds the static YaRN correction (computed once on the host). In place.
#pragma once
#include "common.cuh"

struct RopeParams
{
    void* x;                // [tokens, token_stride] rows; head h's rope slice starts at h * head_stride + rope_offset
    const i32* positions;   // [tokens] absolute positions
    const float* inv_freq;  // [pairs]
    i64 token_stride;       // elements
    i64 head_stride;        // elements
    i32 tokens;
    i32 heads;
    i32 rope_offset;        // elements from a head's start to its rope slice
    i32 pairs;              // rope_dim / 2
};

// One thread per (token, head, pair).
template <int BLOCK, int BF16>
__global__ void __launch_bounds__(BLOCK) rope_kernel(const __grid_constant__ RopeParams p)
{
    typedef typename ElemOf<BF16>::type T;
    const i64 idx = (i64)blockIdx.x * BLOCK + threadIdx.x;
    const i64 total = (i64)p.tokens * p.heads * p.pairs;
    if (idx >= total) return;
    const int i = (int)(idx % p.pairs);
    const i64 th = idx / p.pairs;
    const int h = (int)(th % p.heads);
    const i64 t = th / p.heads;
    T* x = (T*)p.x + t * p.token_stride + (i64)h * p.head_stride + p.rope_offset + 2 * i;
    const float angle = (float)p.positions[t] * p.inv_freq[i];
    float s, c;
    sincosf(angle, &s, &c);
    const float x0 = load_f32<T>(x, 0), x1 = load_f32<T>(x, 1);
    store_f32<T>(x, 0, x0 * c - x1 * s);
    store_f32<T>(x, 1, x0 * s + x1 * c);
}
