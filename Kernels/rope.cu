// Rotary embedding on interleaved pairs (x[2i], x[2i+1]) (the checkpoint's native layout, MODEL.md 4), in place:
// y[2i] = x[2i] cos - x[2i+1] sin, y[2i+1] = x[2i] sin + x[2i+1] cos, with cos/sin read from the host's table
// (YarnRope.Table: the static YaRN correction applied, the same table the CPU backend and mla_cache.cu read), each
// product and sum rounded on its own (rope_pair), so a row matches CpuBackend.ApplyRope bit for bit. The one RoPE
// kernel of the engine: q's rope slices (heads = H) and any other rows laid out by heads.
#pragma once
#include "common.cuh"

struct RopeParams
{
    void* x;                // [tokens, token_stride] rows; head h's rope slice starts at h * head_stride + rope_offset
    const float* cos;       // [table_positions, pairs]
    const float* sin;       // [table_positions, pairs]
    const i32* positions;   // [tokens] each row's position (the step's rows on the device); null: row t at start + t
    i64 token_stride;       // elements
    i64 head_stride;        // elements
    i32 tokens;
    i32 heads;
    i32 rope_offset;        // elements from a head's start to its rope slice
    i32 pairs;              // rope_dim / 2
    i32 start;              // position of row 0 when positions is null
    i32 table_positions;    // rows of cos/sin: a row whose position falls outside [0, table_positions) is left as it is
};

// One thread per (token, head, pair), grid-stride. ROUND (f32 storage only): the results rounded to bf16 values.
template <int BLOCK, int BF16, int ROUND>
__global__ void __launch_bounds__(BLOCK) rope_kernel(const __grid_constant__ RopeParams p)
{
    typedef typename ElemOf<BF16>::type T;
    const i64 per_token = (i64)p.heads * p.pairs;
    const i64 total = (i64)p.tokens * per_token;
    for (i64 idx = (i64)blockIdx.x * BLOCK + threadIdx.x; idx < total; idx += (i64)gridDim.x * BLOCK)
    {
        const i64 t = idx / per_token;
        const i32 rem = (i32)(idx % per_token);
        const i32 h = rem / p.pairs, i = rem % p.pairs;
        const i64 pos = p.positions ? (i64)p.positions[t] : (i64)p.start + t;
        if (pos < 0 || pos >= p.table_positions) continue;
        T* x = (T*)p.x + t * p.token_stride + (i64)h * p.head_stride + p.rope_offset + 2 * i;
        float y0, y1;
        rope_pair(load_f32<T>(x, 0), load_f32<T>(x, 1), p.cos[pos * p.pairs + i], p.sin[pos * p.pairs + i], y0, y1);
        store_rounded<T, ROUND>(x, 0, y0);
        store_rounded<T, ROUND>(x, 1, y1);
    }
}
