using System.CommandLine;
using System.Globalization;
using DeepSeekCuda.Backends.Cuda;
using DeepSeekCuda.Model;
using CudaRt = DeepSeekCuda.Cuda.Cuda;

namespace DeepSeekCuda.Cli;

/// <summary>
/// The <c>--gpus</c> and <c>--placement</c> options: which GPUs a model runs on (one, or several it is spread over) and
/// how it is spread. Values are checked here, before the weights are read, each mistake a one-line error naming the option.
/// </summary>
internal static class GpuOption
{
    public static Option<string?> CreateGpus() => new("--gpus")
    {
        Description = "GPUs to run on: an ordinal (3), a list or ranges (0,1 or 0-7), or all; several spread the model over them "
            + "(how: --placement); default: GPU 0 when the CUDA backend runs",
    };

    public static Option<string> CreatePlacement()
    {
        var option = new Option<string>("--placement")
        {
            Description = "How a model on several GPUs is spread: auto (tensor/expert parallel when it fits, else a pipeline), tensor, pipeline",
            DefaultValueFactory = _ => "auto",
        };
        option.AcceptOnlyFromAmong("auto", "tensor", "pipeline");
        return option;
    }

    /// <summary>The placement a <c>--placement</c> value asks for (null: auto).</summary>
    public static PlacementKind? Placement(string? value) => value switch
    {
        "tensor" => PlacementKind.TensorExpertParallel,
        "pipeline" => PlacementKind.Pipeline,
        _ => null,
    };

    /// <summary>
    /// The GPU ordinals a <c>--gpus</c> value names, in order; null when it is not given. <c>all</c> asks the driver
    /// how many there are. The list must be non-empty with each GPU once, and CUDA must be usable.
    /// </summary>
    public static IReadOnlyList<int>? Parse(string? value)
    {
        if (value is null)
        {
            return null;
        }

        var trimmed = value.Trim();
        var gpus = trimmed == "all" ? null : ParseList(trimmed);
        if (!CudaBackend.IsSupported(out var reason))
        {
            throw new UserErrorException($"--gpus {trimmed}: {reason}; leave --gpus out to run on the CPU");
        }

        return gpus ?? [.. Enumerable.Range(0, CudaRt.DeviceCount)];
    }

    /// <summary>The ordinals of a list such as <c>0,2,4-7</c> (no driver needed): each item an ordinal or an ascending range.</summary>
    internal static IReadOnlyList<int> ParseList(string value)
    {
        var gpus = new List<int>();
        foreach (var item in value.Split(',', StringSplitOptions.TrimEntries))
        {
            var dash = item.Length > 1 ? item.IndexOf('-', 1) : -1;
            if (dash < 0 && Ordinal(item) is { } one)
            {
                gpus.Add(one);
            }
            else if (dash > 0 && Ordinal(item[..dash]) is { } from && Ordinal(item[(dash + 1)..]) is { } to && from <= to)
            {
                gpus.AddRange(Enumerable.Range(from, to - from + 1));
            }
            else
            {
                throw new UserErrorException($"--gpus {value}: '{item}' is not a GPU ordinal or an ascending range such as 0-7");
            }
        }

        if (gpus.GroupBy(g => g).FirstOrDefault(g => g.Count() > 1) is { } twice)
        {
            throw new UserErrorException($"--gpus {value}: GPU {twice.Key} is named twice");
        }

        return gpus;
    }

    private static int? Ordinal(string text) =>
        int.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out var n) ? n : null;
}
