using System.Collections.Concurrent;
using System.Runtime.CompilerServices;
using System.Text;
using DeepSeekCuda.Text;

namespace DeepSeekCuda.Inference.Constraints;

/// <summary>
/// A tokenizer's vocabulary as constrained decoding needs it: every id's bytes, which ids are added tokens
/// (matched only by <see cref="Grammar.ControlToken"/> or <see cref="Grammar.FreeText"/>), and a byte trie of
/// the other ids so one automaton state is stepped once per shared prefix. Built once per tokenizer
/// (about a second for DeepSeek-V3's 129K ids); immutable and safe to share between threads. Callers cache
/// it beside the tokenizer: the mask caches of compiled grammars are keyed by the instance.
/// </summary>
public sealed class TokenVocabulary
{
    private readonly byte[][] _bytes;
    private readonly bool[] _added;
    private readonly Dictionary<string, int> _addedByContent;
    private readonly ConcurrentDictionary<int, LocalMask> _stringMasks = new();

    private TokenVocabulary(byte[][] bytes, bool[] added, Dictionary<string, int> addedByContent, int? eosId)
    {
        _bytes = bytes;
        _added = added;
        _addedByContent = addedByContent;
        EosId = eosId;
        AddedIds = [.. Enumerable.Range(0, bytes.Length).Where(i => added[i])];
        Trie = TokenTrie.Build(bytes, added);
    }

    /// <summary>Reads <paramref name="tokenizer"/>'s ids, their bytes and its added tokens, and builds the trie.</summary>
    /// <param name="tokenizer">The tokenizer whose ids the masks will cover.</param>
    public static TokenVocabulary Create(ITokenizer tokenizer)
    {
        ArgumentNullException.ThrowIfNull(tokenizer);
        var size = tokenizer.VocabSize;
        var bytes = new byte[size][];
        var added = new bool[size];
        var addedByContent = new Dictionary<string, int>(StringComparer.Ordinal);
        var strict = new UTF8Encoding(false, throwOnInvalidBytes: true);
        for (var id = 0; id < size; id++)
        {
            bytes[id] = tokenizer.GetTokenBytes(id).ToArray();
            if (tokenizer.IsSpecial(id))
            {
                added[id] = true;
            }
            else
            {
                // An added token that is not special (DeepSeek's <think>) is still one indivisible id; its
                // bytes are valid UTF-8 text, which most byte-level pieces are not.
                string content;
                try
                {
                    content = strict.GetString(bytes[id]);
                }
                catch (DecoderFallbackException)
                {
                    continue;
                }

                added[id] = tokenizer.AddedTokenId(content) == id;
            }

            if (added[id])
            {
                addedByContent.TryAdd(Encoding.UTF8.GetString(bytes[id]), id);
            }
        }

        return new TokenVocabulary(bytes, added, addedByContent, tokenizer.EosId);
    }

    /// <summary>One more than the largest id.</summary>
    internal int Size => _bytes.Length;

    /// <summary>The end-of-sentence id, allowed where the grammar is complete.</summary>
    internal int? EosId { get; }

    /// <summary>The added (and special) ids, ascending.</summary>
    internal int[] AddedIds { get; }

    /// <summary>The trie of every id that is not an added token.</summary>
    internal TokenTrie Trie { get; }

    /// <summary>Whether <paramref name="id"/> is an added token.</summary>
    internal bool IsAdded(int id) => _added[id];

    /// <summary>Token <paramref name="id"/>'s bytes.</summary>
    internal ReadOnlySpan<byte> Bytes(int id) => _bytes[id];

    /// <summary>The id of the added token whose content is <paramref name="content"/>, or null.</summary>
    internal int? AddedTokenId(string content) => _addedByContent.TryGetValue(content, out var id) ? id : null;

    /// <summary>
    /// What a JSON string in lexer state <paramref name="data"/> decides on its own, whatever grammar it is in:
    /// the ids it accepts without ending, and the trie subtrees of ids that end it (those depend on what follows
    /// the string). Computed once per state (a string has a few dozen) by a walk over a stack whose rest is a
    /// placeholder accepting anything; shared by every grammar on this vocabulary.
    /// </summary>
    internal LocalMask StringMask(int data) => _stringMasks.GetOrAdd(data, d => LocalMask.Compute(this, new Frame(JsonStringLeaf.Instance, d, new Frame(HoleLeaf.Instance, 0, null))));
}

/// <summary>The part of a mask one leaf decides alone (<see cref="TokenVocabulary.StringMask"/>).</summary>
internal sealed class LocalMask(TokenMask accepted, (int Node, byte[] Prefix)[] uncertain)
{
    /// <summary>Ids accepted without leaving the leaf.</summary>
    public TokenMask Accepted => accepted;

    /// <summary>Trie nodes where the leaf ends (with the bytes from the root to the node): their subtrees depend on the context.</summary>
    public (int Node, byte[] Prefix)[] Uncertain => uncertain;

    public static LocalMask Compute(TokenVocabulary vocabulary, Frame top)
    {
        var trie = vocabulary.Trie;
        var x = new Expander();
        var accepted = new TokenMask(vocabulary.Size);
        var uncertain = new List<(int, byte[])>();
        var states = new AutomatonState[trie.MaxDepth + 1];
        var path = new byte[trie.MaxDepth];
        states[0] = new AutomatonState([top]);
        var i = 0;
        while (i < trie.Count)
        {
            var d = trie.Depth[i];
            path[d - 1] = trie.Label[i];
            var next = states[d - 1].Step(trie.Label[i], x);
            if (next is null)
            {
                i = trie.End[i];
                continue;
            }

            if (next.Stacks.Any(s => s.Node is HoleLeaf))
            {
                uncertain.Add((i, path[..d]));
                i = trie.End[i];
                continue;
            }

            states[d] = next;
            for (var t = trie.TokenHead[i]; t >= 0; t = trie.NextSame[t])
            {
                accepted.Allow(t);
            }

            i++;
        }

        return new LocalMask(accepted.Seal(), [.. uncertain]);
    }
}

/// <summary>
/// A byte trie flattened in preorder: node i's subtree is nodes [i, <see cref="End"/>[i]), so a walk that
/// rejects node i skips its whole subtree with one assignment. The root is implicit (depth 0).
/// </summary>
internal sealed class TokenTrie
{
    /// <summary>The byte on the edge into each node.</summary>
    public readonly byte[] Label;

    /// <summary>Each node's depth (its prefix length, 1 for the root's children).</summary>
    public readonly int[] Depth;

    /// <summary>One past the last node of each node's subtree.</summary>
    public readonly int[] End;

    /// <summary>The first id whose bytes end at each node, or -1; further ids with the same bytes via <see cref="NextSame"/>.</summary>
    public readonly int[] TokenHead;

    /// <summary>For an id, the next id with identical bytes, or -1.</summary>
    public readonly int[] NextSame;

    /// <summary>The longest token, in bytes.</summary>
    public readonly int MaxDepth;

    private TokenTrie(byte[] label, int[] depth, int[] end, int[] tokenHead, int[] nextSame, int maxDepth)
    {
        Label = label;
        Depth = depth;
        End = end;
        TokenHead = tokenHead;
        NextSame = nextSame;
        MaxDepth = maxDepth;
    }

    /// <summary>Number of nodes (not counting the root).</summary>
    public int Count => Label.Length;

    /// <summary>Builds the trie of the non-added, non-empty ids from their bytes sorted lexicographically.</summary>
    public static TokenTrie Build(byte[][] bytes, bool[] added)
    {
        var ids = Enumerable.Range(0, bytes.Length).Where(i => !added[i] && bytes[i].Length > 0).ToArray();
        Array.Sort(ids, (a, b) => bytes[a].AsSpan().SequenceCompareTo(bytes[b]) is var c && c != 0 ? c : a.CompareTo(b));
        var label = new List<byte>();
        var depth = new List<int>();
        var tokenHead = new List<int>();
        var nextSame = new int[bytes.Length];
        Array.Fill(nextSame, -1);
        var path = new List<int>(); // node index of each prefix length - 1 on the current path
        byte[] previous = [];
        var lastAtNode = new Dictionary<int, int>();
        foreach (var id in ids)
        {
            var s = bytes[id];
            var common = s.AsSpan().CommonPrefixLength(previous);
            path.RemoveRange(common, path.Count - common);
            for (var d = common; d < s.Length; d++)
            {
                path.Add(label.Count);
                label.Add(s[d]);
                depth.Add(d + 1);
                tokenHead.Add(-1);
            }

            var node = path[s.Length - 1];
            if (tokenHead[node] < 0)
            {
                tokenHead[node] = id;
            }
            else
            {
                nextSame[lastAtNode[node]] = id;
            }

            lastAtNode[node] = id;
            previous = s;
        }

        var count = label.Count;
        var end = new int[count];
        var open = new Stack<int>();
        for (var i = 0; i < count; i++)
        {
            while (open.Count > 0 && depth[open.Peek()] >= depth[i])
            {
                end[open.Pop()] = i;
            }

            open.Push(i);
        }

        while (open.Count > 0)
        {
            end[open.Pop()] = count;
        }

        return new TokenTrie([.. label], [.. depth], end, [.. tokenHead], nextSame, depth.Count == 0 ? 0 : depth.Max());
    }
}

/// <summary>A set of token ids over a vocabulary, as a bit per id.</summary>
internal sealed class TokenMask(int size)
{
    private readonly ulong[] _bits = new ulong[(size + 63) / 64];

    /// <summary>How many ids the mask covers.</summary>
    public int Size => size;

    /// <summary>Number of ids allowed; set by <see cref="Seal"/>.</summary>
    public int AllowedCount { get; private set; }

    /// <summary>The allowed ids when few (under 1/32 of the vocabulary), else null; set by <see cref="Seal"/>.</summary>
    public int[]? Sparse { get; private set; }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public void Allow(int id) => _bits[id >> 6] |= 1UL << (id & 63);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public bool IsAllowed(int id) => (_bits[id >> 6] & (1UL << (id & 63))) != 0;

    /// <summary>Allows every id <paramref name="other"/> allows (same vocabulary).</summary>
    public void CopyFrom(TokenMask other)
    {
        for (var w = 0; w < _bits.Length; w++)
        {
            _bits[w] |= other._bits[w];
        }
    }

    public void AllowAll()
    {
        Array.Fill(_bits, ulong.MaxValue);
        if (size % 64 != 0)
        {
            _bits[^1] = (1UL << (size % 64)) - 1;
        }
    }

    /// <summary>Counts the allowed ids and keeps a list of them when few; call once, after the last <see cref="Allow"/>.</summary>
    public TokenMask Seal()
    {
        var count = 0;
        foreach (var w in _bits)
        {
            count += System.Numerics.BitOperations.PopCount(w);
        }

        AllowedCount = count;
        if (count < size / 32)
        {
            var list = new int[count];
            var n = 0;
            for (var w = 0; w < _bits.Length; w++)
            {
                for (var bits = _bits[w]; bits != 0; bits &= bits - 1)
                {
                    list[n++] = (w << 6) + System.Numerics.BitOperations.TrailingZeroCount(bits);
                }
            }

            Sparse = list;
        }

        return this;
    }

    /// <summary>Writes the mask as <see cref="ITokenConstraint.TryWriteAllowed"/> does: bit i of the words set when id i is allowed; ids past <see cref="Size"/> are not.</summary>
    public void CopyTo(Span<ulong> allowed)
    {
        var n = Math.Min(allowed.Length, _bits.Length);
        _bits.AsSpan(0, n).CopyTo(allowed);
        allowed[n..].Clear();
    }

    /// <summary>Sets every disallowed logit to -infinity, in place.</summary>
    public void Apply(Span<float> logits)
    {
        var n = Math.Min(logits.Length, size);
        if (Sparse is { } allowed)
        {
            Span<float> kept = allowed.Length <= 1024 ? stackalloc float[allowed.Length] : new float[allowed.Length];
            for (var i = 0; i < allowed.Length; i++)
            {
                kept[i] = allowed[i] < n ? logits[allowed[i]] : 0;
            }

            logits.Fill(float.NegativeInfinity);
            for (var i = 0; i < allowed.Length; i++)
            {
                if (allowed[i] < n)
                {
                    logits[allowed[i]] = kept[i];
                }
            }

            return;
        }

        for (var w = 0; w * 64 < n; w++)
        {
            var bits = _bits[w];
            var start = w * 64;
            var count = Math.Min(64, n - start);
            if (bits == ulong.MaxValue && count == 64)
            {
                continue;
            }

            if (bits == 0)
            {
                logits.Slice(start, count).Fill(float.NegativeInfinity);
                continue;
            }

            for (var b = 0; b < count; b++)
            {
                if ((bits & (1UL << b)) == 0)
                {
                    logits[start + b] = float.NegativeInfinity;
                }
            }
        }

        logits[n..].Fill(float.NegativeInfinity);
    }
}
