using DeepSeekCuda.Cuda.Native;

namespace DeepSeekCuda.Cuda.Blas;

/// <summary>
/// A cuBLAS handle on one device, for the BF16 GEMM baseline of <c>run-bench gemm</c> and tests. The engine
/// itself never calls cuBLAS. Construction throws <see cref="CublasUnavailableException"/> (naming the files
/// tried) when libcublas cannot be loaded.
/// </summary>
internal sealed unsafe class CublasHandle : IDisposable
{
    private IntPtr _handle;

    /// <summary>Creates a handle in <paramref name="device"/>'s primary context.</summary>
    public CublasHandle(CudaDevice device)
    {
        NativeLibraries.RequireCublas();
        Device = device;
        device.MakeCurrent();
        IntPtr h;
        CublasCheck.Check(CublasApi.cublasCreate(&h), "cublas", device.Ordinal);
        _handle = h;

        // FP32 accumulation all the way, as our kernels do: the baseline must not win by rounding split-K
        // partial sums to BF16.
        CublasCheck.Check(CublasApi.cublasSetMathMode(h, CublasApi.MathDisallowReducedPrecisionReduction), "cublas", device.Ordinal);
        int version;
        CublasCheck.Check(CublasApi.cublasGetVersion(h, &version), "cublas", device.Ordinal);
        Version = version;
    }

    /// <summary>The owning device.</summary>
    public CudaDevice Device { get; }

    /// <summary>cuBLAS version as the library reports it (major·10000 + minor·100 + patch for CUDA 12+).</summary>
    public int Version { get; }

    /// <summary>The file cuBLAS was loaded from.</summary>
    public static string? LibraryPath => NativeLibraries.CublasPath;

    private IntPtr Handle => _handle != IntPtr.Zero ? _handle : throw new ObjectDisposedException(nameof(CublasHandle));

    /// <summary>
    /// <c>y[m,n] = x[m,k] · w[n,k]ᵀ</c>, all BF16, row-major and dense, accumulated in FP32
    /// (CUBLAS_COMPUTE_32F, FP32 split-K reductions), queued on <paramref name="stream"/>. The column-major call is
    /// <see cref="ColumnMajorGemm.ForLinear"/>.
    /// </summary>
    public void GemmBf16(CudaStream stream, ulong x, ulong w, ulong y, int m, int n, int k)
    {
        var g = ColumnMajorGemm.ForLinear(m, n, k);
        var h = Handle;
        float alpha = 1f, beta = 0f;
        CublasCheck.Check(CublasApi.cublasSetStream(h, stream.Handle), "cublas", Device.Ordinal);
        CublasCheck.Check(CublasApi.cublasGemmEx(h, g.TransA, g.TransB, g.M, g.N, g.K,
            &alpha, w, CudaDataType.R16BF, g.Lda, x, CudaDataType.R16BF, g.Ldb,
            &beta, y, CudaDataType.R16BF, g.Ldc, CublasComputeType.Compute32F, CublasApi.GemmDefault), "cublas", Device.Ordinal);
    }

    /// <inheritdoc />
    public void Dispose()
    {
        if (_handle != IntPtr.Zero)
        {
            var h = _handle;
            _handle = IntPtr.Zero;
            CublasCheck.Release(CublasApi.cublasDestroy(h), "cublas", Device.Ordinal);
        }
    }
}
