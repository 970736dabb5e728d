// MoE dispatch: from the gate's topk_idx [tokens, k] build the expert-contiguous layout the grouped
// expert GEMM reads. The CPU reference is MoeDispatch in Engine/Kernels/MoeDispatchKernel.cs.
//   slot s = token * k + j                        (flat index into topk_idx)
//   counts[e]    = number of slots routed to e    (entries outside [0, E) are ignored)
//   offsets[e]   = sum over e' < e of round_up(counts[e'], tile); offsets[E] = total padded rows
//   perm[row]    = s for rows offsets[e] .. offsets[e] + counts[e] - 1, in increasing s (token, then
//                  slot); -1 for the padding rows up to offsets[e + 1] and for every row >= offsets[E]
//   inv[s]       = the row of slot s; -1 for an ignored entry and for slots of tokens >= the token count
//
// Expert parallelism: a device holds a stack of E local expert slots out of the model's map_experts, and
// expert_map [map_experts] gives each global expert its slot (-1: held by another device). With a map,
// the count pass translates every live slot's expert (local_idx[s] = map[topk_idx[s]], -1 for ids
// outside [0, map_experts) and for experts held elsewhere) and everything after it (scatter, the masked
// layout) reads local_idx: the slots another device serves are not routed here, so the combine skips them
// and the all-reduce adds that device's share. Without a map (null), topk_idx holds local ids already.
//
// Deterministic without ordered atomics, three launches with grids fixed by t_max (capturable in a
// CUDA graph; the live token count may come from device memory through num_tokens):
//   1. moe_dispatch_count   one block per CHUNK slots: per-chunk histogram hist[chunk][E] (shared-memory
//                           atomics only count, so the result does not depend on their order)
//   2. moe_dispatch_scan    one block: per expert, the exclusive scan of hist over chunks (in place) and
//                           counts; then the padded exclusive scan over experts into offsets; padding rows
//                           and the tail of perm set to -1
//   3. moe_dispatch_scatter one block per chunk, rounds of BLOCK consecutive slots: within a warp the rank
//                           among equal experts comes from __match_any_sync and the lanes below, across warps
//                           from a [warps][E] table of this round's counts, across rounds from a running
//                           base per expert; row = offsets[e] + hist[chunk][e] + that rank.
#pragma once
#include "common.cuh"

struct MoeDispatchParams
{
    const i32* topk_idx;    // [t_max, k] experts per token slot (int32)
    const i32* expert_map;  // null, or [map_experts] global expert -> local slot, -1 when held elsewhere
    i32* local_idx;         // with a map: [t_max, k] the slots' local experts, written by the count pass
    const i32* num_tokens;  // device token count (clamped to t_max), or null to use `tokens`
    i32* counts;            // [E] slots per expert
    i32* offsets;           // [E + 1] padded exclusive offsets
    i32* perm;              // [rows_max] row -> slot, -1 for padding
    i32* inv;               // [t_max * k] slot -> row, -1 when not routed
    i32* hist;              // [chunks, E] workspace
    i32 tokens;             // token count when num_tokens is null
    i32 t_max;              // capacity the buffers and grids are sized for
    i32 k;
    i32 tile;               // each expert's rows are padded to a multiple of this (1 = no padding)
    i32 rows_max;           // length of perm: >= t_max * k + E * (tile - 1)
    i32 chunks;             // ceil(t_max * k / CHUNK), the grid of count and scatter
    i32 map_experts;        // length of expert_map (the model's routed experts); 0 without a map
    i32 pad0;
};

DSC_DEVICE int dispatch_slots(const MoeDispatchParams& p)
{
    int t = p.num_tokens ? *p.num_tokens : p.tokens;
    t = t < 0 ? 0 : (t > p.t_max ? p.t_max : t);
    return t * p.k;
}

template <int E, int BLOCK, int CHUNK>
__global__ void __launch_bounds__(BLOCK) moe_dispatch_count(const __grid_constant__ MoeDispatchParams p)
{
    __shared__ int h[E];
    for (int e = threadIdx.x; e < E; e += BLOCK) h[e] = 0;
    __syncthreads();
    const int n = dispatch_slots(p);
    const int base = blockIdx.x * CHUNK;
    const int end = base + CHUNK < n ? base + CHUNK : n;
    for (int s = base + threadIdx.x; s < end; s += BLOCK)
    {
        int e = p.topk_idx[s];
        if (p.expert_map)
        {
            e = e >= 0 && e < p.map_experts ? p.expert_map[e] : -1;
            p.local_idx[s] = e;
        }
        if (e >= 0 && e < E) atomicAdd(&h[e], 1);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += BLOCK) p.hist[(i64)blockIdx.x * E + e] = h[e];
}

template <int E, int BLOCK, int CHUNK>
__global__ void __launch_bounds__(BLOCK) moe_dispatch_scan(const __grid_constant__ MoeDispatchParams p)
{
    static_assert(BLOCK % 32 == 0, "block must be whole warps");
    __shared__ int s_count[E];
    __shared__ int s_off[E + 1];
    for (int e = threadIdx.x; e < E; e += BLOCK)
    {
        int running = 0;
        for (int b = 0; b < p.chunks; b++)
        {
            const int c = p.hist[(i64)b * E + e];
            p.hist[(i64)b * E + e] = running;
            running += c;
        }
        s_count[e] = running;
        p.counts[e] = running;
    }
    __syncthreads();

    if (threadIdx.x < 32)
    {
        // Padded exclusive scan over experts: lane l owns experts [l * PER, (l + 1) * PER).
        constexpr int PER = (E + 31) / 32;
        const int lane = threadIdx.x;
        int local = 0;
        for (int i = 0; i < PER; i++)
        {
            const int e = lane * PER + i;
            if (e < E) local += (s_count[e] + p.tile - 1) / p.tile * p.tile;
        }
        int incl = local;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1)
        {
            const int v = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += v;
        }
        int run = incl - local;
        for (int i = 0; i < PER; i++)
        {
            const int e = lane * PER + i;
            if (e < E)
            {
                s_off[e] = run;
                run += (s_count[e] + p.tile - 1) / p.tile * p.tile;
            }
        }
        if (lane == 31) s_off[E] = incl;
    }
    __syncthreads();

    for (int e = threadIdx.x; e <= E; e += BLOCK) p.offsets[e] = s_off[e];
    for (int e = threadIdx.x; e < E; e += BLOCK)
    {
        const int end = s_off[e + 1] < p.rows_max ? s_off[e + 1] : p.rows_max;
        for (int r = s_off[e] + s_count[e]; r < end; r++) p.perm[r] = -1;
    }
    for (int r = s_off[E] + threadIdx.x; r < p.rows_max; r += BLOCK) p.perm[r] = -1;
}

template <int E, int BLOCK, int CHUNK>
__global__ void __launch_bounds__(BLOCK) moe_dispatch_scatter(const __grid_constant__ MoeDispatchParams p)
{
    static_assert(BLOCK % 32 == 0 && CHUNK % BLOCK == 0, "a chunk is whole rounds of whole warps");
    static_assert(E <= 1024, "[warps][E] table in static shared memory");
    constexpr int NW = BLOCK / 32;
    __shared__ int run[E];
    __shared__ int wh[NW][E];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int e = threadIdx.x; e < E; e += BLOCK)
    {
        run[e] = p.offsets[e] + p.hist[(i64)blockIdx.x * E + e];
#pragma unroll
        for (int w = 0; w < NW; w++) wh[w][e] = 0;
    }
    __syncthreads();

    const int n = dispatch_slots(p);
    const int cap = p.t_max * p.k;
    const int base = blockIdx.x * CHUNK;
    for (int r0 = base; r0 < base + CHUNK && r0 < cap; r0 += BLOCK) // uniform over the block
    {
        const int s = r0 + threadIdx.x;
        const int e = s < n ? (p.expert_map ? p.local_idx[s] : p.topk_idx[s]) : -1;
        const bool ok = e >= 0 && e < E;
        const unsigned peers = __match_any_sync(0xffffffffu, ok ? e : -1);
        const unsigned below = peers & ((1u << lane) - 1u);
        if (ok && below == 0) wh[warp][e] = __popc(peers);
        __syncthreads();
        if (ok)
        {
            int row = run[e] + __popc(below);
            for (int w = 0; w < warp; w++) row += wh[w][e];
            if (row < p.rows_max) p.perm[row] = s;
            p.inv[s] = row;
        }
        else if (s < cap)
        {
            p.inv[s] = -1;
        }
        __syncthreads();
        for (int x = threadIdx.x; x < E; x += BLOCK)
        {
            int tot = 0;
#pragma unroll
            for (int w = 0; w < NW; w++)
            {
                tot += wh[w][x];
                wh[w][x] = 0;
            }
            run[x] += tot;
        }
        __syncthreads();
    }
}
