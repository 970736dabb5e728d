// Grouped FP8 expert GEMM (MoE): every expert's rows against that expert's FP8 e4m3 weights with 128x128
// fp32 block scales, built from the mma.sync blocks of fp8_gemm.cuh (same tile, same promotion every 128
// of K, same FP8/BF16 paths). The CPU reference is CpuBackend.MoeExperts in GpuEmulation numerics.
//
// Weights are stacked per layer: w [E, N, K] e4m3 and w_scales [E, SROWS, ceil(K/128)].
//   SWIGLU = 1 (gate/up): w is W13 = [gate; up], N = 2·I rows. Gate row c has scale row c/128, up row c has
//            scale row ceil(I/128) + c/128 (SROWS = 2·ceil(I/128): the two checkpoint tensors' scales
//            stacked, so I need not be a multiple of 128). A block computes 32 output columns c0..c0+31 of
//            h = SiLU(gate)·up: warps wn = 0 the gate rows, wn = 1 the up rows of the same columns; the up
//            accumulators cross to the gate warps through shared memory. Epilogue like the CPU: gate and up
//            rounded to bf16 (what separate bf16 GEMM outputs would hold), h = g / (1 + exp(-g)) · u in
//            fp32, stored bf16 [rows, I].
//   SWIGLU = 0 (down): N output columns per 64-wide tile, SROWS = ceil(N/128), stored bf16 [rows, N].
//
// Row layouts (the activation row of a grouped row r is r itself, or gather[r] / gather_div when gather is
// set: the dispatch's perm holds token slots t·k + j, so the gate/up pass reads the token's codes in place
// and no permuted copy of the activations is made):
//   contiguous (MASKED = 0, prefill): expert e owns rows [offsets[e], offsets[e] + counts[e]), offsets
//            padded to multiples of 64 by the dispatch (tile = 64), so a 64-row tile never straddles two
//            experts; blockIdx.y = tile, its expert found by binary search over offsets[0..E]; tiles past
//            offsets[E] exit. Padding rows are neither read (zero fill) nor written.
//   masked   (MASKED = 1, decode): expert e = blockIdx.z owns the fixed slot rows [e·capacity, e·capacity +
//            min(counts[e], capacity)); tiles past the count exit at once.
// Rows outside an expert's live range are never written: the next stages read only live rows.
#pragma once
#include "fp8_gemm.cuh"
#include "moe_grouped.cuh"

static_assert(kMoeTile == kMmaBM, "a grouped tile is one mma tile of rows");

template <int N, int K, int SWIGLU, int MASKED>
__global__ void __launch_bounds__(128) moe_grouped_gemm_kernel(const __grid_constant__ MoeGroupedGemmParams p)
{
    constexpr int KB = (K + kFp8Block - 1) / kFp8Block;
    constexpr int I = SWIGLU ? N / 2 : N;          // output columns
    constexpr int IB = (I + kFp8Block - 1) / kFp8Block;
    constexpr int SROWS = SWIGLU ? 2 * IB : IB;
    static_assert(!SWIGLU || N % 2 == 0, "W13 stacks gate and up: N = 2 * inter");
    __shared__ __align__(16) u8 As[kMmaBM * kMmaRow];
    __shared__ __align__(16) u8 Bs[kMmaBN * kMmaRow];
    __shared__ i64 s_arow[kMmaBM]; // activation row of each tile row, -1: zero row

    int e, row0, live;
    if (!moe_tile<MASKED>(p, e, row0, live)) return;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1;
    const int g = lane >> 2, t = lane & 3;
    // Output columns of this block: SWIGLU c0..c0+31 (gate rows c0.., up rows I + c0..), else n0..n0+63.
    const int c0 = blockIdx.x * (SWIGLU ? 32 : kMmaBN);
    const u8* we = p.w + (i64)e * N * K;
    const float* se = p.w_scales + (i64)e * SROWS * KB;
    const bool wvec = (K % 16) == 0;
    const bool xvec = wvec && (p.x_stride % 16) == 0 && ((u64)p.x_codes & 15u) == 0;

    for (int r = tid; r < kMmaBM; r += 128) s_arow[r] = moe_activation_row(p, row0, r, live);
    __syncthreads();

    // Weight row of B-tile row r (-1: past the weight), and its scale row.
    auto wrow = [&](int r) -> int {
        if (SWIGLU)
        {
            const int c = c0 + (r & 31);
            return c < I ? (r < 32 ? c : I + c) : -1;
        }
        return c0 + r < N ? c0 + r : -1;
    };
    auto srow = [&](int row) -> int { return SWIGLU && row >= I ? IB + (row - I) / kFp8Block : row / kFp8Block; };

    // This thread's accumulator columns and rows: scale rows and activation rows, fixed over K.
    int sr[4][2];
#pragma unroll
    for (int ni = 0; ni < 4; ni++)
#pragma unroll
        for (int j = 0; j < 2; j++)
        {
            const int row = wrow(wn * 32 + ni * 8 + 2 * t + j);
            sr[ni][j] = row < 0 ? -1 : srow(row);
        }
    i64 ar[2][2];
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int h = 0; h < 2; h++) ar[mi][h] = s_arow[wm * 32 + mi * 16 + g + 8 * h];

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
        fp8_mma_stage(As, tid, kbase, kend, xvec, [&](int r) -> const u8* { return s_arow[r] < 0 ? nullptr : p.x_codes + s_arow[r] * p.x_stride; });
        fp8_mma_stage(Bs, tid, kbase, kend, wvec, [&](int r) -> const u8* { const int row = wrow(r); return row < 0 ? nullptr : we + (i64)row * K; });
        __syncthreads();

        float part[2][4][4];
        fp8_mma_block(As, Bs, wm, wn, lane, part);

        // Promote: scale this K block's partial products (per row sa, per column sb) into fp32.
        float ws[4][2];
#pragma unroll
        for (int ni = 0; ni < 4; ni++)
#pragma unroll
            for (int j = 0; j < 2; j++) ws[ni][j] = sr[ni][j] < 0 ? 0.0f : se[sr[ni][j] * KB + kb];
#pragma unroll
        for (int mi = 0; mi < 2; mi++)
#pragma unroll
            for (int h = 0; h < 2; h++)
            {
                const float xs = ar[mi][h] < 0 ? 0.0f : p.x_scales[ar[mi][h] * p.x_scales_stride + kb];
#pragma unroll
                for (int ni = 0; ni < 4; ni++)
#pragma unroll
                    for (int j = 0; j < 2; j++)
                        acc[mi][ni][2 * h + j] = fmaf(part[mi][ni][2 * h + j], xs * ws[ni][j], acc[mi][ni][2 * h + j]);
            }
        __syncthreads();
    }

    if (SWIGLU)
    {
        // The up warps hand their accumulators to the gate warps of the same rows and columns (As is free).
        float (*U)[33] = (float (*)[33])As;
        static_assert(kMmaBM * 33 * 4 <= kMmaBM * kMmaRow, "up exchange fits in As");
        if (wn == 1)
        {
#pragma unroll
            for (int mi = 0; mi < 2; mi++)
#pragma unroll
                for (int ni = 0; ni < 4; ni++)
#pragma unroll
                    for (int c = 0; c < 4; c++) U[wm * 32 + mi * 16 + g + 8 * (c >> 1)][ni * 8 + 2 * t + (c & 1)] = acc[mi][ni][c];
        }
        __syncthreads();
        if (wn == 1) return;
    }

#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int ni = 0; ni < 4; ni++)
#pragma unroll
            for (int c = 0; c < 4; c++)
            {
                const int lr = wm * 32 + mi * 16 + g + 8 * (c >> 1);
                const int lc = ni * 8 + 2 * t + (c & 1);
                if (lr >= live) continue;
                const i64 out = (i64)(row0 + lr) * p.y_stride;
                if (SWIGLU)
                {
                    const int col = c0 + lc;
                    if (col >= I) continue;
                    const float (*U)[33] = (const float (*)[33])As;
                    const float gv = bf16_to_float(float_to_bf16(acc[mi][ni][c]));
                    const float uv = bf16_to_float(float_to_bf16(U[lr][lc]));
                    p.y[out + col] = float_to_bf16(gv / (1.0f + expf(-gv)) * uv);
                }
                else
                {
                    const int col = c0 + wn * 32 + lc;
                    if (col < N) p.y[out + col] = float_to_bf16(acc[mi][ni][c]);
                }
            }
}

// Masked layout from the dispatch's contiguous one (tile 1 or any padding): per masked row
// m = e·capacity + r, gather[m] = the slot in row offsets[e] + r when r < min(counts[e], capacity), else -1;
// per token slot s < t_max·k, minv[s] = its masked row, or -1 (not routed, or past the capacity). Every
// output element is written by exactly one thread: deterministic and capturable.
struct MoeMaskedLayoutParams
{
    const i32* topk_idx;  // [t_max, k]
    const i32* counts;    // [E]
    const i32* offsets;   // [E + 1]
    const i32* perm;      // dispatch row -> slot
    const i32* inv;       // [t_max * k] dispatch slot -> row
    i32* gather;          // [E * capacity]
    i32* minv;            // [t_max * k]
    i32 experts;
    i32 capacity;
    i32 slots;            // t_max * k
    i32 pad0;
};

template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) moe_masked_layout_kernel(const __grid_constant__ MoeMaskedLayoutParams p)
{
    const i64 i = (i64)blockIdx.x * BLOCK + threadIdx.x;
    const i64 rows = (i64)p.experts * p.capacity;
    if (i < rows)
    {
        const int e = (int)(i / p.capacity), r = (int)(i % p.capacity);
        p.gather[i] = r < p.counts[e] ? p.perm[p.offsets[e] + r] : -1;
    }
    if (i < p.slots)
    {
        const int row = p.inv[i];
        int m = -1;
        if (row >= 0)
        {
            const int e = p.topk_idx[i];
            const int r = row - p.offsets[e];
            if (r < p.capacity) m = e * p.capacity + r;
        }
        p.minv[i] = m;
    }
}
