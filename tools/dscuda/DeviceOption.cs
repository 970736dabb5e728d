using System.CommandLine;
using DeepSeekCuda.Backends.Cuda;
using DeepSeekCuda.Hosting;

namespace DeepSeekCuda.Cli;

/// <summary>The <c>--device auto|cpu|cuda</c> option.</summary>
internal static class DeviceOption
{
    public static Option<string> Create()
    {
        var option = new Option<string>("--device")
        {
            Description = "Where to run: auto (a GPU when the CUDA backend can use one, else the CPU), cpu, cuda",
            DefaultValueFactory = _ => "auto",
        };
        option.AcceptOnlyFromAmong("auto", "cpu", "cuda");
        return option;
    }

    /// <summary>
    /// The backend choice of an option value: <c>cuda</c> must be usable here (an error with the reason, not a
    /// silent fallback), <c>auto</c> picks CUDA when it is, else the CPU.
    /// </summary>
    public static ComputeDevice Parse(string? device)
    {
        switch (device)
        {
            case "cpu":
                return ComputeDevice.Cpu;
            case "cuda":
                if (!CudaBackend.IsSupported(out var reason))
                {
                    throw new UserErrorException($"--device cuda: {reason}; use --device cpu");
                }

                return ComputeDevice.Cuda;
            default:
                return ComputeDevice.Auto;
        }
    }
}
