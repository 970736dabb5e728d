using System.CommandLine;
using DeepSeekCuda.Hosting;
using DeepSeekCuda.Loader.Synthetic;

namespace DeepSeekCuda.Cli.Commands;

/// <summary><c>dscuda make-model</c>: write a synthetic checkpoint in the exact release layout.</summary>
internal static class MakeModelCommand
{
    public static Command Create()
    {
        var output = new Option<string>("--out", "-o") { Description = "Folder to create", Required = true };
        var preset = new Option<string>("--preset") { Description = "Preset name (tiny, deepseek-v3-slice4, deepseek-v3, ...)", DefaultValueFactory = _ => "tiny" };
        var seed = new Option<int>("--seed") { Description = "Seed of the random weights", DefaultValueFactory = _ => 0 };
        var command = new Command("make-model", "Write a synthetic checkpoint (config, FP8 shards with block scales, index, MTP layer, tokenizer)")
        {
            output, preset, seed,
        };
        command.SetAction(parse =>
        {
            var dir = Path.GetFullPath(parse.GetValue(output)!);
            if (Directory.Exists(dir) && Directory.EnumerateFileSystemEntries(dir).Any())
            {
                throw new UserErrorException($"{dir} exists and is not empty");
            }

            var config = ModelPresets.ByName(parse.GetValue(preset)!);
            Progress.Run($"writing {parse.GetValue(preset)} to {dir}", parse.InvocationConfiguration.Error, p => SyntheticCheckpoint.Write(dir, config, parse.GetValue(seed), progress: p));
            DemoTokenizer.Write(dir, config.VocabSize);
            parse.InvocationConfiguration.Output.WriteLine($"wrote {dir}: {config}");
            return 0;
        });
        return command;
    }
}
