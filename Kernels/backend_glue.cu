// Small elementwise kernels CudaBackend needs where a launcher's contract does not fit IBackend
// (Engine/Backends/Cuda/CudaBackend.cs keeps activations as f32 holding bf16-rounded values):
//   glue_round_kernel      out[i] = bf16(out[i])                 (the CPU emulation's Store)
//   glue_convert_kernel    out[i] = x[i] between f32 and bf16    (bf16 operands of the MLA kernels)
//   glue_copy_kernel       out[r, c] = x[r, c] with row strides, f32 or bf16 elements  (CopyRows, ConcatColumns)
//   glue_dequant_kernel    out bf16 [rows, cols] = e4m3(x) * scale[r/128, c/128]  (kv_b for the absorbed MLA)
//   glue_ring_kernel       f32 or bf16 rows between a tensor and a ring of ring_rows rows per slot, step row r at ring row
//                          slots[r] * ring_rows + positions[r] % ring_rows: gathered (out[r] = x[ring row]) or, with
//                          SCATTER, scattered (out[ring row] = x[r])
#pragma once
#include "common.cuh"

struct BackendGlueParams
{
    const void* x;      // input (see each kernel)
    const void* y;      // second input: block scales of glue_dequant_kernel
    void* out;          // output
    const i32* positions; // [rows] each row's position (glue_ring_kernel)
    const i32* slots;   // [rows] each row's slot (glue_ring_kernel)
    i64 n;              // elements of the 1-D kernels
    i64 x_stride;       // row strides in elements (glue_copy_kernel)
    i64 out_stride;
    i32 rows;
    i32 cols;           // row width
    i32 scale_cols;     // scale blocks per row of glue_dequant_kernel
    i32 ring_rows;      // rows per slot of glue_ring_kernel's ring
};

template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) glue_round_kernel(const __grid_constant__ BackendGlueParams p)
{
    float* o = (float*)p.out;
    for (i64 i = (i64)blockIdx.x * BLOCK + threadIdx.x; i < p.n; i += (i64)gridDim.x * BLOCK)
        o[i] = bf16_round(o[i]);
}

template <int BLOCK, int IN_BF16, int OUT_BF16>
__global__ void __launch_bounds__(BLOCK) glue_convert_kernel(const __grid_constant__ BackendGlueParams p)
{
    typedef typename ElemOf<IN_BF16>::type TIn;
    typedef typename ElemOf<OUT_BF16>::type TOut;
    for (i64 i = (i64)blockIdx.x * BLOCK + threadIdx.x; i < p.n; i += (i64)gridDim.x * BLOCK)
        store_f32<TOut>((TOut*)p.out, i, load_f32<TIn>((const TIn*)p.x, i));
}

template <int BLOCK, int BF16>
__global__ void __launch_bounds__(BLOCK) glue_copy_kernel(const __grid_constant__ BackendGlueParams p)
{
    typedef typename ElemOf<BF16>::type T;
    const i64 total = (i64)p.rows * p.cols;
    for (i64 i = (i64)blockIdx.x * BLOCK + threadIdx.x; i < total; i += (i64)gridDim.x * BLOCK)
    {
        const i64 r = i / p.cols, c = i % p.cols;
        ((T*)p.out)[r * p.out_stride + c] = ((const T*)p.x)[r * p.x_stride + c];
    }
}

template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) glue_dequant_kernel(const __grid_constant__ BackendGlueParams p)
{
    const i64 total = (i64)p.rows * p.cols;
    const u8* codes = (const u8*)p.x;
    const float* scales = (const float*)p.y;
    for (i64 i = (i64)blockIdx.x * BLOCK + threadIdx.x; i < total; i += (i64)gridDim.x * BLOCK)
    {
        const i64 r = i / p.cols, c = i % p.cols;
        const float s = scales[(r / 128) * p.scale_cols + c / 128];
        ((u16*)p.out)[i] = float_to_bf16(__fmul_rn(e4m3_to_float(codes[i]), s));
    }
}

template <int BLOCK, int SCATTER, int BF16>
__global__ void __launch_bounds__(BLOCK) glue_ring_kernel(const __grid_constant__ BackendGlueParams p)
{
    typedef typename ElemOf<BF16>::type T;
    const i64 total = (i64)p.rows * p.cols;
    for (i64 i = (i64)blockIdx.x * BLOCK + threadIdx.x; i < total; i += (i64)gridDim.x * BLOCK)
    {
        const i64 r = i / p.cols, c = i % p.cols;
        const i64 g = (i64)p.slots[r] * p.ring_rows + p.positions[r] % p.ring_rows;
        if (SCATTER)
            ((T*)p.out)[g * p.cols + c] = ((const T*)p.x)[r * p.cols + c];
        else
            ((T*)p.out)[r * p.cols + c] = ((const T*)p.x)[g * p.cols + c];
    }
}
