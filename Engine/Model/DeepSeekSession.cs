using DeepSeekCuda.Backends;
using DeepSeekCuda.Inference;

namespace DeepSeekCuda.Model;

/// <summary>
/// One sequence of a <see cref="DeepSeekModel"/>: a latent cache per layer (and one for the MTP layer),
/// its length, and the last token's hidden state after the final norm (the MTP module's input).
/// Multi-token calls may start at any position (chunked prefill); a query at position p sees keys ≤ p.
/// Not thread-safe; sessions are independent of each other.
/// </summary>
public sealed class DeepSeekSession : IModelSession
{
    private readonly DeepSeekModel _model;
    private readonly IBackend _b;
    private readonly LatentCache[] _caches;
    private readonly LatentCache? _mtpCache;
    private readonly Tensor _lastHidden;
    private readonly DeviceLayout _layout;
    private readonly LayerContext _context;
    private readonly FreshActivations _activations;

    internal DeepSeekSession(DeepSeekModel model)
    {
        _model = model;
        _b = model.Backend;
        var c = model.Config;
        _caches = new LatentCache[model.Layers.Length];
        for (var i = 0; i < _caches.Length; i++)
        {
            _caches[i] = _b.AllocateLatentCache(model.MaxSequenceLength, c.KvLoraRank, c.QkRopeHeadDim);
        }

        _mtpCache = model.HasMtp ? _b.AllocateLatentCache(model.MaxSequenceLength, c.KvLoraRank, c.QkRopeHeadDim) : null;
        _lastHidden = _b.Allocate(1, c.HiddenSize);
        _layout = ((IPagedModel)model).Layout;
        _context = _layout.Devices[0].Context;
        _activations = new FreshActivations(_b);
    }

    /// <inheritdoc />
    public int Length { get; private set; }

    /// <summary>Positions held by the MTP layer's cache (fed in order through <c>MtpForward</c>).</summary>
    public int MtpLength { get; private set; }

    /// <inheritdoc />
    public void Forward(ReadOnlySpan<int> tokens, Span<float> lastLogits)
    {
        if (lastLogits.Length < _model.VocabSize)
        {
            throw new ArgumentException($"lastLogits holds {lastLogits.Length} values; the vocabulary has {_model.VocabSize}", nameof(lastLogits));
        }

        using var normed = RunLayers(tokens, null);
        using var last = _b.Allocate(1, _model.Config.HiddenSize);
        _b.CopyRows(normed, normed.Rows - 1, last, 0, 1);
        using var logits = _b.Allocate(1, _model.VocabSize, TensorKind.Logits);
        _b.Logits(last, _model.Head, logits);
        _b.Download(logits, lastLogits[.._model.VocabSize]);
    }

    /// <summary>
    /// Runs <paramref name="tokens"/> at positions <see cref="Length"/>.. and returns the logits of every
    /// position, [tokens, vocab] row-major. <paramref name="observer"/>, when given, receives the named
    /// intermediates (fixture names: embed, layer{i}.attn_out, ..., final_norm).
    /// </summary>
    public float[] ForwardAll(ReadOnlySpan<int> tokens, Action<Intermediate>? observer = null)
    {
        using var normed = RunLayers(tokens, observer);
        using var logits = _b.Allocate(normed.Rows, _model.VocabSize, TensorKind.Logits);
        _b.Logits(normed, _model.Head, logits);
        var result = new float[logits.Length];
        _b.Download(logits, result);
        return result;
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
        var d = _model.Config.HiddenSize;
        if (!hiddens.IsEmpty && hiddens.Length != tokens.Length * d)
        {
            throw new ArgumentException($"hiddens holds {hiddens.Length} values; {tokens.Length} tokens need {tokens.Length * d}", nameof(hiddens));
        }

        using var normed = RunLayers(tokens, null);
        if (!hiddens.IsEmpty)
        {
            _b.Download(normed, hiddens);
        }

        using var tail = _b.Allocate(logitRows, d);
        _b.CopyRows(normed, normed.Rows - logitRows, tail, 0, logitRows);
        using var logits = _b.Allocate(logitRows, _model.VocabSize, TensorKind.Logits);
        _b.Logits(tail, _model.Head, logits);
        var result = new float[logits.Length];
        _b.Download(logits, result);
        return result;
    }

    /// <summary>The last processed token's hidden state after the final norm, [hidden_size] (the MTP module's h_i).</summary>
    public float[] GetLastHidden()
    {
        if (Length == 0)
        {
            throw new InvalidOperationException("the session is empty");
        }

        var h = new float[_model.Config.HiddenSize];
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
    /// </summary>
    public float[] MtpForward(ReadOnlySpan<float> hiddens, ReadOnlySpan<int> nextTokens, int startPosition, Action<Intermediate>? observer = null)
    {
        var mtp = _model.Mtp ?? throw new InvalidOperationException("the model was loaded without an MTP layer");
        var c = _model.Config;
        var n = nextTokens.Length;
        if (n == 0 || hiddens.Length != n * c.HiddenSize)
        {
            throw new ArgumentException($"need one hidden of {c.HiddenSize} values per next token ({n} tokens, {hiddens.Length} values)");
        }

        if (startPosition < 0 || startPosition > MtpLength || startPosition + n > _model.MaxSequenceLength)
        {
            throw new ArgumentOutOfRangeException(nameof(startPosition), startPosition,
                $"MTP positions must continue its cache (length {MtpLength}) within {_model.MaxSequenceLength}");
        }

        LayerSteps.CheckIds(nextTokens, _model.VocabSize);
        using var h = _b.Upload(hiddens, n, c.HiddenSize);
        using var normed = _b.Allocate(n, c.HiddenSize);
        LayerSteps.Mtp(_context, mtp, _model.Embed, h, nextTokens, new LayerRows(new[] { new Segment(_mtpCache!, startPosition, 0, n) }), _activations, normed, observer);
        MtpLength = startPosition + n;
        using var logits = _b.Allocate(n, _model.VocabSize, TensorKind.Logits);
        _b.Logits(normed, _model.Head, logits);
        var result = new float[logits.Length];
        _b.Download(logits, result);
        return result;
    }

    /// <summary>Embedding, every layer and the final norm (<see cref="ModelPass"/>); returns the normed hidden [T, D] and advances <see cref="Length"/>.</summary>
    private Tensor RunLayers(ReadOnlySpan<int> tokens, Action<Intermediate>? observer)
    {
        var count = tokens.Length;
        LayerSteps.CheckStep(tokens, Length, _model.MaxSequenceLength, _model.VocabSize);
        var start = Length;
        var normed = ModelPass.Run(_layout, tokens, [_activations], (_, i) => new LayerRows(new[] { new Segment(_caches[i], start, 0, count) }), observer);
        _b.CopyRows(normed, count - 1, _lastHidden, 0, 1);
        Length = start + count;
        return normed;
    }

    /// <summary>Releases the session's caches.</summary>
    public void Dispose()
    {
        foreach (var cache in _caches)
        {
            cache.Dispose();
        }

        _mtpCache?.Dispose();
        _lastHidden.Dispose();
    }
}
