using System.Runtime.CompilerServices;
using DeepSeekCuda.Cuda.Native;

namespace DeepSeekCuda.Cuda.Blas;

/// <summary>
/// A cuBLAS or cuBLASLt call failed. <see cref="CudaException.ErrorName"/> is the status name
/// (CUBLAS_STATUS_NOT_SUPPORTED, ...), <see cref="CudaException.Call"/> the call as written.
/// </summary>
internal sealed class CublasException(string api, CublasStatus status, string call, int device)
    : CudaException(api, (int)status, CublasCheck.Name(status), CublasCheck.Text(status), call, device)
{
    /// <summary>The status the library returned.</summary>
    public CublasStatus Status { get; } = status;
}

/// <summary>
/// cuBLAS or cuBLASLt cannot be loaded here. They serve only as baselines, so callers report this and go on
/// without them; the message names every file tried.
/// </summary>
internal sealed class CublasUnavailableException(string library, string reason) : Exception(reason)
{
    /// <summary>"cublas" or "cublasLt".</summary>
    public string Library { get; } = library;

    /// <summary>Why the library could not be loaded.</summary>
    public string Reason { get; } = reason;
}

/// <summary>The one check for cuBLAS and cuBLASLt results.</summary>
internal static class CublasCheck
{
    /// <summary>Throws <see cref="CublasException"/> unless <paramref name="status"/> is success.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Check(CublasStatus status, string api = "cublas", int device = -1, [CallerArgumentExpression(nameof(status))] string call = "")
    {
        if (status != CublasStatus.Success)
        {
            Throw(api, status, device, call);
        }
    }

    /// <summary>
    /// Checks a destroy call. CUBLAS_STATUS_NOT_INITIALIZED there means the library (or the context under
    /// it) is already gone, which took the resource with it; any other failure throws.
    /// </summary>
    public static void Release(CublasStatus status, string api = "cublas", int device = -1, [CallerArgumentExpression(nameof(status))] string call = "")
    {
        if (status != CublasStatus.NotInitialized)
        {
            Check(status, api, device, call);
        }
    }

    [MethodImpl(MethodImplOptions.NoInlining)]
    private static void Throw(string api, CublasStatus status, int device, string call) => throw new CublasException(api, status, call, device);

    /// <summary>
    /// The header's name of a status (cublasGetStatusName says the same but needs the library, which is
    /// exactly what may be missing when an error is reported).
    /// </summary>
    public static string Name(CublasStatus status) => status switch
    {
        CublasStatus.Success => "CUBLAS_STATUS_SUCCESS",
        CublasStatus.NotInitialized => "CUBLAS_STATUS_NOT_INITIALIZED",
        CublasStatus.AllocFailed => "CUBLAS_STATUS_ALLOC_FAILED",
        CublasStatus.InvalidValue => "CUBLAS_STATUS_INVALID_VALUE",
        CublasStatus.ArchMismatch => "CUBLAS_STATUS_ARCH_MISMATCH",
        CublasStatus.MappingError => "CUBLAS_STATUS_MAPPING_ERROR",
        CublasStatus.ExecutionFailed => "CUBLAS_STATUS_EXECUTION_FAILED",
        CublasStatus.InternalError => "CUBLAS_STATUS_INTERNAL_ERROR",
        CublasStatus.NotSupported => "CUBLAS_STATUS_NOT_SUPPORTED",
        CublasStatus.LicenseError => "CUBLAS_STATUS_LICENSE_ERROR",
        _ => $"cublasStatus_t {(int)status}",
    };

    /// <summary>What a status usually means for the calls made here.</summary>
    public static string Text(CublasStatus status) => status switch
    {
        CublasStatus.Success => "success",
        CublasStatus.NotInitialized => "the library was not initialized (no context, or the handle is gone)",
        CublasStatus.AllocFailed => "resource allocation failed",
        CublasStatus.InvalidValue => "an unsupported value or parameter was passed",
        CublasStatus.ArchMismatch => "the device lacks a feature the call needs",
        CublasStatus.MappingError => "access to GPU memory space failed",
        CublasStatus.ExecutionFailed => "the GPU program failed to execute",
        CublasStatus.InternalError => "an internal cuBLAS operation failed",
        CublasStatus.NotSupported => "the functionality requested is not supported (no algorithm for this configuration)",
        CublasStatus.LicenseError => "license error",
        _ => "unknown status",
    };
}
