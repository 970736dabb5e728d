using DeepSeekCuda.Backends;

namespace DeepSeekCuda.Model;

/// <summary>One sequence's rows of a token stream: rows <paramref name="FirstRow"/>.. hold positions <paramref name="Start"/>.. of <paramref name="Cache"/>.</summary>
/// <param name="Cache">The sequence's latent cache of the layer being run.</param>
/// <param name="Start">Position of the first row.</param>
/// <param name="FirstRow">First row in the stream.</param>
/// <param name="Rows">Rows (tokens) of the sequence in the stream.</param>
internal readonly record struct Segment(LatentCache Cache, int Start, int FirstRow, int Rows);

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
}

/// <summary>Allocates every intermediate when it is taken (a single sequence's session).</summary>
internal sealed class FreshActivations(IBackend backend) : Activations
{
    public override Tensor Take(Activation which, int rows, int cols) => backend.Allocate(rows, cols);

    public override Taken<Routing> TakeRouting(int tokens, int experts, int topK) => new(backend.AllocateRouting(tokens, experts, topK), owned: true);
}

/// <summary>
/// One tensor of <see cref="MaxRows"/> rows per (activation, width), allocated the first time it is taken; every
/// take is a view of its first rows. After a step that took each of them, steps allocate nothing.
/// </summary>
internal sealed class ActivationArena(IBackend backend, int maxRows) : Activations, IDisposable
{
    private readonly Dictionary<(Activation, int), Tensor> _tensors = [];
    private readonly Dictionary<(int, int), Routing> _routings = [];

    /// <summary>The most rows a take may ask for.</summary>
    public int MaxRows { get; } = maxRows;

    /// <summary>Tensors and routing buffers allocated so far.</summary>
    public int Allocations => _tensors.Count + _routings.Count;

    public override Tensor Take(Activation which, int rows, int cols)
    {
        Check(which.ToString(), rows);
        if (!_tensors.TryGetValue((which, cols), out var tensor))
        {
            tensor = backend.Allocate(MaxRows, cols);
            _tensors[(which, cols)] = tensor;
        }

        return backend.View(tensor, 0, rows);
    }

    public override Taken<Routing> TakeRouting(int tokens, int experts, int topK)
    {
        Check("routing", tokens);
        if (!_routings.TryGetValue((experts, topK), out var routing))
        {
            routing = backend.AllocateRouting(MaxRows, experts, topK);
            _routings[(experts, topK)] = routing;
        }

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
