using System.Globalization;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using DeepSeekCuda.Loader.Numerics;

namespace DeepSeekCuda.Loader.Synthetic;

/// <summary>
/// Writes a random-weight checkpoint for any <see cref="ModelConfig"/> in the exact release layout:
/// <c>config.json</c>, <c>model-0000k-of-0000n.safetensors</c> shards, <c>model.safetensors.index.json</c>,
/// every tensor of <see cref="CheckpointLayout.Expected(ModelConfig)"/> (MTP layers included), FP8 linear weights
/// block-quantized like the release. Same config and seed give byte-identical files.
/// </summary>
/// <remarks>
/// Weights are drawn like the tiny-a fixture's (fixtures README, <c>reference.json → checkpoint.init</c>):
/// linear N(0, g²/in) times a per-block factor 2^U(-1,1) (g = 1; 0.3 for o_proj and dense/shared
/// down_proj; 0.15 for routed experts' down_proj), norms 1 + 0.1·N(0,1), correction bias 0.2·N(0,1),
/// embedding N(0,1), lm_head N(0, 4/D), gate N(0, 9/D), eh_proj N(0, 1/(2D)); the MTP embedding and
/// head are copies of the main ones. Each block row of a linear weight and each 1M-element chunk of
/// another tensor has its own random stream (seed, tensor name, piece index), so any tensor can be
/// redrawn alone with <see cref="DrawFloat"/> and pieces are drawn in parallel. Data is generated and
/// written a window of pieces at a time: presets of many gigabytes never sit in memory.
/// </remarks>
internal static class SyntheticCheckpoint
{
    // Elements of a non-linear tensor drawn per piece: bounds memory for [V, D] embeddings.
    private const int ChunkElements = 1 << 20;

    /// <summary>The shard file name the release uses for shard <paramref name="shard"/> (1-based) of <paramref name="count"/>.</summary>
    public static string ShardFileName(int shard, int count) =>
        string.Create(CultureInfo.InvariantCulture, $"model-{shard:D5}-of-{count:D5}.safetensors");

    /// <summary>Writes the checkpoint into <paramref name="directory"/> (created if missing; existing files of the same names are replaced).</summary>
    /// <param name="directory">Target folder.</param>
    /// <param name="config">The architecture; validated first.</param>
    /// <param name="seed">Seed of every random draw.</param>
    /// <param name="shards">Number of safetensors shards (at least 1). With 2 or more, the first cut falls between a weight and its scale, as in the release.</param>
    /// <param name="progress">Receives the fraction of tensor bytes written, 0 to 1.</param>
    /// <param name="fill">How values are made: <see cref="SyntheticFill.Random"/> (the documented draws) or
    /// <see cref="SyntheticFill.Pattern"/> (windows of one drawn template, for benchmarks of full-width slices).</param>
    /// <exception cref="ArgumentOutOfRangeException">Fewer than one shard, or more shards than the model has cut points.</exception>
    public static void Write(string directory, ModelConfig config, int seed, int shards = 2, IProgress<double>? progress = null,
        SyntheticFill fill = SyntheticFill.Random)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentOutOfRangeException.ThrowIfLessThan(shards, 1);
        config.Validate();
        directory = Path.GetFullPath(directory);
        Directory.CreateDirectory(directory);

        var order = ShardOrder(config);
        var cuts = Cuts(config, order, shards);
        var shardOf = new Dictionary<string, int>(StringComparer.Ordinal);
        for (var s = 0; s < shards; s++)
        {
            for (var i = cuts[s]; i < cuts[s + 1]; i++)
            {
                shardOf[order[i].Name] = s;
            }
        }

        var total = order.Sum(t => ByteLength(t));
        long done = 0;
        var writers = new SafetensorsWriter[shards];
        try
        {
            for (var s = 0; s < shards; s++)
            {
                writers[s] = new SafetensorsWriter(
                    Path.Combine(directory, ShardFileName(s + 1, shards)),
                    order.Skip(cuts[s]).Take(cuts[s + 1] - cuts[s]).Select(t => (t.Name, t.DType, t.Shape.ToArray())));
            }

            var recipes = Recipes(config);
            var template = fill == SyntheticFill.Pattern ? PatternTemplate.Draw(seed) : null;
            foreach (var tensor in order)
            {
                var recipe = recipes[tensor.Name];
                if (recipe.Kind == Kind.Scale)
                {
                    continue; // written together with its weight
                }

                var writer = writers[shardOf[tensor.Name]];
                var scaleWriter = tensor.DType == DType.F8_E4M3 ? writers[shardOf[LinearSpec.ScaleName(tensor.Name)]] : null;
                var pieces = template is not null ? PatternPieces(config, template, recipe, tensor) : Pieces(config, seed, recipe, tensor);
                Func<int, (byte[] Data, float[]? Scales)> encode = template is not null && recipe.Kind == Kind.Linear
                    ? i => PatternCodes(config, template, recipe, tensor, i)
                    : i => Encode(config, tensor, pieces.Draw(i));
                foreach (var (data, scales) in InOrder(pieces.Count, encode))
                {
                    writer.Write(tensor.Name, data);
                    if (scales is not null)
                    {
                        scaleWriter!.Write<float>(LinearSpec.ScaleName(tensor.Name), scales);
                    }

                    done += data.Length;
                    progress?.Report((double)done / total);
                }
            }

            foreach (var w in writers)
            {
                w.Commit();
            }
        }
        finally
        {
            foreach (var w in writers)
            {
                w?.Dispose();
            }
        }

        WriteText(Path.Combine(directory, Checkpoint.IndexFileName), IndexJson(order, shardOf, shards, total));
        WriteText(Path.Combine(directory, Checkpoint.ConfigFileName), ConfigJson(config));
        progress?.Report(1.0);
    }

    /// <summary>
    /// The float32 values drawn for tensor <paramref name="name"/> before storage: the exact values a BF16
    /// or F32 tensor stores after rounding, and the weight an FP8 tensor approximates (scales are not
    /// drawn; they follow from the weight).
    /// </summary>
    /// <exception cref="ArgumentException">The config implies no such tensor, or it is a scale.</exception>
    public static float[] DrawFloat(ModelConfig config, int seed, string name)
    {
        ArgumentNullException.ThrowIfNull(config);
        var tensor = CheckpointLayout.Expected(config).FirstOrDefault(t => t.Name == name);
        var recipes = Recipes(config);
        if (tensor is null || !recipes.TryGetValue(name, out var recipe) || recipe.Kind == Kind.Scale)
        {
            throw new ArgumentException($"'{name}' is not a drawn tensor of this config", nameof(name));
        }

        var pieces = Pieces(config, seed, recipe, tensor);
        var result = new List<float>();
        for (var i = 0; i < pieces.Count; i++)
        {
            result.AddRange(pieces.Draw(i));
        }

        return [.. result];
    }

    /// <summary>The <c>config.json</c> text for <paramref name="config"/>: every field the loader reads, under the HF names, plus the release's usual extras.</summary>
    public static string ConfigJson(ModelConfig config)
    {
        ArgumentNullException.ThrowIfNull(config);
        var fields = new SortedDictionary<string, JsonNode?>(StringComparer.Ordinal)
        {
            ["architectures"] = new JsonArray("DeepseekV3ForCausalLM"),
            ["attention_bias"] = false,
            ["attention_dropout"] = 0.0,
            ["bos_token_id"] = config.BosTokenId,
            ["eos_token_id"] = config.EosTokenId,
            ["first_k_dense_replace"] = config.FirstKDenseReplace,
            ["hidden_act"] = "silu",
            ["hidden_size"] = config.HiddenSize,
            ["initializer_range"] = 0.02,
            ["intermediate_size"] = config.IntermediateSize,
            ["kv_lora_rank"] = config.KvLoraRank,
            ["max_position_embeddings"] = config.MaxPositionEmbeddings,
            ["model_type"] = "deepseek_v3",
            ["moe_intermediate_size"] = config.MoeIntermediateSize,
            ["moe_layer_freq"] = config.MoeLayerFreq,
            ["n_group"] = config.NGroup,
            ["n_routed_experts"] = config.NRoutedExperts,
            ["n_shared_experts"] = config.NSharedExperts,
            ["norm_topk_prob"] = config.NormTopkProb,
            ["num_attention_heads"] = config.NumAttentionHeads,
            ["num_experts_per_tok"] = config.NumExpertsPerTok,
            ["num_hidden_layers"] = config.NumHiddenLayers,
            ["num_key_value_heads"] = config.NumAttentionHeads,
            ["num_nextn_predict_layers"] = config.NumNextNPredictLayers,
            ["q_lora_rank"] = config.QLoraRank,
            ["qk_nope_head_dim"] = config.QkNopeHeadDim,
            ["qk_rope_head_dim"] = config.QkRopeHeadDim,
            ["rms_norm_eps"] = Number(config.RmsNormEps),
            ["rope_theta"] = Number(config.RopeTheta),
            ["routed_scaling_factor"] = Number(config.RoutedScalingFactor),
            ["scoring_func"] = "sigmoid",
            ["tie_word_embeddings"] = config.TieWordEmbeddings,
            ["topk_group"] = config.TopkGroup,
            ["topk_method"] = "noaux_tc",
            ["torch_dtype"] = "bfloat16",
            ["use_cache"] = true,
            ["v_head_dim"] = config.VHeadDim,
            ["vocab_size"] = config.VocabSize,
        };

        fields["rope_scaling"] = config.RopeScaling is { } y
            ? new JsonObject
            {
                ["beta_fast"] = Number(y.BetaFast),
                ["beta_slow"] = Number(y.BetaSlow),
                ["factor"] = Number(y.Factor),
                ["mscale"] = y.MScale,
                ["mscale_all_dim"] = y.MScaleAllDim,
                ["original_max_position_embeddings"] = y.OriginalMaxPositionEmbeddings,
                ["type"] = "yarn",
            }
            : null;
        if (config.Quantization is { } q)
        {
            fields["quantization_config"] = new JsonObject
            {
                ["activation_scheme"] = q.ActivationScheme,
                ["fmt"] = "e4m3",
                ["quant_method"] = "fp8",
                ["weight_block_size"] = new JsonArray(q.BlockRows, q.BlockCols),
            };
        }

        var root = new JsonObject();
        foreach (var (key, value) in fields)
        {
            root[key] = value;
        }

        return root.ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n";
    }

    // Integral values as JSON integers (as the release writes factor 40, theta 10000); others round-trip exactly.
    private static JsonNode Number(double value) =>
        value == Math.Floor(value) && Math.Abs(value) < 1e15 ? JsonValue.Create((long)value) : JsonValue.Create(value);

    private enum Kind { Normal, Norm, Linear, Scale }

    /// <summary>How one tensor is drawn: from stream <see cref="Stream"/>, N(Mean, Std²) (linear: per-block factor too).</summary>
    private sealed record Recipe(Kind Kind, string Stream, double Std, double Mean = 0, int Out = 0, int In = 0);

    private static Dictionary<string, Recipe> Recipes(ModelConfig c)
    {
        var r = new Dictionary<string, Recipe>(StringComparer.Ordinal);
        double d = c.HiddenSize;
        var headStream = c.TieWordEmbeddings ? CheckpointLayout.Embedding : CheckpointLayout.LmHead;
        var headStd = c.TieWordEmbeddings ? 1.0 : 2.0 / Math.Sqrt(d);
        r[CheckpointLayout.Embedding] = new(Kind.Normal, CheckpointLayout.Embedding, 1.0);
        r[CheckpointLayout.FinalNorm] = new(Kind.Norm, CheckpointLayout.FinalNorm, 0.1, 1.0);
        r[CheckpointLayout.LmHead] = new(Kind.Normal, headStream, headStd);

        void Linear(LinearSpec l, double g)
        {
            r[l.Weight] = new(Kind.Linear, l.Weight, g / Math.Sqrt(l.In), 0, l.Out, l.In);
            r[l.Scale] = new(Kind.Scale, l.Scale, 0);
        }

        void Norm(string name) => r[name] = new(Kind.Norm, name, 0.1, 1.0);

        for (var i = 0; i < c.StoredLayerCount; i++)
        {
            var n = CheckpointLayout.Layer(c, i);
            Norm(n.InputNorm);
            Norm(n.PostAttentionNorm);
            if (n.QA is { } qa)
            {
                Linear(qa, 1);
                Norm(n.QANorm!);
            }

            Linear(n.QB, 1);
            Linear(n.KvA, 1);
            Norm(n.KvANorm);
            Linear(n.KvB, 1);
            Linear(n.O, 0.3);
            var dense = n.DenseMlp;
            Linear(dense[0], 1);
            Linear(dense[1], 1);
            Linear(dense[2], 0.3);
            r[n.Gate] = new(Kind.Normal, n.Gate, 3.0 / Math.Sqrt(d));
            r[n.GateBias] = new(Kind.Normal, n.GateBias, 0.2);
            for (var e = 0; e < c.NRoutedExperts; e++)
            {
                var x = n.Expert(e);
                Linear(x[0], 1);
                Linear(x[1], 1);
                Linear(x[2], 0.15);
            }

            var shared = n.SharedExpert;
            Linear(shared[0], 1);
            Linear(shared[1], 1);
            Linear(shared[2], 0.3);
            r[n.MtpEmbedding] = new(Kind.Normal, CheckpointLayout.Embedding, 1.0);
            Norm(n.MtpEnorm);
            Norm(n.MtpHnorm);
            r[n.MtpEhProj] = new(Kind.Normal, n.MtpEhProj, 1.0 / Math.Sqrt(2 * d));
            Norm(n.MtpHeadNorm);
            r[n.MtpHead] = new(Kind.Normal, headStream, headStd);
        }

        return r;
    }

    /// <summary>A tensor's values as independent row-major pieces: piece i is <c>Draw(i)</c>.</summary>
    private readonly record struct PieceSet(int Count, Func<int, float[]> Draw);

    /// <summary>
    /// Splits a tensor into pieces with their own random streams (tensor stream and piece index), so
    /// pieces can be drawn in parallel and any one redrawn alone: a linear weight by block rows (the
    /// block factors of the row, then its values), any other tensor by chunks of elements.
    /// </summary>
    private static PieceSet Pieces(ModelConfig config, int seed, Recipe recipe, ExpectedTensor tensor)
    {
        if (recipe.Kind == Kind.Linear)
        {
            var (blockRows, blockCols) = Blocks(config);
            var gridCols = CheckpointLayout.CeilDiv(recipe.In, blockCols);
            return new PieceSet(CheckpointLayout.CeilDiv(recipe.Out, blockRows), stripe =>
            {
                var rng = Xoshiro256.ForStream(seed, $"{recipe.Stream}#{stripe}");
                var factors = new double[gridCols];
                for (var b = 0; b < gridCols; b++)
                {
                    factors[b] = Math.Pow(2.0, 2.0 * rng.NextDouble() - 1.0) * recipe.Std;
                }

                var rows = Math.Min(blockRows, recipe.Out - stripe * blockRows);
                var values = new float[rows * recipe.In];
                for (var r = 0; r < rows; r++)
                {
                    for (var col = 0; col < recipe.In; col++)
                    {
                        values[r * recipe.In + col] = (float)(rng.NextNormal() * factors[col / blockCols]);
                    }
                }

                return values;
            });
        }

        var count = tensor.Shape.Aggregate(1L, (a, b) => a * b);
        return new PieceSet((int)((count + ChunkElements - 1) / ChunkElements), chunk =>
        {
            var rng = Xoshiro256.ForStream(seed, $"{recipe.Stream}#{chunk}");
            var values = new float[(int)Math.Min(ChunkElements, count - (long)chunk * ChunkElements)];
            for (var i = 0; i < values.Length; i++)
            {
                values[i] = (float)(recipe.Mean + recipe.Std * rng.NextNormal());
            }

            return values;
        });
    }

    // Template of the pattern fill: 4 Mi standard normal values, drawn once per seed.
    private const int TemplateLength = 1 << 22;

    // Pattern fill: an FP8 code of the template is z · 448 / PatternAmax (saturated), so the block scale is std · PatternAmax / 448.
    private const double PatternAmax = 4.5;

    /// <summary>The pattern fill's template: standard normals and their FP8 codes at scale 4.5 / 448.</summary>
    private sealed record PatternTemplate(float[] Normals, byte[] Codes)
    {
        public static PatternTemplate Draw(int seed)
        {
            var rng = Xoshiro256.ForStream(seed, "pattern-template");
            var normals = new float[TemplateLength];
            var codes = new byte[TemplateLength];
            for (var i = 0; i < normals.Length; i++)
            {
                normals[i] = (float)rng.NextNormal();
                codes[i] = Fp8E4M3.FromFloat((float)Math.Clamp(normals[i] * Fp8E4M3.MaxValue / PatternAmax, -Fp8E4M3.MaxValue, Fp8E4M3.MaxValue));
            }

            return new PatternTemplate(normals, codes);
        }
    }

    /// <summary>Where piece <paramref name="piece"/> of a tensor starts reading the template (a hash of stream and piece).</summary>
    private static int TemplateOffset(string stream, int piece)
    {
        var h = 14695981039346656037UL;
        foreach (var ch in stream)
        {
            h = (h ^ ch) * 1099511628211UL;
        }

        h = (h ^ (ulong)piece) * 0x9E3779B97F4A7C15UL;
        return (int)((h >> 20) & (TemplateLength - 1));
    }

    /// <summary>
    /// Pattern fill of a non-linear tensor: the same chunks as <see cref="Pieces"/>, each a window of the template's
    /// normals (wrapping) scaled to the recipe's mean and std.
    /// </summary>
    private static PieceSet PatternPieces(ModelConfig config, PatternTemplate template, Recipe recipe, ExpectedTensor tensor)
    {
        if (recipe.Kind == Kind.Linear)
        {
            return new PieceSet(CheckpointLayout.CeilDiv(recipe.Out, Blocks(config).Rows), _ => []);
        }

        var normals = template.Normals;
        var count = tensor.Shape.Aggregate(1L, (a, b) => a * b);
        return new PieceSet((int)((count + ChunkElements - 1) / ChunkElements), chunk =>
        {
            var values = new float[(int)Math.Min(ChunkElements, count - (long)chunk * ChunkElements)];
            var at = TemplateOffset(recipe.Stream, chunk);
            for (var i = 0; i < values.Length; i++)
            {
                values[i] = (float)(recipe.Mean + recipe.Std * normals[(at + i) & (TemplateLength - 1)]);
            }

            return values;
        });
    }

    /// <summary>
    /// Pattern fill of block row <paramref name="stripe"/> of an FP8 linear: a window of the template's codes (wrapping)
    /// and one block scale std · 4.5 / 448 for the whole row, so values are N(0, std²) clipped at 4.5 σ, without
    /// per-element drawing or quantization.
    /// </summary>
    private static (byte[] Data, float[]? Scales) PatternCodes(ModelConfig config, PatternTemplate template, Recipe recipe, ExpectedTensor tensor, int stripe)
    {
        var (blockRows, blockCols) = Blocks(config);
        var rows = Math.Min(blockRows, recipe.Out - stripe * blockRows);
        var length = rows * recipe.In;
        if (tensor.DType != DType.F8_E4M3)
        {
            var floats = new float[length];
            var normals = template.Normals;
            var start = TemplateOffset(recipe.Stream, stripe);
            for (var i = 0; i < length; i++)
            {
                floats[i] = (float)(recipe.Std * normals[(start + i) & (TemplateLength - 1)]);
            }

            return Encode(config, tensor, floats);
        }

        var codes = template.Codes;
        var data = new byte[length];
        var at = TemplateOffset(recipe.Stream, stripe);
        for (var done = 0; done < length;)
        {
            var n = Math.Min(length - done, TemplateLength - at);
            codes.AsSpan(at, n).CopyTo(data.AsSpan(done));
            done += n;
            at = 0;
        }

        var scales = new float[CheckpointLayout.CeilDiv(recipe.In, blockCols)];
        Array.Fill(scales, (float)(recipe.Std * PatternAmax / Fp8E4M3.MaxValue));
        return (data, scales);
    }

    /// <summary>Results of <paramref name="produce"/> for 0..count-1 in order, computed a window at a time in parallel.</summary>
    private static IEnumerable<T> InOrder<T>(int count, Func<int, T> produce)
    {
        var window = Math.Max(2, Environment.ProcessorCount);
        for (var start = 0; start < count; start += window)
        {
            var results = new T[Math.Min(window, count - start)];
            var first = start;
            Parallel.For(0, results.Length, i => results[i] = produce(first + i));
            foreach (var r in results)
            {
                yield return r;
            }
        }
    }

    private static (int Rows, int Cols) Blocks(ModelConfig config) =>
        config.Quantization is { } q ? (q.BlockRows, q.BlockCols) : (128, 128);

    /// <summary>
    /// Stored bytes of one piece: F32 as is, BF16 rounded to nearest even, FP8 as e4m3(w / scale) with
    /// its row of block scales (scale = block amax / 448, float32), as the release's quantizer.
    /// </summary>
    private static (byte[] Data, float[]? Scales) Encode(ModelConfig config, ExpectedTensor tensor, float[] values)
    {
        switch (tensor.DType)
        {
            case DType.F32:
                return (MemoryMarshal.AsBytes(values.AsSpan()).ToArray(), null);
            case DType.BF16:
                var halves = new ushort[values.Length];
                BFloat16.Encode(values, halves);
                return (MemoryMarshal.AsBytes(halves.AsSpan()).ToArray(), null);
        }

        var (_, blockCols) = Blocks(config);
        var cols = (int)tensor.Shape[1];
        var rows = values.Length / cols;
        var gridCols = CheckpointLayout.CeilDiv(cols, blockCols);
        var scales = new float[gridCols];
        for (var r = 0; r < rows; r++)
        {
            for (var col = 0; col < cols; col++)
            {
                var b = col / blockCols;
                scales[b] = Math.Max(scales[b], Math.Abs(values[r * cols + col]));
            }
        }

        for (var b = 0; b < gridCols; b++)
        {
            // An all-zero block keeps scale 1 so w / scale stays 0 rather than NaN.
            scales[b] = scales[b] > 0 ? scales[b] / Fp8E4M3.MaxValue : 1f;
        }

        var codes = new byte[values.Length];
        for (var r = 0; r < rows; r++)
        {
            for (var col = 0; col < cols; col++)
            {
                codes[r * cols + col] = Fp8E4M3.FromFloat(values[r * cols + col] / scales[col / blockCols]);
            }
        }

        return (codes, scales);
    }

    /// <summary>Tensors in shard order: embedding, layer by layer (each weight just before its scale), final norm, lm_head.</summary>
    private static List<ExpectedTensor> ShardOrder(ModelConfig config)
    {
        var expected = CheckpointLayout.Expected(config);
        var tail = new[] { CheckpointLayout.FinalNorm, CheckpointLayout.LmHead };
        return [.. expected.Where(t => !tail.Contains(t.Name)), .. expected.Where(t => tail.Contains(t.Name))];
    }

    private static long ByteLength(ExpectedTensor t) => t.Shape.Aggregate((long)DTypes.SizeOf(t.DType), (a, b) => a * b);

    /// <summary>
    /// Start index of each shard in <paramref name="order"/> (plus the end): near equal bytes, each cut
    /// moved forward to fall between an FP8 weight and its scale so that pair spans two shards, as in the release.
    /// </summary>
    private static int[] Cuts(ModelConfig config, List<ExpectedTensor> order, int shards)
    {
        var cuts = new int[shards + 1];
        cuts[shards] = order.Count;
        var total = order.Sum(ByteLength);
        var before = new long[order.Count + 1];
        for (var i = 0; i < order.Count; i++)
        {
            before[i + 1] = before[i] + ByteLength(order[i]);
        }

        bool Splits(int i) => order[i - 1].DType == DType.F8_E4M3 && order[i].Name == LinearSpec.ScaleName(order[i - 1].Name);

        for (var k = 1; k < shards; k++)
        {
            var target = (long)((double)total * k / shards);
            var first = cuts[k - 1] + 1;
            while (first < order.Count && before[first] < target)
            {
                first++;
            }

            var cut = first;
            while (cut < order.Count && config.Quantization is not null && !Splits(cut))
            {
                cut++;
            }

            cuts[k] = cut < order.Count ? cut : first;
            if (cuts[k] >= order.Count)
            {
                throw new ArgumentOutOfRangeException(nameof(shards), shards, $"the config's {order.Count} tensors cannot fill {shards} non-empty shards");
            }
        }

        return cuts;
    }

    private static string IndexJson(List<ExpectedTensor> order, Dictionary<string, int> shardOf, int shards, long total)
    {
        var map = new JsonObject();
        foreach (var t in order.OrderBy(t => t.Name, StringComparer.Ordinal))
        {
            map[t.Name] = ShardFileName(shardOf[t.Name] + 1, shards);
        }

        var root = new JsonObject
        {
            ["metadata"] = new JsonObject { ["total_size"] = total },
            ["weight_map"] = map,
        };
        return root.ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n";
    }

    /// <summary>Writes through a temporary file and a rename, so a reader never sees half a file.</summary>
    private static void WriteText(string path, string text)
    {
        var temp = Path.Combine(Path.GetDirectoryName(path)!, $".{Path.GetFileName(path)}.{Guid.NewGuid():N}.tmp");
        try
        {
            File.WriteAllText(temp, text, new UTF8Encoding(false));
            File.Move(temp, path, overwrite: true);
        }
        finally
        {
            File.Delete(temp);
        }
    }
}

/// <summary>How <see cref="SyntheticCheckpoint.Write"/> makes values.</summary>
internal enum SyntheticFill
{
    /// <summary>Every value drawn from its own stream (the documented recipes; <see cref="SyntheticCheckpoint.DrawFloat"/> redraws them).</summary>
    Random,

    /// <summary>
    /// Windows of one template of drawn values, at offsets hashed from tensor and piece: the same distributions (FP8
    /// linears without per-block factors, clipped at 4.5 σ), written at disk speed. For benchmarks, where only shapes,
    /// magnitudes and routing spread matter; <see cref="SyntheticCheckpoint.DrawFloat"/> does not describe these values.
    /// </summary>
    Pattern,
}
