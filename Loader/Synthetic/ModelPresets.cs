using System.Globalization;
using System.Text.RegularExpressions;

namespace DeepSeekCuda.Loader.Synthetic;

/// <summary>Named DeepSeek-V3-architecture configs for synthetic checkpoints, tests and benchmarks.</summary>
internal static partial class ModelPresets
{
    /// <summary>
    /// A tiny model (forward passes in milliseconds) shaped unlike tiny-a on purpose: hidden 192 and most
    /// other widths are not multiples of 128 (partial scale blocks on both edges), 3 heads, 12 experts
    /// in 3 groups, 2 shared experts, vocabulary 500, YaRN factor 8 over 128 positions, rope_theta 50000,
    /// one MTP layer.
    /// </summary>
    public static ModelConfig Tiny { get; } = new ModelConfig
    {
        VocabSize = 500,
        HiddenSize = 192,
        IntermediateSize = 320,
        MoeIntermediateSize = 96,
        NumHiddenLayers = 3,
        NumNextNPredictLayers = 1,
        NumAttentionHeads = 3,
        NSharedExperts = 2,
        NRoutedExperts = 12,
        RoutedScalingFactor = 1.5,
        KvLoraRank = 80,
        QLoraRank = 96,
        QkRopeHeadDim = 16,
        QkNopeHeadDim = 32,
        VHeadDim = 40,
        NGroup = 3,
        TopkGroup = 2,
        NumExpertsPerTok = 3,
        FirstKDenseReplace = 1,
        MoeLayerFreq = 1,
        NormTopkProb = true,
        RmsNormEps = 1e-6,
        RopeTheta = 50000,
        RopeScaling = new RopeScaling(8, 128, 32, 1, 1.0, 1.0),
        MaxPositionEmbeddings = 1024,
        Quantization = new Fp8Quantization(128, 128, "dynamic"),
        BosTokenId = 0,
        EosTokenId = 1,
        TieWordEmbeddings = false,
    }.Validate();

    /// <summary>DeepSeek-V3 / R1 671B exactly as its config.json (MODEL.md §1).</summary>
    public static ModelConfig DeepSeekV3 { get; } = new ModelConfig
    {
        VocabSize = 129280,
        HiddenSize = 7168,
        IntermediateSize = 18432,
        MoeIntermediateSize = 2048,
        NumHiddenLayers = 61,
        NumNextNPredictLayers = 1,
        NumAttentionHeads = 128,
        NSharedExperts = 1,
        NRoutedExperts = 256,
        RoutedScalingFactor = 2.5,
        KvLoraRank = 512,
        QLoraRank = 1536,
        QkRopeHeadDim = 64,
        QkNopeHeadDim = 128,
        VHeadDim = 128,
        NGroup = 8,
        TopkGroup = 4,
        NumExpertsPerTok = 8,
        FirstKDenseReplace = 3,
        MoeLayerFreq = 1,
        NormTopkProb = true,
        RmsNormEps = 1e-6,
        RopeTheta = 10000,
        RopeScaling = new RopeScaling(40, 4096, 32, 1, 1.0, 1.0),
        MaxPositionEmbeddings = 163840,
        Quantization = new Fp8Quantization(128, 128, "dynamic"),
        BosTokenId = 0,
        EosTokenId = 1,
        TieWordEmbeddings = false,
    }.Validate();

    /// <summary>
    /// DeepSeek-V3 at full width with <paramref name="layers"/> main layers (layer 0 dense, the rest MoE
    /// when there are two or more) and no MTP layer: a benchmark model whose every layer has the real
    /// shapes. Each MoE layer stores about 11 GB of FP8 experts.
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="layers"/> is not 1..61.</exception>
    public static ModelConfig DeepSeekV3Slice(int layers)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(layers, 1);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(layers, 61);
        return (DeepSeekV3 with
        {
            NumHiddenLayers = layers,
            NumNextNPredictLayers = 0,
            FirstKDenseReplace = 1,
        }).Validate();
    }

    /// <summary>The names <see cref="ByName"/> accepts (<c>N</c> stands for a layer count).</summary>
    public static IReadOnlyList<string> Names { get; } = ["tiny", "deepseek-v3", "deepseek-r1", "deepseek-v3-sliceN"];

    /// <summary>A preset by name, case-insensitive: <c>tiny</c>, <c>deepseek-v3</c> (alias <c>deepseek-r1</c>), <c>deepseek-v3-slice4</c>.</summary>
    /// <exception cref="ArgumentException">Unknown name; the message lists the valid ones.</exception>
    public static ModelConfig ByName(string name)
    {
        ArgumentNullException.ThrowIfNull(name);
        var key = name.Trim().ToLowerInvariant();
        switch (key)
        {
            case "tiny":
                return Tiny;
            case "deepseek-v3" or "deepseek-r1":
                return DeepSeekV3;
        }

        var m = SliceName().Match(key);
        if (m.Success && int.TryParse(m.Groups[1].Value, NumberStyles.None, CultureInfo.InvariantCulture, out var layers) && layers is >= 1 and <= 61)
        {
            return DeepSeekV3Slice(layers);
        }

        throw new ArgumentException(
            $"unknown model preset '{name}'; valid: {string.Join(", ", Names)} (N = 1..61, e.g. deepseek-v3-slice4)", nameof(name));
    }

    [GeneratedRegex("^deepseek-v3-slice([0-9]{1,2})$")]
    private static partial Regex SliceName();
}
