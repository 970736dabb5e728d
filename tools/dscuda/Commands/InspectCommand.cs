using System.CommandLine;
using System.Globalization;
using DeepSeekCuda.Loader;

namespace DeepSeekCuda.Cli.Commands;

/// <summary><c>dscuda inspect</c>: validate a checkpoint and print what running it takes.</summary>
internal static class InspectCommand
{
    public static Command Create()
    {
        var model = ModelOption.Create();
        var command = new Command("inspect", "Validate a checkpoint and print its config, parameters, bytes per dtype and memory per GPU")
        {
            model,
        };
        command.SetAction(parse =>
        {
            var dir = ModelOption.Resolve(parse.GetValue(model), parse.InvocationConfiguration.Error);
            using var checkpoint = Checkpoint.Open(dir);
            parse.InvocationConfiguration.Output.Write(Describe(checkpoint));
            return 0;
        });
        return command;
    }

    public static string Describe(Checkpoint checkpoint)
    {
        var c = checkpoint.Config;
        var stats = CheckpointStats.Compute(c);
        var w = new StringWriter(CultureInfo.InvariantCulture);
        w.WriteLine($"checkpoint   {checkpoint.Directory}");
        w.WriteLine($"shards       {checkpoint.ShardFiles.Count()}, {checkpoint.Tensors.Count} tensors, {Bytes(checkpoint.TotalTensorBytes)}: valid for its config");
        w.WriteLine();
        w.WriteLine("config");
        w.WriteLine($"  layers          {c.NumHiddenLayers} ({c.FirstKDenseReplace} dense, {Enumerable.Range(0, c.NumHiddenLayers).Count(c.IsMoeLayer)} MoE) + {c.NumNextNPredictLayers} MTP");
        w.WriteLine($"  hidden          {c.HiddenSize}, vocab {c.VocabSize}, max positions {c.MaxPositionEmbeddings}");
        w.WriteLine($"  attention       MLA, {c.NumAttentionHeads} heads, q_lora {c.QLoraRank?.ToString(CultureInfo.InvariantCulture) ?? "none"}, kv_lora {c.KvLoraRank}, head dims nope {c.QkNopeHeadDim} + rope {c.QkRopeHeadDim}, v {c.VHeadDim}");
        w.WriteLine($"  MoE             {c.NRoutedExperts} routed x {c.MoeIntermediateSize} + {c.NSharedExperts} shared, top-{c.NumExpertsPerTok} in {c.TopkGroup} of {c.NGroup} groups, scale {c.RoutedScalingFactor}");
        w.WriteLine($"  dense MLP       {c.IntermediateSize}");
        w.WriteLine(c.RopeScaling is { } y
            ? $"  RoPE            theta {c.RopeTheta}, YaRN factor {y.Factor} from {y.OriginalMaxPositionEmbeddings}, beta {y.BetaFast}/{y.BetaSlow}; softmax scale {c.SoftmaxScale:G7}"
            : $"  RoPE            theta {c.RopeTheta}, no scaling; softmax scale {c.SoftmaxScale:G7}");
        w.WriteLine(c.Quantization is { } q
            ? $"  weights         FP8 e4m3, {q.BlockRows}x{q.BlockCols} block scales, activations {q.ActivationScheme}"
            : "  weights         BF16 (unquantized)");
        w.WriteLine();
        w.WriteLine("parameters");
        w.WriteLine($"  total (main)    {Count(stats.MainParameters)}");
        w.WriteLine($"  MTP module      {Count(stats.MtpParameters)}");
        w.WriteLine($"  active / token  {Count(stats.ActiveParameters)} (all but the unchosen routed experts)");
        w.WriteLine();
        w.WriteLine("bytes per dtype");
        foreach (var group in checkpoint.Tensors.Values.GroupBy(t => t.DType).OrderByDescending(g => g.Sum(t => t.ByteLength)))
        {
            w.WriteLine($"  {group.Key,-8}        {Bytes(group.Sum(t => t.ByteLength)),12}  ({group.Count()} tensors)");
        }

        w.WriteLine();
        w.WriteLine($"memory per GPU (main model weights split evenly; BF16 latent KV cache {Bytes(stats.KvCacheBytesPerToken)} per token, layers split)");
        w.WriteLine("  GPUs    weights        KV per 1K tokens   KV at max positions");
        foreach (var n in new[] { 1, 2, 4, 8 })
        {
            w.WriteLine($"  {n,-4}    {Bytes(stats.MainWeightBytes / n),-13}  {Bytes(stats.KvCacheBytesPerToken * 1024 / n),-17}  {Bytes(stats.KvCacheBytesPerToken * c.MaxPositionEmbeddings / n)}");
        }

        return w.ToString();
    }

    private static string Count(long n) => n switch
    {
        >= 1_000_000_000 => string.Create(CultureInfo.InvariantCulture, $"{n / 1e9:F2} B ({n:N0})"),
        >= 1_000_000 => string.Create(CultureInfo.InvariantCulture, $"{n / 1e6:F2} M ({n:N0})"),
        _ => n.ToString("N0", CultureInfo.InvariantCulture),
    };

    internal static string Bytes(long n) => n switch
    {
        >= 1L << 30 => string.Create(CultureInfo.InvariantCulture, $"{n / (double)(1L << 30):F2} GiB"),
        >= 1L << 20 => string.Create(CultureInfo.InvariantCulture, $"{n / (double)(1L << 20):F2} MiB"),
        >= 1L << 10 => string.Create(CultureInfo.InvariantCulture, $"{n / 1024.0:F1} KiB"),
        _ => string.Create(CultureInfo.InvariantCulture, $"{n} B"),
    };
}
