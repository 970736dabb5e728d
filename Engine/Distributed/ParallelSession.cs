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
    private readonly FreshActivations[] _activations; // [device]
    private readonly LatentCache?[][] _caches; // [device][layer]

    internal ParallelSession(ParallelModel model)
    {
        _model = model;
        _comm = model.Communicator;
        var c = model.Config;
        var devices = model.Devices;
        _activations = [.. devices.Select(w => new FreshActivations(w.Backend))];
        _caches = new LatentCache?[devices.Length][];
        for (var r = 0; r < devices.Length; r++)
        {
            _caches[r] = new LatentCache?[c.NumHiddenLayers];
        }

        for (var i = 0; i < c.NumHiddenLayers; i++)
        {
            foreach (var r in model.Layout.Runners[i])
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
            using var logits = b.Allocate(1, _model.VocabSize, TensorKind.Logits);
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
            using var logits = b.Allocate(normed.Rows, _model.VocabSize, TensorKind.Logits);
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

    /// <summary>Embedding, every layer, final norm (<see cref="ModelPass"/>); returns the head device's backend and the normed hidden [T, D] on it.</summary>
    private (IBackend Backend, Tensor Normed) RunLayers(ReadOnlySpan<int> tokens)
    {
        var count = tokens.Length;
        LayerSteps.CheckStep(tokens, Length, _model.MaxSequenceLength, _model.VocabSize);
        var start = Length;
        var normed = ModelPass.Run(_model.Layout, tokens, _activations, (r, i) => new LayerRows(new[] { new Segment(_caches[r][i]!, start, 0, count) }), null);
        Length = start + count;
        return (_model.Devices[_model.Plan.HeadDevice].Backend, normed);
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
