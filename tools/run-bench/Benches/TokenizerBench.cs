using System.CommandLine;
using System.Diagnostics;
using System.Text;
using System.Text.Json;
using DeepSeekCuda.Bench.Harness;
using DeepSeekCuda.Text;

namespace DeepSeekCuda.Bench.Benches;

/// <summary>
/// Encode throughput of <see cref="BpeTokenizer"/> on one thread, in MB/s of UTF-8 input: a mixed
/// corpus (the shared encode cases: many scripts, emoji, random strings) and an English-only one.
/// </summary>
internal static class TokenizerBench
{
    private const int CorpusBytes = 4 << 20;
    private const int Runs = 7;

    public static Command Create()
    {
        var tokenizerOption = new Option<string>("--tokenizer") { Description = "Folder holding tokenizer.json and encode-cases.json", Required = true };
        var outOption = new Option<string?>("--out") { Description = "Folder to write tokenizer_encode.json into" };
        var command = new Command("tokenizer", "Tokenizer encode throughput (MB/s, median of several runs)");
        command.Options.Add(tokenizerOption);
        command.Options.Add(outOption);
        command.SetAction(parseResult => Run(parseResult.GetValue(tokenizerOption)!, parseResult.GetValue(outOption)));
        return command;
    }

    private static int Run(string folder, string? outDir)
    {
        BpeTokenizer tokenizer;
        string[] texts;
        try
        {
            var load = Stopwatch.StartNew();
            tokenizer = BpeTokenizer.Load(folder);
            Console.WriteLine($"load: {load.Elapsed.TotalMilliseconds:F0} ms");
            using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(folder, "encode-cases.json")));
            texts = doc.RootElement.GetProperty("cases").EnumerateArray().Select(c => c.GetProperty("text").GetString()!).ToArray();
        }
        catch (Exception ex) when (ex is IOException or TokenizerFormatException or JsonException or KeyNotFoundException)
        {
            Console.Error.WriteLine($"run-bench tokenizer: {ex.Message}");
            return 1;
        }

        var corpora = new (string Name, string Text)[]
        {
            ("mixed (encode-cases)", Repeat(texts, "\n")),
            ("english", Repeat([English], " ")),
        };

        var results = new List<TokenizerRow>();
        Console.WriteLine($"{"corpus",-22} {"MB",6} {"tokens",10} {"median MB/s",12} {"best MB/s",10} {"Mtok/s",8}");
        foreach (var (name, text) in corpora)
        {
            var megabytes = Encoding.UTF8.GetByteCount(text) / 1e6;
            var tokens = tokenizer.Encode(text, addBos: false).Length; // warm-up: JIT, regex, piece cache
            tokenizer.Encode(text, addBos: false);
            var seconds = new double[Runs];
            for (var r = 0; r < Runs; r++)
            {
                var sw = Stopwatch.StartNew();
                tokenizer.Encode(text, addBos: false);
                seconds[r] = sw.Elapsed.TotalSeconds;
            }

            Array.Sort(seconds);
            var median = megabytes / seconds[Runs / 2];
            var best = megabytes / seconds[0];
            Console.WriteLine($"{name,-22} {megabytes,6:F2} {tokens,10} {median,12:F1} {best,10:F1} {tokens / seconds[Runs / 2] / 1e6,8:F2}");
            results.Add(new TokenizerRow(name, Math.Round(megabytes, 3), tokens, Runs, Math.Round(median, 2), Math.Round(best, 2)));
        }

        if (outDir is not null)
        {
            Directory.CreateDirectory(outDir);
            var json = JsonSerializer.Serialize(new TokenizerFile("tokenizer_encode", 1, Environment.MachineName, Environment.ProcessorCount,
                System.Runtime.InteropServices.RuntimeInformation.FrameworkDescription, results), BenchJson.Default.TokenizerFile);
            File.WriteAllText(Path.Combine(outDir, "tokenizer_encode.json"), json);
        }

        return 0;
    }

    private static string Repeat(string[] parts, string separator)
    {
        var sb = new StringBuilder(CorpusBytes + 4096);
        var i = 0;
        while (sb.Length < CorpusBytes)
        {
            sb.Append(parts[i++ % parts.Length]).Append(separator);
        }

        return sb.ToString();
    }

    // Plain English prose, so the English figure reflects ordinary text rather than code or symbols.
    private const string English =
        "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness, " +
        "it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it was the season of Darkness. " +
        "The committee reviewed 42 proposals over three days and, after a long discussion about budgets and timelines, " +
        "approved the plan to rebuild the old library near the river. Residents said they were pleased with the decision, " +
        "although several asked why the work would not begin until next spring. \"We have waited a long time,\" one of them said.\n";
}
