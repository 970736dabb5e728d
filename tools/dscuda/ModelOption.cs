using System.CommandLine;
using DeepSeekCuda.Hosting;

namespace DeepSeekCuda.Cli;

/// <summary>The <c>--model DIR</c> option every model command shares, with the embedded demo as default.</summary>
internal static class ModelOption
{
    public static Option<string?> Create() => new("--model", "-m")
    {
        Description = "Checkpoint folder (config.json, safetensors shards, tokenizer.json); default: the embedded demo model",
    };

    /// <summary>The folder to use: the given one, or the demo checkpoint (created on first use), saying so.</summary>
    public static string Resolve(string? model, TextWriter log)
    {
        if (!string.IsNullOrEmpty(model))
        {
            return model;
        }

        var dir = DemoModel.Ensure(out var created);
        log.WriteLine(created
            ? $"No --model given: created the embedded demo model (random weights, meaningless text) in {dir}"
            : $"No --model given: using the embedded demo model (random weights, meaningless text) in {dir}");
        return dir;
    }
}
