// MoE gate, DeepSeek-V3 noaux_tc routing (MODEL.md 5), fp32 throughout; the CPU reference is
// Engine/Backends/Cpu/Router.cs and this kernel makes the same decisions:
//   logit[e]  = dot(x, W[e])            x fp32 (or bf16 widened), W bf16 [E, D] widened exactly, fp32 accumulation
//   score[e]  = 1 / (1 + exp(-logit))   (accurate expf: NVRTC runs without fast math)
//   biased[e] = score[e] + bias[e]      the correction bias steers selection only
//   group score = sum of the two largest biased scores of each of NGROUP groups (the largest alone when
//   a group has one expert); the TOPKGROUP best groups are kept, the others' experts become -inf
//   (only when NGROUP > 1 and TOPKGROUP < NGROUP, as Router)
//   topk_idx  = the K best biased scores in descending order; every top-k (groups, experts) breaks ties
//               by the lower index, i.e. compares (value, -index) pairs
//   topk_weight[j] = score[idx[j]] / sum_j score[idx[j]] (normalize) * scaling, the sum taken in j order
//
// The input should be the fp32 gate input: the fixture's routing margins (6e-4 in tiny-a) leave no room
// for a bf16 round trip of x. A bf16 input is supported (IN_BF16 = 1) for callers that only hold bf16.
// The dot products differ from the CPU's only by fp32 summation order (~1e-7 relative).
//
// One block per token. Phase 1: x into shared memory as fp32; each warp takes experts warp, warp + NW, ...
// and its lanes read the expert's bf16 row coalesced (8 bf16 = 16 bytes per lane and load when D % 8 == 0,
// which also requires a 16-byte aligned weight pointer), then a warp sum. Phase 2 (warp 0): group scores
// (one lane per group), group top-k and expert top-k by warp arg-max reductions, weights by lane 0.
// NaN logits are not given Router's exact (first-untaken-wins) treatment; a NaN never wins a comparison here.
//
// moe_route_kernel makes the same decisions from logits a GEMM computed (the router on tensor cores,
// MoeGateKernel with a Bf16MmaKernel): x holds `logit_splits` partial logit arrays [tokens, E], x_stride
// elements apart, added in split order (deterministic). One warp per token.
#pragma once
#include "common.cuh"

struct MoeGateParams
{
    const void* x;           // [tokens, x_stride] gate input (IN_BF16 ? bf16 : f32)
    const u16* weight;       // [E, D] bf16 gate weight, 16-byte aligned
    const float* bias;       // [E] e_score_correction_bias (f32)
    i32* topk_idx;           // [tokens, K] chosen experts, best first
    float* topk_weight;      // [tokens, K] routing weights
    float* scores;           // [tokens, E] unbiased sigmoid scores, or null (not written)
    i64 x_stride;            // elements between token rows of x
    i32 tokens;
    i32 normalize;           // norm_topk_prob
    float scaling;           // routed_scaling_factor
    i32 logit_splits;        // moe_route_kernel: partial logit arrays in x (x_stride elements apart)
};

constexpr int kMoeRouteWarps = 4; // tokens per moe_route_kernel block

// (value, index) order of every top-k: larger value first, then lower index.
DSC_DEVICE bool gate_better(float v, int i, float bv, int bi)
{
    return bi < 0 || v > bv || (v == bv && i < bi);
}

// Warp arg-max over (value, index) candidates with gate_better; every lane gets the winner.
DSC_DEVICE void gate_warp_argmax(float& v, int& i)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
    {
        float ov = __shfl_xor_sync(0xffffffffu, v, o);
        int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (oi >= 0 && gate_better(ov, oi, v, i))
        {
            v = ov;
            i = oi;
        }
    }
}

// The sigmoid score of one logit and its biased copy (selection only); the score is also written out when asked.
DSC_DEVICE void moe_gate_score(const MoeGateParams& p, int t, int e, int experts, float logit, float* s_score, float* s_biased)
{
    const float s = 1.0f / (1.0f + expf(-logit));
    s_score[e] = s;
    s_biased[e] = s + p.bias[e];
    if (p.scores) p.scores[(i64)t * experts + e] = s;
}

// Group limit, top-k and weights of token t from its scores (one warp, every lane active).
template <int E, int NGROUP, int TOPKGROUP, int K>
DSC_DEVICE void moe_gate_select(const MoeGateParams& p, int t, int lane, const float* s_score, const float* s_biased)
{
    static_assert(E % NGROUP == 0, "experts must split evenly into groups");
    static_assert(NGROUP <= 32, "one lane per group");
    static_assert(E <= 1024, "at most 32 candidates per lane");
    static_assert(TOPKGROUP >= 1 && TOPKGROUP <= NGROUP, "groups kept");
    static_assert(K >= 1 && K <= E && K <= (E / NGROUP) * TOPKGROUP, "k experts must exist in the kept groups");
    constexpr int PER_GROUP = E / NGROUP;
    constexpr int PER_LANE = (E + 31) / 32;
    constexpr bool LIMIT_GROUPS = NGROUP > 1 && TOPKGROUP < NGROUP;
    bool keep_group = true; // of group `lane`
    if (LIMIT_GROUPS)
    {
        float gscore = -f32_inf();
        if (lane < NGROUP)
        {
            float first = -f32_inf(), second = -f32_inf();
            for (int i = 0; i < PER_GROUP; i++)
            {
                const float v = s_biased[lane * PER_GROUP + i];
                if (v > first)
                {
                    second = first;
                    first = v;
                }
                else if (v > second)
                {
                    second = v;
                }
            }
            gscore = PER_GROUP >= 2 ? first + second : first;
        }
        keep_group = false;
        bool taken = lane >= NGROUP;
        for (int j = 0; j < TOPKGROUP; j++)
        {
            float v = gscore;
            int i = taken ? -1 : lane;
            gate_warp_argmax(v, i);
            if (i == lane)
            {
                keep_group = true;
                taken = true;
            }
        }
    }
    const unsigned kept_mask = __ballot_sync(0xffffffffu, keep_group);

    // Candidates: expert e = lane + 32 r, masked to -inf outside the kept groups.
    float cand[PER_LANE];
    unsigned taken_bits = 0;
#pragma unroll
    for (int r = 0; r < PER_LANE; r++)
    {
        const int e = lane + 32 * r;
        if (e < E)
        {
            cand[r] = ((kept_mask >> (e / PER_GROUP)) & 1u) ? s_biased[e] : -f32_inf();
        }
        else
        {
            cand[r] = -f32_inf();
            taken_bits |= 1u << r;
        }
    }

    float wsum = 0.0f;
    int chosen[K];
#pragma unroll
    for (int j = 0; j < K; j++)
    {
        float v = 0.0f;
        int i = -1;
#pragma unroll
        for (int r = 0; r < PER_LANE; r++)
        {
            if (!((taken_bits >> r) & 1u) && gate_better(cand[r], lane + 32 * r, v, i))
            {
                v = cand[r];
                i = lane + 32 * r;
            }
        }
        gate_warp_argmax(v, i);
        if ((i & 31) == lane) taken_bits |= 1u << (i >> 5);
        chosen[j] = i;
        wsum += s_score[i];
    }

    if (lane == 0)
    {
#pragma unroll
        for (int j = 0; j < K; j++)
        {
            const float w = s_score[chosen[j]];
            p.topk_idx[(i64)t * K + j] = chosen[j];
            p.topk_weight[(i64)t * K + j] = (p.normalize ? w / wsum : w) * p.scaling;
        }
    }
}

template <int E, int D, int NGROUP, int TOPKGROUP, int K, int BLOCK, int IN_BF16>
__global__ void __launch_bounds__(BLOCK) moe_gate_kernel(const __grid_constant__ MoeGateParams p)
{
    static_assert(BLOCK % 32 == 0 && BLOCK <= 1024, "block must be whole warps");
    constexpr int NW = BLOCK / 32;
    typedef typename ElemOf<IN_BF16>::type TIn;

    __shared__ __align__(16) float xs[D];
    __shared__ float s_score[E];
    __shared__ float s_biased[E];

    const int t = blockIdx.x;
    if (t >= p.tokens) return;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const TIn* x = (const TIn*)p.x + (i64)t * p.x_stride;
    for (int i = threadIdx.x; i < D; i += BLOCK) xs[i] = load_f32<TIn>(x, i);
    __syncthreads();

    // ---- phase 1: logits, sigmoid, bias ----
    for (int e = warp; e < E; e += NW)
    {
        const u16* w = p.weight + (i64)e * D;
        float acc = 0.0f;
        if (D % 8 == 0)
        {
            const uint4* w8 = (const uint4*)w;
#pragma unroll 4
            for (int c = lane; c < D / 8; c += 32)
            {
                const uint4 q = w8[c];
                const float4 xa = *(const float4*)&xs[c * 8];
                const float4 xb = *(const float4*)&xs[c * 8 + 4];
                acc = fmaf(xa.x, __uint_as_float(q.x << 16), acc);
                acc = fmaf(xa.y, __uint_as_float(q.x & 0xffff0000u), acc);
                acc = fmaf(xa.z, __uint_as_float(q.y << 16), acc);
                acc = fmaf(xa.w, __uint_as_float(q.y & 0xffff0000u), acc);
                acc = fmaf(xb.x, __uint_as_float(q.z << 16), acc);
                acc = fmaf(xb.y, __uint_as_float(q.z & 0xffff0000u), acc);
                acc = fmaf(xb.z, __uint_as_float(q.w << 16), acc);
                acc = fmaf(xb.w, __uint_as_float(q.w & 0xffff0000u), acc);
            }
        }
        else
        {
            for (int c = lane; c < D; c += 32) acc = fmaf(xs[c], bf16_to_float(w[c]), acc);
        }
        acc = warp_sum(acc);
        if (lane == 0) moe_gate_score(p, t, e, E, acc, s_score, s_biased);
    }
    __syncthreads();

    // ---- phase 2 (warp 0): group limit, top-k, weights ----
    if (warp == 0) moe_gate_select<E, NGROUP, TOPKGROUP, K>(p, t, lane, s_score, s_biased);
}

// One warp per token: logit[e] = Σ_s partial_s[t, e] in split order, then the same scoring and selection.
template <int E, int NGROUP, int TOPKGROUP, int K>
__global__ void __launch_bounds__(kMoeRouteWarps * 32) moe_route_kernel(const __grid_constant__ MoeGateParams p)
{
    __shared__ float s_score[kMoeRouteWarps][E];
    __shared__ float s_biased[kMoeRouteWarps][E];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int t = blockIdx.x * kMoeRouteWarps + warp;
    if (t >= p.tokens) return; // the whole warp: nothing below synchronizes more than one warp
    const float* logits = (const float*)p.x + (i64)t * E;
    for (int e = lane; e < E; e += 32)
    {
        float acc = 0.0f;
        for (int s = 0; s < p.logit_splits; s++) acc += logits[(i64)s * p.x_stride + e];
        moe_gate_score(p, t, e, E, acc, s_score[warp], s_biased[warp]);
    }
    __syncwarp();
    moe_gate_select<E, NGROUP, TOPKGROUP, K>(p, t, lane, s_score[warp], s_biased[warp]);
}
