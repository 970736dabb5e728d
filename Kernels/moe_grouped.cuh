// What the grouped FP8 expert GEMMs share (moe_grouped_gemm.cu on mma.sync, moe_grouped_gemm_wgmma.cu on Hopper):
// the params, the tile's expert and rows in both layouts, and the activation row of a grouped row.
#pragma once
#include "fp8_gemm.cuh"

constexpr int kMoeTile = 64; // rows per tile; the dispatch pads the contiguous layout's offsets to it

struct MoeGroupedGemmParams
{
    const u8* x_codes;      // e4m3 activation codes, activation row a at x_codes + a * x_stride
    const float* x_scales;  // [.., x_scales_stride] one per 128 channels
    const u8* w;            // [E, N, K] e4m3
    const float* w_scales;  // [E, SROWS, ceil(K/128)]
    u16* y;                 // bf16 [rows, y_stride], row = grouped row
    const i32* counts;      // [E] live rows per expert
    const i32* offsets;     // contiguous: [E + 1] first row per expert (multiples of 64); masked: unused
    const i32* gather;      // null: activation row = grouped row; else gather[row] / gather_div (< 0: no row)
    i64 x_stride;
    i64 x_scales_stride;
    i64 y_stride;
    i32 experts;
    i32 capacity;           // masked: rows per expert slot
    i32 gather_div;         // top-k (slot -> token)
    i32 pad0;
};

// Resolves this block's expert and grouped row range; false when the tile holds no live row.
template <int MASKED>
DSC_DEVICE bool moe_tile(const MoeGroupedGemmParams& p, int& e, int& row0, int& live)
{
    if (MASKED)
    {
        e = blockIdx.z;
        const int cnt = min(p.counts[e], p.capacity);
        const int r = blockIdx.y * kMoeTile;
        row0 = e * p.capacity + r;
        live = min(kMoeTile, cnt - r);
        return live > 0;
    }
    row0 = blockIdx.y * kMoeTile;
    if (row0 >= p.offsets[p.experts]) return false;
    // Last e with offsets[e] <= row0 (empty experts share their offset with the next one).
    int lo = 0, hi = p.experts - 1;
    while (lo < hi)
    {
        const int mid = (lo + hi + 1) >> 1;
        if (p.offsets[mid] <= row0) lo = mid;
        else hi = mid - 1;
    }
    e = lo;
    live = min(kMoeTile, p.offsets[e] + p.counts[e] - row0);
    return live > 0;
}

// The activation row of tile row r (grouped row row0 + r): the row itself, or through the dispatch perm
// (gather[row] / gather_div); -1 for a row past the tile's live rows or an empty slot.
DSC_DEVICE i64 moe_activation_row(const MoeGroupedGemmParams& p, int row0, int r, int live)
{
    if (r >= live) return -1;
    const int gr = row0 + r;
    if (!p.gather) return gr;
    const int s = p.gather[gr];
    return s < 0 ? -1 : s / p.gather_div;
}
