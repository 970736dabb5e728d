using System.Text.Json.Serialization;

namespace DeepSeekCuda.Bench.Harness;

/// <summary>
/// One GPU bench's file: <c>{"device", "driver", "cuda", "commit", "date", "copy_gbs", "results": [...], "error"}</c>.
/// <see cref="Error"/> is null when the bench ran to the end; otherwise it says why it stopped (no device, an
/// exception), and <see cref="Results"/> holds the rows measured before that.
/// </summary>
internal sealed record BenchFile(
    string? Device, string? Driver, string? Cuda, string? Commit, string Date, double? CopyGbs, IReadOnlyList<BenchRow> Results, string? Error);

/// <summary>
/// One row of <see cref="BenchFile.Results"/>; <see cref="Ratio"/> = baseline_us / us. The end-to-end CPU bench adds
/// the mean and sample standard deviation of tokens/s over its repetitions; other benches leave them out of the file.
/// </summary>
internal sealed record BenchRow(
    string Bench, IReadOnlyDictionary<string, object> Shape, double Us, double Tflops, double Gbs, string Baseline, double BaselineUs, double Ratio)
{
    [JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)]
    public double? TokensPerS { get; init; }

    [JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)]
    public double? TokensPerSSd { get; init; }
}

/// <summary><c>run-bench tokenizer</c>'s file.</summary>
internal sealed record TokenizerFile(string Bench, int Threads, string Machine, int Processors, string Runtime, IReadOnlyList<TokenizerRow> Results);

/// <summary>One corpus of <see cref="TokenizerFile.Results"/>.</summary>
internal sealed record TokenizerRow(string Corpus, double Megabytes, int Tokens, int Runs, double MedianMbPerS, double BestMbPerS);

/// <summary>
/// Every JSON file run-bench writes, through source generation: the bundle that travels to the GPU server is trimmed,
/// and trimming disables reflection-based serialization. Shape values are numbers and strings, listed here so that
/// the <c>object</c>-typed dictionary values serialize by their runtime type.
/// </summary>
[JsonSourceGenerationOptions(WriteIndented = true, PropertyNamingPolicy = JsonKnownNamingPolicy.SnakeCaseLower)]
[JsonSerializable(typeof(BenchFile))]
[JsonSerializable(typeof(TokenizerFile))]
[JsonSerializable(typeof(PreflightReport))]
[JsonSerializable(typeof(int))]
[JsonSerializable(typeof(long))]
[JsonSerializable(typeof(double))]
[JsonSerializable(typeof(string))]
[JsonSerializable(typeof(bool))]
internal sealed partial class BenchJson : JsonSerializerContext;
