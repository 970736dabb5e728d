using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace DeepSeekCuda.Loader;

/// <summary>YaRN rotary scaling (<c>rope_scaling</c> with type <c>yarn</c>).</summary>
public sealed record RopeScaling(
    double Factor,
    int OriginalMaxPositionEmbeddings,
    double BetaFast,
    double BetaSlow,
    double MScale,
    double MScaleAllDim);

/// <summary>FP8 block quantization of the linear weights (<c>quantization_config</c>).</summary>
public sealed record Fp8Quantization(int BlockRows, int BlockCols, string ActivationScheme)
{
    /// <summary>DeepSeek-V3's: 128x128 blocks, dynamic activation scales (what FP8 weights of a config without <c>quantization_config</c> are read with).</summary>
    public static Fp8Quantization Default { get; } = new(128, 128, "dynamic");
}

/// <summary>
/// A DeepSeek-V3 architecture config as read from Hugging Face <c>config.json</c>. Immutable; every
/// invariant the engine relies on is checked when it is built, and a violation names the field.
/// </summary>
public sealed record ModelConfig
{
    /// <summary>Rows of the embedding and lm_head.</summary>
    public required int VocabSize { get; init; }
    /// <summary>Model width D.</summary>
    public required int HiddenSize { get; init; }
    /// <summary>Width of the dense MLP.</summary>
    public required int IntermediateSize { get; init; }
    /// <summary>Width of each routed expert.</summary>
    public required int MoeIntermediateSize { get; init; }
    /// <summary>Main decoder layers.</summary>
    public required int NumHiddenLayers { get; init; }
    /// <summary>MTP layers stored after the main layers.</summary>
    public required int NumNextNPredictLayers { get; init; }
    /// <summary>Attention heads H.</summary>
    public required int NumAttentionHeads { get; init; }
    /// <summary>Shared experts per MoE layer.</summary>
    public required int NSharedExperts { get; init; }
    /// <summary>Routed experts per MoE layer.</summary>
    public required int NRoutedExperts { get; init; }
    /// <summary>Multiplier of the routed weights.</summary>
    public required double RoutedScalingFactor { get; init; }
    /// <summary>Latent width of the KV compression.</summary>
    public required int KvLoraRank { get; init; }
    /// <summary>Query compression width; null when a single q_proj replaces q_a/q_b.</summary>
    public required int? QLoraRank { get; init; }
    /// <summary>Rotary part of each q/k head.</summary>
    public required int QkRopeHeadDim { get; init; }
    /// <summary>Non-rotary part of each q/k head.</summary>
    public required int QkNopeHeadDim { get; init; }
    /// <summary>Value width per head.</summary>
    public required int VHeadDim { get; init; }
    /// <summary>Expert groups.</summary>
    public required int NGroup { get; init; }
    /// <summary>Groups kept per token.</summary>
    public required int TopkGroup { get; init; }
    /// <summary>Experts per token k.</summary>
    public required int NumExpertsPerTok { get; init; }
    /// <summary>Layers below this index are dense.</summary>
    public required int FirstKDenseReplace { get; init; }
    /// <summary>Every this-many layers is MoE (after the dense ones).</summary>
    public required int MoeLayerFreq { get; init; }
    /// <summary>Renormalize the k routing weights.</summary>
    public required bool NormTopkProb { get; init; }
    /// <summary>RMSNorm epsilon.</summary>
    public required double RmsNormEps { get; init; }
    /// <summary>RoPE base θ.</summary>
    public required double RopeTheta { get; init; }
    /// <summary>YaRN scaling, or null for plain RoPE.</summary>
    public required RopeScaling? RopeScaling { get; init; }
    /// <summary>Longest supported context.</summary>
    public required int MaxPositionEmbeddings { get; init; }
    /// <summary>FP8 block quantization, or null when the linear weights are stored unquantized.</summary>
    public required Fp8Quantization? Quantization { get; init; }
    /// <summary>Beginning-of-sentence id.</summary>
    public required int BosTokenId { get; init; }
    /// <summary>End-of-sentence id.</summary>
    public required int EosTokenId { get; init; }
    /// <summary>Whether lm_head shares the embedding (never for V3/R1; supported for synthetic models).</summary>
    public required bool TieWordEmbeddings { get; init; }

    /// <summary>q/k head width: nope + rope.</summary>
    public int QkHeadDim => QkNopeHeadDim + QkRopeHeadDim;

    /// <summary>Latent cache values per token per layer: kv_lora_rank + rope dims.</summary>
    public int KvCacheDim => KvLoraRank + QkRopeHeadDim;

    /// <summary>Experts per group.</summary>
    public int ExpertsPerGroup => NRoutedExperts / NGroup;

    /// <summary>Width of the shared experts' MLP.</summary>
    public int SharedIntermediateSize => NSharedExperts * MoeIntermediateSize;

    /// <summary>Main layers plus MTP layers: the layer indices the checkpoint stores.</summary>
    public int StoredLayerCount => NumHiddenLayers + NumNextNPredictLayers;

    /// <summary>Whether stored layer <paramref name="layer"/> (main or MTP) has a MoE feed-forward.</summary>
    public bool IsMoeLayer(int layer) => layer >= FirstKDenseReplace && layer % MoeLayerFreq == 0;

    /// <summary>
    /// Softmax scale of attention: qk_head_dim^-0.5, times mscale² under YaRN with factor &gt; 1, where
    /// mscale = 0.1·mscale_all_dim·ln(factor) + 1 (MODEL.md §3).
    /// </summary>
    public double SoftmaxScale
    {
        get
        {
            var scale = 1.0 / Math.Sqrt(QkHeadDim);
            if (RopeScaling is { Factor: > 1 } y)
            {
                var m = 0.1 * y.MScaleAllDim * Math.Log(y.Factor) + 1.0;
                scale *= m * m;
            }

            return scale;
        }
    }

    /// <summary>
    /// The largest routed_scaling_factor accepted (DeepSeek-V3: 2.5). The routed experts' weights are
    /// probabilities times this factor; far beyond it the BF16 residual stream overflows.
    /// </summary>
    public const double MaxRoutedScalingFactor = 1000;

    /// <summary>Reads and validates <c>config.json</c>.</summary>
    /// <exception cref="ModelConfigException">A field is missing, mistyped or invalid.</exception>
    /// <exception cref="CheckpointException">The file is missing, unreadable, not a regular file of its folder, or over <see cref="MaxFileBytes"/>.</exception>
    public static ModelConfig Load(string path)
    {
        path = Path.GetFullPath(path);
        var bytes = ModelFiles.ReadAllBytes(path, Path.GetDirectoryName(path)!, MaxFileBytes);
        string text;
        try
        {
            text = new UTF8Encoding(false, true).GetString(bytes);
        }
        catch (DecoderFallbackException e)
        {
            throw new ModelConfigException(path, "(root)", $"not valid UTF-8 (at byte {e.Index})", e);
        }

        return Parse(text, path);
    }

    /// <summary>The largest config.json read (DeepSeek-V3's is under 2 KB).</summary>
    public const long MaxFileBytes = 1 << 20;

    /// <summary>Parses and validates config JSON; <paramref name="path"/> names it in errors.</summary>
    public static ModelConfig Parse(string json, string? path = null)
    {
        JsonObject root;
        try
        {
            // Duplicate keys would make JsonObject throw ArgumentException later; refuse them while parsing.
            root = JsonNode.Parse(json, null, new JsonDocumentOptions { AllowDuplicateProperties = false }) as JsonObject
                ?? throw new ModelConfigException(path, "(root)", "config is not a JSON object");
        }
        catch (JsonException e)
        {
            throw new ModelConfigException(path, "(root)", $"not valid JSON: {e.Message}", e);
        }
        catch (InvalidOperationException e)
        {
            // The duplicate-key check unescapes every key: a lone surrogate ("\ud800") in one throws this.
            throw new ModelConfigException(path, "(root)", $"holds a JSON key that is not valid UTF-16: {e.Message}", e);
        }

        try
        {
            return ParseObject(root, path);
        }
        catch (InvalidOperationException e)
        {
            // JsonNode throws this when it unescapes a lone surrogate ("\ud800") in a key or string.
            throw new ModelConfigException(path, "(root)", $"holds a JSON string that is not valid UTF-16: {e.Message}", e);
        }
    }

    private static ModelConfig ParseObject(JsonObject root, string? path)
    {
        var r = new FieldReader(root, path);
        var config = new ModelConfig
        {
            VocabSize = r.Int("vocab_size"),
            HiddenSize = r.Int("hidden_size"),
            IntermediateSize = r.Int("intermediate_size"),
            MoeIntermediateSize = r.Int("moe_intermediate_size"),
            NumHiddenLayers = r.Int("num_hidden_layers"),
            NumNextNPredictLayers = r.Int("num_nextn_predict_layers", 0),
            NumAttentionHeads = r.Int("num_attention_heads"),
            NSharedExperts = r.Int("n_shared_experts", 0),
            NRoutedExperts = r.Int("n_routed_experts"),
            RoutedScalingFactor = r.Double("routed_scaling_factor", 1.0),
            KvLoraRank = r.Int("kv_lora_rank"),
            QLoraRank = r.NullableInt("q_lora_rank"),
            QkRopeHeadDim = r.Int("qk_rope_head_dim"),
            QkNopeHeadDim = r.Int("qk_nope_head_dim"),
            VHeadDim = r.Int("v_head_dim"),
            NGroup = r.Int("n_group", 1),
            TopkGroup = r.Int("topk_group", 1),
            NumExpertsPerTok = r.Int("num_experts_per_tok"),
            FirstKDenseReplace = r.Int("first_k_dense_replace", 0),
            MoeLayerFreq = r.Int("moe_layer_freq", 1),
            NormTopkProb = r.Bool("norm_topk_prob", false),
            RmsNormEps = r.Double("rms_norm_eps", 1e-6),
            RopeTheta = r.Double("rope_theta", 10000),
            RopeScaling = ReadRopeScaling(r, path),
            MaxPositionEmbeddings = r.Int("max_position_embeddings"),
            Quantization = ReadQuantization(r, path),
            BosTokenId = r.Int("bos_token_id", 0),
            EosTokenId = r.Int("eos_token_id", 1),
            TieWordEmbeddings = r.Bool("tie_word_embeddings", false),
        };

        r.RequireString("topk_method", "noaux_tc", "only bias-corrected group-limited routing (noaux_tc) is supported");
        r.RequireString("scoring_func", "sigmoid", "only sigmoid gating is supported");
        r.RequireString("hidden_act", "silu", "only SiLU MLPs are supported");
        config.Validate(path);
        return config;
    }

    /// <summary>Checks every invariant; the record's <c>with</c> expressions skip it, so call it after editing.</summary>
    /// <exception cref="ModelConfigException">The first violated invariant, naming its field.</exception>
    public ModelConfig Validate(string? path = null)
    {
        void Positive(int value, string field)
        {
            if (value <= 0)
            {
                throw new ModelConfigException(path, field, $"must be positive, is {value}");
            }
        }

        void NonNegative(int value, string field)
        {
            if (value < 0)
            {
                throw new ModelConfigException(path, field, $"must not be negative, is {value}");
            }
        }

        void Check(bool ok, string field, string problem)
        {
            if (!ok)
            {
                throw new ModelConfigException(path, field, problem);
            }
        }

        Positive(VocabSize, "vocab_size");
        Positive(HiddenSize, "hidden_size");
        Positive(IntermediateSize, "intermediate_size");
        Positive(MoeIntermediateSize, "moe_intermediate_size");
        Positive(NumHiddenLayers, "num_hidden_layers");
        NonNegative(NumNextNPredictLayers, "num_nextn_predict_layers");
        Positive(NumAttentionHeads, "num_attention_heads");
        NonNegative(NSharedExperts, "n_shared_experts");
        Positive(NRoutedExperts, "n_routed_experts");
        Positive(KvLoraRank, "kv_lora_rank");
        if (QLoraRank is { } q)
        {
            Positive(q, "q_lora_rank");
        }

        Positive(QkRopeHeadDim, "qk_rope_head_dim");
        Check(QkRopeHeadDim % 2 == 0, "qk_rope_head_dim", $"must be even (RoPE rotates pairs), is {QkRopeHeadDim}");
        Positive(QkNopeHeadDim, "qk_nope_head_dim");
        Positive(VHeadDim, "v_head_dim");
        Positive(NGroup, "n_group");
        Positive(TopkGroup, "topk_group");
        Positive(NumExpertsPerTok, "num_experts_per_tok");
        Positive(MoeLayerFreq, "moe_layer_freq");
        Positive(MaxPositionEmbeddings, "max_position_embeddings");
        // Tensor shapes are products of these; a 32-bit overflow would silently give nonsense shapes.
        Check((long)NumAttentionHeads * ((long)QkNopeHeadDim + QkRopeHeadDim) <= int.MaxValue, "num_attention_heads",
            $"{NumAttentionHeads} heads of qk_head_dim {(long)QkNopeHeadDim + QkRopeHeadDim} overflow a 32-bit width");
        Check((long)NumAttentionHeads * ((long)QkNopeHeadDim + VHeadDim) <= int.MaxValue, "num_attention_heads",
            $"{NumAttentionHeads} heads of k_nope + v width {(long)QkNopeHeadDim + VHeadDim} overflow a 32-bit width");
        Check((long)KvLoraRank + QkRopeHeadDim <= int.MaxValue, "kv_lora_rank", $"{KvLoraRank} + qk_rope_head_dim overflows a 32-bit width");
        Check((long)NSharedExperts * MoeIntermediateSize <= int.MaxValue, "n_shared_experts",
            $"{NSharedExperts} shared experts of width {MoeIntermediateSize} overflow a 32-bit width");
        Check((long)NumHiddenLayers + NumNextNPredictLayers <= int.MaxValue, "num_nextn_predict_layers",
            $"{NumNextNPredictLayers} MTP layers after {NumHiddenLayers} overflow the layer index");
        Check(NumExpertsPerTok <= NRoutedExperts, "num_experts_per_tok",
            $"{NumExpertsPerTok} exceeds n_routed_experts {NRoutedExperts}");
        Check(NRoutedExperts % NGroup == 0, "n_group", $"{NGroup} does not divide n_routed_experts {NRoutedExperts}");
        Check(TopkGroup <= NGroup, "topk_group", $"{TopkGroup} exceeds n_group {NGroup}");
        Check((long)TopkGroup * (NRoutedExperts / NGroup) >= NumExpertsPerTok, "topk_group",
            $"{TopkGroup} groups of {NRoutedExperts / NGroup} experts hold fewer than num_experts_per_tok {NumExpertsPerTok}");
        Check(FirstKDenseReplace >= 0 && FirstKDenseReplace <= NumHiddenLayers, "first_k_dense_replace",
            $"{FirstKDenseReplace} is outside 0..num_hidden_layers ({NumHiddenLayers})");
        // The engine computes in float32: a value that passes as a double but overflows there (or scales
        // activations past BF16's range) loads "valid" and then gives NaN logits, so bound it here.
        Check(double.IsFinite(RoutedScalingFactor) && RoutedScalingFactor > 0 && RoutedScalingFactor <= MaxRoutedScalingFactor, "routed_scaling_factor",
            $"must be in (0, {MaxRoutedScalingFactor}], is {RoutedScalingFactor}");
        Check(double.IsFinite(RmsNormEps) && RmsNormEps > 0 && RmsNormEps <= 1 && (float)RmsNormEps > 0, "rms_norm_eps",
            $"must be in (0, 1] and not vanish in float32, is {RmsNormEps}");
        Check(double.IsFinite(RopeTheta) && RopeTheta > 1 && RopeTheta <= float.MaxValue && (float)RopeTheta > 1, "rope_theta",
            $"must be above 1 in float32 and finite there, is {RopeTheta}");
        Check(BosTokenId >= 0 && BosTokenId < VocabSize, "bos_token_id", $"{BosTokenId} is outside the vocabulary (0..{VocabSize - 1})");
        Check(EosTokenId >= 0 && EosTokenId < VocabSize, "eos_token_id", $"{EosTokenId} is outside the vocabulary (0..{VocabSize - 1})");
        if (RopeScaling is { } y)
        {
            Check(double.IsFinite(y.Factor) && y.Factor >= 1 && y.Factor <= float.MaxValue, "rope_scaling.factor",
                $"must be at least 1 and finite in float32, is {y.Factor}");
            Check(y.OriginalMaxPositionEmbeddings > 0, "rope_scaling.original_max_position_embeddings",
                $"must be positive, is {y.OriginalMaxPositionEmbeddings}");
            Check(double.IsFinite(y.BetaFast) && y.BetaFast > 0, "rope_scaling.beta_fast", $"must be positive, is {y.BetaFast}");
            Check(double.IsFinite(y.BetaSlow) && y.BetaSlow > 0, "rope_scaling.beta_slow", $"must be positive, is {y.BetaSlow}");
            Check(double.IsFinite(y.MScaleAllDim) && y.MScaleAllDim >= 0, "rope_scaling.mscale_all_dim",
                $"must not be negative, is {y.MScaleAllDim}");
            Check(float.IsFinite((float)SoftmaxScale) && (float)SoftmaxScale > 0, "rope_scaling.mscale_all_dim",
                $"with factor {y.Factor} gives the softmax scale {SoftmaxScale}, not a positive float32");
        }

        if (Quantization is { } fp8)
        {
            Check(fp8.BlockRows > 0 && fp8.BlockCols > 0, "quantization_config.weight_block_size",
                $"[{fp8.BlockRows}, {fp8.BlockCols}] must be two positive integers");
        }

        return this;
    }

    private static RopeScaling? ReadRopeScaling(FieldReader r, string? path)
    {
        var node = r.Object("rope_scaling");
        if (node is null)
        {
            return null;
        }

        var y = new FieldReader(node, path, "rope_scaling.");
        // Older configs say "type", newer HF "rope_type"; both name the same thing.
        var type = y.OptionalString("type") ?? y.OptionalString("rope_type")
            ?? throw new ModelConfigException(path, "rope_scaling.type", "missing");
        if (type != "yarn")
        {
            throw new ModelConfigException(path, "rope_scaling.type", $"'{type}' is not supported (only 'yarn')");
        }

        return new RopeScaling(
            y.Double("factor"),
            y.Int("original_max_position_embeddings"),
            y.Double("beta_fast", 32),
            y.Double("beta_slow", 1),
            y.Double("mscale", 1),
            y.Double("mscale_all_dim", 0));
    }

    private static Fp8Quantization? ReadQuantization(FieldReader r, string? path)
    {
        var node = r.Object("quantization_config");
        if (node is null)
        {
            return null;
        }

        var q = new FieldReader(node, path, "quantization_config.");
        var method = q.OptionalString("quant_method");
        if (method != "fp8")
        {
            throw new ModelConfigException(path, "quantization_config.quant_method", $"'{method}' is not supported (only 'fp8')");
        }

        var fmt = q.OptionalString("fmt") ?? "e4m3";
        if (fmt != "e4m3")
        {
            throw new ModelConfigException(path, "quantization_config.fmt", $"'{fmt}' is not supported (only 'e4m3')");
        }

        var block = q.IntArray("weight_block_size");
        if (block.Length != 2)
        {
            throw new ModelConfigException(path, "quantization_config.weight_block_size", $"has {block.Length} entries, needs 2");
        }

        return new Fp8Quantization(block[0], block[1], q.OptionalString("activation_scheme") ?? "dynamic");
    }

    /// <summary>Typed access to JSON fields; every error names the field with its prefix.</summary>
    private sealed class FieldReader(JsonObject obj, string? path, string prefix = "")
    {
        private ModelConfigException Error(string name, string problem) => new(path, prefix + name, problem);

        private JsonNode? Node(string name) => obj.TryGetPropertyValue(name, out var n) ? n : null;

        public int Int(string name, int? fallback = null) =>
            NullableIntCore(name, fallback, required: fallback is null) ?? fallback!.Value;

        public int? NullableInt(string name) => NullableIntCore(name, null, required: false);

        private int? NullableIntCore(string name, int? fallback, bool required)
        {
            var node = Node(name);
            if (node is null)
            {
                return required ? throw Error(name, obj.ContainsKey(name) ? "is null" : "missing") : fallback;
            }

            if (node is JsonValue v && v.GetValueKind() == JsonValueKind.Number)
            {
                var d = v.GetValue<double>();
                if (d == Math.Floor(d) && d >= int.MinValue && d <= int.MaxValue)
                {
                    return (int)d;
                }
            }

            throw Error(name, $"{node.ToJsonString()} is not a 32-bit integer");
        }

        public double Double(string name, double? fallback = null)
        {
            var node = Node(name);
            if (node is null)
            {
                return fallback ?? throw Error(name, "missing");
            }

            // Factors and betas are often written as JSON integers; parse every number as a double.
            return node is JsonValue v && v.GetValueKind() == JsonValueKind.Number
                ? v.GetValue<double>()
                : throw Error(name, $"{node.ToJsonString()} is not a number");
        }

        public bool Bool(string name, bool fallback)
        {
            var node = Node(name);
            return node switch
            {
                null => fallback,
                JsonValue v when v.GetValueKind() is JsonValueKind.True or JsonValueKind.False => v.GetValue<bool>(),
                _ => throw Error(name, $"{node.ToJsonString()} is not a boolean"),
            };
        }

        public string? OptionalString(string name)
        {
            var node = Node(name);
            return node switch
            {
                null => null,
                JsonValue v when v.GetValueKind() == JsonValueKind.String => v.GetValue<string>(),
                _ => throw Error(name, $"{node.ToJsonString()} is not a string"),
            };
        }

        public void RequireString(string name, string expected, string why)
        {
            var value = OptionalString(name);
            if (value is not null && value != expected)
            {
                throw Error(name, $"'{value}': {why}");
            }
        }

        public JsonObject? Object(string name)
        {
            var node = Node(name);
            return node switch
            {
                null => null,
                JsonObject o => o,
                _ => throw Error(name, $"{node.ToJsonString()} is not an object"),
            };
        }

        public int[] IntArray(string name)
        {
            if (Node(name) is not JsonArray array)
            {
                throw Error(name, "missing or not an array");
            }

            return array.Select((n, i) => n is JsonValue v && v.GetValueKind() == JsonValueKind.Number
                    && v.GetValue<double>() is var d && d == Math.Floor(d) && d is >= int.MinValue and <= int.MaxValue
                ? (int)d
                : throw Error(name, $"entry {i} ({n?.ToJsonString() ?? "null"}) is not an integer")).ToArray();
        }
    }

    /// <inheritdoc />
    public override string ToString() => string.Create(CultureInfo.InvariantCulture,
        $"DeepSeek-V3 config: {NumHiddenLayers} layers (+{NumNextNPredictLayers} MTP), hidden {HiddenSize}, {NumAttentionHeads} heads, " +
        $"{NRoutedExperts} experts top-{NumExpertsPerTok} in {TopkGroup}/{NGroup} groups, vocab {VocabSize}");
}
