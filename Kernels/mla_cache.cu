// Latent cache append (MODEL.md 3, absorbed form): per new token, from its kv_a_proj output row
// [latent | k_pe], write RMSNorm(latent; kv_a_layernorm) and RoPE(k_pe) as BF16 into the paged cache
// (layout: Engine/Kernels/PagedLatentCache.cs). The same arithmetic as CpuBackend.AppendLatent: mean of
// squares and rsqrt in fp32, the weight multiplies the normalized value; interleaved pairs
// (x[2i], x[2i+1]) rotated by rope_pair with the host's cos/sin table (the one YarnRope.Table also gives the CPU).
#pragma once
#include "common.cuh"

struct MlaCacheParams
{
    const void* kv;          // [tokens, kv_stride] rows: DV latent values then DR rope values (F32 or BF16)
    const u16* norm_weight;  // [DV] kv_a_layernorm weight, BF16
    const float* cos;        // [table_positions, DR/2]
    const float* sin;        // [table_positions, DR/2]
    const i32* requests;     // [tokens] request (block-table row) of each token; < 0 marks a padding token (skipped)
    const i32* positions;    // [tokens] position of each token within its request
    const i32* block_table;  // [requests, max_blocks] physical block of each 64-token logical block
    u16* cache;              // [num_blocks, 64, DV + DR] BF16
    i64 kv_stride;           // elements between kv rows
    float eps;               // RMSNorm epsilon
    i32 tokens;
    i32 max_blocks;          // block-table row length
    i32 table_positions;     // rows of cos/sin: a position outside [0, table_positions) or the block table is skipped
};

constexpr int kMlaCacheBlock = 128;
constexpr int kMlaBlockTokens = 64;

// One block per token. Tokens whose slot cannot be resolved are skipped, never written elsewhere: the
// launcher cannot see device-side positions, so the kernel is the one place that bounds them.
template <int DV, int DR, int XBF16>
__global__ void __launch_bounds__(kMlaCacheBlock) mla_cache_append_kernel(const __grid_constant__ MlaCacheParams p)
{
    static_assert(DV % 2 == 0 && DR % 2 == 0, "even widths");
    typedef typename ElemOf<XBF16>::type T;
    constexpr int PER = (DV + kMlaCacheBlock - 1) / kMlaCacheBlock;
    __shared__ float scratch[32];
    const int t = blockIdx.x;
    const int req = p.requests[t];
    const int pos = p.positions[t];
    if (req < 0 || pos < 0 || pos >= p.table_positions || pos >= p.max_blocks * kMlaBlockTokens) return;
    const i32 block = p.block_table[(i64)req * p.max_blocks + pos / kMlaBlockTokens];
    if (block < 0) return;
    const T* x = (const T*)p.kv + (i64)t * p.kv_stride;
    u16* dst = p.cache + ((i64)block * kMlaBlockTokens + pos % kMlaBlockTokens) * (DV + DR);

    float v[PER];
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < PER; k++)
    {
        const int c = threadIdx.x + k * kMlaCacheBlock;
        v[k] = c < DV ? load_f32<T>(x, c) : 0.0f;
        ss += v[k] * v[k];
    }
    ss = block_sum<kMlaCacheBlock>(ss, scratch);
    const float r = 1.0f / sqrtf(ss / (float)DV + p.eps);
#pragma unroll
    for (int k = 0; k < PER; k++)
    {
        const int c = threadIdx.x + k * kMlaCacheBlock;
        if (c < DV) dst[c] = float_to_bf16((v[k] * r) * bf16_to_float(p.norm_weight[c]));
    }

    for (int i = threadIdx.x; i < DR / 2; i += kMlaCacheBlock)
    {
        const float c = p.cos[(i64)pos * (DR / 2) + i], s = p.sin[(i64)pos * (DR / 2) + i];
        float y0, y1;
        rope_pair(load_f32<T>(x, DV + 2 * i), load_f32<T>(x, DV + 2 * i + 1), c, s, y0, y1);
        dst[DV + 2 * i] = float_to_bf16(y0);
        dst[DV + 2 * i + 1] = float_to_bf16(y1);
    }
}
