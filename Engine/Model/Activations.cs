using DeepSeekCuda.Backends;
using DeepSeekCuda.Loader;

namespace DeepSeekCuda.Model;

/// <summary>One sequence's rows of a token stream: rows <paramref name="FirstRow"/>.. hold positions <paramref name="Start"/>.. of <paramref name="Cache"/>.</summary>
/// <param name="Cache">The sequence's latent cache of the layer being run.</param>
/// <param name="Start">Position of the first row.</param>
/// <param name="FirstRow">First row in the stream.</param>
/// <param name="Rows">Rows (tokens) of the sequence in the stream.</param>
/// <param name="Form">
/// How the rows attend under <see cref="AttentionForm.Auto"/>: <see cref="AttentionForm.Naive"/> or
/// <see cref="AttentionForm.Absorbed"/> as the caller decided (<see cref="LayerSteps.NaiveRows"/>), or Auto: as one forward
/// call over them (naive for more than <see cref="LayerSteps.AbsorbedRows"/> rows).
/// </param>
internal readonly record struct Segment(LatentCache Cache, int Start, int FirstRow, int Rows, AttentionForm Form = AttentionForm.Auto);

/// <summary>
/// A paged step's rows over one layer's shared pool: every row's slot and position on the device (<see cref="StepRows"/>), so
/// RoPE and the latent append run once over the whole stream; the first <paramref name="DecodeRows"/> rows, those of
/// sequences fed at most <see cref="LayerSteps.AbsorbedRows"/> tokens, attend in one call (<see cref="IBackend.MlaAttentionRows"/>).
/// </summary>
/// <param name="Pool">The layer's shared latent pool.</param>
/// <param name="Table">The block table that addresses it.</param>
/// <param name="Rows">The stream's rows, uploaded for this pass.</param>
/// <param name="DecodeRows">Leading rows that are decode queries.</param>
/// <param name="Chosen">
/// Where the rows' tokens were chosen, when they were (an MTP draft after the step that chose them): the rows' tokens name
/// rows of this buffer, and the pass embeds the ids chosen there (<see cref="IBackend.EmbeddingChosenRows"/>).
/// </param>
internal readonly record struct PagedRows(LatentPool Pool, BlockTable Table, StepRows Rows, int DecodeRows, TokenChoiceBuffer? Chosen = null);

/// <summary>How a pass's rows reach a layer's caches: each sequence's <see cref="Segment"/>, and in a paged step the rows on the device.</summary>
/// <param name="Segments">Each sequence's rows of the stream over its cache of the layer.</param>
/// <param name="Paged">In a paged step, every row's address in the layer's pool.</param>
internal readonly record struct LayerRows(ReadOnlyMemory<Segment> Segments, PagedRows? Paged = null);

/// <summary>The intermediate tensors of a forward pass; two that are alive at once never share a name.</summary>
internal enum Activation
{
    Residual,
    NormedEven,
    NormedOdd,
    Query,
    QueryLatent,
    KeyValue,
    AttentionOutput,
    AttentionProjection,
    FfnInput,
    FfnOutput,
    MlpGate,
    MlpUp,
    HeadInput,
    Logits,
    DraftLogits,
    MtpInput,
    MtpEmbedding,
    MtpHidden,
    MtpConcat,
    MtpResidual,
    MtpNormed,
    MtpOutput,
}

/// <summary>A taken resource and whether disposing it frees it (taken from an arena: no).</summary>
internal readonly struct Taken<T>(T value, bool owned) : IDisposable
    where T : IDisposable
{
    public T Value => value;

    public void Dispose()
    {
        if (owned)
        {
            value.Dispose();
        }
    }
}

/// <summary>
/// Where a forward pass gets its intermediates. Each tensor taken is disposed by the caller when it is done with it:
/// <see cref="FreshActivations"/> allocates and frees each one; <see cref="ActivationArena"/> hands out views of
/// tensors sized once, so a step allocates nothing.
/// </summary>
internal abstract class Activations
{
    /// <summary>A [<paramref name="rows"/>, <paramref name="cols"/>] tensor for <paramref name="which"/> (contents undefined).</summary>
    public abstract Tensor Take(Activation which, int rows, int cols);

    /// <summary>A routing buffer for at least <paramref name="tokens"/> tokens.</summary>
    public abstract Taken<Routing> TakeRouting(int tokens, int experts, int topK);

    /// <summary>The kind of tensor <paramref name="which"/> is: the logits (a step's and its drafts') stay fp32, everything else is an activation.</summary>
    protected static TensorKind KindOf(Activation which) => which is Activation.Logits or Activation.DraftLogits ? TensorKind.Logits : TensorKind.Activation;
}

/// <summary>Allocates every intermediate when it is taken (a single sequence's session).</summary>
internal sealed class FreshActivations(IBackend backend) : Activations
{
    public override Tensor Take(Activation which, int rows, int cols) => backend.Allocate(rows, cols, KindOf(which));

    public override Taken<Routing> TakeRouting(int tokens, int experts, int topK) => new(backend.AllocateRouting(tokens, experts, topK), owned: true);
}

/// <summary>What an arena holds: tensors by (activation, width) and routing buffers by (experts, top-k), each for MaxRows rows.</summary>
internal sealed record ArenaPlan(IReadOnlyList<(Activation Which, int Cols)> Tensors, IReadOnlyList<(int Experts, int TopK)> Routings)
{
    /// <summary>
    /// The main stream of a step on a device that runs <paramref name="layers"/> (all of them by default), whole or as
    /// <paramref name="shard"/>: the residual stream and its two normed ping-pong buffers, and what a decoder layer's
    /// steps (<see cref="LayerSteps"/>) take over those layers (dense and MoE).
    /// </summary>
    public static ArenaPlan Main(ModelConfig config, IEnumerable<int>? layers = null, LayerShard? shard = null)
    {
        var d = config.HiddenSize;
        var kinds = (layers ?? Enumerable.Range(0, config.NumHiddenLayers)).Select(config.IsMoeLayer).Distinct();
        return Combine([(Activation.Residual, d), (Activation.NormedEven, d), (Activation.NormedOdd, d)], [.. kinds.Select(moe => Layer(config, moe, shard))]);
    }

    /// <summary>
    /// The MTP stream on a device that runs the layer, whole or as <paramref name="shard"/>: the layer's input and output and
    /// its decoder layer's buffers; with <paramref name="input"/>, the buffers of the module's input side
    /// (<see cref="LayerSteps.Mtp"/>) too.
    /// </summary>
    public static ArenaPlan Mtp(ModelConfig config, LayerShard? shard = null, bool input = true)
    {
        var d = config.HiddenSize;
        (Activation, int)[] inputs = input ? [(Activation.MtpInput, d), (Activation.MtpEmbedding, d), (Activation.MtpHidden, d), (Activation.MtpConcat, 2 * d)] : [];
        return Combine([.. inputs, (Activation.MtpResidual, d), (Activation.MtpNormed, d), (Activation.MtpOutput, d)],
            [Layer(config, config.IsMoeLayer(config.NumHiddenLayers), shard)]);
    }

    /// <summary>
    /// The head: the rows whose logits are wanted and their fp32 logits; with <paramref name="drafts"/>, the fp32 logits of
    /// the MTP drafts too, apart, so a step's drafts leave its logits for the host to read.
    /// </summary>
    public static ArenaPlan Head(ModelConfig config, bool drafts = false) =>
        new([(Activation.HeadInput, config.HiddenSize), (Activation.Logits, config.VocabSize), .. drafts ? [(Activation.DraftLogits, config.VocabSize)] : Array.Empty<(Activation, int)>()], []);

    /// <summary>One decoder layer: MLA, then the dense MLP or the MoE; a shard's heads and dense MLP columns only.</summary>
    private static ArenaPlan Layer(ModelConfig c, bool moe, LayerShard? shard)
    {
        var heads = shard?.Heads ?? c.NumAttentionHeads;
        List<(Activation, int)> t =
        [
            (Activation.Query, heads * c.QkHeadDim),
            (Activation.KeyValue, c.KvCacheDim),
            (Activation.AttentionOutput, heads * c.VHeadDim),
            (Activation.AttentionProjection, c.HiddenSize),
            (Activation.FfnInput, c.HiddenSize),
            (Activation.FfnOutput, c.HiddenSize),
        ];
        if (c.QLoraRank is { } qLora)
        {
            t.Add((Activation.QueryLatent, qLora));
        }

        if (!moe)
        {
            var width = shard?.Dense.Count ?? c.IntermediateSize;
            t.Add((Activation.MlpGate, width));
            t.Add((Activation.MlpUp, width));
        }

        return new(t, moe ? [(c.NRoutedExperts, c.NumExpertsPerTok)] : []);
    }

    private static ArenaPlan Combine(IReadOnlyList<(Activation, int)> own, IReadOnlyList<ArenaPlan> parts) =>
        new([.. own.Concat(parts.SelectMany(p => p.Tensors)).Distinct()], [.. parts.SelectMany(p => p.Routings).Distinct()]);
}

/// <summary>
/// Every buffer of an <see cref="ArenaPlan"/>, allocated for <see cref="MaxRows"/> rows when the arena is made; every
/// take is a view of one's first rows, so a step allocates nothing. Taking what the plan lacks is a bug and throws.
/// </summary>
internal sealed class ActivationArena : Activations, IDisposable
{
    private readonly IBackend _backend;
    private readonly Dictionary<(Activation, int), Tensor> _tensors = [];
    private readonly Dictionary<(int, int), Routing> _routings = [];
    private readonly HashSet<(Activation, int)> _takenTensors = [];
    private readonly HashSet<(int, int)> _takenRoutings = [];

    public ActivationArena(IBackend backend, int maxRows, ArenaPlan plan)
    {
        _backend = backend;
        MaxRows = maxRows;
        try
        {
            foreach (var key in plan.Tensors)
            {
                _tensors[key] = backend.Allocate(maxRows, key.Cols, KindOf(key.Which));
            }

            foreach (var key in plan.Routings)
            {
                _routings[key] = backend.AllocateRouting(maxRows, key.Experts, key.TopK);
            }
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    /// <summary>The most rows a take may ask for.</summary>
    public int MaxRows { get; }

    /// <summary>Planned buffers no take has asked for yet (a plan that holds more than steps use).</summary>
    public IEnumerable<string> Unused =>
        _tensors.Keys.Where(k => !_takenTensors.Contains(k)).Select(k => $"{k.Item1} [{k.Item2}]")
            .Concat(_routings.Keys.Where(k => !_takenRoutings.Contains(k)).Select(k => $"routing [{k.Item1} experts, top {k.Item2}]"));

    public override Tensor Take(Activation which, int rows, int cols)
    {
        Check(which.ToString(), rows);
        var key = (which, cols);
        if (!_tensors.TryGetValue(key, out var tensor))
        {
            throw new InvalidOperationException($"{which} [{cols}] is not in the step arena's plan");
        }

        _takenTensors.Add(key);
        return _backend.View(tensor, 0, rows);
    }

    public override Taken<Routing> TakeRouting(int tokens, int experts, int topK)
    {
        Check("routing", tokens);
        var key = (experts, topK);
        if (!_routings.TryGetValue(key, out var routing))
        {
            throw new InvalidOperationException($"routing [{experts} experts, top {topK}] is not in the step arena's plan");
        }

        _takenRoutings.Add(key);
        return new(routing, owned: false);
    }

    private void Check(string what, int rows)
    {
        if (rows < 0 || rows > MaxRows)
        {
            throw new ArgumentOutOfRangeException(nameof(rows), rows, $"{what}: the step arena holds {MaxRows} rows");
        }
    }

    public void Dispose()
    {
        foreach (var t in _tensors.Values)
        {
            t.Dispose();
        }

        foreach (var r in _routings.Values)
        {
            r.Dispose();
        }

        _tensors.Clear();
        _routings.Clear();
    }
}
