using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Bench.Harness;
using DeepSeekCuda.Hosting;
using DeepSeekCuda.Inference;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Synthetic;
using DeepSeekCuda.Model;
using DeepSeekCuda.Serving;

namespace DeepSeekCuda.Bench.Benches;

/// <summary>
/// End to end on <see cref="CpuBackend"/> (float32) through <see cref="DeepSeekModel"/> sessions, in the manner of
/// llama-bench's pp512/tg128: <c>cpu_pp</c> is one prefill of N tokens from an empty cache, <c>cpu_tg</c> is N decode
/// steps of one token from an empty cache (greedy, each step fed the previous argmax). One warm-up run of each, then R
/// timed repetitions; each row carries the mean time of a run (<c>us</c>) and the mean ± sample standard deviation of
/// the runs' tokens/s. Baseline <c>floor</c>: the bytes the run must read in the checkpoint's format
/// (<see cref="StepCost.PrefillBytes"/>; for tg the sum of <see cref="StepCost.DecodeBytes"/> over the growing context)
/// at this run's host copy bandwidth; the CPU backend holds weights in float32, so expect a ratio well below 1. tflops
/// counts <see cref="StepCost.PrefillFlops"/> of N tokens for both (N causal tokens do the same work either way). The
/// repetitions of tg must produce the same tokens, or the bench fails: a timing of a wrong run is not a number.
/// </summary>
internal static class CpuE2eBench
{
    /// <summary>The bench's name: its subcommand and its JSON file.</summary>
    public const string Name = "cpu-e2e";

    public static Command Create()
    {
        var quick = new Option<bool>("--quick") { Description = "pp64, tg16, 2 repetitions (unless set below)" };
        var model = new Option<string>("--model")
        {
            Description = "demo (the embedded demo model, default), a preset (tiny, deepseek-v3-sliceN: random weights written to a temporary folder) or a checkpoint folder",
            DefaultValueFactory = _ => "demo",
        };
        var pp = new Option<int?>("--pp") { Description = "Prompt tokens (default 512; quick 64)" };
        var tg = new Option<int?>("--tg") { Description = "Generated tokens (default 128; quick 16)" };
        var reps = new Option<int?>("--reps") { Description = "Timed repetitions after one warm-up (default 5; quick 2)" };
        var threads = new Option<int?>("--threads") { Description = "CPU backend threads (default: all cores)" };
        var outOption = new Option<string?>("--out") { Description = "Folder to write cpu-e2e.json into" };
        var command = new Command(Name, "CPU backend end to end: prompt processing and generation tokens/s (pp N, tg N; mean ± sd over repetitions)");
        foreach (var o in new Option[] { quick, model, pp, tg, reps, threads, outOption })
        {
            command.Options.Add(o);
        }

        command.SetAction(p =>
        {
            var isQuick = p.GetValue(quick);
            var settings = new Settings(p.GetValue(model)!, p.GetValue(pp) ?? (isQuick ? 64 : 512), p.GetValue(tg) ?? (isQuick ? 16 : 128),
                p.GetValue(reps) ?? (isQuick ? 2 : 5), p.GetValue(threads));
            return Run(settings, p.GetValue(outOption));
        });
        return command;
    }

    /// <summary>What to measure.</summary>
    internal sealed record Settings(string Model, int PromptTokens, int GeneratedTokens, int Repetitions, int? Threads);

    /// <summary>Measures, prints a table, writes <c>OUT/cpu-e2e.json</c>; 0 when it ran to the end, 1 with the error in the file.</summary>
    internal static int Run(Settings s, string? outDir)
    {
        var rows = new List<BenchRow>();
        string? error = null;
        var copyGbs = 0.0;
        var threads = s.Threads ?? Environment.ProcessorCount;
        try
        {
            ArgumentOutOfRangeException.ThrowIfNegativeOrZero(s.PromptTokens, "--pp");
            ArgumentOutOfRangeException.ThrowIfNegativeOrZero(s.GeneratedTokens, "--tg");
            ArgumentOutOfRangeException.ThrowIfNegativeOrZero(s.Repetitions, "--reps");
            ArgumentOutOfRangeException.ThrowIfNegativeOrZero(threads, "--threads");
            copyGbs = HostCopyGbs();
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"cpu: {Environment.ProcessorCount} processors, {threads} threads, host copy {copyGbs:F1} GB/s (read + write)"));
            Measure(s, threads, copyGbs, rows);
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            error = $"{e.GetType().Name}: {e.Message}";
            Console.Error.WriteLine($"run-bench {Name} failed after {rows.Count} rows: {e}");
        }

        BenchReport.WriteFile(outDir, Name, new BenchFile($"cpu ({Environment.ProcessorCount} processors, {RuntimeInformation.OSArchitecture}, {threads} threads)",
            null, null, BenchReport.Commit, BenchReport.Now, copyGbs > 0 ? Math.Round(copyGbs, 1) : null, rows, error));
        return error is null ? 0 : 1;
    }

    private static void Measure(Settings s, int threads, double copyGbs, List<BenchRow> rows)
    {
        string? temporary = null;
        try
        {
            var (folder, name) = s.Model switch
            {
                "demo" => (DemoModel.Ensure(out _), "demo"),
                _ when Directory.Exists(s.Model) => (s.Model, Path.GetFileName(Path.TrimEndingDirectorySeparator(Path.GetFullPath(s.Model)))),
                _ => (temporary = WritePreset(s.Model), s.Model),
            };
            using var checkpoint = Checkpoint.Open(folder);
            var config = checkpoint.Config;
            var length = Math.Max(s.PromptTokens, s.GeneratedTokens);
            if (length >= config.MaxPositionEmbeddings)
            {
                throw new ArgumentException($"{length} tokens do not fit the model's {config.MaxPositionEmbeddings} positions");
            }

            using var backend = new CpuBackend(CpuNumerics.Float32, threads);
            using var model = DeepSeekModel.Load(checkpoint, backend,
                new ModelOptions { MaxSequenceLength = length + 1, LoadMtp = false });
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"{name}: {config.NumHiddenLayers} layers, hidden {config.HiddenSize}, vocab {config.VocabSize}; pp{s.PromptTokens} tg{s.GeneratedTokens}, 1 warm-up + {s.Repetitions} runs"));
            Console.WriteLine("| bench | model | tokens | tokens/s | ± sd | ms per run | floor ms | ratio |");
            Console.WriteLine("|---|---|---:|---:|---:|---:|---:|---:|");

            var prompt = Prompt(config, s.PromptTokens);
            using var session = model.CreateSession();
            var logits = new float[config.VocabSize];

            void Prefill()
            {
                session.Truncate(0);
                session.Forward(prompt, logits);
            }

            int[] Generate()
            {
                session.Truncate(0);
                var tokens = new int[s.GeneratedTokens];
                var next = config.BosTokenId;
                for (var i = 0; i < tokens.Length; i++)
                {
                    session.Forward([next], logits);
                    next = tokens[i] = Sampler.ArgMax(logits);
                }

                return tokens;
            }

            var flops = StepCost.PrefillFlops(config, s.PromptTokens);
            rows.Add(Row("cpu_pp", name, s, threads, s.PromptTokens, Time(s.Repetitions, Prefill), flops, StepCost.PrefillBytes(config, s.PromptTokens), copyGbs));

            var expected = Generate(); // warm-up, and the tokens every repetition must produce
            var tgBytes = Enumerable.Range(0, s.GeneratedTokens).Sum(context => StepCost.DecodeBytes(config, 1, context));
            var tgTimes = Time(s.Repetitions, () =>
            {
                var tokens = Generate();
                if (!tokens.AsSpan().SequenceEqual(expected))
                {
                    throw new InvalidOperationException("a repetition of tg generated other tokens than the warm-up: the session does not restart cleanly");
                }
            }, warmUp: false);
            rows.Add(Row("cpu_tg", name, s, threads, s.GeneratedTokens, tgTimes, StepCost.PrefillFlops(config, s.GeneratedTokens), tgBytes, copyGbs));
        }
        finally
        {
            if (temporary is not null)
            {
                Directory.Delete(temporary, recursive: true);
            }
        }
    }

    private static string WritePreset(string preset)
    {
        var config = ModelPresets.ByName(preset);
        var dir = Path.Combine(Path.GetTempPath(), "dscuda-cpu-e2e-" + Guid.NewGuid().ToString("N")[..8]);
        SyntheticCheckpoint.Write(dir, config, seed: 1, shards: 1);
        return dir;
    }

    /// <summary>Token ids spread over the vocabulary, fixed for a given model (the same prompt for every run).</summary>
    private static int[] Prompt(ModelConfig config, int tokens)
    {
        var rng = new Random(1);
        return [.. Enumerable.Range(0, tokens).Select(_ => rng.Next(config.VocabSize))];
    }

    /// <summary>Seconds of each of <paramref name="runs"/> timed calls, after one untimed call when <paramref name="warmUp"/>.</summary>
    private static double[] Time(int runs, Action call, bool warmUp = true)
    {
        if (warmUp)
        {
            call();
        }

        var seconds = new double[runs];
        for (var r = 0; r < runs; r++)
        {
            var clock = Stopwatch.StartNew();
            call();
            seconds[r] = clock.Elapsed.TotalSeconds;
        }

        return seconds;
    }

    private static BenchRow Row(string bench, string model, Settings s, int threads, int tokens, double[] seconds, double flops, double bytes, double copyGbs)
    {
        var rates = seconds.Select(t => tokens / t).ToArray();
        var mean = rates.Average();
        var sd = rates.Length > 1 ? Math.Sqrt(rates.Sum(r => (r - mean) * (r - mean)) / (rates.Length - 1)) : 0;
        var us = seconds.Average() * 1e6;
        var floorUs = bytes / (copyGbs * 1e9) * 1e6;
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"| {bench} | {model} | {tokens} | {mean:F1} | {sd:F1} | {us / 1e3:F1} | {floorUs / 1e3:F2} | {floorUs / us:F4} |"));
        var shape = new Dictionary<string, object> { ["model"] = model, ["tokens"] = tokens, ["threads"] = threads, ["reps"] = s.Repetitions };
        return new BenchRow(bench, shape, Math.Round(us, 2), Math.Round(flops / (us * 1e-6) / 1e12, 6), Math.Round(bytes / (us * 1e-6) / 1e9, 3),
            "floor", Math.Round(floorUs, 2), Math.Round(floorUs / us, 6))
        {
            TokensPerS = Math.Round(mean, 3),
            TokensPerSSd = Math.Round(sd, 3),
        };
    }

    /// <summary>Same-run host copy bandwidth, GB/s counting read and write: the median of 5 copies of 256 MiB.</summary>
    private static double HostCopyGbs()
    {
        const int bytes = 256 << 20;
        var source = GC.AllocateUninitializedArray<byte>(bytes);
        var destination = GC.AllocateUninitializedArray<byte>(bytes);
        source.AsSpan().Fill(1);
        source.AsSpan().CopyTo(destination); // touch every page first
        var seconds = new double[5];
        for (var i = 0; i < seconds.Length; i++)
        {
            var clock = Stopwatch.StartNew();
            source.AsSpan().CopyTo(destination);
            seconds[i] = clock.Elapsed.TotalSeconds;
        }

        Array.Sort(seconds);
        return 2.0 * bytes / seconds[seconds.Length / 2] / 1e9;
    }
}
