// P2P all-reduce (sum) over RANKS devices of one process. Every rank launches the same kernel with the
// same grid on its own stream; each reads its peers' buffers directly through device pointers that are
// valid on every rank (peer access enabled between GPUs, or N logical ranks = N allocations on one GPU).
// The CPU reference is a float32 sum in rank order 0, 1, ..., RANKS-1 (HostCommunicator.AllReduceSum).
//
//   allreduce_oneshot  (small, decode-sized messages) block b of every rank takes elements
//                      [b*per, (b+1)*per): it reads that range of all RANKS inputs, sums in rank order in
//                      fp32 and writes its own output. Every rank does the same arithmetic, so every
//                      output holds identical bits. Traffic per rank: (RANKS-1) x message read remotely.
//   allreduce_twostep  (large messages) reduce-scatter then all-gather: rank r reduces chunk r (rank order,
//                      fp32) into its own output, then copies every other chunk q from rank q's output.
//                      Each chunk is reduced once, so all outputs are again bit-identical. Traffic per
//                      rank: about 2 x (RANKS-1)/RANKS x message.
//
// Synchronization without the host: per-block flags. Each rank owns a flag array
// u32 flags[AR_MAX_BLOCKS][3][8] followed by u32 epochs[AR_MAX_BLOCKS] (all zeroed once at setup). At the
// start of a call block b of rank r takes this call's epoch from its own counter, epochs[b] + 1 (0 skipped
// when it wraps), and stores it back; every rank runs the same calls with the same grids in the same order,
// so block b's counters agree on every rank without the host counting. (A host-given epoch would be frozen
// into a CUDA graph and repeat at every replay; a counter on the device goes on counting.) Only block b of
// rank r touches epochs[b], and calls on one stream run in order, so the counter needs no atomics.
// At barrier `phase` block b of rank r writes the epoch into flags_of_rank_t[b][phase][r] for every rank t,
// after a system-scope fence that publishes everything it wrote before; then it waits until its own
// flags[b][phase][t] equal the epoch for every t, and fences again before reading. Block b of every
// rank touches the same element ranges, so a per-block barrier orders exactly the accesses that conflict:
//   phase 0 (entry)  every rank's input is complete (written by earlier work on that rank's stream);
//   phase 1 (mid)    two-step only: every chunk is reduced before anyone gathers it;
//   phase 2 (exit)   nobody still reads this rank's input/output when its stream moves on and may overwrite
//                    them (the next call's entry barrier would be too late for that).
// An epoch from a later call cannot overwrite a slot still awaited: a rank reaches the next call's
// barriers only after every rank passed this call's exit barrier. Inputs and outputs must be distinct
// buffers (a peer may still read a rank's input while that rank writes its output).
//
// Every rank's blocks spin, so all RANKS x grid blocks must be resident at once: the launcher caps the
// grid (logical ranks share one GPU's SMs) and loads the kernel with an empty call (count 0 returns at
// once) before the first real one, because lazy module loading during a spinning peer could stall. A
// wait longer than timeout_cycles (clock64) sets *error and abandons the call instead of hanging.
// Peer data is read with ld.global.cg (L2, not L1: a peer's writes never invalidate this SM's L1).
#pragma once
#include "common.cuh"

#define AR_MAX_RANKS 8
#define AR_MAX_BLOCKS 64
#define AR_PHASES 3
#define AR_FLAG_WORDS (AR_MAX_BLOCKS * AR_PHASES * AR_MAX_RANKS) // then AR_MAX_BLOCKS epoch counters

struct AllReduceParams
{
    u64 inputs[AR_MAX_RANKS];   // each rank's input [count] (f32 or bf16), rank order
    u64 outputs[AR_MAX_RANKS];  // each rank's output [count]; this rank writes outputs[rank]
    u64 flags[AR_MAX_RANKS];    // each rank's u32 flags [AR_MAX_BLOCKS][AR_PHASES][AR_MAX_RANKS], then epochs [AR_MAX_BLOCKS]
    i32* error;                 // this rank's error word: 1 when a barrier timed out
    i64 count;                  // elements; 0 = load the kernel and return (no barrier)
    i64 timeout_cycles;         // barrier wait limit in clock64 cycles
    i32 rank;
};
DSC_STATIC_ASSERT_OFFSET(AllReduceParams, outputs, 64);
DSC_STATIC_ASSERT_OFFSET(AllReduceParams, rank, 216);

DSC_DEVICE float ld_cg(const float* p, i64 i)
{
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p + i));
    return v;
}

DSC_DEVICE float ld_cg(const u16* p, i64 i)
{
    unsigned short v;
    asm volatile("ld.global.cg.u16 %0, [%1];" : "=h"(v) : "l"(p + i));
    return bf16_to_float(v);
}

DSC_DEVICE void ld_copy(const float* src, float* dst, i64 i) { dst[i] = ld_cg(src, i); }

DSC_DEVICE void ld_copy(const u16* src, u16* dst, i64 i)
{
    unsigned short v;
    asm volatile("ld.global.cg.u16 %0, [%1];" : "=h"(v) : "l"(src + i));
    dst[i] = v;
}

// This call's epoch for this block (see the header), the same in every thread of the block.
DSC_DEVICE u32 ar_next_epoch(const AllReduceParams& p)
{
    __shared__ u32 epoch;
    if (threadIdx.x == 0)
    {
        volatile u32* counter = (volatile u32*)p.flags[p.rank] + AR_FLAG_WORDS + blockIdx.x;
        u32 e = *counter + 1;
        if (e == 0) e = 1; // 0 is what the flags start as
        *counter = e;
        epoch = e;
    }

    __syncthreads();
    return epoch;
}

// Block-wide barrier with the same block of every rank (see the header). Returns false on timeout.
template <int RANKS>
DSC_DEVICE bool ar_barrier(const AllReduceParams& p, u32 epoch, int phase)
{
    __syncthreads();
    int ok = 1;
    if (threadIdx.x < RANKS)
    {
        const int t = threadIdx.x;
        const int slot = (blockIdx.x * AR_PHASES + phase) * AR_MAX_RANKS;
        __threadfence_system();
        volatile u32* theirs = (volatile u32*)p.flags[t] + slot + p.rank;
        *theirs = epoch;
        volatile u32* mine = (volatile u32*)p.flags[p.rank] + slot + t;
        const long long start = clock64();
        while (*mine != epoch)
        {
            if (clock64() - start > p.timeout_cycles)
            {
                atomicExch(p.error, 1);
                ok = 0;
                break;
            }
        }

        __threadfence_system();
    }

    return __syncthreads_and(ok) != 0;
}

// The range [begin, end) of `total` elements starting at `base` that block b takes.
DSC_DEVICE void ar_block_range(i64 base, i64 total, i64* begin, i64* end)
{
    const i64 per = (total + gridDim.x - 1) / gridDim.x;
    i64 b = base + (i64)blockIdx.x * per;
    i64 e = b + per;
    const i64 limit = base + total;
    *begin = b < limit ? b : limit;
    *end = e < limit ? e : limit;
}

template <int RANKS, typename T, int BLOCK>
DSC_DEVICE void ar_reduce_range(const AllReduceParams& p, i64 begin, i64 end)
{
    T* out = (T*)p.outputs[p.rank];
    for (i64 i = begin + threadIdx.x; i < end; i += BLOCK)
    {
        float s = ld_cg((const T*)p.inputs[0], i);
#pragma unroll
        for (int r = 1; r < RANKS; ++r) s += ld_cg((const T*)p.inputs[r], i); // rank order: the reference's order
        store_f32<T>(out, i, s);
    }
}

template <int RANKS, int BF16, int BLOCK>
__global__ void __launch_bounds__(BLOCK) allreduce_oneshot(const __grid_constant__ AllReduceParams p)
{
    static_assert(RANKS >= 2 && RANKS <= AR_MAX_RANKS && BLOCK % 32 == 0, "ranks 2..8, whole warps");
    typedef typename ElemOf<BF16>::type T;
    if (p.count == 0) return;
    const u32 epoch = ar_next_epoch(p);
    if (!ar_barrier<RANKS>(p, epoch, 0)) return;
    i64 begin, end;
    ar_block_range(0, p.count, &begin, &end);
    ar_reduce_range<RANKS, T, BLOCK>(p, begin, end);
    ar_barrier<RANKS>(p, epoch, 2);
}

template <int RANKS, int BF16, int BLOCK>
__global__ void __launch_bounds__(BLOCK) allreduce_twostep(const __grid_constant__ AllReduceParams p)
{
    static_assert(RANKS >= 2 && RANKS <= AR_MAX_RANKS, "ranks 2..8");
    typedef typename ElemOf<BF16>::type T;
    if (p.count == 0) return;
    const u32 epoch = ar_next_epoch(p);
    if (!ar_barrier<RANKS>(p, epoch, 0)) return;
    const i64 chunk = (p.count + RANKS - 1) / RANKS;

    // Reduce-scatter: this rank's chunk, from every input, in rank order.
    {
        const i64 base = (i64)p.rank * chunk;
        const i64 len = base >= p.count ? 0 : (p.count - base < chunk ? p.count - base : chunk);
        i64 begin, end;
        ar_block_range(base, len, &begin, &end);
        ar_reduce_range<RANKS, T, BLOCK>(p, begin, end);
    }

    if (!ar_barrier<RANKS>(p, epoch, 1)) return;

    // All-gather: every other chunk from the rank that reduced it (bits copied, not re-rounded).
    T* out = (T*)p.outputs[p.rank];
#pragma unroll
    for (int k = 1; k < RANKS; ++k)
    {
        const int q = (p.rank + k) % RANKS; // start with the next rank so peers' links are read in parallel
        const i64 base = (i64)q * chunk;
        const i64 len = base >= p.count ? 0 : (p.count - base < chunk ? p.count - base : chunk);
        i64 begin, end;
        ar_block_range(base, len, &begin, &end);
        const T* src = (const T*)p.outputs[q];
        for (i64 i = begin + threadIdx.x; i < end; i += BLOCK) ld_copy(src, out, i);
    }

    ar_barrier<RANKS>(p, epoch, 2);
}
