using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Text.Json;
using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Bench.Harness;
using DeepSeekCuda.Hosting;
using DeepSeekCuda.Inference.Constraints;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Model;
using DeepSeekCuda.Text;

namespace DeepSeekCuda.Bench.Benches;

/// <summary>
/// Constrained decoding on the CPU (<see cref="GrammarConstraint"/>), on a real tokenizer's vocabulary: the time to
/// build the <see cref="TokenVocabulary"/> (trie), and per generated token the time of <c>Mask</c> + <c>Advance</c>
/// along a realistic JSON document constrained by a schema (the tokenizer's own encoding of it, one token per step).
/// Rows: <c>constraint_vocab</c> (one build), <c>constraint_first_mask</c> (mean over the steps whose state had no
/// cached mask: one trie walk), <c>constraint_cached_mask</c> (mean over the steps served from the cache, in a second
/// pass with the cache warm), <c>constraint_token</c> (mean Mask + Advance per token of a cold pass: what a request
/// with a new schema pays). Baseline <c>cpu_step</c>: one decode step of the embedded demo model (or <c>--model</c>) on
/// the CPU backend in the same run (a tiny model: a floor for what a step costs, not DeepSeek-V3's step), so ratio =
/// step µs / µs; without a baseline (<c>--no-baseline</c>) the rows say <c>none</c> and ratio 0.
/// </summary>
internal static class ConstraintBench
{
    /// <summary>The bench's name: its subcommand and its JSON file.</summary>
    public const string Name = "constraint";

    private const string Schema = """
        {"type":"object","properties":{
          "name":{"type":"string","description":"full name"},
          "age":{"type":"integer"},
          "height":{"type":"number"},
          "active":{"type":"boolean"},
          "mood":{"type":"string","enum":["Happy","Sad","Thoughtful"]},
          "tags":{"type":"array","items":{"type":"string"}},
          "home":{"type":"object","properties":{"street":{"type":"string"},"city":{"type":"string"},"zip":{"type":["integer","null"]}},"required":["street","city","zip"]},
          "past":{"type":"array","items":{"$ref":"#/properties/home"}},
          "note":{"type":["string","null"]}},
         "required":["name","age","height","active","mood","tags","home","past","note"]}
        """;

    private const string Document = """
        {
          "name": "Zoë Ångström-Okafor",
          "age": 42,
          "height": 1.78,
          "active": true,
          "mood": "Thoughtful",
          "tags": ["hiking", "chess", "日本語の勉強", "cooking for friends on weekends"],
          "home": {"street": "12 Rue de la Paix", "city": "Paris", "zip": 75002},
          "past": [
            {"street": "1600 Amphitheatre Parkway", "city": "Mountain View", "zip": 94043},
            {"street": "Bahnhofstrasse 1", "city": "Zürich", "zip": null}
          ],
          "note": "Prefers email; replies within a day.\nAllergic to peanuts 🥜."
        }
        """;

    public static Command Create()
    {
        var tokenizerOption = new Option<string>("--tokenizer") { Description = "Folder holding tokenizer.json (DeepSeek-V3's)", Required = true };
        var reps = new Option<int>("--reps") { Description = "Cold passes over the document, each with a new grammar (default 3)", DefaultValueFactory = _ => 3 };
        var baseline = new Option<bool>("--no-baseline") { Description = "Skip the CPU model step baseline" };
        var model = new Option<string>("--model") { Description = "Checkpoint folder of the baseline's CPU model (default: the embedded demo model)", DefaultValueFactory = _ => "demo" };
        var outOption = new Option<string?>("--out") { Description = "Folder to write constraint.json into" };
        var command = new Command(Name, "Constrained decoding mask time per token on a real vocabulary (vocabulary build, first mask, cached mask)");
        foreach (var o in new Option[] { tokenizerOption, reps, baseline, model, outOption })
        {
            command.Options.Add(o);
        }

        command.SetAction(p => Run(p.GetValue(tokenizerOption)!, p.GetValue(reps), p.GetValue(baseline) ? null : p.GetValue(model)!, p.GetValue(outOption)));
        return command;
    }

    /// <summary>Measures, prints a table, writes <c>OUT/constraint.json</c>; 0 when it ran to the end, 1 with the error in the file.</summary>
    internal static int Run(string tokenizerFolder, int repetitions, string? baselineModel, string? outDir)
    {
        var rows = new List<BenchRow>();
        string? error = null;
        try
        {
            ArgumentOutOfRangeException.ThrowIfNegativeOrZero(repetitions, "--reps");
            Measure(BpeTokenizer.Load(tokenizerFolder), repetitions, baselineModel, rows);
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            error = $"{e.GetType().Name}: {e.Message}";
            Console.Error.WriteLine($"run-bench {Name} failed after {rows.Count} rows: {e}");
        }

        BenchReport.WriteFile(outDir, Name, new BenchFile($"cpu ({Environment.ProcessorCount} processors, {RuntimeInformation.OSArchitecture}, 1 thread)",
            null, null, BenchReport.Commit, BenchReport.Now, null, rows, error));
        return error is null ? 0 : 1;
    }

    private static void Measure(ITokenizer tokenizer, int repetitions, string? baselineModel, List<BenchRow> rows)
    {
        var stepUs = baselineModel is null ? 0 : CpuStepUs(baselineModel == "demo" ? DemoModel.Ensure(out _) : baselineModel);
        var clock = Stopwatch.StartNew();
        var vocabulary = TokenVocabulary.Create(tokenizer);
        var vocabUs = clock.Elapsed.TotalMicroseconds;
        using var schema = JsonDocument.Parse(Schema);
        var ids = tokenizer.EncodeLiteral(Document.Trim());
        var logits = new float[tokenizer.VocabSize];
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"vocabulary: {tokenizer.VocabSize} ids, {vocabulary.Trie.Count} trie nodes, built in {vocabUs / 1e3:F0} ms; document: {ids.Length} tokens"));

        var firstUs = new List<double>();
        var cachedUs = new List<double>();
        var tokenUs = new List<double>();
        for (var r = 0; r <= repetitions; r++)
        {
            // Pass 0 warms the JIT and is not counted; every pass gets a new grammar, so a cold cache.
            var grammar = Grammar.JsonSchema(schema.RootElement);
            var cold = Pass(grammar, vocabulary, ids, logits, out var misses);
            var warm = Pass(grammar, vocabulary, ids, logits, out var warmMisses);
            if (warmMisses.Any(m => m))
            {
                throw new InvalidOperationException("the second pass over the same document missed the mask cache");
            }

            if (r == 0)
            {
                continue;
            }

            var slowest = Enumerable.Range(0, ids.Length).MaxBy(i => cold[i].Mask);
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"pass {r}: slowest Mask {cold[slowest].Mask:F0} µs, before token {slowest} {JsonSerializer.Serialize(tokenizer.Decode([ids[slowest]]), BenchJson.Default.String)} after {JsonSerializer.Serialize(tokenizer.Decode(ids.AsSpan(Math.Max(0, slowest - 4), Math.Min(4, slowest))), BenchJson.Default.String)}"));
            for (var i = 0; i < ids.Length; i++)
            {
                (misses[i] ? firstUs : cachedUs).Add(cold[i].Mask);
                tokenUs.Add(cold[i].Mask + cold[i].Advance);
                cachedUs.Add(warm[i].Mask);
            }
        }

        var shape = new Dictionary<string, object> { ["vocab"] = tokenizer.VocabSize, ["tokens"] = ids.Length, ["reps"] = repetitions };
        Console.WriteLine("| bench | samples | µs | cpu step µs | ratio |");
        Console.WriteLine("|---|---:|---:|---:|---:|");
        rows.Add(Row("constraint_vocab", shape, 1, vocabUs, stepUs));
        rows.Add(Row("constraint_first_mask", shape, firstUs.Count, firstUs.Average(), stepUs));
        rows.Add(Row("constraint_cached_mask", shape, cachedUs.Count, cachedUs.Average(), stepUs));
        rows.Add(Row("constraint_token", shape, tokenUs.Count, tokenUs.Average(), stepUs));
        tokenUs.Sort();
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"cold pass per token: median {tokenUs[tokenUs.Count / 2]:F1} µs, p90 {tokenUs[tokenUs.Count * 9 / 10]:F1} µs, max {tokenUs[^1]:F1} µs; {firstUs.Count / repetitions} of {ids.Length} steps walked the trie"));
    }

    /// <summary>Mask and Advance times (µs) of each token of <paramref name="ids"/>, and which Mask computed rather than hit the cache.</summary>
    private static (double Mask, double Advance)[] Pass(Grammar grammar, TokenVocabulary vocabulary, int[] ids, float[] logits, out bool[] misses)
    {
        var constraint = new GrammarConstraint(grammar, vocabulary);
        var times = new (double, double)[ids.Length];
        misses = new bool[ids.Length];
        for (var i = 0; i < ids.Length; i++)
        {
            Array.Clear(logits);
            var hits = constraint.Compiled.CacheHits;
            var t0 = Stopwatch.GetTimestamp();
            constraint.Mask(logits);
            var t1 = Stopwatch.GetTimestamp();
            if (float.IsNegativeInfinity(logits[ids[i]]))
            {
                throw new InvalidOperationException($"token {i} of the document is masked");
            }

            constraint.Advance(ids[i]);
            var t2 = Stopwatch.GetTimestamp();
            misses[i] = constraint.Compiled.CacheHits == hits;
            times[i] = (Stopwatch.GetElapsedTime(t0, t1).TotalMicroseconds, Stopwatch.GetElapsedTime(t1, t2).TotalMicroseconds);
        }

        if (!constraint.IsComplete)
        {
            throw new InvalidOperationException("the document did not complete the grammar");
        }

        return times;
    }

    /// <summary>The mean decode step of a model (the demo model by default) on the CPU backend, one thread, µs (8 steps after 2 warm-up).</summary>
    private static double CpuStepUs(string folder)
    {
        using var checkpoint = Checkpoint.Open(folder);
        using var backend = new CpuBackend(CpuNumerics.Float32, 1);
        using var model = DeepSeekModel.Load(checkpoint, backend, new ModelOptions { MaxSequenceLength = 16, LoadMtp = false });
        using var session = model.CreateSession();
        var logits = new float[checkpoint.Config.VocabSize];
        var next = checkpoint.Config.BosTokenId;
        var clock = new Stopwatch();
        for (var i = 0; i < 10; i++)
        {
            if (i == 2)
            {
                clock.Start();
            }

            session.Forward([next], logits);
            next = Inference.Sampler.ArgMax(logits);
        }

        return clock.Elapsed.TotalMicroseconds / 8;
    }

    private static BenchRow Row(string bench, Dictionary<string, object> shape, int samples, double us, double stepUs)
    {
        var ratio = stepUs > 0 ? stepUs / us : 0;
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"| {bench} | {samples} | {us:F1} | {stepUs:F1} | {ratio:F3} |"));
        return new BenchRow(bench, new Dictionary<string, object>(shape) { ["samples"] = samples }, Math.Round(us, 2), 0, 0,
            stepUs > 0 ? "cpu_step" : "none", Math.Round(stepUs, 2), Math.Round(ratio, 6));
    }
}
