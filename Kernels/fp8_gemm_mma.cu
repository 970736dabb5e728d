// FP8 block-scaled GEMM, portable tensor-core prefill path with mma.sync (no wgmma/TMA: those need a GPU
// to develop and tune; this is the correctness baseline and the path for non-Hopper cards).
// Semantics and params: fp8_gemm.cuh. Activations are pre-quantized by act_quant.
//
// Tile: 64 (M) x 64 (N) per block of 4 warps (2 x 2, 32 x 32 each), K in steps of 128 = one scale block.
// Per K block the warp's mma accumulators start from zero, run over the 128 channels, and are then
// multiplied by sa[m, kb] * sb[n/128, kb] and added to fp32 registers: the promotion every 128 of K the
// official kernel does (tensor-core accumulators of FP8 products may hold fewer bits than fp32).
//   FP8 path  (__CUDA_ARCH__ >= 890 and NVRTC >= 12.4, the first PTX ISA with FP8 mma.sync):
//             mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 straight on the codes.
//   BF16 path (sm_80, and any target compiled by an older NVRTC such as 11.8): every e4m3 value is exact
//             in bf16 (3 mantissa bits, exponents 2^-9..2^8), so codes are widened to bf16 and
//             mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 computes the same exact products.
// Tiles go global -> shared with 16-byte loads where K and the activation stride allow it, byte loads
// with zero fill otherwise (K % 16 != 0, the K tail, rows past M or N). One stage, no pipelining.
#pragma once
#include "fp8_gemm.cuh"

constexpr int kMmaBM = 64;
constexpr int kMmaBN = 64;
constexpr int kMmaPad = 16; // bytes of padding per shared row (keeps 16-byte alignment, spreads banks)
constexpr int kMmaRow = kFp8Block + kMmaPad;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890 && defined(__CUDACC_VER_MAJOR__) && \
    (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 4))
#define DSC_FP8_MMA 1
#else
#define DSC_FP8_MMA 0
#endif

DSC_DEVICE u32 smem_u32(const u8* p) { return *(const u32*)p; }

#if !DSC_FP8_MMA
// Two e4m3 codes -> two bf16 packed low/high (exact widening; NaN stays NaN).
DSC_DEVICE u32 e4m3x2_to_bf16x2(u8 lo, u8 hi)
{
    return (__float_as_uint(e4m3_fast(lo)) >> 16) | (__float_as_uint(e4m3_fast(hi)) & 0xffff0000u);
}
#endif

template <int N, int K>
__global__ void __launch_bounds__(128) fp8_gemm_mma_kernel(const __grid_constant__ Fp8GemmParams p)
{
    constexpr int KB = (K + kFp8Block - 1) / kFp8Block;
    __shared__ __align__(16) u8 As[kMmaBM * kMmaRow];
    __shared__ __align__(16) u8 Bs[kMmaBN * kMmaRow];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1;
    const int g = lane >> 2, t = lane & 3;
    const int n0 = blockIdx.x * kMmaBN;
    const int m0 = blockIdx.y * kMmaBM;
    const bool wvec = (K % 16) == 0;
    const bool xvec = wvec && (p.x_stride % 16) == 0 && ((u64)p.x_codes & 15u) == 0;
    const float* sb = p.w_scales + (i64)(n0 / kFp8Block) * KB; // a 64-wide tile lies inside one 128-block

    float acc[2][4][4];
#pragma unroll
    for (int a = 0; a < 2; a++)
#pragma unroll
        for (int b = 0; b < 4; b++)
#pragma unroll
            for (int c = 0; c < 4; c++) acc[a][b][c] = 0.0f;

    for (int kb = 0; kb < KB; kb++)
    {
        const int kbase = kb * kFp8Block;
        const int kend = min(K, kbase + kFp8Block);
        // 64 rows x 8 chunks of 16 bytes per operand, 128 threads: 4 chunks each.
#pragma unroll
        for (int c = 0; c < 4; c++)
        {
            const int chunk = tid + c * 128;
            const int r = chunk >> 3, kc = (chunk & 7) * 16;
            const int gm = m0 + r, gn = n0 + r;
            const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
            *(uint4*)&As[r * kMmaRow + kc] = gm < p.m ? fp8_load16(p.x_codes + (i64)gm * p.x_stride, kbase + kc, kend, xvec) : zero;
            *(uint4*)&Bs[r * kMmaRow + kc] = gn < N ? fp8_load16(p.w + (i64)gn * K, kbase + kc, kend, wvec) : zero;
        }
        __syncthreads();

        float part[2][4][4];
#pragma unroll
        for (int a = 0; a < 2; a++)
#pragma unroll
            for (int b = 0; b < 4; b++)
#pragma unroll
                for (int c = 0; c < 4; c++) part[a][b][c] = 0.0f;

#pragma unroll
        for (int ks = 0; ks < kFp8Block; ks += 32)
        {
#if DSC_FP8_MMA
            u32 af[2][4], bfr[4][2];
#pragma unroll
            for (int mi = 0; mi < 2; mi++)
            {
                const u8* a0 = &As[(wm * 32 + mi * 16 + g) * kMmaRow + ks + t * 4];
                af[mi][0] = smem_u32(a0);
                af[mi][1] = smem_u32(a0 + 8 * kMmaRow);
                af[mi][2] = smem_u32(a0 + 16);
                af[mi][3] = smem_u32(a0 + 8 * kMmaRow + 16);
            }
#pragma unroll
            for (int ni = 0; ni < 4; ni++)
            {
                const u8* b0 = &Bs[(wn * 32 + ni * 8 + g) * kMmaRow + ks + t * 4];
                bfr[ni][0] = smem_u32(b0);
                bfr[ni][1] = smem_u32(b0 + 16);
            }
#pragma unroll
            for (int mi = 0; mi < 2; mi++)
#pragma unroll
                for (int ni = 0; ni < 4; ni++)
                    asm volatile("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                                 : "+f"(part[mi][ni][0]), "+f"(part[mi][ni][1]), "+f"(part[mi][ni][2]), "+f"(part[mi][ni][3])
                                 : "r"(af[mi][0]), "r"(af[mi][1]), "r"(af[mi][2]), "r"(af[mi][3]), "r"(bfr[ni][0]), "r"(bfr[ni][1]));
#else
#pragma unroll
            for (int kh = 0; kh < 32; kh += 16)
            {
                const int kk = ks + kh + t * 2;
                u32 af[2][4], bfr[4][2];
#pragma unroll
                for (int mi = 0; mi < 2; mi++)
                {
                    const u8* a0 = &As[(wm * 32 + mi * 16 + g) * kMmaRow + kk];
                    const u8* a1 = a0 + 8 * kMmaRow;
                    af[mi][0] = e4m3x2_to_bf16x2(a0[0], a0[1]);
                    af[mi][1] = e4m3x2_to_bf16x2(a1[0], a1[1]);
                    af[mi][2] = e4m3x2_to_bf16x2(a0[8], a0[9]);
                    af[mi][3] = e4m3x2_to_bf16x2(a1[8], a1[9]);
                }
#pragma unroll
                for (int ni = 0; ni < 4; ni++)
                {
                    const u8* b0 = &Bs[(wn * 32 + ni * 8 + g) * kMmaRow + kk];
                    bfr[ni][0] = e4m3x2_to_bf16x2(b0[0], b0[1]);
                    bfr[ni][1] = e4m3x2_to_bf16x2(b0[8], b0[9]);
                }
#pragma unroll
                for (int mi = 0; mi < 2; mi++)
#pragma unroll
                    for (int ni = 0; ni < 4; ni++)
                        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                                     : "+f"(part[mi][ni][0]), "+f"(part[mi][ni][1]), "+f"(part[mi][ni][2]), "+f"(part[mi][ni][3])
                                     : "r"(af[mi][0]), "r"(af[mi][1]), "r"(af[mi][2]), "r"(af[mi][3]), "r"(bfr[ni][0]), "r"(bfr[ni][1]));
            }
#endif
        }

        // Promote: scale this K block's partial products and add them to the fp32 accumulators.
        const float wscale = sb[kb];
#pragma unroll
        for (int mi = 0; mi < 2; mi++)
        {
#pragma unroll
            for (int h = 0; h < 2; h++)
            {
                const int gm = m0 + wm * 32 + mi * 16 + g + 8 * h;
                const float s = gm < p.m ? p.x_scales[(i64)gm * p.x_scales_stride + kb] * wscale : 0.0f;
#pragma unroll
                for (int ni = 0; ni < 4; ni++)
                {
                    acc[mi][ni][2 * h] = fmaf(part[mi][ni][2 * h], s, acc[mi][ni][2 * h]);
                    acc[mi][ni][2 * h + 1] = fmaf(part[mi][ni][2 * h + 1], s, acc[mi][ni][2 * h + 1]);
                }
            }
        }
        __syncthreads();
    }

    // Accumulator layout of m16n8: c0, c1 at row g, columns 2t, 2t+1; c2, c3 at row g + 8.
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int ni = 0; ni < 4; ni++)
#pragma unroll
            for (int c = 0; c < 4; c++)
            {
                const int gm = m0 + wm * 32 + mi * 16 + g + 8 * (c >> 1);
                const int gn = n0 + wn * 32 + ni * 8 + 2 * t + (c & 1);
                if (gm < p.m && gn < N) fp8_gemm_store(p, gm, gn, acc[mi][ni][c]);
            }
}
