// Building blocks of the mma.sync tensor-core kernels (sm_80 and later, PTX 7.0+): cp.async into shared memory,
// ldmatrix fragment loads and the BF16 m16n8k16 product with fp32 accumulation. One copy for every family that
// uses them (the MLA kernels, the BF16 GEMM; hopper.cuh builds on cp_async16_zfill).
#pragma once
#include "common.cuh"

// ---- cp.async ---------------------------------------------------------------------------------------------

// Copies 16 bytes from global src to shared dst asynchronously (both 16-byte aligned).
DSC_DEVICE void cp_async16(void* dst, const void* src)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}

// Copies `bytes` (0 or 16) from global src to shared dst and zero-fills the rest of the 16 bytes. With 0 bytes
// nothing is read, but src must still be a valid global address.
DSC_DEVICE void cp_async16_zfill(u32 dst, const void* src, u32 bytes)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}

DSC_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
DSC_DEVICE void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// ---- ldmatrix ---------------------------------------------------------------------------------------------

// Four 8x8 b16 matrices; lane l gives the row address of matrix l / 8.
DSC_DEVICE void ldsm_x4(u32 (&r)[4], const u16* p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

DSC_DEVICE void ldsm_x2(u32& r0, u32& r1, const u16* p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r0), "=r"(r1) : "r"(smem_addr(p)));
}

// The transposed forms: each thread gets a column pair of the stored rows (a [k][n] operand as mma's B).
DSC_DEVICE void ldsm_x4_trans(u32 (&r)[4], const u16* p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

DSC_DEVICE void ldsm_x2_trans(u32& r0, u32& r1, const u16* p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r0), "=r"(r1) : "r"(smem_addr(p)));
}

// ---- the product --------------------------------------------------------------------------------------------

// c += a·b on m16n8k16: a row-major 16x16 bf16 (4 regs), b column-major 16x8 bf16 (2 regs), c fp32 16x8.
DSC_DEVICE void mma_bf16_16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats rounded to bf16 and packed, the lower index in the low half (mma's and ldmatrix's order).
DSC_DEVICE u32 pack_bf16x2(float lo, float hi) { return (u32)float_to_bf16(lo) | ((u32)float_to_bf16(hi) << 16); }
