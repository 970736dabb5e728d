namespace DeepSeekCuda.Inference.Constraints;

/// <summary>
/// Restricts one generation to a <see cref="Grammar"/>: only ids whose bytes keep the text a prefix of some
/// sentence of the grammar are allowed; added tokens only where <see cref="Grammar.ControlToken"/> or
/// <see cref="Grammar.FreeText"/> allows them; end of sentence only once a sentence is complete (and then it is
/// the only id allowed if the grammar cannot go on). The mask of each automaton state is computed by one walk
/// of the vocabulary's trie and cached with the <see cref="Grammar"/> instance (bounded), so a state seen before
/// costs one pass over the logits; reuse one instance for the requests of one schema to share that cache. Inside
/// JSON strings, where most of the vocabulary is allowed, what the string alone decides is cached on the
/// <see cref="TokenVocabulary"/> for every grammar, and only tokens that close the string are walked in context.
/// One instance serves one generation, from one thread at a time.
/// </summary>
public sealed class GrammarConstraint : ITokenConstraint
{
    private readonly CompiledGrammar _grammar;
    private readonly TokenVocabulary _vocabulary;
    private readonly MarkerMatcher? _marker;
    private readonly Expander _expander = new();
    private int _matched;
    private AutomatonState? _state;
    private bool _ended;

    /// <summary>Creates the constraint for one generation.</summary>
    /// <param name="grammar">What the output (after <paramref name="startAfter"/>) must match.</param>
    /// <param name="vocabulary">The tokenizer's vocabulary (cache it: building it walks every id).</param>
    /// <param name="startAfter">
    /// When set, output is unconstrained until the generated text (the bytes of every sampled token, added
    /// tokens included) contains this string, e.g. <c>&lt;/think&gt;</c> so a reasoning model thinks freely;
    /// the grammar applies to the bytes after it. A token that would end the marker and go on with bytes the
    /// grammar rejects is not allowed.
    /// </param>
    /// <exception cref="ArgumentException">The grammar names an added token the vocabulary lacks.</exception>
    /// <exception cref="InvalidOperationException">The grammar matches nothing (an empty <see cref="Grammar.Choice"/>).</exception>
    public GrammarConstraint(Grammar grammar, TokenVocabulary vocabulary, string? startAfter = null)
    {
        ArgumentNullException.ThrowIfNull(grammar);
        ArgumentNullException.ThrowIfNull(vocabulary);
        _vocabulary = vocabulary;
        _grammar = grammar.CompileFor(vocabulary);
        if (string.IsNullOrEmpty(startAfter))
        {
            _state = _grammar.Start;
        }
        else
        {
            _marker = new MarkerMatcher(startAfter);
        }
    }

    /// <summary>Whether the grammar has started (after <c>startAfter</c>, or from the beginning without one).</summary>
    public bool IsStarted => _state is not null;

    /// <summary>Whether the text so far is a complete sentence of the grammar.</summary>
    public bool IsComplete => _state is { IsComplete: true };

    /// <summary>The compiled grammar, for tests and the bench.</summary>
    internal CompiledGrammar Compiled => _grammar;

    /// <summary>The current automaton state (null before the grammar starts).</summary>
    internal AutomatonState? State => _state;

    /// <inheritdoc />
    /// <exception cref="InvalidOperationException">No id at all could come next (a grammar the vocabulary cannot express).</exception>
    public void Mask(Span<float> logits)
    {
        if (_state is null)
        {
            foreach (var id in _grammar.BlockedBeforeStart(_marker!, _matched))
            {
                if (id < logits.Length)
                {
                    logits[id] = float.NegativeInfinity;
                }
            }

            return;
        }

        ThrowIfEnded();
        _grammar.MaskFor(_state).Apply(logits);
    }

    /// <inheritdoc />
    /// <remarks>Always writes them: the state's cached mask, or, before the grammar starts, every id but those that would start it wrongly.</remarks>
    /// <exception cref="InvalidOperationException">The generation already ended.</exception>
    public bool TryWriteAllowed(Span<ulong> allowed)
    {
        if (_state is null)
        {
            allowed.Fill(ulong.MaxValue);
            foreach (var id in _grammar.BlockedBeforeStart(_marker!, _matched))
            {
                if (id < allowed.Length * 64L)
                {
                    allowed[id >> 6] &= ~(1UL << (id & 63));
                }
            }

            return true;
        }

        ThrowIfEnded();
        _grammar.MaskFor(_state).CopyTo(allowed);
        return true;
    }

    /// <inheritdoc />
    /// <exception cref="InvalidOperationException"><paramref name="tokenId"/> is not one the mask allowed.</exception>
    public void Advance(int tokenId)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(tokenId);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(tokenId, _vocabulary.Size);
        var bytes = _vocabulary.Bytes(tokenId);
        if (_state is null)
        {
            for (var i = 0; i < bytes.Length; i++)
            {
                _matched = _marker!.Step(_matched, bytes[i]);
                if (_matched == _marker.Length)
                {
                    _state = _grammar.Start.Step(bytes[(i + 1)..], _expander)
                             ?? throw Refused(tokenId);
                    return;
                }
            }

            return;
        }

        ThrowIfEnded();
        if (tokenId == _vocabulary.EosId && (_state.IsComplete || _state.HasFreeText))
        {
            _ended = true;
            return;
        }

        var next = _vocabulary.IsAdded(tokenId) ? _state.StepAdded(tokenId, _expander) : _state.Step(bytes, _expander);
        _state = next ?? throw Refused(tokenId);
    }

    private void ThrowIfEnded()
    {
        if (_ended)
        {
            throw new InvalidOperationException("the generation already ended with the end-of-sentence id");
        }
    }

    private static InvalidOperationException Refused(int tokenId) =>
        new($"token {tokenId} does not continue the grammar (Advance must get an id the mask allowed)");
}
