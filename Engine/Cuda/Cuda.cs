using DeepSeekCuda.Cuda.Native;

namespace DeepSeekCuda.Cuda;

/// <summary>Whether CUDA can be used on this machine, asked without throwing.</summary>
internal static unsafe class Cuda
{
    private static readonly Lazy<string?> Problem = new(Probe);

    /// <summary>Whether this process has asked the driver to initialize (cuInit) through this class yet.</summary>
    internal static bool InitializationAttempted => Problem.IsValueCreated;

    /// <summary>True when the driver loads, initializes and reports at least one device.</summary>
    public static bool IsAvailable => Problem.Value is null;

    /// <summary>Why CUDA is unavailable, or null when it is available.</summary>
    public static string? UnavailableReason => Problem.Value;

    /// <summary>Number of devices (0 when CUDA is unavailable).</summary>
    public static int DeviceCount
    {
        get
        {
            if (!IsAvailable)
            {
                return 0;
            }

            int n;
            CudaCheck.Driver(CuDriver.cuDeviceGetCount(&n));
            return n;
        }
    }

    /// <summary>The CUDA version the installed driver supports, as "major.minor" (null when CUDA is unavailable).</summary>
    public static string? DriverVersion
    {
        get
        {
            if (!IsAvailable)
            {
                return null;
            }

            int v;
            CudaCheck.Driver(CuDriver.cuDriverGetVersion(&v));
            return $"{v / 1000}.{v % 1000 / 10}";
        }
    }

    /// <summary>Throws <see cref="CudaUnavailableException"/> with the reason when CUDA cannot be used.</summary>
    public static void EnsureAvailable()
    {
        if (Problem.Value is { } reason)
        {
            throw new CudaUnavailableException(reason);
        }
    }

    private static string? Probe()
    {
        if (!NativeLibraries.TryDriver(out _, out var reason))
        {
            return reason;
        }

        var r = CuDriver.cuInit(0);
        if (r != CuResult.Success)
        {
            var (name, text) = CudaCheck.Describe(r);
            return $"cuInit failed: {name}: {text}";
        }

        int count;
        r = CuDriver.cuDeviceGetCount(&count);
        if (r != CuResult.Success)
        {
            var (name, text) = CudaCheck.Describe(r);
            return $"cuDeviceGetCount failed: {name}: {text}";
        }

        return count == 0 ? "the NVIDIA driver reports no CUDA device" : null;
    }
}
