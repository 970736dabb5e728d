// MLA decode attention in the absorbed form (MODEL.md 3) over the paged latent cache
// (layout: Engine/Kernels/PagedLatentCache.cs). Four kernels, one launcher (MlaDecodeKernel.cs):
//   mla_fold_kernel     q_abs[t, h] = [q_nope[t, h] · W_UK[h] (DV values) | q_pe[t, h] (DR values)], BF16
//   mla_decode_kernel   per (request, 16 or 64 query rows, KV split): online-softmax attention of the absorbed
//                       queries over the cached rows [latent | rope] (keys) and their latent part (values);
//                       Flash-Decoding: each split writes a normalized partial output and its log-sum-exp
//   mla_combine_kernel  merges the splits by their LSEs (skipped when there is one split)
//   mla_unfold_kernel   out[t, h] = W_UV[h] · latent_out[t, h] (the V head), before o_proj (the FP8 GEMM)
// Fold and unfold can instead run as one tensor-core GEMM per head (Kernels/bf16_gemm_mma.cu, MlaDecodeKernel);
// mla_fold_rope_kernel then copies q_pe into q_abs.
// Query rows of a request are (query i, head h) pairs, row = i·heads + h; query i sits at position
// len - s_q + i and sees keys 0..its position (causal between the s_q queries of one MTP step).
// Scores and values go through mma.sync m16n8k16 BF16 tensor cores with fp32 accumulation (sm_80+, PTX 7.0+);
// the softmax runs in fp32 (base-2 exponent, max subtracted); P is rounded to BF16 for the P·V product.
#pragma once
#include "mma_sync.cuh"

struct MlaDecodeParams
{
    const void* q;           // [batch, s_q, heads, DV + DR] absorbed queries (F32 or BF16)
    const u16* cache;        // [num_blocks, 64, DV + DR] BF16 paged latent cache
    const i32* block_table;  // [table rows, max_blocks]
    const i32* requests;     // [batch] block-table row of each request (the step's slots); null: request r reads row r
    const i32* lengths;      // [batch] cached tokens per request, this step's s_q tokens included (>= s_q)
    float* out;              // [batch, s_q, heads, DV] attention output in latent space (fp32)
    float* lse;              // [batch, s_q, heads] natural-log log-sum-exp of the scaled scores
    float* o_partial;        // [splits, batch, s_q·heads, DV] per-split normalized outputs (splits > 1)
    float* lse_partial;      // [splits, batch, s_q·heads] per-split LSE; -inf for a split with no visible key
    float scale;             // softmax scale (qk_head_dim^-0.5 times the YaRN mscale²)
    i32 batch;
    i32 heads;
    i32 q_tokens;            // s_q: 1, or 2 with one MTP draft token
    i32 max_blocks;          // block-table row length
    i32 splits;              // KV splits per request (1: write out/lse directly)
};

struct MlaProjParams
{
    const void* x;  // fold: q [tokens, heads, nope + DR] (F32 or BF16); unfold: latent output [tokens, heads, DV] fp32
    const u16* w;   // kv_b_proj dequantized to BF16: [heads·(nope + v), DV], per head nope W_UK rows then v W_UV rows
    void* y;        // fold: q_abs [tokens, heads, DV + DR] BF16; unfold: [tokens, heads, v] (F32 or BF16)
    i32 tokens;
    i32 heads;
    i32 nope;       // qk_nope_head_dim (<= 256)
    i32 v;          // v_head_dim
};

constexpr int kMlaDecodeBlockTokens = 64;  // PagedLatentCache.BlockSize
constexpr int kMlaTile = 32;               // tokens per pipeline stage: half a cache block, so a stage never crosses blocks
constexpr int kMlaCombineBlock = 128;
constexpr int kMlaMaxSplits = 64;          // MlaDecodeKernel.MaxSplits
constexpr int kMlaProjBlock = 128;
constexpr int kMlaProjTokens = 8;
constexpr int kMlaMaxNope = 256;

// ---- decode --------------------------------------------------------------------------------------

// M query rows per block in WC column groups: warp (wr, wc) owns rows wr·16..+16, the score columns
// (tokens) wc·TN..+TN of each stage and the output columns wc·CW..+CW. Shared memory: the block's queries,
// two stages of cache rows (cp.async double buffering), P in BF16 and a row-statistics exchange. Row pitches
// are padded by 16 bytes so ldmatrix row addresses fall in distinct banks. MlaDecodeKernel.SharedBytes
// mirrors SMEM (a compile test checks them against each other).
template <int DV, int DR, int M, int WC>
struct MlaDecodeGeometry
{
    static constexpr int D = DV + DR;
    static constexpr int DP = D + 8;
    static constexpr int PP = kMlaTile + 8;
    static constexpr int WARPS = (M / 16) * WC;
    static constexpr int THREADS = WARPS * 32;
    static constexpr int TN = kMlaTile / WC;
    static constexpr int CW = DV / WC;
    static constexpr int SMEM = 2 * (M * DP + 2 * kMlaTile * DP + M * PP) + 4 * M * WC;
};

template <int DV, int DR, int M, int WC, int QBF16>
__global__ void __launch_bounds__(MlaDecodeGeometry<DV, DR, M, WC>::THREADS) mla_decode_kernel(const __grid_constant__ MlaDecodeParams p)
{
    typedef MlaDecodeGeometry<DV, DR, M, WC> G;
    constexpr int D = G::D, DP = G::DP, PP = G::PP, TN = G::TN, CW = G::CW, THREADS = G::THREADS;
    constexpr int NS = TN / 8, NO = CW / 8, KS = D / 16, C8 = D / 8;
    static_assert(M % 16 == 0 && (WC == 1 || WC == 2 || WC == 4) && DV % (8 * WC) == 0 && D % 16 == 0 && TN % 8 == 0, "tile shape");
    extern __shared__ __align__(16) u16 mla_smem[];
    u16* qs = mla_smem;                  // [M][DP]
    u16* ks = qs + M * DP;               // [2][kMlaTile][DP]
    u16* ps = ks + 2 * kMlaTile * DP;    // [M][PP]
    float* red = (float*)(ps + M * PP);  // [M][WC]

    const int rg = blockIdx.x, split = blockIdx.y, r = blockIdx.z;
    const int rows = p.q_tokens * p.heads;
    const int len = p.lengths[r];
    // Splits cut the request into whole stages: ceil(len / splits) rounded up to kMlaTile tokens.
    const int chunk = ((len + p.splits - 1) / p.splits + kMlaTile - 1) / kMlaTile * kMlaTile;
    const int kbeg = split * chunk;
    const int kend = min(len, kbeg + chunk);
    const int ntiles = kend > kbeg ? (kend - kbeg + kMlaTile - 1) / kMlaTile : 0;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    const int wr = warp / WC, wc = warp % WC;
    const i32* table = p.block_table + (i64)(p.requests ? p.requests[r] : r) * p.max_blocks;

    auto load_stage = [&](int tile, int stage) {
        const int start = kbeg + tile * kMlaTile;
        const i32 block = table[start / kMlaDecodeBlockTokens];
        const u16* src = p.cache + ((i64)block * kMlaDecodeBlockTokens + start % kMlaDecodeBlockTokens) * D;
        u16* dst = ks + stage * kMlaTile * DP;
        for (int idx = tid; idx < kMlaTile * C8; idx += THREADS)
        {
            const int j = idx / C8, c8 = idx % C8;
            // Rows past the split stay finite zeros: masked scores meet them in P·V as 0 · 0.
            if (start + j < kend) cp_async16(dst + j * DP + c8 * 8, src + (i64)j * D + c8 * 8);
            else *(uint4*)(dst + j * DP + c8 * 8) = make_uint4(0, 0, 0, 0);
        }
        cp_async_commit();
    };

    if (ntiles > 0) load_stage(0, 0);

    // Queries to shared memory as BF16 (the tensor cores' input); rows past the last one are zeros.
    for (int idx = tid; idx < M * C8; idx += THREADS)
    {
        const int m = idx / C8, c8 = idx % C8, row = rg * M + m;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (row < rows)
        {
            const i64 off = ((i64)r * rows + row) * D + c8 * 8;
            if (QBF16)
            {
                v = *(const uint4*)((const u16*)p.q + off);
            }
            else
            {
                const float4 a = *(const float4*)((const float*)p.q + off), b = *(const float4*)((const float*)p.q + off + 4);
                v = make_uint4(pack_bf16x2(a.x, a.y), pack_bf16x2(a.z, a.w), pack_bf16x2(b.x, b.y), pack_bf16x2(b.z, b.w));
            }
        }
        *(uint4*)(qs + m * DP + c8 * 8) = v;
    }

    // This thread's two accumulator rows (g and g + 8 of the warp's 16) and the last key each may see.
    int qpos[2];
#pragma unroll
    for (int h = 0; h < 2; h++)
    {
        const int row = rg * M + wr * 16 + g + 8 * h;
        qpos[h] = row < rows ? len - p.q_tokens + row / p.heads : -1;
    }

    const float scale_log2 = p.scale * 1.4426950408889634f;
    float o[NO][4];
#pragma unroll
    for (int n = 0; n < NO; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float mrow[2] = {-f32_inf(), -f32_inf()};  // running max of the scaled scores, log2 units
    float lrow[2] = {0.0f, 0.0f};               // this thread's share of the running sum

    for (int it = 0; it < ntiles; it++)
    {
        if (it + 1 < ntiles)
        {
            load_stage(it + 1, (it + 1) & 1);
            cp_async_wait<1>();
        }
        else
        {
            cp_async_wait<0>();
        }
        __syncthreads();
        const u16* kt = ks + (it & 1) * kMlaTile * DP;
        const int start = kbeg + it * kMlaTile;

        // S = Q · Kᵀ over all D = DV + DR columns: this warp's 16 rows × TN tokens.
        float s[NS][4];
#pragma unroll
        for (int n = 0; n < NS; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
        const u16* qa = qs + (wr * 16 + (lane & 15)) * DP + (lane >> 4) * 8;
        const u16* kb = kt + (wc * TN + ((lane >> 4) & 1) * 8 + (lane & 7)) * DP + ((lane >> 3) & 1) * 8;
#pragma unroll 4
        for (int kk = 0; kk < KS; kk++)
        {
            u32 a[4];
            ldsm_x4(a, qa + kk * 16);
#pragma unroll
            for (int n = 0; n + 1 < NS; n += 2)
            {
                u32 b[4];
                ldsm_x4(b, kb + n * 8 * DP + kk * 16);
                mma_bf16_16816(s[n], a, b[0], b[1]);
                mma_bf16_16816(s[n + 1], a, b[2], b[3]);
            }
            if (NS % 2 == 1)
            {
                u32 b0, b1;
                ldsm_x2(b0, b1, kb - ((lane >> 4) & 1) * 8 * DP + (NS - 1) * 8 * DP + kk * 16);
                mma_bf16_16816(s[NS - 1], a, b0, b1);
            }
        }

        // Scale, mask (past the split, or after the row's position), and the row max over the stage.
        float tmax[2] = {-f32_inf(), -f32_inf()};
#pragma unroll
        for (int n = 0; n < NS; n++)
#pragma unroll
            for (int e = 0; e < 4; e++)
            {
                const int h = e >> 1, j = start + wc * TN + n * 8 + 2 * t4 + (e & 1);
                s[n][e] = (j < kend && j <= qpos[h]) ? s[n][e] * scale_log2 : -f32_inf();
                tmax[h] = nan_max(tmax[h], s[n][e]);
            }
#pragma unroll
        for (int h = 0; h < 2; h++)
        {
            tmax[h] = nan_max(tmax[h], __shfl_xor_sync(0xffffffffu, tmax[h], 1));
            tmax[h] = nan_max(tmax[h], __shfl_xor_sync(0xffffffffu, tmax[h], 2));
            if (t4 == 0) red[(wr * 16 + g + 8 * h) * WC + wc] = tmax[h];
        }
        __syncthreads();

        float base[2], alpha[2];
#pragma unroll
        for (int h = 0; h < 2; h++)
        {
            float mx = mrow[h];
#pragma unroll
            for (int c = 0; c < WC; c++) mx = nan_max(mx, red[(wr * 16 + g + 8 * h) * WC + c]);
            // Nothing visible yet: subtract 0 so exp2(-inf) gives 0 instead of exp2(-inf + inf) = NaN.
            base[h] = mx == -f32_inf() ? 0.0f : mx;
            alpha[h] = exp2f(mrow[h] - base[h]);
            mrow[h] = mx;
            lrow[h] *= alpha[h];
        }
#pragma unroll
        for (int n = 0; n < NO; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) o[n][e] *= alpha[e >> 1];
#pragma unroll
        for (int n = 0; n < NS; n++)
#pragma unroll
            for (int h = 0; h < 2; h++)
            {
                const float p0 = exp2f(s[n][2 * h] - base[h]), p1 = exp2f(s[n][2 * h + 1] - base[h]);
                lrow[h] += p0 + p1;
                *(u32*)(ps + (wr * 16 + g + 8 * h) * PP + wc * TN + n * 8 + 2 * t4) = pack_bf16x2(p0, p1);
            }
        __syncthreads();

        // O += P · V, V = the latent part of the same cached rows: this warp's 16 rows × CW columns.
        const u16* pa = ps + (wr * 16 + (lane & 15)) * PP + (lane >> 4) * 8;
        const u16* vb = kt + (((lane >> 3) & 1) * 8 + (lane & 7)) * DP + wc * CW + (lane >> 4) * 8;
#pragma unroll
        for (int kk = 0; kk < kMlaTile / 16; kk++)
        {
            u32 a[4];
            ldsm_x4(a, pa + kk * 16);
#pragma unroll
            for (int n = 0; n + 1 < NO; n += 2)
            {
                u32 b[4];
                ldsm_x4_trans(b, vb + kk * 16 * DP + n * 8);
                mma_bf16_16816(o[n], a, b[0], b[1]);
                mma_bf16_16816(o[n + 1], a, b[2], b[3]);
            }
            if (NO % 2 == 1)
            {
                u32 b0, b1;
                ldsm_x2_trans(b0, b1, vb - (lane >> 4) * 8 + kk * 16 * DP + (NO - 1) * 8);
                mma_bf16_16816(o[NO - 1], a, b0, b1);
            }
        }
        __syncthreads();  // the next iteration's cp.async overwrites this stage; P and red are rewritten
    }

    // Row sums: over the 4 lanes of a row, then over the WC warps sharing it.
#pragma unroll
    for (int h = 0; h < 2; h++)
    {
        lrow[h] += __shfl_xor_sync(0xffffffffu, lrow[h], 1);
        lrow[h] += __shfl_xor_sync(0xffffffffu, lrow[h], 2);
        if (t4 == 0) red[(wr * 16 + g + 8 * h) * WC + wc] = lrow[h];
    }
    __syncthreads();
#pragma unroll
    for (int h = 0; h < 2; h++)
    {
        const int m = wr * 16 + g + 8 * h, row = rg * M + m;
        if (row >= rows) continue;
        float l = 0.0f;
#pragma unroll
        for (int c = 0; c < WC; c++) l += red[m * WC + c];
        const float inv = l == 0.0f ? 0.0f : 1.0f / l;  // no visible key in this split: output 0, LSE -inf
        const float lse = l == 0.0f ? -f32_inf() : (mrow[h] + log2f(l)) * 0.6931471805599453f;
        float* dst;
        float* lse_dst;
        if (p.splits == 1)
        {
            dst = p.out + ((i64)r * rows + row) * DV;
            lse_dst = p.lse + (i64)r * rows + row;
        }
        else
        {
            const i64 pr = ((i64)split * p.batch + r) * rows + row;
            dst = p.o_partial + pr * DV;
            lse_dst = p.lse_partial + pr;
        }
#pragma unroll
        for (int n = 0; n < NO; n++)
            *(float2*)(dst + wc * CW + n * 8 + 2 * t4) = make_float2(o[n][2 * h] * inv, o[n][2 * h + 1] * inv);
        if (wc == 0 && t4 == 0) *lse_dst = lse;
    }
}

// One block per (query row, request): out = Σ_s w_s·O_s / Σ_s w_s, w_s = exp(lse_s - max lse), lse = max + log Σ w_s.
template <int DV>
__global__ void __launch_bounds__(kMlaCombineBlock) mla_combine_kernel(const __grid_constant__ MlaDecodeParams p)
{
    __shared__ float w[kMlaMaxSplits];
    const int row = blockIdx.x, r = blockIdx.y;
    const int rows = p.q_tokens * p.heads;
    const int splits = min(p.splits, kMlaMaxSplits);
    for (int s = threadIdx.x; s < splits; s += kMlaCombineBlock) w[s] = p.lse_partial[((i64)s * p.batch + r) * rows + row];
    __syncthreads();
    float mx = -f32_inf();
    for (int s = 0; s < splits; s++) mx = nan_max(mx, w[s]);
    const float base = mx == -f32_inf() ? 0.0f : mx;
    float sum = 0.0f;
    for (int s = 0; s < splits; s++) sum += expf(w[s] - base);
    const float inv = sum == 0.0f ? 0.0f : 1.0f / sum;
    for (int c = threadIdx.x; c < DV; c += kMlaCombineBlock)
    {
        float acc = 0.0f;
        for (int s = 0; s < splits; s++) acc += expf(w[s] - base) * p.o_partial[(((i64)s * p.batch + r) * rows + row) * DV + c];
        p.out[((i64)r * rows + row) * DV + c] = acc * inv;
    }
    if (threadIdx.x == 0) p.lse[(i64)r * rows + row] = sum == 0.0f ? -f32_inf() : base + logf(sum);
}

// ---- fold and unfold through kv_b ----------------------------------------------------------------

// One block per (head, 8 tokens): q̃[c] = Σ_d q_nope[d]·W_UK[h, d, c] (fp32, d ascending as the CPU
// reference), stored BF16 with q_pe appended. W_UK rows are read once per 8 tokens.
template <int DV, int DR, int XBF16>
__global__ void __launch_bounds__(kMlaProjBlock) mla_fold_kernel(const __grid_constant__ MlaProjParams p)
{
    typedef typename ElemOf<XBF16>::type T;
    constexpr int PER = (DV + kMlaProjBlock - 1) / kMlaProjBlock;
    __shared__ float qn[kMlaProjTokens][kMlaMaxNope];
    const int h = blockIdx.x, t0 = blockIdx.y * kMlaProjTokens;
    const int nt = min(kMlaProjTokens, p.tokens - t0);
    const int qw = p.nope + DR;
    const T* x = (const T*)p.x;
    for (int idx = threadIdx.x; idx < kMlaProjTokens * p.nope; idx += kMlaProjBlock)
    {
        const int tt = idx / p.nope, d = idx % p.nope;
        qn[tt][d] = tt < nt ? load_f32<T>(x, ((i64)(t0 + tt) * p.heads + h) * qw + d) : 0.0f;
    }
    __syncthreads();
    float acc[kMlaProjTokens][PER];
#pragma unroll
    for (int tt = 0; tt < kMlaProjTokens; tt++)
#pragma unroll
        for (int k = 0; k < PER; k++) acc[tt][k] = 0.0f;
    const u16* w = p.w + (i64)h * (p.nope + p.v) * DV;
    for (int d = 0; d < p.nope; d++)
    {
#pragma unroll
        for (int k = 0; k < PER; k++)
        {
            const int c = threadIdx.x + k * kMlaProjBlock;
            const float wv = c < DV ? bf16_to_float(w[(i64)d * DV + c]) : 0.0f;
#pragma unroll
            for (int tt = 0; tt < kMlaProjTokens; tt++) acc[tt][k] += qn[tt][d] * wv;
        }
    }
    u16* y = (u16*)p.y;
#pragma unroll
    for (int tt = 0; tt < kMlaProjTokens; tt++)
    {
        if (tt >= nt) break;
        u16* yr = y + ((i64)(t0 + tt) * p.heads + h) * (DV + DR);
#pragma unroll
        for (int k = 0; k < PER; k++)
        {
            const int c = threadIdx.x + k * kMlaProjBlock;
            if (c < DV) yr[c] = float_to_bf16(acc[tt][k]);
        }
        for (int e = threadIdx.x; e < DR; e += kMlaProjBlock)
            yr[DV + e] = float_to_bf16(load_f32<T>(x, ((i64)(t0 + tt) * p.heads + h) * qw + p.nope + e));
    }
}

// The rope half of q_abs when the tensor-core GEMM (Kernels/bf16_gemm_mma.cu) computes the latent half: q_abs[t, h,
// DV + e] = bf16(q_pe[t, h, e]), the same values mla_fold_kernel stores. A grid-stride loop over every element.
template <int DV, int DR, int XBF16>
__global__ void __launch_bounds__(kMlaProjBlock) mla_fold_rope_kernel(const __grid_constant__ MlaProjParams p)
{
    typedef typename ElemOf<XBF16>::type T;
    const i64 total = (i64)p.tokens * p.heads * DR;
    const int qw = p.nope + DR;
    for (i64 i = (i64)blockIdx.x * kMlaProjBlock + threadIdx.x; i < total; i += (i64)gridDim.x * kMlaProjBlock)
    {
        const i64 row = i / DR;
        const int e = (int)(i % DR);
        ((u16*)p.y)[row * (DV + DR) + DV + e] = float_to_bf16(load_f32<T>((const T*)p.x, row * qw + p.nope + e));
    }
}

// One block per (head, 8 tokens), a warp per output channel d: out[t, h, d] = W_UV[h, d, :] · latent[t, h, :].
template <int DV, int YBF16>
__global__ void __launch_bounds__(kMlaProjBlock) mla_unfold_kernel(const __grid_constant__ MlaProjParams p)
{
    typedef typename ElemOf<YBF16>::type T;
    __shared__ float lat[kMlaProjTokens][DV];
    const int h = blockIdx.x, t0 = blockIdx.y * kMlaProjTokens;
    const int nt = min(kMlaProjTokens, p.tokens - t0);
    const float* x = (const float*)p.x;
    for (int idx = threadIdx.x; idx < kMlaProjTokens * DV; idx += kMlaProjBlock)
    {
        const int tt = idx / DV, c = idx % DV;
        lat[tt][c] = tt < nt ? x[((i64)(t0 + tt) * p.heads + h) * DV + c] : 0.0f;
    }
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u16* w = p.w + ((i64)h * (p.nope + p.v) + p.nope) * DV;
    for (int d = warp; d < p.v; d += kMlaProjBlock / 32)
    {
        float acc[kMlaProjTokens];
#pragma unroll
        for (int tt = 0; tt < kMlaProjTokens; tt++) acc[tt] = 0.0f;
        for (int c = lane; c < DV; c += 32)
        {
            const float wv = bf16_to_float(w[(i64)d * DV + c]);
#pragma unroll
            for (int tt = 0; tt < kMlaProjTokens; tt++) acc[tt] += lat[tt][c] * wv;
        }
#pragma unroll
        for (int tt = 0; tt < kMlaProjTokens; tt++)
        {
            acc[tt] = warp_sum(acc[tt]);
            if (lane == 0 && tt < nt) store_f32<T>((T*)p.y, ((i64)(t0 + tt) * p.heads + h) * p.v + d, acc[tt]);
        }
    }
}
