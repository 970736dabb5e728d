// MLA prefill attention, naive (decompressed) form, over the paged latent cache (MODEL.md 3).
//
// Paged latent cache, one array per layer: [num_blocks, 64, LORA + DR] bf16; per token row LORA values of
// kv_a_layernorm(latent), then DR values of the YaRN-rotated k_pe. Token at position j of request r lives
// in block block_table[r * max_blocks + j / 64], row j % 64.
//
// A prefill chunk of request r holds the queries at positions start_r .. start_r + len_r - 1, and the
// append kernel has already written their keys, so the context is positions 0 .. ctx_r - 1 with
// ctx_r = start_r + len_r. Requests are packed like FlashAttention's varlen: queries of request r are rows
// cu_q[r] .. cu_q[r+1] - 1 of q and out, its context rows cu_kv[r] .. cu_kv[r+1] - 1 of the kv scratch
// (so start_r = (cu_kv[r+1] - cu_kv[r]) - (cu_q[r+1] - cu_q[r])).
//
// Two kernels:
//   mla_prefill_gather_kernel: paged latents -> contiguous [cu_kv[R], LORA] (the input of the kv_b GEMM);
//   mla_prefill_attn_kernel:   causal attention, per head, with K = [k_nope (kv scratch) | k_pe (cache)]
//                              (DN + DR wide) and V (kv scratch, DV wide), flash-attention style.
// Between them the caller runs kv_b (act_quant + fp8_gemm) to produce kv = [cu_kv[R], heads, DN + DV].
#pragma once
#include "mma_sync.cuh"

struct MlaPrefillParams
{
    const u16* q;            // [cu_q[R], heads, DN + DR] bf16: q_nope | rotated q_pe per head
    const u16* cache;        // [num_blocks, 64, LORA + DR] bf16 paged latent cache (one layer)
    const i32* block_table;  // [requests, max_blocks]
    const i32* cu_q;         // [requests + 1] first query row of each request
    const i32* cu_kv;        // [requests + 1] first kv-scratch row of each request (context = positions 0..)
    const u16* kv;           // [cu_kv[R], heads, DN + DV] bf16: kv_b(latent) = k_nope | v per head
    u16* latent;             // gather output [cu_kv[R], LORA] bf16
    u16* out;                // [cu_q[R], heads, DV] bf16
    float scale;             // softmax scale (192^-0.5 * mscale^2 for V3), applied to q.k
    i32 requests;
    i32 max_blocks;          // block-table row length
    i32 heads;
};

constexpr int kMlaPageRows = 64;

DSC_DEVICE u32 ld_u32(const u16* p) { return *(const u32*)p; }
DSC_DEVICE void st_u32(u16* p, u32 v) { *(u32*)p = v; }
// VEC bf16 values (2 or 8) from global to shared memory, or zeros; both addresses VEC-aligned.
template <int VEC> DSC_DEVICE void copy_vec(u16* dst, const u16* src, bool valid);
template <> DSC_DEVICE void copy_vec<2>(u16* dst, const u16* src, bool valid) { *(u32*)dst = valid ? *(const u32*)src : 0u; }
template <> DSC_DEVICE void copy_vec<8>(u16* dst, const u16* src, bool valid)
{
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (valid) v = *(const uint4*)src;
    *(uint4*)dst = v;
}

// VEC bf16 values from global memory as VEC/2 packed pairs (low half = lower index), or zeros.
template <int VEC> DSC_DEVICE void load_pairs(u32 (&w)[VEC / 2], const u16* src, bool valid);
template <> DSC_DEVICE void load_pairs<2>(u32 (&w)[1], const u16* src, bool valid) { w[0] = valid ? *(const u32*)src : 0u; }
template <> DSC_DEVICE void load_pairs<8>(u32 (&w)[4], const u16* src, bool valid)
{
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (valid) v = *(const uint4*)src;
    w[0] = v.x;
    w[1] = v.y;
    w[2] = v.z;
    w[3] = v.w;
}

// Grid (min(max context, 65535), requests), 128 threads: one context row per block iteration.
template <int LORA, int DR>
__global__ void __launch_bounds__(128) mla_prefill_gather_kernel(const __grid_constant__ MlaPrefillParams p)
{
    static_assert(LORA % 2 == 0 && DR % 2 == 0, "widths must be even (bf16 pairs)");
    const int r = blockIdx.y;
    const int kv0 = p.cu_kv[r], ctx = p.cu_kv[r + 1] - kv0;
    for (int j = blockIdx.x; j < ctx; j += gridDim.x)
    {
        const i64 block = p.block_table[(i64)r * p.max_blocks + j / kMlaPageRows];
        const u16* src = p.cache + (block * kMlaPageRows + (j % kMlaPageRows)) * (LORA + DR);
        u16* dst = p.latent + (i64)(kv0 + j) * LORA;
        for (int c = 2 * threadIdx.x; c < LORA; c += 2 * 128) st_u32(dst + c, ld_u32(src + c));
    }
}

// Grid (ceil(max chunk / 64), heads, requests), 128 threads = 4 warps x 16 query rows. Per key tile of 64
// (= one cache block): S = Q K^T on mma.sync m16n8k16 (bf16 in, fp32 accumulate), causal mask by absolute
// position, online softmax with fp32 running max and sum per row, P rounded to bf16 as the A operand of
// O += P V. The score matrix never leaves registers. Dims that are not multiples of 16 (q.k) or 8 (v)
// are zero-padded in shared memory.
template <int DN, int DR, int DV, int LORA>
__global__ void __launch_bounds__(128) mla_prefill_attn_kernel(const __grid_constant__ MlaPrefillParams p)
{
    constexpr int DQK = DN + DR;
    constexpr int DQKP = (DQK + 15) / 16 * 16;
    constexpr int DVP = (DV + 7) / 8 * 8;
    constexpr int BM = 64, BN = kMlaPageRows;
    constexpr int QS = DQKP + 8;   // row stride (elements) of the Q/K tile: 16 bytes of padding against bank conflicts
    constexpr int VS = BN + 8;     // row stride of the transposed V tile [DVP][BN]
    static_assert(DN % 2 == 0 && DR % 2 == 0 && DV % 2 == 0 && LORA % 2 == 0, "widths must be even (bf16 pairs)");
    static_assert((BN * QS + DVP * VS) * 2 <= 48 * 1024, "q.k / v head dims too large for static shared memory");
    constexpr float kLog2e = 1.4426950408889634f;
    // 16-byte loads when every segment (q, k_nope, v, k_pe after the latent) starts and ends on 8 values.
    constexpr int VEC = (DN % 8 == 0 && DR % 8 == 0 && DV % 8 == 0 && LORA % 8 == 0) ? 8 : 2;

    __shared__ __align__(16) u16 sk[BN * QS];   // the Q tile first, then each K tile [key][dim]
    __shared__ __align__(16) u16 sv[DVP * VS];  // V tile transposed [dim][key]

    const int r = blockIdx.z, h = blockIdx.y;
    const int q0 = p.cu_q[r], qlen = p.cu_q[r + 1] - q0;
    const int kv0 = p.cu_kv[r], ctx = p.cu_kv[r + 1] - kv0;
    const int start = ctx - qlen;
    const int m0 = blockIdx.x * BM;
    if (m0 >= qlen) return;
    const int rows = min(BM, qlen - m0);
    const int kend = start + m0 + rows;   // keys 0 .. kend-1 are visible to some row of this tile
    const int heads = p.heads;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;

    // ---- Q tile -> shared -> registers (A fragments), rows beyond the chunk zero.
    for (int i = threadIdx.x; i < BM * (DQKP / VEC); i += 128)
    {
        const int row = i / (DQKP / VEC), c = VEC * (i % (DQKP / VEC));
        const bool valid = row < rows && c < DQK;
        copy_vec<VEC>(&sk[row * QS + c], p.q + ((i64)(q0 + m0 + (valid ? row : 0)) * heads + h) * DQK + (valid ? c : 0), valid);
    }
    __syncthreads();
    u32 qf[DQKP / 16][4];
    {
        const u16* qa = &sk[(warp * 16 + g) * QS + 2 * t4];
#pragma unroll
        for (int ks = 0; ks < DQKP / 16; ks++)
        {
            qf[ks][0] = ld_u32(qa + ks * 16);
            qf[ks][1] = ld_u32(qa + 8 * QS + ks * 16);
            qf[ks][2] = ld_u32(qa + ks * 16 + 8);
            qf[ks][3] = ld_u32(qa + 8 * QS + ks * 16 + 8);
        }
    }
    __syncthreads();

    // This thread's two query rows (g and g + 8 of the warp's 16) and their absolute positions; a row past
    // the chunk gets position -1: every key masked, never stored.
    const int rowA = m0 + warp * 16 + g, rowB = rowA + 8;
    const int posA = rowA < qlen ? start + rowA : -1;
    const int posB = rowB < qlen ? start + rowB : -1;
    const int warpMaxPos = start + min(m0 + warp * 16 + 15, qlen - 1);

    float o[DVP / 8][4];
#pragma unroll
    for (int i = 0; i < DVP / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float mA = -f32_inf(), mB = -f32_inf(), lA = 0.0f, lB = 0.0f;   // running max (log2 domain) and partial sums

    const i32* table = p.block_table + (i64)r * p.max_blocks;
    const int tiles = (kend + BN - 1) / BN;
    for (int kt = 0; kt < tiles; kt++)
    {
        const int k0 = kt * BN;
        const i64 block = table[kt];
        // ---- K tile [key][k_nope | k_pe | 0] and V tile transposed; keys >= kend are zero (never read).
        for (int i = threadIdx.x; i < BN * (DQKP / VEC); i += 128)
        {
            const int key = i / (DQKP / VEC), c = VEC * (i % (DQKP / VEC));
            const int j = k0 + key;
            const bool nope = c < DN;
            const bool valid = j < kend && c < DQK;
            const u16* src = nope ? p.kv + ((i64)(kv0 + j) * heads + h) * (DN + DV) + c
                                  : p.cache + (block * kMlaPageRows + key) * (LORA + DR) + LORA + (c - DN);
            copy_vec<VEC>(&sk[key * QS + c], src, valid);
        }
        for (int i = threadIdx.x; i < BN * (DVP / VEC); i += 128)
        {
            const int key = i % BN, c = VEC * (i / BN);   // consecutive threads take consecutive keys: fewer bank conflicts on the transposed store
            const int j = k0 + key;
            u32 w[VEC / 2];
            load_pairs<VEC>(w, p.kv + ((i64)(kv0 + j) * heads + h) * (DN + DV) + DN + c, j < kend && c < DV);
#pragma unroll
            for (int e = 0; e < VEC / 2; e++)
            {
                sv[(c + 2 * e) * VS + key] = (u16)(w[e] & 0xffffu);
                sv[(c + 2 * e + 1) * VS + key] = (u16)(w[e] >> 16);
            }
        }
        __syncthreads();

        if (k0 <= warpMaxPos)   // warp-uniform: a tile wholly after this warp's rows adds nothing
        {
            float s[BN / 8][4];
#pragma unroll
            for (int nt = 0; nt < BN / 8; nt++)
            {
                s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
                const u16* kb = &sk[(nt * 8 + g) * QS + 2 * t4];
#pragma unroll
                for (int ks = 0; ks < DQKP / 16; ks++) mma_bf16_16816(s[nt], qf[ks], ld_u32(kb + ks * 16), ld_u32(kb + ks * 16 + 8));
            }

            // Scale into the log2 domain and mask by position (a select, so a NaN score of a hidden key
            // cannot leak). Row maxima over the quad that shares a row.
            const float sl = p.scale * kLog2e;
            float mxA = -f32_inf(), mxB = -f32_inf();
#pragma unroll
            for (int nt = 0; nt < BN / 8; nt++)
            {
                const int j = k0 + nt * 8 + 2 * t4;
                s[nt][0] = j <= posA ? s[nt][0] * sl : -f32_inf();
                s[nt][1] = j + 1 <= posA ? s[nt][1] * sl : -f32_inf();
                s[nt][2] = j <= posB ? s[nt][2] * sl : -f32_inf();
                s[nt][3] = j + 1 <= posB ? s[nt][3] * sl : -f32_inf();
                mxA = fmaxf(mxA, fmaxf(s[nt][0], s[nt][1]));
                mxB = fmaxf(mxB, fmaxf(s[nt][2], s[nt][3]));
            }
            mxA = fmaxf(mxA, __shfl_xor_sync(0xffffffffu, mxA, 1));
            mxA = fmaxf(mxA, __shfl_xor_sync(0xffffffffu, mxA, 2));
            mxB = fmaxf(mxB, __shfl_xor_sync(0xffffffffu, mxB, 1));
            mxB = fmaxf(mxB, __shfl_xor_sync(0xffffffffu, mxB, 2));
            const float nA = fmaxf(mA, mxA), nB = fmaxf(mB, mxB);
            // A row with nothing visible yet keeps max -inf; exponentiate against 0 then (every term is 0).
            const float bA = nA == -f32_inf() ? 0.0f : nA, bB = nB == -f32_inf() ? 0.0f : nB;
            const float alphaA = exp2f(mA - bA), alphaB = exp2f(mB - bB);
            mA = nA;
            mB = nB;
            lA *= alphaA;
            lB *= alphaB;
#pragma unroll
            for (int i = 0; i < DVP / 8; i++)
            {
                o[i][0] *= alphaA;
                o[i][1] *= alphaA;
                o[i][2] *= alphaB;
                o[i][3] *= alphaB;
            }
#pragma unroll
            for (int nt = 0; nt < BN / 8; nt++)
            {
                s[nt][0] = exp2f(s[nt][0] - bA);
                s[nt][1] = exp2f(s[nt][1] - bA);
                s[nt][2] = exp2f(s[nt][2] - bB);
                s[nt][3] = exp2f(s[nt][3] - bB);
                lA += s[nt][0] + s[nt][1];
                lB += s[nt][2] + s[nt][3];
            }

            // O += P V: the S accumulators of key columns 16kk..16kk+15 are exactly the A fragment. A masked
            // key enters as P = 0, so a non-finite v of a future key in the same tile would still reach
            // earlier rows through 0·NaN (as in FlashAttention); k_pe/q non-finites are masked exactly.
            // Keys past kend are zero-filled, so nothing outside the context is ever read.
#pragma unroll
            for (int kk = 0; kk < BN / 16; kk++)
            {
                const u32 a[4] = {
                    pack_bf16x2(s[2 * kk][0], s[2 * kk][1]),
                    pack_bf16x2(s[2 * kk][2], s[2 * kk][3]),
                    pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                    pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3]),
                };
                const u16* vb = &sv[g * VS + kk * 16 + 2 * t4];
#pragma unroll
                for (int dt = 0; dt < DVP / 8; dt++) mma_bf16_16816(o[dt], a, ld_u32(vb + dt * 8 * VS), ld_u32(vb + dt * 8 * VS + 8));
            }
        }
        __syncthreads();
    }

    // ---- normalize and store (bf16 pairs; columns past DV are padding).
    lA += __shfl_xor_sync(0xffffffffu, lA, 1);
    lA += __shfl_xor_sync(0xffffffffu, lA, 2);
    lB += __shfl_xor_sync(0xffffffffu, lB, 1);
    lB += __shfl_xor_sync(0xffffffffu, lB, 2);
    const float invA = 1.0f / lA, invB = 1.0f / lB;
#pragma unroll
    for (int dt = 0; dt < DVP / 8; dt++)
    {
        const int c = dt * 8 + 2 * t4;
        if (c >= DV) continue;
        if (rowA < qlen) st_u32(p.out + ((i64)(q0 + rowA) * heads + h) * DV + c, pack_bf16x2(o[dt][0] * invA, o[dt][1] * invA));
        if (rowB < qlen) st_u32(p.out + ((i64)(q0 + rowB) * heads + h) * DV + c, pack_bf16x2(o[dt][2] * invB, o[dt][3] * invB));
    }
}
