// Batched BF16 GEMM on mma.sync tensor cores (sm_80+): for every batch b and K split s,
//   y[b][s][m, n] = Σ_{k in split s} a[b][m, k] · B[b](k, n)
// with B bf16 stored either [n, k] (B_KN = 0: a linear's weight rows, lm_head, the router, W_UV) or [k, n]
// (B_KN = 1: W_UK in kv_b's row order), a f32 or bf16, y f32 or bf16, fp32 accumulation. The callers:
// lm_head above 4 rows and the router logits (Bf16GemmKernel, MoeGateKernel), and MLA's fold and unfold as
// one GEMM per head (MlaDecodeKernel). Split-K writes each split's partial sums to its own slice (y_split
// apart) for a reducer that adds them in split order, so results are deterministic.
//
// An f32 activation enters the tensor cores as two bf16 terms, hi = bf16(x) and lo = bf16(x - hi): x is kept
// to 2^-17 of itself and every product is exact in fp32, so the result differs from an fp32 dot product only by
// summation order. Activations that already hold bf16 values (what CudaBackend's tensors hold) have lo = 0;
// a block vote per stage then skips the lo products.
//
// Tiles of 64 x 128 x 32, 128 threads as 2 x 2 warps of 32 x 64; a 3-stage cp.async pipeline for B and bf16 A;
// f32 A goes through registers one stage ahead (loaded before the stage's products, converted and stored
// after). Row pitches are padded by 16 bytes so ldmatrix's eight row addresses fall in distinct banks. Ragged
// M, N and K need no special path: rows and 8-wide chunks past an edge are zero-filled. Requirements (checked by
// Bf16MmaKernel.Refusal): K a multiple of 8; bf16 operands 16-byte aligned with strides in multiples of 8
// elements, f32 A 16-byte aligned with strides in multiples of 4; N a multiple of 8 when B is [k, n].
#pragma once
#include "mma_sync.cuh"

struct Bf16MmaParams
{
    const void* a;   // [batch][m, lda] (A_BF16 ? bf16 : f32)
    const u16* b;    // [batch] B_KN ? [k, ldb] : [n, ldb], bf16
    void* y;         // [batch][splits][m, ldy] (Y_BF16 ? bf16 : f32)
    i64 lda;         // row strides, in elements
    i64 ldb;
    i64 ldy;
    i64 a_batch;     // elements between batches
    i64 b_batch;
    i64 y_batch;
    i64 y_split;     // elements between the K splits' outputs
    i32 m;
    i32 n;
    i32 k;
    i32 batch;
    i32 splits;      // grid.z = batch · splits
    i32 k_chunk;     // K per split, a multiple of kBf16MmaBK; split s covers [s·k_chunk, min(k, (s+1)·k_chunk))
};

constexpr int kBf16MmaBM = 64;
constexpr int kBf16MmaBN = 128;
constexpr int kBf16MmaBK = 32;
constexpr int kBf16MmaStages = 3;
constexpr int kBf16MmaThreads = 128;

// Shared memory of one block; Bf16MmaKernel.SharedBytes mirrors SMEM (a compile test checks them against each other).
template <int A_BF16, int B_KN>
struct Bf16MmaGeometry
{
    static constexpr int AP = kBf16MmaBK + 8;                            // A row pitch (bf16 elements)
    static constexpr int A_STAGE = kBf16MmaBM * AP;
    static constexpr int A_BYTES = kBf16MmaStages * A_STAGE * 2 * (A_BF16 ? 1 : 2); // hi (and lo for f32 A)
    static constexpr int B_ROWS = B_KN ? kBf16MmaBK : kBf16MmaBN;
    static constexpr int BP = (B_KN ? kBf16MmaBN : kBf16MmaBK) + 8;      // B row pitch
    static constexpr int B_STAGE = B_ROWS * BP;
    static constexpr int SMEM = A_BYTES + kBf16MmaStages * B_STAGE * 2;
};

// grid = (ceil(n / 128), ceil(m / 64), batch · splits), block = 128, dynamic shared memory Bf16MmaGeometry::SMEM
template <int A_BF16, int B_KN, int Y_BF16>
__global__ void __launch_bounds__(kBf16MmaThreads, 1) bf16_gemm_mma_kernel(const __grid_constant__ Bf16MmaParams p)
{
    typedef Bf16MmaGeometry<A_BF16, B_KN> G;
    typedef typename ElemOf<Y_BF16>::type TOut;
    constexpr int BM = kBf16MmaBM, BN = kBf16MmaBN, BK = kBf16MmaBK, S = kBf16MmaStages;
    constexpr int A_LOADS = BM * BK / 4 / kBf16MmaThreads; // float4 pieces of an f32 A stage per thread
    extern __shared__ __align__(16) u8 bf16_mma_smem[];
    u16* As = (u16*)bf16_mma_smem;
    u16* Al = As + S * G::A_STAGE; // the lo parts (f32 A only)
    u16* Bs = (u16*)(bf16_mma_smem + G::A_BYTES);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1;
    const i64 m0 = (i64)blockIdx.y * BM, n0 = (i64)blockIdx.x * BN;
    const int bz = blockIdx.z / p.splits, sz = blockIdx.z % p.splits;
    const i32 kb = sz * p.k_chunk;
    const i32 ke = min(p.k, kb + p.k_chunk);
    const int ktiles = ke > kb ? (ke - kb + BK - 1) / BK : 0;
    const u16* B = p.b + (i64)bz * p.b_batch;

    auto load_b = [&](int stage, int kt) {
        const i32 k0 = kb + kt * BK;
        u16* dst = Bs + stage * G::B_STAGE;
        constexpr int CHUNKS = BN * BK / 8, PER_ROW = (B_KN ? BN : BK) / 8;
#pragma unroll
        for (int c = tid; c < CHUNKS; c += kBf16MmaThreads)
        {
            const int row = c / PER_ROW, col = (c % PER_ROW) * 8;
            const i64 gk = B_KN ? k0 + row : k0 + col;
            const i64 gn = B_KN ? n0 + col : n0 + row;
            const bool ok = gk < ke && gn < p.n;
            const u16* src = ok ? (B_KN ? B + gk * p.ldb + gn : B + gn * p.ldb + gk) : B;
            cp_async16_zfill(smem_addr(dst + row * G::BP + col), src, ok ? 16u : 0u);
        }
    };

    // bf16 A: straight into the stage by cp.async.
    auto load_a_async = [&](int stage, int kt) {
        const i32 k0 = kb + kt * BK;
        const u16* A = (const u16*)p.a + (i64)bz * p.a_batch;
#pragma unroll
        for (int c = tid; c < BM * BK / 8; c += kBf16MmaThreads)
        {
            const int row = c / (BK / 8), col = (c % (BK / 8)) * 8;
            const bool ok = m0 + row < p.m && k0 + col < ke;
            const u16* src = ok ? A + (m0 + row) * p.lda + k0 + col : A;
            cp_async16_zfill(smem_addr(As + stage * G::A_STAGE + row * G::AP + col), src, ok ? 16u : 0u);
        }
    };

    // f32 A: loads into registers (issued before a stage's products) ...
    auto load_a_regs = [&](float4 (&r)[A_LOADS], int kt) {
        const i32 k0 = kb + kt * BK;
        const float* A = (const float*)p.a + (i64)bz * p.a_batch;
#pragma unroll
        for (int i = 0; i < A_LOADS; i++)
        {
            const int c = tid + i * kBf16MmaThreads;
            const int row = c / (BK / 4), col = (c % (BK / 4)) * 4;
            r[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (m0 + row < p.m && k0 + col < ke) r[i] = *(const float4*)(A + (m0 + row) * p.lda + k0 + col);
        }
    };

    // ... and hi/lo bf16 into the stage after them; returns whether any lo part is non-zero.
    auto store_a = [&](const float4 (&r)[A_LOADS], int stage) -> u32 {
        u32 nonzero = 0;
#pragma unroll
        for (int i = 0; i < A_LOADS; i++)
        {
            const int c = tid + i * kBf16MmaThreads;
            const int row = c / (BK / 4), col = (c % (BK / 4)) * 4;
            const float x[4] = {r[i].x, r[i].y, r[i].z, r[i].w};
            float lo[4];
            u16 h[4];
#pragma unroll
            for (int j = 0; j < 4; j++)
            {
                h[j] = float_to_bf16(x[j]);
                const float hf = bf16_to_float(h[j]);
                // x - hi is exact; an infinite or NaN hi carries the value alone.
                lo[j] = (__float_as_uint(hf) & 0x7f800000u) == 0x7f800000u ? 0.0f : x[j] - hf;
            }
            const uint2 hv = make_uint2((u32)h[0] | ((u32)h[1] << 16), (u32)h[2] | ((u32)h[3] << 16));
            const uint2 lv = make_uint2(pack_bf16x2(lo[0], lo[1]), pack_bf16x2(lo[2], lo[3]));
            const int off = stage * G::A_STAGE + row * G::AP + col;
            *(uint2*)(As + off) = hv;
            *(uint2*)(Al + off) = lv;
            nonzero |= (lv.x | lv.y) & 0x7fff7fffu;
        }
        return nonzero != 0 ? 1u : 0u;
    };

    float acc[2][8][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;

    auto compute = [&](int stage, bool with_lo) {
        const u16* as = As + stage * G::A_STAGE;
        const u16* al = Al + stage * G::A_STAGE;
        const u16* bs = Bs + stage * G::B_STAGE;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16)
        {
            u32 bf[8][2];
#pragma unroll
            for (int j2 = 0; j2 < 4; j2++)
            {
                u32 r[4];
                if (B_KN)
                    ldsm_x4_trans(r, bs + (kk + (lane & 15)) * G::BP + wn * 64 + j2 * 16 + (lane >> 4) * 8);
                else
                    ldsm_x4(r, bs + (wn * 64 + j2 * 16 + (lane & 7) + ((lane >> 4) << 3)) * G::BP + kk + ((lane >> 3) & 1) * 8);
                bf[2 * j2][0] = r[0];
                bf[2 * j2][1] = r[1];
                bf[2 * j2 + 1][0] = r[2];
                bf[2 * j2 + 1][1] = r[3];
            }
#pragma unroll
            for (int i = 0; i < 2; i++)
            {
                const int arow = (wm * 32 + i * 16 + (lane & 15)) * G::AP + kk + (lane >> 4) * 8;
                u32 af[4];
                ldsm_x4(af, as + arow);
#pragma unroll
                for (int j = 0; j < 8; j++) mma_bf16_16816(acc[i][j], af, bf[j][0], bf[j][1]);
                if (!A_BF16 && with_lo)
                {
                    ldsm_x4(af, al + arow);
#pragma unroll
                    for (int j = 0; j < 8; j++) mma_bf16_16816(acc[i][j], af, bf[j][0], bf[j][1]);
                }
            }
        }
    };

    // lo_bits: bit s says this thread stored a non-zero lo part into stage s.
    u32 lo_bits = 0;
#pragma unroll
    for (int s = 0; s < S - 1; s++)
    {
        if (s < ktiles)
        {
            load_b(s, s);
            if (A_BF16)
            {
                load_a_async(s, s);
            }
            else
            {
                float4 r[A_LOADS];
                load_a_regs(r, s);
                lo_bits |= store_a(r, s) << s;
            }
        }
        cp_async_commit();
    }

    for (int kt = 0; kt < ktiles; kt++)
    {
        cp_async_wait<S - 2>();
        const int st = kt % S;
        // The barrier publishes stage st to every warp and frees stage (kt - 1) % S for the refill below; for an f32
        // activation it also tells every thread whether any lo part of stage st is non-zero.
        bool with_lo = false;
        if (A_BF16) __syncthreads();
        else with_lo = __syncthreads_or((lo_bits >> st) & 1u) != 0;
        const int nk = kt + S - 1, ns = nk % S;
        float4 r[A_LOADS];
        if (nk < ktiles)
        {
            load_b(ns, nk);
            if (A_BF16) load_a_async(ns, nk);
            else load_a_regs(r, nk);
        }
        cp_async_commit();
        compute(st, with_lo);
        if (!A_BF16 && nk < ktiles) lo_bits = (lo_bits & ~(1u << ns)) | (store_a(r, ns) << ns);
    }
    cp_async_wait<0>();

    TOut* Y = (TOut*)p.y + (i64)bz * p.y_batch + (i64)sz * p.y_split;
#pragma unroll
    for (int i = 0; i < 2; i++)
    {
#pragma unroll
        for (int j = 0; j < 8; j++)
        {
            const i64 col = n0 + wn * 64 + j * 8 + 2 * (lane & 3);
#pragma unroll
            for (int h = 0; h < 2; h++)
            {
                const i64 row = m0 + wm * 32 + i * 16 + (lane >> 2) + 8 * h;
                if (row >= p.m) continue;
                if (col < p.n) store_f32<TOut>(Y, row * p.ldy + col, acc[i][j][2 * h]);
                if (col + 1 < p.n) store_f32<TOut>(Y, row * p.ldy + col + 1, acc[i][j][2 * h + 1]);
            }
        }
    }
}
