using System.CommandLine;

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

    /// <summary>This build runs models on the CPU backend only; asking for CUDA is an error, not a silent fallback.</summary>
    public static void RequireCpu(string? device)
    {
        if (device == "cuda")
        {
            throw new UserErrorException("--device cuda: this build has no CUDA backend for whole models yet; use --device cpu");
        }
    }
}
