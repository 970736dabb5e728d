using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Backends.Cuda;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace DeepSeekCuda.Hosting;

/// <summary>Where a model runs.</summary>
public enum ComputeDevice
{
    /// <summary>The CUDA backend when a device is present and NVRTC loads, else the CPU backend.</summary>
    Auto,

    /// <summary>The CPU backend.</summary>
    Cpu,

    /// <summary>The CUDA backend; an error when it cannot be used.</summary>
    Cuda,
}

/// <summary>Turns a <see cref="ComputeDevice"/> choice into a backend, saying which and why.</summary>
internal static class BackendSelection
{
    /// <summary>The device <paramref name="device"/> resolves to here, with the reason (Auto: whether CUDA is usable).</summary>
    public static ComputeDevice Resolve(ComputeDevice device, out string reason)
    {
        switch (device)
        {
            case ComputeDevice.Cpu:
                reason = "requested";
                return ComputeDevice.Cpu;
            case ComputeDevice.Cuda:
                reason = "requested";
                return ComputeDevice.Cuda;
            default:
                if (CudaBackend.IsSupported(out var why))
                {
                    reason = "auto: a CUDA device is present and NVRTC loads";
                    return ComputeDevice.Cuda;
                }

                reason = $"auto: {why}";
                return ComputeDevice.Cpu;
        }
    }

    /// <summary>
    /// Creates the backend for <paramref name="device"/> and logs the choice. <paramref name="numerics"/> applies to the
    /// CPU backend (the CUDA backend's numerics are fixed: what <see cref="CpuNumerics.GpuEmulation"/> emulates).
    /// </summary>
    /// <param name="device">Where to run.</param>
    /// <param name="numerics">The CPU backend's arithmetic.</param>
    /// <param name="logger">Receives the choice.</param>
    /// <param name="gpu">The CUDA device ordinal; null: <see cref="CudaBackendOptions.Device"/>'s default.</param>
    /// <exception cref="DeepSeekCuda.Cuda.CudaUnavailableException">CUDA was requested explicitly and cannot be used.</exception>
    public static IBackend Create(ComputeDevice device, CpuNumerics numerics = CpuNumerics.Float32, ILogger? logger = null, int? gpu = null)
    {
        logger ??= NullLogger.Instance;
        var chosen = Resolve(device, out var reason);
        IBackend backend = chosen == ComputeDevice.Cuda
            ? new CudaBackend(gpu is { } ordinal ? new CudaBackendOptions { Device = ordinal } : new CudaBackendOptions())
            : new CpuBackend(numerics);
        logger.LogInformation("Backend {Backend} ({Reason})", backend.Name, reason);
        return backend;
    }
}
