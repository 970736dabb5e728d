// Hopper (sm_90a) building blocks: shared-memory mbarriers, TMA tile loads, wgmma and register
// reconfiguration, as thin inline PTX (NVRTC has no CUDA headers). Only kernels compiled for sm_90a call
// them (guarded by DSC_HOPPER); the declarations compile on every target.
//
// The async pipeline these serve (fp8_gemm_wgmma.cu):
//   - a TMA load writes a box of a tensor (described by a CUtensorMap the host encodes) into shared memory
//     and, when all its bytes have landed, completes that many transaction bytes on an mbarrier;
//   - a "full" mbarrier per stage: the producer arrives once with the stage's byte count (expect_tx), the
//     phase completes when the bytes have landed too; consumers wait on its parity;
//   - an "empty" mbarrier per stage: each consumer warp arrives once after its wgmma has read the stage;
//     the producer waits on it before refilling.
// Phase parity: a stage's barriers complete phases 0, 1, 0, ... as the ring wraps. A fresh barrier counts as
// having completed the phase of parity 1, so the producer's first wait (parity 1) on an empty barrier
// returns at once.
#pragma once
#include "mma_sync.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DSC_HOPPER 1
#else
#define DSC_HOPPER 0
#endif

// A CUtensorMap: 128 opaque bytes encoded by cuTensorMapEncodeTiled on the host, 64-byte aligned. Kernels take
// it inside a __grid_constant__ params struct, so its address is valid for the TMA unit.
struct __align__(64) TmaMap
{
    u64 opaque[16];
};

// ---- mbarrier -------------------------------------------------------------------------------------------

DSC_DEVICE void mbar_init(u32 bar, u32 count) { asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory"); }

// Makes initialized barriers visible to the async proxy (the TMA unit) before anyone uses them.
DSC_DEVICE void mbar_fence_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }

DSC_DEVICE void mbar_arrive(u32 bar) { asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory"); }

// Arrives once and adds `bytes` to the transactions the current phase waits for.
DSC_DEVICE void mbar_arrive_expect_tx(u32 bar, u32 bytes)
{
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

DSC_DEVICE bool mbar_try_wait(u32 bar, u32 parity)
{
    u32 done;
    asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done)
                 : "r"(bar), "r"(parity)
                 : "memory");
    return done != 0;
}

DSC_DEVICE u64 global_timer_ns()
{
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// Waits until the phase of parity `parity` has completed.
DSC_DEVICE void mbar_wait(u32 bar, u32 parity)
{
    while (!mbar_try_wait(bar, parity))
    {
    }
}

// A wait on one barrier longer than this traps: a pipeline that can never complete (a wrong byte count, a lost
// arrive) then ends its launch with an error the host reports, instead of holding the GPU until the process dies.
// No healthy stage takes a thousandth of it.
constexpr u64 kMbarWatchdogNs = 20ull * 1000 * 1000 * 1000;

// mbar_wait with the watchdog. The producer's waits carry it (it has registers to spare; the consumers' hot loop
// has none): when the consumers are stuck, the producer is stuck too, on a stage they never release.
DSC_DEVICE void mbar_wait_watchdog(u32 bar, u32 parity)
{
    if (mbar_try_wait(bar, parity)) return;
    const u64 start = global_timer_ns();
    for (u32 i = 1;; i++)
    {
        if (mbar_try_wait(bar, parity)) return;
        if ((i & 1023u) == 0 && global_timer_ns() - start > kMbarWatchdogNs) __trap();
    }
}

// ---- TMA ------------------------------------------------------------------------------------------------

DSC_DEVICE void tma_prefetch_map(const TmaMap* map) { asm volatile("prefetch.tensormap [%0];\n" ::"l"(map) : "memory"); }

// Loads the box at (c0 innermost, c1) of `map` into shared memory at `dst`, completing its bytes on `bar`.
// Elements outside the tensor read as zero (and still count as transaction bytes).
DSC_DEVICE void tma_load_2d(u32 dst, const TmaMap* map, u32 bar, i32 c0, i32 c1)
{
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
                 ::"r"(dst), "l"(map), "r"(c0), "r"(c1), "r"(bar)
                 : "memory");
}

// The 3-D form: the box at (c0 innermost, c1, c2).
DSC_DEVICE void tma_load_3d(u32 dst, const TmaMap* map, u32 bar, i32 c0, i32 c1, i32 c2)
{
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n"
                 ::"r"(dst), "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
                 : "memory");
}

// ---- cp.async into a pipeline stage (rows TMA cannot address, e.g. gathered ones) --------------------------

// Arrives on `bar` once this thread's earlier cp.async have landed; counted in the barrier's arrivals (noinc).
DSC_DEVICE void cp_async_arrive(u32 bar) { asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory"); }

// Orders shared memory written through the generic proxy (st.shared, cp.async) before the async proxy (wgmma)
// reads it; the reader executes it after the barrier that says the data has landed.
DSC_DEVICE void fence_proxy_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// The offset of 16-byte chunk `chunk` of row `row` in a box stored with the 128-byte swizzle (128-byte rows):
// the chunk index is XORed with the row's position in its 8-row atom, as TMA writes it and wgmma reads it.
DSC_DEVICE u32 swizzle128_offset(int row, int chunk) { return (u32)(row * 128 + ((chunk ^ (row & 7)) << 4)); }

// ---- wgmma ----------------------------------------------------------------------------------------------

// Shared-memory matrix descriptor of a K-major operand tile stored as TMA's 128-byte swizzle writes it: rows of
// 128 bytes, 8-row (1024-byte) swizzle atoms one after another, the tile 1024-byte aligned. Start address and
// offsets in 16-byte units: start (bits 0-13), leading-dimension offset (16-29; unused when one K step stays
// inside the 128-byte row), stride offset = 1024 B between 8-row groups (32-45), swizzle mode 1 = 128 B
// (62-63). Advancing K by 32 bytes inside the row adds 2 to the start address: the hardware applies the
// swizzle to the final address, which is why the tile must be 1024-byte aligned.
DSC_DEVICE u64 wgmma_desc_sw128(u32 smem)
{
    return (u64)((smem & 0x3ffffu) >> 4) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}

// Orders this warpgroup's register and shared-memory accesses before the wgmma that follow.
DSC_DEVICE void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
DSC_DEVICE void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most N committed groups of this warpgroup are pending.
template <int N>
DSC_DEVICE void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// Keeps the compiler from moving accesses to an accumulator register across the asynchronous wgmma.
DSC_DEVICE void wgmma_fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// d[64] (+)= A[64 x 32] · B[128 x 32]ᵀ, e4m3 x e4m3 -> f32, both operands K-major in shared memory (descriptors).
// accumulate 0: d = A·Bᵀ (the old d is ignored); 1: d += A·Bᵀ. Register r of a thread holds row
// 16 * (warp % 4) + lane / 4 + 8 * ((r / 2) % 2), column 8 * (r / 4) + 2 * (lane % 4) + r % 2.
DSC_DEVICE void wgmma_m64n128k32_e4m3(float d[64], u64 a_desc, u64 b_desc, u32 accumulate)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {"
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
                 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
                 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
                 "}, %64, %65, p, 1, 1;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
                   "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
                   "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
                   "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
                   "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
                   "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "l"(a_desc), "l"(b_desc), "r"(accumulate));
}

// d[32] (+)= A[64 x 32] · B[64 x 32]ᵀ, as wgmma_m64n128k32_e4m3 with 64 columns: register r holds row
// 16 * (warp % 4) + lane / 4 + 8 * ((r / 2) % 2), column 8 * (r / 4) + 2 * (lane % 4) + r % 2.
DSC_DEVICE void wgmma_m64n64k32_e4m3(float d[32], u64 a_desc, u64 b_desc, u32 accumulate)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 {"
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
                 "}, %32, %33, p, 1, 1;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
                   "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                 : "l"(a_desc), "l"(b_desc), "r"(accumulate));
}

// part (N / 2 registers) = A[64 x 128] · B[N x 128]ᵀ over one whole 128-byte swizzled row of K: four wgmma k32 from
// zero, committed and waited for. a and b are the operand tiles' shared addresses (1024-byte aligned); the register
// layout is that of wgmma_m64n128k32_e4m3.
template <int N>
DSC_DEVICE void wgmma_k128_e4m3(float (&part)[N / 2], u32 a, u32 b)
{
    static_assert(N == 128 || N == 64, "the m64n128k32 and m64n64k32 forms");
#pragma unroll
    for (int i = 0; i < N / 2; i++) wgmma_fence_operand(part[i]);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < 4; ks++)
    {
        if constexpr (N == 128) wgmma_m64n128k32_e4m3(part, wgmma_desc_sw128(a + 32 * ks), wgmma_desc_sw128(b + 32 * ks), ks > 0 ? 1u : 0u);
        else wgmma_m64n64k32_e4m3(part, wgmma_desc_sw128(a + 32 * ks), wgmma_desc_sw128(b + 32 * ks), ks > 0 ? 1u : 0u);
    }
    wgmma_commit();
#pragma unroll
    for (int i = 0; i < N / 2; i++) wgmma_fence_operand(part[i]);
    wgmma_wait<0>();
}

// acc += part * scale over an m64n128 fragment (wgmma_m64n128k32_e4m3's layout): registers 4j, 4j+1 are the thread's
// first row, 4j+2, 4j+3 its row + 8; columns 8j.. take the _lo scales for j < 8 and the _hi ones above (a K block's
// per-row activation scale times the weight scale of those 64 columns). fp32 fma, the promotion of each K block.
DSC_DEVICE void wgmma_promote_n128(float (&acc)[64], const float (&part)[64], float s0_lo, float s1_lo, float s0_hi, float s1_hi)
{
#pragma unroll
    for (int j = 0; j < 16; j++)
    {
        const float s0 = j < 8 ? s0_lo : s0_hi, s1 = j < 8 ? s1_lo : s1_hi;
        acc[4 * j] = fmaf(part[4 * j], s0, acc[4 * j]);
        acc[4 * j + 1] = fmaf(part[4 * j + 1], s0, acc[4 * j + 1]);
        acc[4 * j + 2] = fmaf(part[4 * j + 2], s1, acc[4 * j + 2]);
        acc[4 * j + 3] = fmaf(part[4 * j + 3], s1, acc[4 * j + 3]);
    }
}

// ---- the stage ring of a warp-specialized pipeline --------------------------------------------------------

// Stage s's operand boxes at base + s * STAGE_BYTES, its full and empty mbarriers after the stages. Producer
// and consumers each keep their own copy and advance it in the same order.
template <int STAGES, int STAGE_BYTES>
struct WgmmaRing
{
    u32 base;
    int stage;
    u32 phase;

    DSC_DEVICE u32 smem() const { return base + stage * STAGE_BYTES; }
    DSC_DEVICE u32 full() const { return base + STAGES * STAGE_BYTES + 8 * stage; }
    DSC_DEVICE u32 empty() const { return base + STAGES * STAGE_BYTES + 8 * (STAGES + stage); }
    DSC_DEVICE void next()
    {
        if (++stage == STAGES)
        {
            stage = 0;
            phase ^= 1u;
        }
    }

    // Aligns the dynamic shared memory to 1024 bytes (the swizzle's alignment; the block needs 1 KiB of slack)
    // and, with the whole block, initializes the barriers: full completes on `full_arrivals` arrives plus the
    // stage's transaction bytes, empty on `empty_arrivals` (one per consumer warp).
    static DSC_DEVICE WgmmaRing open(u8* dynamic_smem, u32 full_arrivals, u32 empty_arrivals)
    {
        WgmmaRing r{(smem_addr(dynamic_smem) + 1023u) & ~1023u, 0, 0u};
        if (threadIdx.x == 0)
        {
            for (int s = 0; s < STAGES; s++)
            {
                mbar_init(r.base + STAGES * STAGE_BYTES + 8 * s, full_arrivals);
                mbar_init(r.base + STAGES * STAGE_BYTES + 8 * (STAGES + s), empty_arrivals);
            }
            mbar_fence_init();
        }
        __syncthreads();
        return r;
    }
};

// After its last load the producer waits, watchdog armed, until the consumers have released every stage: a
// consumer that waits forever on a load then trips the producer's watchdog even when the producer has nothing
// left to load.
template <int STAGES, int STAGE_BYTES>
DSC_DEVICE void wgmma_drain(WgmmaRing<STAGES, STAGE_BYTES>& ring)
{
    for (int s = 0; s < STAGES; s++)
    {
        mbar_wait_watchdog(ring.empty(), ring.phase ^ 1u);
        ring.next();
    }
}

// ---- register reconfiguration (every thread of a warpgroup executes these together) ------------------------

template <int REGS>
DSC_DEVICE void warpgroup_registers_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS)); }
template <int REGS>
DSC_DEVICE void warpgroup_registers_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS)); }
