using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using DeepSeekCuda.Cuda.Native;

namespace DeepSeekCuda.Cuda;

/// <summary>The one check for driver API results.</summary>
public static unsafe class CudaCheck
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
    /// (driver shut down, context destroyed) has taken the resource with it, so those results are not
    /// errors here; any other failure throws.
    /// </summary>
    public static void Release(CuResult result, int device = -1, [CallerArgumentExpression(nameof(result))] string call = "")
    {
        if (!IsContextGone(result))
        {
            Driver(result, device, call);
        }
    }

    /// <summary>Results that mean the owning context no longer exists.</summary>
    public static bool IsContextGone(CuResult result) =>
        result is CuResult.Deinitialized or CuResult.InvalidContext or (CuResult)709 /* CONTEXT_IS_DESTROYED */;

    /// <summary>Name and text of a CUresult, asked of the driver (it knows codes newer than this build).</summary>
    public static (string Name, string Text) Describe(CuResult result)
    {
        byte* name = null, text = null;
        var haveName = CuDriver.cuGetErrorName(result, &name) == CuResult.Success && name != null;
        var haveText = CuDriver.cuGetErrorString(result, &text) == CuResult.Success && text != null;
        return (haveName ? Marshal.PtrToStringUTF8((IntPtr)name)! : $"CUresult {(int)result}",
                haveText ? Marshal.PtrToStringUTF8((IntPtr)text)! : "unknown error");
    }
}

/// <summary>The one check for NVRTC results.</summary>
public static unsafe class NvrtcCheck
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
