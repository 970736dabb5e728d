// Token choice on the GPU, one block per row of logits, each row with its own settings (TokenChoiceRow); only the
// int32 ids are written. The rule is TokenSampling's in Engine/Backends/TokenChoice.cs (the CPU specification):
//   a row with vocab_limit <= 0 is not chosen here: -1.
//   a row with allowed ids (allowed_row >= 0: bit i of its words set = id i allowed) sees every other id as -inf.
//   a row with a NaN or +inf logit below vocab_limit (allowed or not), or no allowed one above -inf, cannot be sampled:
//   -1 (the host reads it).
//   temperature <= 0: argmax, the lowest index on ties.
//   else w_i = exp((l_i - max) / T); top-k keeps logits >= the k-th largest (ties at the threshold kept); top-p then
//   keeps logits >= the largest threshold whose kept weight is >= p of the top-k weight; u = uniform(seed, draw) in
//   [0, 1); the token is the first kept index (in index order) whose running weight exceeds u * total (the last kept
//   index with weight when rounding leaves the target past the end). Weights are fp32 sums in a block order, so a
//   draw within rounding of a boundary may differ from the CPU's sum: tests allow that.
#pragma once
#include "common.cuh"

struct TokenChoiceRow
{
    i32 vocab_limit;      // ids >= it are never chosen; <= 0: not chosen here
    float temperature;    // <= 0: greedy
    i32 top_k;            // <= 0 or >= vocab_limit: off
    float top_p;          // >= 1: off
    u64 seed;
    u64 draw;             // the request's draw counter
    i32 allowed_row;      // its row of SamplingParams::allowed; < 0: every id allowed
    i32 pad0;
};

struct SamplingParams
{
    const float* logits;          // [rows, logits_stride]
    const TokenChoiceRow* choices; // [rows]
    const u32* allowed;            // [masks, allowed_stride]: bit i of a row's words = id i allowed (the host's u64 words, little-endian)
    i32* out_ids;                  // [rows]
    i64 logits_stride;
    i64 allowed_stride;            // u32 words per mask row
    i32 rows;
    i32 pad0;
};

DSC_DEVICE u64 splitmix64(u64 x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// Mirrored by TokenSampling.Uniform in C#.
DSC_DEVICE float sampling_uniform(u64 seed, u64 draw)
{
    const u64 h = splitmix64(seed ^ splitmix64(draw));
    return (float)(u32)(h >> 40) * (1.0f / 16777216.0f);
}

// Order-preserving map of a non-NaN float to an unsigned key.
DSC_DEVICE u32 order_key(float f)
{
    const u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Logit i as the draw sees it: -inf where the row's mask (null: none) does not allow i.
DSC_DEVICE float allowed_logit(const float* l, const u32* mask, int i)
{
    return mask == nullptr || ((mask[i >> 5] >> (i & 31)) & 1u) ? l[i] : -f32_inf();
}

template <int BLOCK>
DSC_DEVICE void block_argmax(const float* l, const u32* mask, int vocab, float* sv, int* si, float& best_v, int& best_i)
{
    float bv = -f32_inf();
    int bi = -1;
    for (int i = threadIdx.x; i < vocab; i += BLOCK)
    {
        const float v = allowed_logit(l, mask, i);
        if (!is_nan(v) && (bi < 0 || v > bv)) { bv = v; bi = i; } // ascending i: first wins ties
    }
    sv[threadIdx.x] = bv;
    si[threadIdx.x] = bi;
    __syncthreads();
    for (int s = BLOCK / 2; s > 0; s >>= 1)
    {
        if (threadIdx.x < s)
        {
            const float ov = sv[threadIdx.x + s];
            const int oi = si[threadIdx.x + s];
            const float mv = sv[threadIdx.x];
            const int mi = si[threadIdx.x];
            if (oi >= 0 && (mi < 0 || ov > mv || (ov == mv && oi < mi))) { sv[threadIdx.x] = ov; si[threadIdx.x] = oi; }
        }
        __syncthreads();
    }
    best_v = sv[0];
    best_i = si[0];
    __syncthreads();
}

template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) choose_kernel(const __grid_constant__ SamplingParams p)
{
    __shared__ float sv[BLOCK];
    __shared__ int si[BLOCK];
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= p.rows) return;
    const TokenChoiceRow* cr = p.choices + row;
    const int vocab = cr->vocab_limit;
    if (vocab <= 0)
    {
        if (threadIdx.x == 0) p.out_ids[row] = -1;
        return;
    }
    const float* l = p.logits + (i64)row * p.logits_stride;
    const u32* mask = cr->allowed_row >= 0 ? p.allowed + (i64)cr->allowed_row * p.allowed_stride : nullptr;
    const float temperature = cr->temperature;
    const int top_k = cr->top_k;
    const float top_p = cr->top_p;

    // Can the row be sampled? No NaN or +inf (allowed or not: a mask never hides broken numerics), and an allowed id above -inf.
    float bad = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += BLOCK)
        if (is_nan(l[i]) || l[i] == f32_inf()) bad += 1.0f;
    bad = block_sum<BLOCK>(bad, scratch);
    float maxv;
    int maxi;
    block_argmax<BLOCK>(l, mask, vocab, sv, si, maxv, maxi);
    if (bad > 0.0f || maxi < 0 || maxv == -f32_inf())
    {
        if (threadIdx.x == 0) p.out_ids[row] = -1;
        return;
    }
    if (temperature <= 0.0f)
    {
        if (threadIdx.x == 0) p.out_ids[row] = maxi;
        return;
    }
    const float inv_t = 1.0f / temperature;

    // Top-k threshold: the largest key t with count(key >= t) >= k, built bit by bit from the top.
    u32 thr = 0;
    if (top_k > 0 && top_k < vocab)
    {
        for (int bit = 31; bit >= 0; bit--)
        {
            const u32 cand = thr | (1u << bit);
            float cnt = 0.0f;
            for (int i = threadIdx.x; i < vocab; i += BLOCK)
                if (order_key(allowed_logit(l, mask, i)) >= cand) cnt += 1.0f;
            if (block_sum<BLOCK>(cnt, scratch) >= (float)top_k) thr = cand;
        }
    }

    // Top-p threshold over the top-k survivors, the same way with weight.
    if (top_p < 1.0f)
    {
        float total = 0.0f;
        for (int i = threadIdx.x; i < vocab; i += BLOCK)
        {
            const float x = allowed_logit(l, mask, i);
            if (order_key(x) >= thr) total += expf((x - maxv) * inv_t);
        }
        total = block_sum<BLOCK>(total, scratch);
        const float need = top_p * total;
        // weight(key >= max(thr, t)) falls as t grows, so the largest t with weight >= need is found bit by bit.
        u32 pthr = 0;
        for (int bit = 31; bit >= 0; bit--)
        {
            const u32 cand = pthr | (1u << bit);
            float mass = 0.0f;
            for (int i = threadIdx.x; i < vocab; i += BLOCK)
            {
                const float x = allowed_logit(l, mask, i);
                if (order_key(x) >= cand && order_key(x) >= thr) mass += expf((x - maxv) * inv_t);
            }
            if (block_sum<BLOCK>(mass, scratch) >= need) pthr = cand;
        }
        thr = max(thr, pthr);
    }

    // Draw: each thread owns a contiguous chunk so the running weight follows index order.
    const int chunk = (vocab + BLOCK - 1) / BLOCK;
    const int lo = min(vocab, (int)threadIdx.x * chunk), hi = min(vocab, lo + chunk);
    float mine = 0.0f;
    for (int i = lo; i < hi; i++)
    {
        const float x = allowed_logit(l, mask, i);
        if (order_key(x) >= thr) mine += expf((x - maxv) * inv_t);
    }
    sv[threadIdx.x] = mine;
    __syncthreads();
    __shared__ float target_s;
    __shared__ int owner_s;
    if (threadIdx.x == 0)
    {
        float total = 0.0f;
        for (int t = 0; t < BLOCK; t++) total += sv[t];
        const float target = sampling_uniform(cr->seed, cr->draw) * total;
        float acc = 0.0f;
        int owner = -1;
        for (int t = 0; t < BLOCK; t++)
        {
            if (sv[t] > 0.0f) owner = t;
            if (sv[t] > 0.0f && acc + sv[t] > target) break;
            acc += sv[t];
        }
        target_s = target - acc;
        owner_s = owner;
    }
    __syncthreads();
    if (owner_s < 0)
    {
        if (threadIdx.x == 0) p.out_ids[row] = maxi;
        return;
    }
    if ((int)threadIdx.x == owner_s)
    {
        float acc = 0.0f;
        int pick = -1;
        for (int i = lo; i < hi; i++)
        {
            const float x = allowed_logit(l, mask, i);
            if (order_key(x) < thr) continue;
            const float w = expf((x - maxv) * inv_t);
            if (w <= 0.0f) continue;
            pick = i; // the last kept index with weight stands in when rounding leaves the target past the end
            acc += w;
            if (acc > target_s) break;
        }
        p.out_ids[row] = pick >= 0 ? pick : maxi;
    }
}
