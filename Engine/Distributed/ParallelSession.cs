using DeepSeekCuda.Backends;
using DeepSeekCuda.Inference;
using DeepSeekCuda.Model;

namespace DeepSeekCuda.Distributed;

/// <summary>
/// One sequence of a <see cref="ParallelModel"/>. Each layer runs on the devices that hold it (one
/// pipeline stage, or every device); where several run it, their partial attention and FFN outputs are
/// all-reduced before the residual add, so every device carries the same residual stream. Between
/// pipeline stages the residual and its normed copy move with the communicator. Each call ends with the
/// communicator's <see cref="ICommunicator.Barrier"/> after the logits are downloaded (the host waits for them anyway), so a
/// collective that failed on the device (a timed-out all-reduce barrier) surfaces here. Not thread-safe.
/// </summary>
public sealed class ParallelSession : IModelSession
{
    private readonly ParallelModel _model;
    private readonly ICommunicator _comm;
    private readonly int[][] _runners; // [layer] → devices that run it
    private readonly LatentCache?[][] _caches; // [device][layer]

    internal ParallelSession(ParallelModel model)
    {
        _model = model;
        _comm = model.Communicator;
        var c = model.Config;
        var devices = model.Devices;
        _runners = model.Layout.Runners;
        _caches = new LatentCache?[devices.Length][];
        for (var r = 0; r < devices.Length; r++)
        {
            _caches[r] = new LatentCache?[c.NumHiddenLayers];
        }

        for (var i = 0; i < c.NumHiddenLayers; i++)
        {
            foreach (var r in _runners[i])
            {
                // Every device running a layer keeps that layer's whole latent cache (see PlacementPlan).
                _caches[r][i] = devices[r].Backend.AllocateLatentCache(model.MaxSequenceLength, c.KvLoraRank, c.QkRopeHeadDim);
            }
        }
    }

    /// <inheritdoc />
    public int Length { get; private set; }

    /// <inheritdoc />
    public void Forward(ReadOnlySpan<int> tokens, Span<float> lastLogits)
    {
        if (lastLogits.Length < _model.VocabSize)
        {
            throw new ArgumentException($"lastLogits holds {lastLogits.Length} values; the vocabulary has {_model.VocabSize}", nameof(lastLogits));
        }

        var (b, normed) = RunLayers(tokens);
        using (normed)
        {
            var w = _model.Devices[_model.Plan.HeadDevice];
            using var last = b.Allocate(1, _model.Config.HiddenSize);
            b.CopyRows(normed, normed.Rows - 1, last, 0, 1);
            using var logits = b.Allocate(1, _model.VocabSize);
            b.Logits(last, w.Head!, logits);
            b.Download(logits, lastLogits[.._model.VocabSize]);
            _comm.Barrier();
        }
    }

    /// <summary>Runs <paramref name="tokens"/> at positions <see cref="Length"/>.. and returns the logits of every position, [tokens, vocab].</summary>
    public float[] ForwardAll(ReadOnlySpan<int> tokens)
    {
        var (b, normed) = RunLayers(tokens);
        using (normed)
        {
            var w = _model.Devices[_model.Plan.HeadDevice];
            using var logits = b.Allocate(normed.Rows, _model.VocabSize);
            b.Logits(normed, w.Head!, logits);
            var result = new float[logits.Length];
            b.Download(logits, result);
            _comm.Barrier();
            return result;
        }
    }

    /// <summary>Forgets positions ≥ <paramref name="length"/>; later calls overwrite them.</summary>
    public void Truncate(int length)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(length, Length);
        Length = length;
    }

    /// <summary>Embedding, every layer, final norm; returns the head device's backend and the normed hidden [T, D] on it.</summary>
    private (IBackend Backend, Tensor Normed) RunLayers(ReadOnlySpan<int> tokens)
    {
        var c = _model.Config;
        var count = tokens.Length;
        LayerSteps.CheckStep(tokens, Length, _model.MaxSequenceLength, _model.VocabSize);

        var start = Length;
        var devices = _model.Devices;
        var n = devices.Length;
        var h = new Tensor?[n]; // [T, D] residual stream, on the devices running the current layer
        var normed = new Tensor?[n]; // [T, D] input_layernorm(h) of the current layer
        try
        {
            var active = _runners[0];
            foreach (var r in active)
            {
                var b = devices[r].Backend;
                h[r] = b.Allocate(count, c.HiddenSize);
                b.Embedding(devices[r].Embed!, tokens, h[r]!);
                normed[r] = b.Allocate(count, c.HiddenSize);
                b.RmsNorm(h[r]!, devices[r].Layers[0]!.InputNorm, normed[r]!);
            }

            for (var i = 0; i < c.NumHiddenLayers; i++)
            {
                var run = _runners[i];
                if (!run.SequenceEqual(active))
                {
                    // Pipeline boundary: one stage hands the residual and its normed copy to the next.
                    if (active.Length != 1 || run.Length != 1)
                    {
                        throw new InvalidOperationException($"layer {i} changes from devices [{string.Join(",", active)}] to [{string.Join(",", run)}]");
                    }

                    int from = active[0], to = run[0];
                    var b = devices[to].Backend;
                    (h[to], normed[to]) = (b.Allocate(count, c.HiddenSize), b.Allocate(count, c.HiddenSize));
                    _comm.Copy(h[from]!, from, h[to]!, to);
                    _comm.Copy(normed[from]!, from, normed[to]!, to);
                    Release(h, normed, from);
                    active = run;
                }

                RunLayer(i, run, h, normed, start);
            }

            var head = _model.Plan.HeadDevice;
            var result = normed[head] ?? throw new InvalidOperationException($"the head device {head} does not run the last layer");
            normed[head] = null;
            Length = start + count;
            return (devices[head].Backend, result);
        }
        finally
        {
            for (var r = 0; r < n; r++)
            {
                Release(h, normed, r);
            }
        }
    }

    /// <summary>Layer <paramref name="i"/> on devices <paramref name="run"/>: h += MLA; h += FFN; normed ← next norm(h).</summary>
    private void RunLayer(int i, int[] run, Tensor?[] h, Tensor?[] normed, int start)
    {
        var devices = _model.Devices;
        var parts = new LayerPart[run.Length];
        for (var k = 0; k < run.Length; k++)
        {
            var r = run[k];
            var w = devices[r];
            // The layer's input norm is consumed by its attention: its buffer receives the next norm.
            parts[k] = new LayerPart(w.Context, w.Layers[i]!, h[r]!, normed[r]!, new[] { new Segment(_caches[r][i]!, start, 0, normed[r]!.Rows) },
                new FreshActivations(w.Backend), w.NormAfter(i), normed[r]!);
        }

        LayerSteps.Layer(parts, _comm.AllReduceSum, null, "");
    }

    private static void Release(Tensor?[] h, Tensor?[] normed, int r)
    {
        h[r]?.Dispose();
        normed[r]?.Dispose();
        h[r] = null;
        normed[r] = null;
    }

    /// <summary>Releases the caches on every device.</summary>
    public void Dispose()
    {
        foreach (var cache in _caches.SelectMany(c => c))
        {
            cache?.Dispose();
        }
    }
}
