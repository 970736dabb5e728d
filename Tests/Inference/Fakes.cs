using System.Text;
using DeepSeekCuda.Inference;
using DeepSeekCuda.Text;

namespace DeepSeekCuda.Tests.Inference;

/// <summary>
/// Byte-level tokenizer: ids 0..255 are bytes (so any non-ASCII character spans several tokens), then a
/// few added tokens written as text, matched greedily (longest first) when encoding.
/// </summary>
internal sealed class FakeTokenizer : ITokenizer
{
    public const int Bos = 256, Eos = 257, Think = 258, EndThink = 259, UserId = 260, AssistantId = 261;

    private static readonly string[] Added = [ChatTemplate.Bos, ChatTemplate.Eos, ChatTemplate.ThinkOpen, ChatTemplate.ThinkClose, ChatTemplate.User, ChatTemplate.Assistant];

    private int _literalCalls;

    public int VocabSize => 256 + Added.Length;

    public int? BosId => Bos;

    public int? EosId => Eos;

    public bool AddBosToken => true;

    public int[] Encode(string text, bool addBos) => Encode(text, addBos, addedTokens: true);

    /// <summary>How many times <see cref="EncodeLiteral"/> ran (a refusal by length must come before it).</summary>
    public int LiteralCalls => Volatile.Read(ref _literalCalls);

    public int[] EncodeLiteral(string text)
    {
        Interlocked.Increment(ref _literalCalls);
        return Encode(text, addBos: false, addedTokens: false);
    }

    public int? AddedTokenId(string content) => TokenToId(content);

    private static int[] Encode(string text, bool addBos, bool addedTokens)
    {
        var ids = new List<int>();
        if (addBos)
        {
            ids.Add(Bos);
        }

        var i = 0;
        while (i < text.Length)
        {
            var match = -1;
            for (var a = 0; addedTokens && a < Added.Length; a++)
            {
                if (text.AsSpan(i).StartsWith(Added[a], StringComparison.Ordinal) && (match < 0 || Added[a].Length > Added[match].Length))
                {
                    match = a;
                }
            }

            if (match >= 0)
            {
                ids.Add(256 + match);
                i += Added[match].Length;
                continue;
            }

            var len = char.IsHighSurrogate(text[i]) && i + 1 < text.Length ? 2 : 1;
            foreach (var b in Encoding.UTF8.GetBytes(text.Substring(i, len)))
            {
                ids.Add(b);
            }

            i += len;
        }

        return [.. ids];
    }

    public ReadOnlySpan<byte> GetTokenBytes(int id) => id < 256 ? new[] { (byte)id } : Encoding.UTF8.GetBytes(Added[id - 256]);

    public bool IsSpecial(int id) => id >= 256 && id != Think && id != EndThink;

    public int? TokenToId(string token)
    {
        var a = Array.IndexOf(Added, token);
        return a >= 0 ? 256 + a : null;
    }

    public string Decode(ReadOnlySpan<int> ids)
    {
        var bytes = new List<byte>();
        foreach (var id in ids)
        {
            bytes.AddRange(GetTokenBytes(id).ToArray());
        }

        return Encoding.UTF8.GetString([.. bytes]);
    }
}

/// <summary>
/// A model whose logits are a pure function of the session's token history, so a test can recompute
/// every step independently. Counts sessions and disposals, and can run a hook inside Forward.
/// </summary>
internal sealed class FakeModel(int vocabSize, int maxSequenceLength, Action<IReadOnlyList<int>, float[]> logitsOf) : ILanguageModel
{
    private int _created, _disposed;

    public int VocabSize => vocabSize;

    public int MaxSequenceLength => maxSequenceLength;

    public int SessionsCreated => Volatile.Read(ref _created);

    public int SessionsDisposed => Volatile.Read(ref _disposed);

    public int ForwardCalls;

    internal Action<IReadOnlyList<int>, float[]> LogitsOf => logitsOf;

    /// <summary>Runs inside every Forward, with the history after the new tokens.</summary>
    public Action<IReadOnlyList<int>>? OnForward { get; set; }

    public bool Disposed { get; private set; }

    public IModelSession CreateSession()
    {
        Interlocked.Increment(ref _created);
        return new Session(this);
    }

    public void Dispose() => Disposed = true;

    /// <summary>
    /// Bigram model over printable ASCII and EOS, from a seeded table: logits depend on the last token only.
    /// EOS gets <paramref name="eosLogit"/>; every other id is impossible.
    /// </summary>
    public static FakeModel Bigram(int seed, int maxSequenceLength = 4096, float eosLogit = -1f)
    {
        var vocab = new FakeTokenizer().VocabSize;
        var rng = new Random(seed);
        var table = new float[vocab, vocab];
        for (var prev = 0; prev < vocab; prev++)
        {
            for (var v = 0; v < vocab; v++)
            {
                table[prev, v] = v is >= 32 and <= 126 ? (float)(rng.NextDouble() * 4) : v == FakeTokenizer.Eos ? eosLogit : float.NegativeInfinity;
            }
        }

        return new FakeModel(vocab, maxSequenceLength, (history, logits) =>
        {
            var prev = history[^1];
            for (var v = 0; v < vocab; v++)
            {
                logits[v] = table[prev, v];
            }
        });
    }

    /// <summary>
    /// Emits <paramref name="script"/> token by token after a prompt of <paramref name="promptLength"/>
    /// tokens, then EOS: the scripted token gets logit 10, everything else 0.
    /// </summary>
    public static FakeModel Scripted(int[] script, int promptLength, int maxSequenceLength = 4096)
    {
        var vocab = new FakeTokenizer().VocabSize;
        return new FakeModel(vocab, maxSequenceLength, (history, logits) =>
        {
            Array.Clear(logits);
            var step = history.Count - promptLength;
            logits[step < script.Length ? script[step] : FakeTokenizer.Eos] = 10f;
        });
    }

    private sealed class Session(FakeModel model) : IModelSession
    {
        private readonly List<int> _history = [];
        private bool _disposed;

        public int Length => _history.Count;

        public void Forward(ReadOnlySpan<int> tokens, Span<float> lastLogits)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            if (tokens.IsEmpty || _history.Count + tokens.Length > model.MaxSequenceLength)
            {
                throw new ArgumentException("bad forward");
            }

            foreach (var t in tokens)
            {
                if ((uint)t >= (uint)model.VocabSize)
                {
                    throw new ArgumentException($"id {t} out of range");
                }

                _history.Add(t);
            }

            Interlocked.Increment(ref model.ForwardCalls);
            model.OnForward?.Invoke(_history);
            var logits = new float[model.VocabSize];
            model.LogitsOf(_history, logits);
            logits.CopyTo(lastLogits);
        }

        public void Dispose()
        {
            if (!_disposed)
            {
                _disposed = true;
                Interlocked.Increment(ref model._disposed);
            }
        }
    }
}

/// <summary>Straightforward reference loops over the fakes, written without the code under test.</summary>
internal static class Reference
{
    /// <summary>Greedy decoding: argmax with the lowest id on ties, until EOS or <paramref name="maxTokens"/> tokens.</summary>
    public static List<int> Greedy(ILanguageModel model, int[] prompt, int eos, int maxTokens)
    {
        using var session = model.CreateSession();
        var logits = new float[model.VocabSize];
        session.Forward(prompt, logits);
        var output = new List<int>();
        while (output.Count < maxTokens)
        {
            var best = 0;
            for (var i = 1; i < logits.Length; i++)
            {
                if (logits[i] > logits[best])
                {
                    best = i;
                }
            }

            output.Add(best);
            if (best == eos)
            {
                break;
            }

            session.Forward([best], logits);
        }

        return output;
    }
}

/// <summary>
/// A test constraint defined by the ids its state allows: it masks rows on the host by <see cref="Allows"/> (counting them),
/// writes the same ids as bits for the backend's choice unless <paramref name="hostOnly"/>, and refuses to advance past an id
/// it does not allow.
/// </summary>
internal abstract class PredicateConstraint(bool hostOnly) : ITokenConstraint
{
    /// <summary>Rows masked on the host.</summary>
    public int Masks { get; private set; }

    /// <summary>Whether <paramref name="id"/> may come next.</summary>
    public abstract bool Allows(int id);

    /// <summary>Moves the state past <paramref name="tokenId"/>, an id <see cref="Allows"/> allowed.</summary>
    protected abstract void Moved(int tokenId);

    public void Mask(Span<float> logits)
    {
        Masks++;
        for (var id = 0; id < logits.Length; id++)
        {
            logits[id] = Allows(id) ? logits[id] : float.NegativeInfinity;
        }
    }

    public void Advance(int tokenId)
    {
        Assert.IsTrue(Allows(tokenId), $"advanced with {tokenId}, which is not allowed");
        Moved(tokenId);
    }

    public bool TryWriteAllowed(Span<ulong> allowed)
    {
        allowed.Clear();
        for (var id = 0; !hostOnly && id < allowed.Length * 64; id++)
        {
            allowed[id >> 6] |= Allows(id) ? 1UL << (id & 63) : 0;
        }

        return !hostOnly;
    }
}
