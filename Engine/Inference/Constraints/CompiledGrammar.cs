using System.Collections.Concurrent;

namespace DeepSeekCuda.Inference.Constraints;

/// <summary>
/// A grammar compiled for one vocabulary: its start state and the masks computed so far, memoized per
/// automaton state. Thread-safe: requests with the same grammar share the cache.
/// </summary>
internal sealed class CompiledGrammar
{
    /// <summary>
    /// Masks kept per grammar and vocabulary (16 KiB each for DeepSeek-V3); when full the cache is emptied
    /// and refilled, which bounds memory at the price of recomputing states still in use.
    /// </summary>
    public const int MaskCacheCapacity = 256;

    private readonly ConcurrentDictionary<AutomatonState, TokenMask> _masks = new();
    private readonly ConcurrentDictionary<(string Marker, int Matched), int[]> _blockedBeforeStart = new();

    public CompiledGrammar(Node root, TokenVocabulary vocabulary)
    {
        Vocabulary = vocabulary;
        Start = AutomatonState.Start(root);
    }

    public TokenVocabulary Vocabulary { get; }

    /// <summary>The state before any input.</summary>
    public AutomatonState Start { get; }

    /// <summary>Masks served from the cache (for the bench and tests).</summary>
    public long CacheHits;

    /// <summary>The ids allowed after <paramref name="state"/>, from the cache or computed.</summary>
    public TokenMask MaskFor(AutomatonState state)
    {
        if (_masks.TryGetValue(state, out var mask))
        {
            Interlocked.Increment(ref CacheHits);
            return mask;
        }

        mask = ComputeMask(state);
        if (_masks.Count >= MaskCacheCapacity)
        {
            _masks.Clear();
        }

        _masks.TryAdd(state, mask);
        return mask;
    }

    /// <summary>The ids allowed after <paramref name="state"/>, walking the trie once (no cache).</summary>
    public TokenMask ComputeMask(AutomatonState state)
    {
        var v = Vocabulary;
        var mask = new TokenMask(v.Size);
        if (state.HasFreeText)
        {
            mask.AllowAll();
            return mask.Seal();
        }

        if (state.IsComplete && v.EosId is { } eos)
        {
            mask.Allow(eos);
        }

        if (state.HasControl)
        {
            foreach (var s in state.Stacks)
            {
                if (s.Node is ControlTokenLeaf control)
                {
                    mask.Allow(control.Id);
                }
            }
        }

        var x = new Expander();
        if (state.Stacks is [{ Node: JsonStringLeaf } inString])
        {
            // Inside a string most of the vocabulary is allowed: take what the string alone decides from the
            // vocabulary's cache and walk only the subtrees of tokens that close the string.
            var local = v.StringMask(inString.Data);
            mask.CopyFrom(local.Accepted);
            foreach (var (node, prefix) in local.Uncertain)
            {
                var depth = prefix.Length - 1;
                if (state.Step(prefix.AsSpan(0, depth), x) is { } before)
                {
                    Walk(before, node, v.Trie.End[node], depth, mask, x);
                }
            }
        }
        else
        {
            Walk(state, 0, v.Trie.Count, 0, mask, x);
        }

        mask.Seal();
        if (mask.AllowedCount == 0)
        {
            throw new InvalidOperationException("no token can continue the grammar here (the grammar or the vocabulary cannot express the next byte, or the sentence is complete and the tokenizer has no end-of-sentence id)");
        }

        return mask;
    }

    /// <summary>
    /// Allows every id in trie nodes [<paramref name="from"/>, <paramref name="to"/>) (a whole subtree, or the
    /// whole trie) whose bytes after depth <paramref name="baseDepth"/> <paramref name="state"/> accepts, stepping
    /// the state once per trie edge and skipping a rejected node's subtree.
    /// </summary>
    internal void Walk(AutomatonState state, int from, int to, int baseDepth, TokenMask mask, Expander x)
    {
        var trie = Vocabulary.Trie;
        var states = new AutomatonState[trie.MaxDepth + 1];
        states[baseDepth] = state;
        var i = from;
        while (i < to)
        {
            var d = trie.Depth[i];
            var next = states[d - 1].Step(trie.Label[i], x);
            if (next is null)
            {
                i = trie.End[i];
                continue;
            }

            states[d] = next;
            for (var t = trie.TokenHead[i]; t >= 0; t = trie.NextSame[t])
            {
                mask.Allow(t);
            }

            i++;
        }
    }

    /// <summary>
    /// Before the grammar starts (it waits for <paramref name="marker"/> in the text): the ids that would complete
    /// the marker, <paramref name="matched"/> of its bytes being matched already, and go on with bytes the start
    /// state rejects. Every other id is allowed then.
    /// </summary>
    public int[] BlockedBeforeStart(MarkerMatcher marker, int matched) =>
        _blockedBeforeStart.GetOrAdd((marker.Text, matched), key => ComputeBlocked(marker, key.Matched));

    private int[] ComputeBlocked(MarkerMatcher marker, int matched)
    {
        var v = Vocabulary;
        var trie = v.Trie;
        var x = new Expander();
        var blocked = new List<int>();
        var kmp = new int[trie.MaxDepth + 1];
        kmp[0] = matched;
        var i = 0;
        while (i < trie.Count)
        {
            var d = trie.Depth[i];
            var k = marker.Step(kmp[d - 1], trie.Label[i]);
            if (k < marker.Length)
            {
                kmp[d] = k;
                i++;
                continue;
            }

            // The marker ends at this node: tokens ending here start the grammar with nothing consumed; deeper ones
            // feed their remaining bytes to it.
            var allowed = new TokenMask(v.Size);
            Walk(Start, i + 1, trie.End[i], d, allowed, x);
            for (var j = i + 1; j < trie.End[i]; j++)
            {
                for (var t = trie.TokenHead[j]; t >= 0; t = trie.NextSame[t])
                {
                    if (!allowed.IsAllowed(t))
                    {
                        blocked.Add(t);
                    }
                }
            }

            i = trie.End[i];
        }

        foreach (var id in v.AddedIds)
        {
            var bytes = v.Bytes(id);
            var k = matched;
            for (var j = 0; j < bytes.Length; j++)
            {
                k = marker.Step(k, bytes[j]);
                if (k == marker.Length)
                {
                    if (Start.Step(bytes[(j + 1)..], x) is null)
                    {
                        blocked.Add(id);
                    }

                    break;
                }
            }
        }

        blocked.Sort();
        return [.. blocked];
    }
}

/// <summary>Knuth-Morris-Pratt matching of one byte string in a stream; the state is how many bytes match.</summary>
internal sealed class MarkerMatcher
{
    private readonly byte[] _bytes;
    private readonly int[] _fail;

    public MarkerMatcher(string text)
    {
        Text = text;
        _bytes = System.Text.Encoding.UTF8.GetBytes(text);
        _fail = new int[_bytes.Length + 1];
        for (int i = 1, k = 0; i < _bytes.Length; i++)
        {
            while (k > 0 && _bytes[i] != _bytes[k])
            {
                k = _fail[k];
            }

            if (_bytes[i] == _bytes[k])
            {
                k++;
            }

            _fail[i + 1] = k;
        }
    }

    public string Text { get; }

    public int Length => _bytes.Length;

    /// <summary>The match length after <paramref name="b"/>; <see cref="Length"/> means the marker just ended.</summary>
    public int Step(int matched, byte b)
    {
        if (matched == _bytes.Length)
        {
            matched = _fail[matched];
        }

        while (matched > 0 && _bytes[matched] != b)
        {
            matched = _fail[matched];
        }

        return _bytes[matched] == b ? matched + 1 : 0;
    }
}
