using DeepSeekCuda.Cuda.Native;

namespace DeepSeekCuda.Cuda.Blas;

/// <summary>
/// The arguments of one column-major BLAS GEMM <c>C[M,N] = op(A)[M,K] · op(B)[K,N]</c>, where a matrix stored
/// column-major with leading dimension <c>ld</c> holds element (i, j) at <c>i + j·ld</c>.
/// </summary>
internal readonly record struct ColumnMajorGemm(CublasOperation TransA, CublasOperation TransB, int M, int N, int K, int Lda, int Ldb, int Ldc)
{
    /// <summary>
    /// The column-major call that computes the engine's row-major linear layer <c>Y[m,n] = X[m,k] · W[n,k]ᵀ</c>
    /// (X, W, Y dense, row-major).
    /// <para>
    /// A row-major matrix is the column-major view of its transpose with the same leading dimension (its row
    /// length). So Y row-major [m,n] is Yᵀ column-major [n,m] with ldc = n, and Yᵀ = W · Xᵀ:
    /// </para>
    /// <list type="bullet">
    /// <item>A = W's memory: column-major Wᵀ [k,n], lda = k; op(A) = T gives W [n,k].</item>
    /// <item>B = X's memory: column-major Xᵀ [k,m], ldb = k; op(B) = N keeps Xᵀ [k,m].</item>
    /// <item>C = Y's memory: column-major Yᵀ [n,m], ldc = n; BLAS M = n, N = m, K = k.</item>
    /// </list>
    /// This is also the "TN" layout cuBLASLt requires for FP8 (A transposed, B not), with K contiguous in
    /// both inputs.
    /// </summary>
    public static ColumnMajorGemm ForLinear(int m, int n, int k)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(m);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(n);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(k);
        return new ColumnMajorGemm(CublasOperation.T, CublasOperation.N, M: n, N: m, K: k, Lda: k, Ldb: k, Ldc: n);
    }
}
