using DeepSeekCuda.Backends;
using DeepSeekCuda.Inference;

namespace DeepSeekCuda.Model;

/// <summary>
/// One sequence of a <see cref="DeepSeekModel"/>, on one device or spread over several (one device is a layout of one): a latent cache per layer on each device that runs it, one for the MTP
/// layer on each device that runs that layer when the model has one, its length, and the last token's hidden state after the final norm
/// (the MTP module's input). The caches hold what the session has used, not the model's whole length: a new session holds none,
/// and a call that needs more positions moves them to caches at least twice as long (<see cref="SessionCaches"/>); an allocation that
/// fails there leaves the session as it was. Every pass is <see cref="ModelPass"/>'s. Multi-token calls may start at any position (chunked
/// prefill); a query at position p sees keys ≤ p. Over several devices each call that returns logits ends with the collectives'
/// barrier after the host has read them (the host waits for them anyway), so a collective that failed on a device surfaces in that call.
/// Not thread-safe; sessions are independent of each other.
/// </summary>
public sealed class DeepSeekSession : IModelSession
{
    private readonly DeviceLayout _layout;
    private readonly DeviceWeights _head;            // lm_head and the MTP module
    private readonly IBackend _b;                    // the head device's backend
    private readonly SessionCaches _caches;          // [device][layer]: every device running a layer keeps that layer's whole latent cache (see PlacementPlan)
    private readonly SessionCaches _mtpCaches;       // [device][0]: the MTP layer's, where it runs
    private readonly Tensor _lastHidden;             // [1, D] on the head device
    private readonly FreshActivations[] _activations; // [device]

    internal DeepSeekSession(DeviceLayout layout)
    {
        _layout = layout;
        _head = layout.Devices[layout.HeadDevice];
        _b = _head.Backend;
        _activations = [.. layout.Devices.Select(w => new FreshActivations(w.Backend))];
        var c = layout.Config;
        _caches = new SessionCaches(layout.Devices, [.. layout.Devices.Select(w => w.Layers.Select(l => l is not null).ToArray())], c, layout.MaxSequenceLength);
        _mtpCaches = new SessionCaches(layout.Devices, [.. layout.Devices.Select(w => new[] { w.Mtp is not null })], c, layout.MaxSequenceLength);
        _lastHidden = _b.Allocate(1, c.HiddenSize);
    }

    /// <inheritdoc />
    public int Length { get; private set; }

    /// <summary>Positions held by the MTP layer's cache (fed in order through <c>MtpForward</c>).</summary>
    public int MtpLength { get; private set; }

    private int VocabSize => _layout.Config.VocabSize;

    /// <inheritdoc />
    public void Forward(ReadOnlySpan<int> tokens, Span<float> lastLogits)
    {
        if (lastLogits.Length < VocabSize)
        {
            throw new ArgumentException($"lastLogits holds {lastLogits.Length} values; the vocabulary has {VocabSize}", nameof(lastLogits));
        }

        using var normed = RunLayers(tokens, null);
        using var last = _b.View(normed, normed.Rows - 1, 1);
        Download(Logits(last), lastLogits[..VocabSize]);
    }

    /// <summary>
    /// Runs <paramref name="tokens"/> at positions <see cref="Length"/>.. and returns the logits of every
    /// position, [tokens, vocab] row-major. <paramref name="observer"/>, when given, receives the named
    /// intermediates (fixture names: embed, layer{i}.attn_out, ..., final_norm).
    /// </summary>
    public float[] ForwardAll(ReadOnlySpan<int> tokens, Action<Intermediate>? observer = null)
    {
        using var normed = RunLayers(tokens, observer);
        return Download(Logits(normed));
    }

    /// <summary>
    /// Runs <paramref name="tokens"/> at positions <see cref="Length"/>.. and returns the logits of the last
    /// <paramref name="logitRows"/> positions, [logitRows, vocab] row-major (a speculative verify step wants
    /// two). When <paramref name="hiddens"/> is not empty it receives every position's hidden state after
    /// the final norm, [tokens, hidden_size]: the MTP module's inputs.
    /// </summary>
    public float[] Forward(ReadOnlySpan<int> tokens, int logitRows, Span<float> hiddens)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(logitRows, 1);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(logitRows, tokens.Length);
        var d = _layout.Config.HiddenSize;
        if (!hiddens.IsEmpty && hiddens.Length != tokens.Length * d)
        {
            throw new ArgumentException($"hiddens holds {hiddens.Length} values; {tokens.Length} tokens need {tokens.Length * d}", nameof(hiddens));
        }

        using var normed = RunLayers(tokens, null);
        if (!hiddens.IsEmpty)
        {
            _b.Download(normed, hiddens);
        }

        using var tail = _b.View(normed, normed.Rows - logitRows, logitRows);
        return Download(Logits(tail));
    }

    /// <summary>The last processed token's hidden state after the final norm, [hidden_size] (the MTP module's h_i).</summary>
    public float[] GetLastHidden()
    {
        if (Length == 0)
        {
            throw new InvalidOperationException("the session is empty");
        }

        var h = new float[_layout.Config.HiddenSize];
        _b.Download(_lastHidden, h);
        return h;
    }

    /// <summary>
    /// Forgets positions ≥ <paramref name="length"/> (speculative-decoding rollback); later calls overwrite
    /// them. The MTP cache is cut to the same length when it is longer.
    /// </summary>
    public void Truncate(int length)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(length, Length);
        Length = length;
        MtpLength = Math.Min(MtpLength, length);
    }

    /// <summary>
    /// One MTP step: the draft logits [vocab] for the token after <paramref name="nextToken"/>, from the main
    /// model's hidden after the final norm at <paramref name="position"/> (see the multi-position overload).
    /// </summary>
    public float[] MtpForward(ReadOnlySpan<float> hidden, int nextToken, int position) =>
        MtpForward(hidden, [nextToken], position);

    /// <summary>
    /// The MTP module (MODEL.md §6) for n consecutive positions start .. start+n−1: for each, the main
    /// model's hidden after the final norm at that position (<paramref name="hiddens"/> [n, D]) and the
    /// token that follows it (<paramref name="nextTokens"/> [n]); returns the draft logits for the token
    /// after that, [n, vocab]. Concatenation is [embedding ; hidden]; the MTP layer runs at the hidden's
    /// position with its own latent cache, so positions must be fed in order (start ≤ <see cref="MtpLength"/>;
    /// a smaller start overwrites, as after a rollback). vLLM's zeroing of the embedding at position 0 is
    /// not applied: it is a serving convention, not part of the module (MODEL.md §6, UNCONFIRMED items).
    /// A model spread over several devices runs the layer where its last layer runs (sharded under tensor/expert parallelism).
    /// </summary>
    public float[] MtpForward(ReadOnlySpan<float> hiddens, ReadOnlySpan<int> nextTokens, int startPosition, Action<Intermediate>? observer = null)
    {
        if (_layout.Mtp is null)
        {
            throw new InvalidOperationException("the model was loaded without an MTP layer");
        }

        var c = _layout.Config;
        var n = nextTokens.Length;
        if (n == 0 || hiddens.Length != n * c.HiddenSize)
        {
            throw new ArgumentException($"need one hidden of {c.HiddenSize} values per next token ({n} tokens, {hiddens.Length} values)");
        }

        if (startPosition < 0 || startPosition > MtpLength || startPosition + n > _layout.MaxSequenceLength)
        {
            throw new ArgumentOutOfRangeException(nameof(startPosition), startPosition,
                $"MTP positions must continue its cache (length {MtpLength}) within {_layout.MaxSequenceLength}");
        }

        LayerSteps.CheckIds(nextTokens, VocabSize);
        _mtpCaches.Reserve(startPosition + n, kept: startPosition);
        using var h = _b.Upload(hiddens, n, c.HiddenSize);
        var runners = _layout.MtpRunners;
        var parts = new MtpPart[runners.Length];
        try
        {
            for (var k = 0; k < runners.Length; k++)
            {
                var r = runners[k];
                var w = _layout.Devices[r];
                parts[k] = new MtpPart(w.Context, w.Mtp!, new LayerRows(new[] { new Segment(_mtpCaches[r, 0], startPosition, 0, n) }), _activations[r],
                    w.Backend.Allocate(n, c.HiddenSize));
            }

            LayerSteps.Mtp(parts, _head.Embed!, h, nextTokens, _layout.AllReduce, observer);
            MtpLength = startPosition + n;
            return Download(Logits(parts[Array.IndexOf(runners, _layout.HeadDevice)].Normed!));
        }
        finally
        {
            foreach (var p in parts)
            {
                p.Normed?.Dispose();
            }
        }
    }

    /// <summary>Embedding, every layer and the final norm (<see cref="ModelPass"/>); returns the head device's normed hidden [T, D] and advances <see cref="Length"/>.</summary>
    private Tensor RunLayers(ReadOnlySpan<int> tokens, Action<Intermediate>? observer)
    {
        var count = tokens.Length;
        LayerSteps.CheckStep(tokens, Length, _layout.MaxSequenceLength, VocabSize);
        var start = Length;
        _caches.Reserve(start + count, kept: start);
        var normed = ModelPass.Run(_layout, tokens, _activations, (r, i) => new LayerRows(new[] { new Segment(_caches[r, i], start, 0, count) }), observer);
        _b.CopyRows(normed, count - 1, _lastHidden, 0, 1);
        Length = start + count;
        return normed;
    }

    /// <summary>lm_head over <paramref name="normed"/> (on the head device): [rows, vocab], disposed by the caller (<see cref="Download(Tensor)"/>).</summary>
    private Tensor Logits(Tensor normed)
    {
        var logits = _b.Allocate(normed.Rows, VocabSize, TensorKind.Logits);
        _b.Logits(normed, _head.Head!, logits);
        return logits;
    }

    /// <summary>Downloads and disposes <paramref name="logits"/>.</summary>
    private float[] Download(Tensor logits)
    {
        var result = new float[logits.Length];
        Download(logits, result);
        return result;
    }

    /// <summary>Downloads and disposes <paramref name="logits"/>, then the collectives' barrier (a failed collective surfaces here).</summary>
    private void Download(Tensor logits, Span<float> into)
    {
        using (logits)
        {
            _b.Download(logits, into);
        }

        _layout.Communicator?.Barrier();
    }

    /// <summary>Releases the session's caches on every device.</summary>
    public void Dispose()
    {
        _caches.Dispose();
        _mtpCaches.Dispose();
        _lastHidden.Dispose();
    }
}
