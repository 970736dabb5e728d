using DeepSeekCuda.Inference;
using DeepSeekCuda.Model;

namespace DeepSeekCuda.Serving;

/// <summary>
/// <see cref="IStepRunner"/> over per-sequence sessions (the CPU backend's latent cache belongs to one
/// sequence): each slot holds its own session and a step runs its entries one after another. Drafting
/// and multi-row logits need a <see cref="DeepSeekModel"/>; any <see cref="ILanguageModel"/> serves plain decoding.
/// </summary>
public sealed class SessionStepRunner : IStepRunner
{
    private readonly ILanguageModel _model;
    private readonly DeepSeekModel? _deepSeek;
    private readonly Dictionary<int, SlotState> _slots = [];

    /// <summary>Creates a runner over <paramref name="model"/> (not owned: the caller disposes it).</summary>
    public SessionStepRunner(ILanguageModel model)
    {
        _model = model ?? throw new ArgumentNullException(nameof(model));
        _deepSeek = model as DeepSeekModel;
    }

    /// <inheritdoc />
    public int VocabSize => _model.VocabSize;

    /// <inheritdoc />
    public int MaxSequenceLength => _model.MaxSequenceLength;

    /// <inheritdoc />
    public bool CanDraft => _deepSeek?.HasMtp == true;

    /// <inheritdoc />
    /// <remarks>Each session holds its own cache: the block table is bookkeeping only here.</remarks>
    public void Attach(KvBlockManager blocks, int maxTokensPerStep) => ArgumentNullException.ThrowIfNull(blocks);

    /// <inheritdoc />
    public void Open(int slot, bool drafts)
    {
        if (_slots.ContainsKey(slot))
        {
            throw new InvalidOperationException($"slot {slot} is already open");
        }

        if (drafts && !CanDraft)
        {
            throw new InvalidOperationException("the model has no MTP module to draft with");
        }

        _slots[slot] = new SlotState(_model.CreateSession(), drafts);
    }

    /// <inheritdoc />
    public void Close(int slot)
    {
        if (_slots.Remove(slot, out var state))
        {
            state.Session.Dispose();
        }
    }

    /// <inheritdoc />
    public void StopDrafting(int slot)
    {
        // Undrafted hiddens would otherwise pile up for the rest of the request ([hidden_size] per token).
        var state = Get(slot);
        state.Drafts = false;
        state.PendingTokens.Clear();
        state.PendingHiddens.Clear();
    }

    /// <inheritdoc />
    public void Truncate(int slot, int length)
    {
        var state = Get(slot);
        var session = state.Session as DeepSeekSession ?? throw new NotSupportedException("truncation needs a DeepSeekSession");
        if (length < session.MtpLength)
        {
            // The MTP layer's own cache would need hiddens already consumed; rollback is at most one draft.
            throw new InvalidOperationException($"cannot truncate slot {slot} to {length}: the MTP cache already holds {session.MtpLength} positions");
        }

        session.Truncate(length);
        var keep = length - state.PendingStart;
        if (keep < state.PendingTokens.Count)
        {
            state.PendingTokens.RemoveRange(keep, state.PendingTokens.Count - keep);
            state.PendingHiddens.RemoveRange(keep, state.PendingHiddens.Count - keep);
        }
    }

    /// <inheritdoc />
    public void Forward(ReadOnlySpan<StepSequence> batch, Span<float> logits)
    {
        var v = VocabSize;
        var offset = 0;
        foreach (var entry in batch)
        {
            var state = Get(entry.Slot);
            var tokens = entry.Tokens.Span;
            if (state.Session.Length != entry.Position)
            {
                throw new InvalidOperationException($"slot {entry.Slot} holds {state.Session.Length} tokens, the step feeds position {entry.Position}");
            }

            if (entry.LogitRows < 0 || entry.LogitRows > tokens.Length)
            {
                throw new ArgumentException($"slot {entry.Slot}: {entry.LogitRows} logit rows for {tokens.Length} tokens", nameof(batch));
            }

            if (state.Drafts || entry.LogitRows > 1)
            {
                var session = state.Session as DeepSeekSession
                    ?? throw new NotSupportedException($"slot {entry.Slot}: {entry.LogitRows} logit rows need a DeepSeekModel session");
                var d = _deepSeek!.Config.HiddenSize;
                var hiddens = state.Drafts ? new float[tokens.Length * d] : [];
                var rows = session.Forward(tokens, Math.Max(1, entry.LogitRows), hiddens);
                if (entry.LogitRows > 0)
                {
                    rows.CopyTo(logits.Slice(offset, entry.LogitRows * v));
                }

                if (state.Drafts)
                {
                    for (var t = 0; t < tokens.Length; t++)
                    {
                        state.PendingTokens.Add(tokens[t]);
                        state.PendingHiddens.Add(hiddens.AsSpan(t * d, d).ToArray());
                    }
                }
            }
            else
            {
                // Plain sessions always produce the last token's logits; a mid-prompt chunk discards them.
                var row = entry.LogitRows == 1 ? logits.Slice(offset, v) : new float[v];
                state.Session.Forward(tokens, row);
            }

            offset += entry.LogitRows * v;
        }
    }

    /// <inheritdoc />
    public void Draft(ReadOnlySpan<DraftSequence> batch, Span<float> logits)
    {
        var v = VocabSize;
        for (var i = 0; i < batch.Length; i++)
        {
            var (slot, next) = batch[i];
            var state = Get(slot);
            if (!state.Drafts)
            {
                throw new InvalidOperationException($"slot {slot} was opened without drafting");
            }

            var session = (DeepSeekSession)state.Session;
            var n = state.PendingTokens.Count;
            if (n == 0 || state.PendingStart != session.MtpLength)
            {
                throw new InvalidOperationException($"slot {slot}: no new position to draft from");
            }

            // MTP at position p takes h_p and the token at p + 1: the next pending token, then NextToken.
            var d = _deepSeek!.Config.HiddenSize;
            var hiddens = new float[n * d];
            var following = new int[n];
            for (var p = 0; p < n; p++)
            {
                state.PendingHiddens[p].CopyTo(hiddens, p * d);
                following[p] = p + 1 < n ? state.PendingTokens[p + 1] : next;
            }

            var all = session.MtpForward(hiddens, following, state.PendingStart);
            all.AsSpan((n - 1) * v, v).CopyTo(logits.Slice(i * v, v));
            state.PendingStart += n;
            state.PendingTokens.Clear();
            state.PendingHiddens.Clear();
        }
    }

    /// <summary>Closes every slot.</summary>
    public void Dispose()
    {
        foreach (var state in _slots.Values)
        {
            state.Session.Dispose();
        }

        _slots.Clear();
    }

    private SlotState Get(int slot) =>
        _slots.TryGetValue(slot, out var state) ? state : throw new InvalidOperationException($"slot {slot} is not open");

    private sealed class SlotState(IModelSession session, bool drafts)
    {
        public IModelSession Session { get; } = session;

        public bool Drafts { get; set; } = drafts;

        /// <summary>First position whose hidden the MTP module has not consumed.</summary>
        public int PendingStart { get; set; }

        /// <summary>Tokens fed at positions PendingStart.. (the MTP input at p − 1 is followed by the token at p).</summary>
        public List<int> PendingTokens { get; } = [];

        /// <summary>Final hidden state of positions PendingStart.., [hidden_size] each.</summary>
        public List<float[]> PendingHiddens { get; } = [];
    }
}
