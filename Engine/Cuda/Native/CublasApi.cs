using System.Runtime.InteropServices;

namespace DeepSeekCuda.Cuda.Native;

// Values from cublas_api.h, library_types.h and cublasLt.h (CUDA 12.9 / 13); the block-scaling ones were
// checked against the cuBLASLt enum listings (cublasLtMatmulDescAttributes_t, cublasLtMatmulMatrixScale_t).

/// <summary>cublasStatus_t (shared by cuBLAS and cuBLASLt).</summary>
internal enum CublasStatus
{
    Success = 0,
    NotInitialized = 1,
    AllocFailed = 3,
    InvalidValue = 7,
    ArchMismatch = 8,
    MappingError = 11,
    ExecutionFailed = 13,
    InternalError = 14,
    NotSupported = 15,
    LicenseError = 16,
}

/// <summary>cublasOperation_t.</summary>
internal enum CublasOperation
{
    /// <summary>CUBLAS_OP_N: the matrix as stored (column-major).</summary>
    N = 0,

    /// <summary>CUBLAS_OP_T: its transpose.</summary>
    T = 1,
}

/// <summary>cudaDataType_t values the baselines use.</summary>
internal enum CudaDataType
{
    R32F = 0,
    R16BF = 14,
    R8FE4M3 = 28,
}

/// <summary>cublasComputeType_t values the baselines use.</summary>
internal enum CublasComputeType
{
    /// <summary>CUBLAS_COMPUTE_32F: FP32 accumulation (no TF32 down-conversion).</summary>
    Compute32F = 68,
}

/// <summary>cublasLtMatmulDescAttributes_t values the baselines set.</summary>
internal enum CublasLtMatmulDescAttribute
{
    TransA = 3,
    TransB = 4,
    AScalePointer = 17,
    BScalePointer = 18,

    /// <summary>CUBLASLT_MATMUL_DESC_A_SCALE_MODE (cuBLASLt 12.8+; int32 <see cref="CublasLtMatrixScale"/>).</summary>
    AScaleMode = 31,

    /// <summary>CUBLASLT_MATMUL_DESC_B_SCALE_MODE.</summary>
    BScaleMode = 32,
}

/// <summary>cublasLtMatmulMatrixScale_t: how a scale pointer is read.</summary>
internal enum CublasLtMatrixScale
{
    /// <summary>One float for the whole matrix (the default).</summary>
    Scalar32F = 0,

    /// <summary>One float per 128 elements along the inner (K) dimension (cuBLASLt 12.9+, Hopper).</summary>
    Vec128_32F = 4,

    /// <summary>One float per 128×128 block (cuBLASLt 12.9+, Hopper).</summary>
    Blk128x128_32F = 5,
}

/// <summary>cublasLtMatmulPreferenceAttributes_t values the baselines set.</summary>
internal enum CublasLtPreferenceAttribute
{
    /// <summary>CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES (uint64).</summary>
    MaxWorkspaceBytes = 1,
}

/// <summary>cublasLtMatmulHeuristicResult_t: 64-byte opaque algo, workspace size, state, waves, reserved.</summary>
[StructLayout(LayoutKind.Sequential)]
internal unsafe struct CublasLtHeuristicResult
{
    /// <summary>cublasLtMatmulAlgo_t (uint64_t data[8]).</summary>
    public fixed ulong Algo[8];

    /// <summary>Workspace the algorithm needs.</summary>
    public nuint WorkspaceSize;

    /// <summary>Whether the result is usable.</summary>
    public CublasStatus State;

    /// <summary>Waves the algorithm fills the GPU with.</summary>
    public float WavesCount;

    /// <summary>Reserved (int reserved[4]).</summary>
    public fixed int Reserved[4];
}

/// <summary>Thin declarations of the few cuBLAS calls the BF16 baseline needs. Each returns a status for <see cref="Blas.CublasCheck"/>.</summary>
internal static unsafe partial class CublasApi
{
    static CublasApi() => NativeLibraries.EnsureResolver();

    private const string Lib = NativeLibraries.Cublas;

    /// <summary>CUBLAS_GEMM_DEFAULT: let cuBLAS choose (tensor cores where the types allow).</summary>
    public const int GemmDefault = -1;

    /// <summary>
    /// cublasMath_t CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION: split-K partial sums are reduced in the
    /// compute type (FP32), not rounded to the BF16 output type first.
    /// </summary>
    public const int MathDisallowReducedPrecisionReduction = 16;

    [LibraryImport(Lib, EntryPoint = "cublasCreate_v2")] public static partial CublasStatus cublasCreate(IntPtr* handle);
    [LibraryImport(Lib, EntryPoint = "cublasDestroy_v2")] public static partial CublasStatus cublasDestroy(IntPtr handle);
    [LibraryImport(Lib, EntryPoint = "cublasSetStream_v2")] public static partial CublasStatus cublasSetStream(IntPtr handle, IntPtr stream);
    [LibraryImport(Lib, EntryPoint = "cublasGetVersion_v2")] public static partial CublasStatus cublasGetVersion(IntPtr handle, int* version);
    [LibraryImport(Lib)] public static partial CublasStatus cublasSetMathMode(IntPtr handle, int mode);

    [LibraryImport(Lib)]
    public static partial CublasStatus cublasGemmEx(IntPtr handle, CublasOperation transa, CublasOperation transb, int m, int n, int k,
        float* alpha, ulong a, CudaDataType aType, int lda, ulong b, CudaDataType bType, int ldb,
        float* beta, ulong c, CudaDataType cType, int ldc, CublasComputeType computeType, int algo);
}

/// <summary>Thin declarations of the cuBLASLt calls the FP8 baseline needs.</summary>
internal static unsafe partial class CublasLtApi
{
    static CublasLtApi() => NativeLibraries.EnsureResolver();

    private const string Lib = NativeLibraries.CublasLt;

    [LibraryImport(Lib)] public static partial nuint cublasLtGetVersion();
    [LibraryImport(Lib)] public static partial CublasStatus cublasLtCreate(IntPtr* handle);
    [LibraryImport(Lib)] public static partial CublasStatus cublasLtDestroy(IntPtr handle);

    [LibraryImport(Lib)] public static partial CublasStatus cublasLtMatmulDescCreate(IntPtr* desc, CublasComputeType computeType, CudaDataType scaleType);
    [LibraryImport(Lib)] public static partial CublasStatus cublasLtMatmulDescSetAttribute(IntPtr desc, CublasLtMatmulDescAttribute attribute, void* value, nuint size);
    [LibraryImport(Lib)] public static partial CublasStatus cublasLtMatmulDescDestroy(IntPtr desc);

    [LibraryImport(Lib)] public static partial CublasStatus cublasLtMatrixLayoutCreate(IntPtr* layout, CudaDataType type, ulong rows, ulong cols, long ld);
    [LibraryImport(Lib)] public static partial CublasStatus cublasLtMatrixLayoutDestroy(IntPtr layout);

    [LibraryImport(Lib)] public static partial CublasStatus cublasLtMatmulPreferenceCreate(IntPtr* preference);
    [LibraryImport(Lib)] public static partial CublasStatus cublasLtMatmulPreferenceSetAttribute(IntPtr preference, CublasLtPreferenceAttribute attribute, void* value, nuint size);
    [LibraryImport(Lib)] public static partial CublasStatus cublasLtMatmulPreferenceDestroy(IntPtr preference);

    [LibraryImport(Lib)]
    public static partial CublasStatus cublasLtMatmulAlgoGetHeuristic(IntPtr handle, IntPtr desc, IntPtr aDesc, IntPtr bDesc, IntPtr cDesc, IntPtr dDesc,
        IntPtr preference, int requestedAlgoCount, CublasLtHeuristicResult* results, int* returnedAlgoCount);

    [LibraryImport(Lib)]
    public static partial CublasStatus cublasLtMatmul(IntPtr handle, IntPtr desc, float* alpha, ulong a, IntPtr aDesc, ulong b, IntPtr bDesc,
        float* beta, ulong c, IntPtr cDesc, ulong d, IntPtr dDesc, void* algo, ulong workspace, nuint workspaceBytes, IntPtr stream);
}
