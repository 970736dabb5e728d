using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using DeepSeekCuda.Cuda.Native;

namespace DeepSeekCuda.Cuda;

/// <summary>The one check for driver API results.</summary>
internal static unsafe class CudaCheck
{
    /// <summary>Throws <see cref="CudaException"/> unless <paramref name="result"/> is success.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Driver(CuResult result, int device = -1, [CallerArgumentExpression(nameof(result))] string call = "")
    {
        if (result != CuResult.Success)
        {
            Throw(result, device, call);
        }
    }

    [MethodImpl(MethodImplOptions.NoInlining)]
    private static void Throw(CuResult result, int device, string call)
    {
        var (name, text) = Describe(result);
        throw new CudaException("driver", (int)result, name, text, call, device);
    }

    /// <summary>
    /// Checks the result of a release call (free, destroy, unload). A context that is already gone
    /// (driver shut down, context destroyed) has taken the resource with it, and a context a kernel fault
    /// left unusable (<see cref="IsContextCorrupted"/>) answers every later call with that fault, which the
    /// call that met it first has already reported: neither is an error here (a release in a <c>Dispose</c>
    /// on the way out of that first exception must not replace it). Any other failure throws.
    /// </summary>
    public static void Release(CuResult result, int device = -1, [CallerArgumentExpression(nameof(result))] string call = "")
    {
        if (!IsContextGone(result) && !IsContextCorrupted(result))
        {
            Driver(result, device, call);
        }
    }

    /// <summary>Results that mean the owning context no longer exists.</summary>
    public static bool IsContextGone(CuResult result) =>
        result is CuResult.Deinitialized or CuResult.InvalidContext or (CuResult)709 /* CONTEXT_IS_DESTROYED */;

    /// <summary>
    /// The sticky faults: a kernel accessed an illegal or misaligned address, ran an illegal instruction, overflowed
    /// its stack, timed out or failed. The driver answers every later call in that context with the same error; only
    /// a new process gets a working context back.
    /// </summary>
    public static bool IsContextCorrupted(CuResult result) => result is CuResult.IllegalAddress or CuResult.LaunchTimeout
        or CuResult.HardwareStackError or CuResult.IllegalInstruction or CuResult.MisalignedAddress or CuResult.InvalidAddressSpace
        or CuResult.InvalidPc or CuResult.LaunchFailed;

    /// <summary>
    /// Name and text of a CUresult, asked of the driver (it knows codes newer than this build); without a
    /// loadable driver the few codes named in <see cref="CuResult"/> are spelled here.
    /// </summary>
    public static (string Name, string Text) Describe(CuResult result)
    {
        if (NativeLibraries.TryDriver(out _, out _))
        {
            byte* name = null, text = null;
            var haveName = CuDriver.cuGetErrorName(result, &name) == CuResult.Success && name != null;
            var haveText = CuDriver.cuGetErrorString(result, &text) == CuResult.Success && text != null;
            if (haveName)
            {
                return (Marshal.PtrToStringUTF8((IntPtr)name)!, haveText ? Marshal.PtrToStringUTF8((IntPtr)text)! : "unknown error");
            }
        }

        return Fallback(result);
    }

    /// <summary>The driver's names for the codes in <see cref="CuResult"/>, for when the driver cannot be asked.</summary>
    public static (string Name, string Text) Fallback(CuResult result) => result switch
    {
        CuResult.Success => ("CUDA_SUCCESS", "no error"),
        CuResult.InvalidValue => ("CUDA_ERROR_INVALID_VALUE", "invalid argument"),
        CuResult.OutOfMemory => ("CUDA_ERROR_OUT_OF_MEMORY", "out of memory"),
        CuResult.NotInitialized => ("CUDA_ERROR_NOT_INITIALIZED", "initialization error"),
        CuResult.Deinitialized => ("CUDA_ERROR_DEINITIALIZED", "driver shutting down"),
        CuResult.NoDevice => ("CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"),
        CuResult.InvalidDevice => ("CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"),
        CuResult.InvalidImage => ("CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid"),
        CuResult.InvalidContext => ("CUDA_ERROR_INVALID_CONTEXT", "invalid device context"),
        CuResult.NotFound => ("CUDA_ERROR_NOT_FOUND", "named symbol not found"),
        CuResult.NotReady => ("CUDA_ERROR_NOT_READY", "device not ready"),
        CuResult.IllegalAddress => ("CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered"),
        CuResult.LaunchOutOfResources => ("CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES", "too many resources requested for launch"),
        CuResult.MisalignedAddress => ("CUDA_ERROR_MISALIGNED_ADDRESS", "misaligned address"),
        CuResult.LaunchFailed => ("CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure"),
        _ => ($"CUresult {(int)result}", "unknown error (driver not loaded)"),
    };
}

/// <summary>The one check for NVRTC results.</summary>
internal static unsafe class NvrtcCheck
{
    /// <summary>Throws <see cref="CudaException"/> unless <paramref name="result"/> is success.</summary>
    public static void Check(NvrtcResult result, [CallerArgumentExpression(nameof(result))] string call = "")
    {
        if (result != NvrtcResult.Success)
        {
            var text = NvrtcApi.nvrtcGetErrorString(result);
            var name = text != null ? Marshal.PtrToStringUTF8((IntPtr)text)! : $"nvrtcResult {(int)result}";
            throw new CudaException("nvrtc", (int)result, name, name, call, -1);
        }
    }
}
