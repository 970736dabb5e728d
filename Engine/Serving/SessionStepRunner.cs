using DeepSeekCuda.Inference;

namespace DeepSeekCuda.Serving;

/// <summary>
/// <see cref="IStepRunner"/> over per-sequence sessions of any <see cref="ILanguageModel"/> (test models, and the
/// reference a batched runner is tested against): each slot holds its own session, with its own cache, and a step runs
/// its entries one after another. It does not draft, and an entry asks for at most one logit row. Each entry is one forward
/// call of its session, which knows nothing of prompts (<see cref="StepSequence.PromptLength"/> is not read): a DeepSeek
/// session's rows attend as that call's size decides, so its numbers follow how the scheduler cut the request. The DeepSeek models,
/// on one device or several, run batched and paged through <see cref="PagedStepRunner"/> instead (<see cref="StepRunners.For"/>).
/// </summary>
public sealed class SessionStepRunner : IStepRunner
{
    private readonly ILanguageModel _model;
    private readonly Dictionary<int, IModelSession> _slots = [];

    /// <summary>Creates a runner over <paramref name="model"/> (not owned: the caller disposes it).</summary>
    public SessionStepRunner(ILanguageModel model)
    {
        _model = model ?? throw new ArgumentNullException(nameof(model));
    }

    /// <inheritdoc />
    public int VocabSize => _model.VocabSize;

    /// <inheritdoc />
    public int MaxSequenceLength => _model.MaxSequenceLength;

    /// <inheritdoc />
    public bool CanDraft => false;

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

        if (drafts)
        {
            throw new InvalidOperationException("this runner does not draft");
        }

        _slots[slot] = _model.CreateSession();
    }

    /// <inheritdoc />
    public void Close(int slot)
    {
        if (_slots.Remove(slot, out var session))
        {
            session.Dispose();
        }
    }

    /// <inheritdoc />
    public void StopDrafting(int slot) => Get(slot);

    /// <inheritdoc />
    /// <exception cref="NotSupportedException">Always: only a rejected draft is ever truncated, and this runner does not draft.</exception>
    public void Truncate(int slot, int length) => throw new NotSupportedException("this runner does not draft, so it never rolls back");

    /// <inheritdoc />
    public void Forward(ReadOnlySpan<StepSequence> batch, Span<float> logits)
    {
        var v = VocabSize;
        var offset = 0;
        foreach (var entry in batch)
        {
            var session = Get(entry.Slot);
            if (session.Length != entry.Position)
            {
                throw new InvalidOperationException($"slot {entry.Slot} holds {session.Length} tokens, the step feeds position {entry.Position}");
            }

            if (entry.LogitRows is < 0 or > 1)
            {
                throw new ArgumentException($"slot {entry.Slot}: {entry.LogitRows} logit rows; this runner gives at most one per entry", nameof(batch));
            }

            // A session always produces the last token's logits; a mid-prompt chunk discards them.
            var row = entry.LogitRows == 1 ? logits.Slice(offset, v) : new float[v];
            session.Forward(entry.Tokens.Span, row);
            offset += entry.LogitRows * v;
        }
    }

    /// <inheritdoc />
    /// <exception cref="NotSupportedException">Always: this runner does not draft.</exception>
    public void Draft(ReadOnlySpan<DraftSequence> batch, Span<float> logits) => throw new NotSupportedException("this runner does not draft");

    /// <summary>Closes every slot.</summary>
    public void Dispose()
    {
        foreach (var session in _slots.Values)
        {
            session.Dispose();
        }

        _slots.Clear();
    }

    private IModelSession Get(int slot) =>
        _slots.TryGetValue(slot, out var session) ? session : throw new InvalidOperationException($"slot {slot} is not open");
}
