using DeepSeekCuda.Cuda.Native;

namespace DeepSeekCuda.Cuda;

/// <summary>A CUDA driver or NVRTC call failed. Carries the error's name and text, the call and the device.</summary>
public class CudaException : Exception
{
    /// <summary>Creates the exception from the parts of a failed call.</summary>
    public CudaException(string api, int code, string errorName, string errorText, string call, int device)
        : base(Format(api, code, errorName, errorText, call, device))
    {
        Api = api;
        Code = code;
        ErrorName = errorName;
        ErrorText = errorText;
        Call = call;
        Device = device;
    }

    /// <summary>"driver" or "nvrtc".</summary>
    public string Api { get; }

    /// <summary>The numeric result (CUresult or nvrtcResult).</summary>
    public int Code { get; }

    /// <summary>The error's symbolic name, e.g. CUDA_ERROR_OUT_OF_MEMORY.</summary>
    public string ErrorName { get; }

    /// <summary>The library's description of the error.</summary>
    public string ErrorText { get; }

    /// <summary>The failing call as written in the source.</summary>
    public string Call { get; }

    /// <summary>The device ordinal current when the call failed, or -1 when unknown.</summary>
    public int Device { get; }

    /// <summary>The message layout, shared with tests.</summary>
    public static string Format(string api, int code, string errorName, string errorText, string call, int device) =>
        $"{errorName} ({code}): {errorText} in {api} call `{call}`" + (device >= 0 ? $" on device {device}" : "");
}

/// <summary>
/// CUDA cannot be used here: no driver library, no NVRTC, or no device. The message says which, so a
/// caller can tell a user what to install.
/// </summary>
public sealed class CudaUnavailableException(string reason) : Exception(reason)
{
    /// <summary>Why CUDA is unavailable.</summary>
    public string Reason { get; } = reason;
}

/// <summary>NVRTC rejected a kernel source. <see cref="Log"/> holds NVRTC's full log with the error lines.</summary>
public sealed class KernelCompileException(string family, string specialization, string arch, string log)
    : Exception($"NVRTC failed to compile kernel family '{family}' ({specialization}) for {arch}:\n{log}")
{
    /// <summary>The kernel family (the .cu file's name without extension).</summary>
    public string Family { get; } = family;

    /// <summary>The instantiations requested.</summary>
    public string Specialization { get; } = specialization;

    /// <summary>The target architecture option.</summary>
    public string Arch { get; } = arch;

    /// <summary>NVRTC's program log.</summary>
    public string Log { get; } = log;
}
