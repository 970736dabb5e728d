// Embedding gather: out[t, :] = table[ids[t], :] for a bf16 table, widened exactly to f32 or copied as bf16.
// With chosen ids (a token choice buffer's, written on the device by the sampling kernel), ids[t] names a row of them
// and the token is the id chosen there, token 0 where that row was not chosen (-1): an MTP draft reads the tokens
// just chosen without a trip to the host, and a row not chosen embeds a harmless token whose draft is discarded.
// An id (or a chosen row) outside its range yields a NaN row: the launcher cannot check ids that live on the
// device without a synchronization, and NaN makes the fault visible downstream instead of reading out of bounds.
#pragma once
#include "common.cuh"

struct EmbeddingParams
{
    const i32* ids;     // [tokens]
    const u16* table;   // [vocab, dim] bf16
    void* out;          // [tokens, out_stride] (OUT_BF16 ? bf16 : f32)
    i64 out_stride;
    i32 tokens;
    i32 dim;
    i32 vocab;
    i32 chosen_rows;     // rows of chosen (0 when chosen is null)
    const i32* chosen;   // [chosen_rows] chosen ids, or null: ids are tokens
};

// grid = (tokens, ceil(dim / (BLOCK * 2))): each thread moves two adjacent elements.
template <int BLOCK, int OUT_BF16>
__global__ void __launch_bounds__(BLOCK) embedding_kernel(const __grid_constant__ EmbeddingParams p)
{
    typedef typename ElemOf<OUT_BF16>::type TOut;
    const i64 t = blockIdx.x;
    if (t >= p.tokens) return;
    i32 id = p.ids[t];
    if (p.chosen != nullptr) id = id >= 0 && id < p.chosen_rows ? max(p.chosen[id], 0) : -1;
    const bool valid = id >= 0 && id < p.vocab;
    const u16* src = p.table + (i64)(valid ? id : 0) * p.dim;
    TOut* dst = (TOut*)p.out + t * p.out_stride;
    const i64 base = ((i64)blockIdx.y * BLOCK + threadIdx.x) * 2;
#pragma unroll
    for (int k = 0; k < 2; k++)
    {
        const i64 i = base + k;
        if (i < p.dim) store_f32<TOut>(dst, i, valid ? bf16_to_float(src[i]) : f32_nan());
    }
}
