using System.Collections.Immutable;

namespace DeepSeekCuda.Loader;

/// <summary>A tensor the config says the checkpoint must hold.</summary>
/// <param name="Name">Release name.</param>
/// <param name="DType">Stored element type.</param>
/// <param name="Shape">Stored shape.</param>
/// <param name="Layer">Stored layer index, or -1 for model-level tensors.</param>
internal sealed record ExpectedTensor(string Name, DType DType, ImmutableArray<long> Shape, int Layer);

/// <summary>A linear layer <c>y = x·Wᵀ</c> with W [Out, In]; FP8 ones carry a block-scale grid.</summary>
/// <param name="Weight">Name of the weight tensor.</param>
/// <param name="Out">Rows of W.</param>
/// <param name="In">Columns of W.</param>
/// <param name="Quantized">Stored FP8 with <see cref="Scale"/>.</param>
public sealed record LinearSpec(string Weight, int Out, int In, bool Quantized)
{
    /// <summary>The <c>weight_scale_inv</c> tensor name (meaningful when <see cref="Quantized"/>).</summary>
    public string Scale => ScaleName(Weight);

    /// <summary>The scale tensor of a weight: <c>X.weight</c> → <c>X.weight_scale_inv</c>.</summary>
    public static string ScaleName(string weight) => weight + "_scale_inv";

    /// <summary>
    /// Rows and columns of the stored tensor this spec takes, when it is a slice (tensor parallelism);
    /// null for the whole tensor. <see cref="Out"/> and <see cref="In"/> are then the slice's shape.
    /// </summary>
    public TensorSlice? Slice { get; init; }

    /// <summary>The stored shape [rows, cols] (the whole tensor's, also for a slice).</summary>
    public (int Rows, int Cols) StoredShape => Slice is { } s ? (s.StoredRows, s.StoredCols) : (Out, In);

    /// <summary>
    /// This weight restricted to rows [<paramref name="rowStart"/>, +<paramref name="rows"/>) and columns
    /// [<paramref name="colStart"/>, +<paramref name="cols"/>) of the stored tensor.
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException">The range leaves the stored tensor, or this is already a slice.</exception>
    public LinearSpec Sliced(int rowStart, int rows, int colStart, int cols)
    {
        if (Slice is not null)
        {
            throw new ArgumentOutOfRangeException(nameof(rowStart), $"{Weight} is already a slice");
        }

        var slice = new TensorSlice(Out, In, rowStart, rows, colStart, cols);
        return new LinearSpec(Weight, rows, cols, Quantized) { Slice = slice };
    }
}

/// <summary>A rectangle [RowStart, +Rows) × [ColStart, +Cols) of a stored [StoredRows, StoredCols] matrix.</summary>
public sealed record TensorSlice
{
    /// <summary>Creates a slice and checks it lies inside the stored matrix.</summary>
    /// <exception cref="ArgumentOutOfRangeException">It does not.</exception>
    public TensorSlice(int storedRows, int storedCols, int rowStart, int rows, int colStart, int cols)
    {
        if (rowStart < 0 || rows < 1 || rowStart + rows > storedRows || colStart < 0 || cols < 1 || colStart + cols > storedCols)
        {
            throw new ArgumentOutOfRangeException(nameof(rowStart),
                $"slice rows {rowStart}+{rows}, cols {colStart}+{cols} is outside a [{storedRows}, {storedCols}] tensor");
        }

        (StoredRows, StoredCols, RowStart, Rows, ColStart, Cols) = (storedRows, storedCols, rowStart, rows, colStart, cols);
    }

    /// <summary>Rows of the stored matrix.</summary>
    public int StoredRows { get; }

    /// <summary>Columns of the stored matrix.</summary>
    public int StoredCols { get; }

    /// <summary>First row taken.</summary>
    public int RowStart { get; }

    /// <summary>Rows taken.</summary>
    public int Rows { get; }

    /// <summary>First column taken.</summary>
    public int ColStart { get; }

    /// <summary>Columns taken.</summary>
    public int Cols { get; }

    /// <summary>Whether it takes the whole matrix.</summary>
    public bool IsWhole => Rows == StoredRows && Cols == StoredCols;

    /// <summary>Copies the slice out of the row-major stored matrix <paramref name="stored"/>, row-major.</summary>
    /// <exception cref="ArgumentException"><paramref name="stored"/> is not [StoredRows, StoredCols].</exception>
    public T[] Extract<T>(ReadOnlySpan<T> stored)
    {
        if (stored.Length != (long)StoredRows * StoredCols)
        {
            throw new ArgumentException($"{stored.Length} values for a [{StoredRows}, {StoredCols}] tensor", nameof(stored));
        }

        var result = new T[(long)Rows * Cols];
        for (var r = 0; r < Rows; r++)
        {
            stored.Slice((int)((long)(RowStart + r) * StoredCols + ColStart), Cols).CopyTo(result.AsSpan(r * Cols, Cols));
        }

        return result;
    }

    /// <inheritdoc />
    public override string ToString() => $"[{RowStart}:{RowStart + Rows}, {ColStart}:{ColStart + Cols}] of [{StoredRows}, {StoredCols}]";
}

/// <summary>
/// The one table from checkpoint tensor names to the model's weights, and the full list of tensors a
/// config implies (release layout, MODEL.md §2). Nothing else spells tensor names.
/// </summary>
internal static class CheckpointLayout
{
    /// <summary>Token embedding [V, D].</summary>
    public const string Embedding = "model.embed_tokens.weight";

    /// <summary>Final RMSNorm weight [D].</summary>
    public const string FinalNorm = "model.norm.weight";

    /// <summary>Output projection [V, D].</summary>
    public const string LmHead = "lm_head.weight";

    /// <summary>Prefix of stored layer <paramref name="layer"/>.</summary>
    public static string LayerPrefix(int layer) => $"model.layers.{layer}.";

    /// <summary>Names and shapes of one stored layer's tensors.</summary>
    public static LayerNames Layer(ModelConfig config, int layer) => new(config, layer);

    /// <summary>Every tensor the checkpoint must hold for <paramref name="config"/>, MTP layers included.</summary>
    public static IReadOnlyList<ExpectedTensor> Expected(ModelConfig config) => Expected(config, int.MaxValue)!;

    /// <summary>
    /// <see cref="Expected(ModelConfig)"/>, or null as soon as the list would pass <paramref name="maxCount"/>
    /// entries: a small config.json can claim billions of tensors (layers times experts), and what has to be
    /// compared with a checkpoint's real tensors must stop long before that.
    /// </summary>
    public static IReadOnlyList<ExpectedTensor>? Expected(ModelConfig config, int maxCount)
    {
        try
        {
            return ExpectedUpTo(config, maxCount);
        }
        catch (TooManyTensors)
        {
            return null;
        }
    }

    private sealed class TooManyTensors : Exception;

    private static List<ExpectedTensor> ExpectedUpTo(ModelConfig config, int maxCount)
    {
        var list = new List<ExpectedTensor>();
        long v = config.VocabSize, d = config.HiddenSize;
        void Add(string name, DType dtype, int layer, params long[] shape)
        {
            if (list.Count >= maxCount)
            {
                throw new TooManyTensors();
            }

            list.Add(new ExpectedTensor(name, dtype, [.. shape], layer));
        }

        void AddLinear(LinearSpec linear, int layer)
        {
            if (linear.Quantized && config.Quantization is { } q)
            {
                Add(linear.Weight, DType.F8_E4M3, layer, linear.Out, linear.In);
                Add(linear.Scale, DType.F32, layer, CeilDiv(linear.Out, q.BlockRows), CeilDiv(linear.In, q.BlockCols));
            }
            else
            {
                Add(linear.Weight, DType.BF16, layer, linear.Out, linear.In);
            }
        }

        Add(Embedding, DType.BF16, -1, v, d);
        Add(FinalNorm, DType.BF16, -1, d);
        if (!config.TieWordEmbeddings)
        {
            Add(LmHead, DType.BF16, -1, v, d);
        }

        for (var i = 0; i < config.StoredLayerCount; i++)
        {
            var n = Layer(config, i);
            Add(n.InputNorm, DType.BF16, i, d);
            Add(n.PostAttentionNorm, DType.BF16, i, d);
            if (n.QA is { } qa)
            {
                AddLinear(qa, i);
                Add(n.QANorm!, DType.BF16, i, config.QLoraRank!.Value);
            }

            AddLinear(n.QB, i);
            AddLinear(n.KvA, i);
            Add(n.KvANorm, DType.BF16, i, config.KvLoraRank);
            AddLinear(n.KvB, i);
            AddLinear(n.O, i);
            if (n.IsMoe)
            {
                Add(n.Gate, DType.BF16, i, config.NRoutedExperts, d);
                Add(n.GateBias, DType.F32, i, config.NRoutedExperts);
                for (var e = 0; e < config.NRoutedExperts; e++)
                {
                    foreach (var linear in n.Expert(e))
                    {
                        AddLinear(linear, i);
                    }
                }

                if (config.NSharedExperts > 0)
                {
                    foreach (var linear in n.SharedExpert)
                    {
                        AddLinear(linear, i);
                    }
                }
            }
            else
            {
                foreach (var linear in n.DenseMlp)
                {
                    AddLinear(linear, i);
                }
            }

            if (n.IsMtp)
            {
                Add(n.MtpEmbedding, DType.BF16, i, v, d);
                Add(n.MtpEnorm, DType.BF16, i, d);
                Add(n.MtpHnorm, DType.BF16, i, d);
                // eh_proj is BF16 with no block scales in the release (MODEL.md §2, UNCONFIRMED item 1).
                Add(n.MtpEhProj, DType.BF16, i, d, 2 * d);
                Add(n.MtpHeadNorm, DType.BF16, i, d);
                Add(n.MtpHead, DType.BF16, i, v, d);
            }
        }

        return list;
    }

    /// <summary>⌈a/b⌉ for positive values.</summary>
    public static int CeilDiv(int a, int b) => (a + b - 1) / b;

    /// <summary>Tensor names of one stored layer (main or MTP).</summary>
    public sealed class LayerNames
    {
        private readonly ModelConfig _c;
        private readonly string _p;

        internal LayerNames(ModelConfig config, int layer)
        {
            if (layer < 0 || layer >= config.StoredLayerCount)
            {
                throw new ArgumentOutOfRangeException(nameof(layer), layer, $"the config stores layers 0..{config.StoredLayerCount - 1}");
            }

            _c = config;
            Index = layer;
            _p = LayerPrefix(layer);
        }

        /// <summary>The stored layer index.</summary>
        public int Index { get; }

        /// <summary>Whether the feed-forward is MoE.</summary>
        public bool IsMoe => _c.IsMoeLayer(Index);

        /// <summary>Whether this is an MTP layer (stored after the main layers).</summary>
        public bool IsMtp => Index >= _c.NumHiddenLayers;

        /// <summary>input_layernorm [D].</summary>
        public string InputNorm => _p + "input_layernorm.weight";
        /// <summary>post_attention_layernorm [D].</summary>
        public string PostAttentionNorm => _p + "post_attention_layernorm.weight";

        /// <summary>q_a_proj [q_lora_rank, D], or null when q_lora_rank is null.</summary>
        public LinearSpec? QA => _c.QLoraRank is { } r ? new(_p + "self_attn.q_a_proj.weight", r, _c.HiddenSize, true) : null;
        /// <summary>q_a_layernorm [q_lora_rank], or null.</summary>
        public string? QANorm => _c.QLoraRank is null ? null : _p + "self_attn.q_a_layernorm.weight";

        /// <summary>q_b_proj [H·qk_head_dim, q_lora_rank] (or q_proj from D when q_lora_rank is null); rows head-major [nope | rope].</summary>
        public LinearSpec QB => _c.QLoraRank is { } r
            ? new(_p + "self_attn.q_b_proj.weight", _c.NumAttentionHeads * _c.QkHeadDim, r, true)
            : new(_p + "self_attn.q_proj.weight", _c.NumAttentionHeads * _c.QkHeadDim, _c.HiddenSize, true);

        /// <summary>kv_a_proj_with_mqa [kv_lora_rank + rope, D]; rows [latent | k_rope].</summary>
        public LinearSpec KvA => new(_p + "self_attn.kv_a_proj_with_mqa.weight", _c.KvLoraRank + _c.QkRopeHeadDim, _c.HiddenSize, true);
        /// <summary>kv_a_layernorm [kv_lora_rank].</summary>
        public string KvANorm => _p + "self_attn.kv_a_layernorm.weight";
        /// <summary>kv_b_proj [H·(nope + v), kv_lora_rank]; rows head-major [k_nope | v].</summary>
        public LinearSpec KvB => new(_p + "self_attn.kv_b_proj.weight", _c.NumAttentionHeads * (_c.QkNopeHeadDim + _c.VHeadDim), _c.KvLoraRank, true);
        /// <summary>o_proj [D, H·v]; columns head-major.</summary>
        public LinearSpec O => new(_p + "self_attn.o_proj.weight", _c.HiddenSize, _c.NumAttentionHeads * _c.VHeadDim, true);

        /// <summary>Dense MLP: gate, up, down.</summary>
        public LinearSpec[] DenseMlp => Mlp(_p + "mlp.", _c.IntermediateSize);

        /// <summary>Router weight [E, D] (BF16).</summary>
        public string Gate => _p + "mlp.gate.weight";
        /// <summary>Router correction bias [E] (F32), for selection only.</summary>
        public string GateBias => _p + "mlp.gate.e_score_correction_bias";

        /// <summary>Routed expert <paramref name="expert"/>: gate, up, down.</summary>
        public LinearSpec[] Expert(int expert) => Mlp($"{_p}mlp.experts.{expert}.", _c.MoeIntermediateSize);

        /// <summary>The shared experts, stored as one MLP of width n_shared·moe_intermediate: gate, up, down.</summary>
        public LinearSpec[] SharedExpert => Mlp(_p + "mlp.shared_experts.", _c.SharedIntermediateSize);

        /// <summary>MTP: embedding copy [V, D].</summary>
        public string MtpEmbedding => _p + "embed_tokens.weight";
        /// <summary>MTP: norm of the next token's embedding [D].</summary>
        public string MtpEnorm => _p + "enorm.weight";
        /// <summary>MTP: norm of the main model's hidden state [D].</summary>
        public string MtpHnorm => _p + "hnorm.weight";
        /// <summary>MTP: projection [D, 2D] of [embedding ; hidden].</summary>
        public string MtpEhProj => _p + "eh_proj.weight";
        /// <summary>MTP: final norm [D].</summary>
        public string MtpHeadNorm => _p + "shared_head.norm.weight";
        /// <summary>MTP: output head copy [V, D].</summary>
        public string MtpHead => _p + "shared_head.head.weight";

        private LinearSpec[] Mlp(string prefix, int width) =>
        [
            new(prefix + "gate_proj.weight", width, _c.HiddenSize, true),
            new(prefix + "up_proj.weight", width, _c.HiddenSize, true),
            new(prefix + "down_proj.weight", _c.HiddenSize, width, true),
        ];
    }
}
