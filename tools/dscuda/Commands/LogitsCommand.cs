using System.CommandLine;
using System.Globalization;
using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Hosting;
using DeepSeekCuda.Inference;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Model;

namespace DeepSeekCuda.Cli.Commands;

/// <summary><c>dscuda logits</c>: one prefill, every position's logits written to a safetensors file.</summary>
internal static class LogitsCommand
{
    public static Command Create()
    {
        var model = new ModelArguments(generation: false);
        var tokens = new Option<string>("--tokens", "-t") { Description = "Comma-separated token ids, e.g. 0,17,42", Required = true };
        var output = new Option<string>("--out", "-o") { Description = "Safetensors file to write (F32 tensor 'logits' [tokens, vocab])", Required = true };
        var numerics = new Option<CpuNumerics>("--numerics")
        {
            Description = "CPU arithmetic: Float32 (reference) or GpuEmulation (BF16 storage, FP8 activation quantization)",
            DefaultValueFactory = _ => CpuNumerics.Float32,
        };
        var command = new Command("logits", "Run one prefill and write the logits of every position")
        {
            tokens, output, numerics,
        };
        model.AddTo(command);
        command.SetAction(parse =>
        {
            var ids = ParseTokens(parse.GetValue(tokens)!);
            var path = Path.GetFullPath(parse.GetValue(output)!);
            var computeDevice = model.Device(parse);
            var dir = model.ModelDirectory(parse, parse.InvocationConfiguration.Error);
            using var checkpoint = Checkpoint.Open(dir);
            var vocab = checkpoint.Config.VocabSize;
            foreach (var id in ids.Where(id => id >= vocab))
            {
                throw new UserErrorException($"token {id} is outside the vocabulary (0..{vocab - 1}) of {dir}");
            }

            if (ids.Length > checkpoint.Config.MaxPositionEmbeddings)
            {
                throw new UserErrorException($"{ids.Length} tokens exceed max_position_embeddings {checkpoint.Config.MaxPositionEmbeddings}");
            }

            using var loggers = CliLogging.CreateFactory(parse);
            using var backend = BackendSelection.Create(computeDevice, parse.GetValue(numerics), loggers.CreateLogger("DeepSeekCuda.Cli.Logits"));
            using var net = DeepSeekModel.Load(checkpoint, backend, new ModelOptions { MaxSequenceLength = Math.Max(ids.Length, 1), LoadMtp = false });
            var logits = net.ComputeLogits(ids);
            SafetensorsWriter.WriteFile(path, [("logits", new long[] { ids.Length, vocab }, logits)]);
            parse.InvocationConfiguration.Output.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"wrote {path}: logits [{ids.Length}, {vocab}] ({backend.Name}); last position argmax {Sampler.ArgMax(logits.AsSpan((ids.Length - 1) * vocab, vocab))}"));
            return 0;
        });
        return command;
    }

    internal static int[] ParseTokens(string text)
    {
        var parts = text.Split(',', StringSplitOptions.TrimEntries);
        var ids = new int[parts.Length];
        for (var i = 0; i < parts.Length; i++)
        {
            if (!int.TryParse(parts[i], NumberStyles.None, CultureInfo.InvariantCulture, out ids[i]))
            {
                throw new UserErrorException($"--tokens: '{parts[i]}' (entry {i}) is not a non-negative integer token id");
            }
        }

        return ids;
    }
}
