using System.Buffers;
using System.Collections.Concurrent;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;

namespace DeepSeekCuda.Text;

/// <summary>
/// A Hugging Face <c>tokenizer.json</c> byte-level BPE tokenizer (GPT-2 family, DeepSeek-V3/R1),
/// producing the same ids as the Rust <c>tokenizers</c> library. Thread-safe: <see cref="Encode"/>
/// may be called from several threads at once.
/// </summary>
public sealed partial class BpeTokenizer : ITokenizer
{
    /// <summary>Pieces longer than this are not cached: they are rare and would crowd the cache.</summary>
    private const int MaxCachedPieceLength = 64;

    /// <summary>Bound on cached pieces; past it, new pieces are encoded without being remembered.</summary>
    private const int CacheCapacity = 100_000;

    private readonly Dictionary<string, int> _vocab;
    private readonly Dictionary<string, int> _addedByContent;
    private readonly Dictionary<ulong, long> _merges; // (left id, right id) -> rank << 32 | merged id
    private readonly int[] _byteToId;
    private readonly byte[][] _tokenBytes;
    private readonly bool[] _special;
    private readonly bool _ignoreMerges;
    private readonly AddedTokenMatcher _rawAdded;
    private readonly AddedTokenMatcher _normalizedAdded;
    private readonly PreTokenizer _preTokenizer;
    private readonly ConcurrentDictionary<string, int[]> _cache = new(StringComparer.Ordinal);
    private readonly ConcurrentDictionary<string, int[]>.AlternateLookup<ReadOnlySpan<char>> _cacheBySpan;
    private int _cacheCount;

    private BpeTokenizer(
        Dictionary<string, int> vocab,
        Dictionary<ulong, long> merges,
        int[] byteToId,
        IReadOnlyList<AddedToken> addedTokens,
        PreTokenizer preTokenizer,
        bool ignoreMerges)
    {
        _vocab = vocab;
        _merges = merges;
        _byteToId = byteToId;
        _preTokenizer = preTokenizer;
        _ignoreMerges = ignoreMerges;
        AddedTokens = addedTokens;
        _addedByContent = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (var t in addedTokens)
        {
            _addedByContent.TryAdd(t.Content, t.Id);
        }

        var maxId = -1;
        foreach (var id in vocab.Values)
        {
            maxId = Math.Max(maxId, id);
        }

        foreach (var t in addedTokens)
        {
            maxId = Math.Max(maxId, t.Id);
        }

        VocabSize = maxId + 1;
        _tokenBytes = new byte[VocabSize][];
        Array.Fill(_tokenBytes, []);
        foreach (var (token, id) in vocab)
        {
            _tokenBytes[id] = ByteLevel.DecodeToken(token);
        }

        _special = new bool[VocabSize];
        foreach (var t in addedTokens)
        {
            // Added tokens decode to their literal content, overriding a vocab entry with the same id.
            _tokenBytes[t.Id] = Encoding.UTF8.GetBytes(t.Content);
            _special[t.Id] = t.Special;
        }

        _rawAdded = new AddedTokenMatcher(addedTokens.Where(t => !t.Normalized));
        _normalizedAdded = new AddedTokenMatcher(addedTokens.Where(t => t.Normalized));
        _cacheBySpan = _cache.GetAlternateLookup<ReadOnlySpan<char>>();
    }

    /// <inheritdoc />
    public int VocabSize { get; }

    /// <inheritdoc />
    public int? BosId { get; private set; }

    /// <inheritdoc />
    public int? EosId { get; private set; }

    /// <inheritdoc />
    public bool AddBosToken { get; private set; }

    /// <summary>The added tokens (special and not) in file order.</summary>
    public IReadOnlyList<AddedToken> AddedTokens { get; }

    /// <summary>Number of BPE merges.</summary>
    public int MergeCount => _merges.Count;

    /// <inheritdoc />
    /// <remarks>Unpaired surrogates, which have no UTF-8 form, are encoded as U+FFFD.</remarks>
    public int[] Encode(string text, bool addBos)
    {
        ArgumentNullException.ThrowIfNull(text);
        var ids = new List<int>(text.Length / 3 + 2);
        if (addBos)
        {
            ids.Add(BosId ?? throw new InvalidOperationException("this tokenizer has no BOS token (tokenizer_config.json bos_token)"));
        }

        EncodeInto(text, ids, addedTokens: true);
        return ids.ToArray();
    }

    /// <inheritdoc />
    public ReadOnlySpan<byte> GetTokenBytes(int id)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(id);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(id, VocabSize);
        return _tokenBytes[id];
    }

    /// <inheritdoc />
    public bool IsSpecial(int id) => (uint)id < (uint)_special.Length && _special[id];

    /// <inheritdoc />
    public int? TokenToId(string token)
    {
        ArgumentNullException.ThrowIfNull(token);
        if (_addedByContent.TryGetValue(token, out var id) || _vocab.TryGetValue(token, out id))
        {
            return id;
        }

        return null;
    }

    /// <inheritdoc />
    public string Decode(ReadOnlySpan<int> ids)
    {
        var total = 0;
        foreach (var id in ids)
        {
            total += GetTokenBytes(id).Length;
        }

        var buffer = ArrayPool<byte>.Shared.Rent(Math.Max(total, 1));
        try
        {
            var pos = 0;
            foreach (var id in ids)
            {
                var bytes = _tokenBytes[id];
                bytes.CopyTo(buffer, pos);
                pos += bytes.Length;
            }

            return Encoding.UTF8.GetString(buffer, 0, total);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    /// <inheritdoc />
    /// <remarks>Unpaired surrogates, which have no UTF-8 form, are encoded as U+FFFD.</remarks>
    public int[] EncodeLiteral(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        var ids = new List<int>(text.Length / 3 + 2);
        EncodeInto(text, ids, addedTokens: false);
        return ids.ToArray();
    }

    /// <inheritdoc />
    public int? AddedTokenId(string content)
    {
        ArgumentNullException.ThrowIfNull(content);
        return _addedByContent.TryGetValue(content, out var id) ? id : null;
    }

    private void EncodeInto(string text, List<int> ids, bool addedTokens)
    {
        if (text.Length == 0)
        {
            return;
        }

        var hasSurrogates = text.AsSpan().ContainsAnyInRange('\uD800', '\uDFFF');
        if (hasSurrogates)
        {
            // A .NET string may hold unpaired surrogates, which have no UTF-8 form; UTF-8 encoding
            // would turn each into U+FFFD, so do that up front and let the regexes see the same.
            text = ReplaceLoneSurrogates(text);
        }

        var a = new List<TextPiece>();
        var b = new List<TextPiece>();
        if (!addedTokens)
        {
            EncodeOrdinary(new TextPiece(text, 0, text.Length), hasSurrogates, ids, a, b);
            return;
        }

        var segments = new List<Segment>();
        var textSegments = new List<Segment>();
        _rawAdded.Split(text, 0, text.Length, segments);
        foreach (var seg in segments)
        {
            if (seg.Id >= 0)
            {
                ids.Add(seg.Id);
                continue;
            }

            textSegments.Clear();
            _normalizedAdded.Split(text, seg.Start, seg.Length, textSegments);
            foreach (var inner in textSegments)
            {
                if (inner.Id >= 0)
                {
                    ids.Add(inner.Id);
                }
                else
                {
                    EncodeOrdinary(new TextPiece(text, inner.Start, inner.Length), hasSurrogates, ids, a, b);
                }
            }
        }
    }

    /// <summary>Pre-tokenizes and BPE-encodes text holding no added token; <paramref name="a"/> and <paramref name="b"/> are scratch lists.</summary>
    private void EncodeOrdinary(TextPiece text, bool hasSurrogates, List<int> ids, List<TextPiece> a, List<TextPiece> b)
    {
        foreach (var piece in _preTokenizer.Split(text, hasSurrogates, a, b))
        {
            EncodePiece(piece.Span, ids);
        }
    }

    private static string ReplaceLoneSurrogates(string text)
    {
        var chars = text.ToCharArray();
        for (var i = 0; i < chars.Length; i++)
        {
            if (char.IsHighSurrogate(chars[i]) && i + 1 < chars.Length && char.IsLowSurrogate(chars[i + 1]))
            {
                i++;
            }
            else if (char.IsSurrogate(chars[i]))
            {
                chars[i] = '\uFFFD';
            }
        }

        return new string(chars);
    }

    private void EncodePiece(ReadOnlySpan<char> piece, List<int> ids)
    {
        if (_cacheBySpan.TryGetValue(piece, out var cached))
        {
            ids.AddRange(cached);
            return;
        }

        var result = Bpe(piece);
        if (piece.Length <= MaxCachedPieceLength && Volatile.Read(ref _cacheCount) < CacheCapacity && _cacheBySpan.TryAdd(piece, result))
        {
            Interlocked.Increment(ref _cacheCount);
        }

        ids.AddRange(result);
    }

    private int[] Bpe(ReadOnlySpan<char> piece)
    {
        var maxBytes = piece.Length * 3;
        byte[]? rentedBytes = null;
        var bytes = maxBytes <= 512 ? stackalloc byte[512] : (rentedBytes = ArrayPool<byte>.Shared.Rent(maxBytes));
        var n = Encoding.UTF8.GetBytes(piece, bytes);
        try
        {
            if (_ignoreMerges)
            {
                var mapped = new char[n];
                for (var i = 0; i < n; i++)
                {
                    mapped[i] = ByteLevel.ByteToChar[bytes[i]];
                }

                if (_vocab.GetAlternateLookup<ReadOnlySpan<char>>().TryGetValue(mapped, out var whole))
                {
                    return [whole];
                }
            }

            var symbols = new int[n];
            for (var i = 0; i < n; i++)
            {
                symbols[i] = _byteToId[bytes[i]];
            }

            var count = n <= 48 ? MergeSmall(symbols) : MergeLarge(symbols);
            return count == n ? symbols : symbols.AsSpan(0, count).ToArray();
        }
        finally
        {
            if (rentedBytes is not null)
            {
                ArrayPool<byte>.Shared.Return(rentedBytes);
            }
        }
    }

    /// <summary>BPE of one pre-token through a chosen merge loop, bypassing the cache (for tests).</summary>
    internal int[] BpeWith(string piece, bool heap)
    {
        var bytes = Encoding.UTF8.GetBytes(piece);
        var symbols = bytes.Select(b => _byteToId[b]).ToArray();
        var count = heap ? MergeLarge(symbols) : MergeSmall(symbols);
        return symbols.AsSpan(0, count).ToArray();
    }

    /// <summary>
    /// Hashes a merge key (left id &lt;&lt; 32 | right id). The default hash of a 64-bit integer is its
    /// halves XORed, which is 0 for every "x x" merge (hundreds in DeepSeek-V3's table), so those all
    /// collided and a run of one repeated character cost 30-100x normal text per byte.
    /// </summary>
    private sealed class PairComparer : IEqualityComparer<ulong>
    {
        public static readonly PairComparer Instance = new();

        public bool Equals(ulong x, ulong y) => x == y;

        // Fibonacci hashing: the multiply spreads both halves into the high bits that are kept.
        public int GetHashCode(ulong key) => (int)((key * 0x9E3779B97F4A7C15UL) >> 32);
    }

    private long MergeOf(int left, int right) =>
        _merges.TryGetValue(((ulong)(uint)left << 32) | (uint)right, out var v) ? v : long.MaxValue;

    /// <summary>
    /// Repeatedly merges the lowest-ranked pair, leftmost on ties (what Hugging Face's heap yields),
    /// with pair ranks kept in an array so each step costs one scan and two lookups.
    /// </summary>
    private int MergeSmall(int[] s)
    {
        var n = s.Length;
        if (n < 2)
        {
            return n;
        }

        Span<long> pair = stackalloc long[n];
        for (var i = 0; i < n - 1; i++)
        {
            pair[i] = MergeOf(s[i], s[i + 1]);
        }

        while (n > 1)
        {
            var best = -1;
            var bestValue = long.MaxValue;
            for (var i = 0; i < n - 1; i++)
            {
                // Equal packed values mean the same pair; strict < keeps the leftmost.
                if (pair[i] < bestValue)
                {
                    bestValue = pair[i];
                    best = i;
                }
            }

            if (best < 0)
            {
                break;
            }

            s[best] = (int)(bestValue & 0xFFFFFFFF);
            var tail = n - best - 2;
            if (tail > 0)
            {
                Array.Copy(s, best + 2, s, best + 1, tail);
                pair.Slice(best + 2, tail).CopyTo(pair[(best + 1)..]);
            }

            n--;
            pair[best] = best + 1 < n ? MergeOf(s[best], s[best + 1]) : long.MaxValue;
            if (best > 0)
            {
                pair[best - 1] = MergeOf(s[best - 1], s[best]);
            }
        }

        return n;
    }

    /// <summary>Hugging Face's algorithm for long pieces: a heap of (rank, position) over a linked list.</summary>
    private int MergeLarge(int[] s)
    {
        var n = s.Length;
        var next = new int[n];
        var prev = new int[n];
        for (var i = 0; i < n; i++)
        {
            next[i] = i + 1;
            prev[i] = i - 1;
        }

        var queue = new PriorityQueue<int, long>(n);
        for (var i = 0; i < n - 1; i++)
        {
            var v = MergeOf(s[i], s[i + 1]);
            if (v != long.MaxValue)
            {
                queue.Enqueue(i, (v & ~0xFFFFFFFFL) | (uint)i);
            }
        }

        while (queue.TryDequeue(out var pos, out var priority))
        {
            var nx = next[pos];
            if (s[pos] < 0 || nx >= n)
            {
                continue;
            }

            var v = MergeOf(s[pos], s[nx]);
            if (v == long.MaxValue || (v >> 32) != (priority >> 32))
            {
                continue; // stale: the pair changed since it was queued
            }

            s[pos] = (int)(v & 0xFFFFFFFF);
            s[nx] = -1;
            next[pos] = next[nx];
            if (next[pos] < n)
            {
                prev[next[pos]] = pos;
            }

            if (prev[pos] >= 0)
            {
                var p = prev[pos];
                var vp = MergeOf(s[p], s[pos]);
                if (vp != long.MaxValue)
                {
                    queue.Enqueue(p, (vp & ~0xFFFFFFFFL) | (uint)p);
                }
            }

            if (next[pos] < n)
            {
                var vn = MergeOf(s[pos], s[next[pos]]);
                if (vn != long.MaxValue)
                {
                    queue.Enqueue(pos, (vn & ~0xFFFFFFFFL) | (uint)pos);
                }
            }
        }

        var count = 0;
        for (var i = 0; i < n; i = next[i])
        {
            s[count++] = s[i];
        }

        return count;
    }
}
