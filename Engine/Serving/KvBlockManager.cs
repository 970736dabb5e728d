namespace DeepSeekCuda.Serving;

/// <summary>The block pool cannot hold what was asked; nothing was allocated.</summary>
public sealed class KvCacheFullException(string message) : Exception(message);

/// <summary>
/// The paged latent cache's bookkeeping (pure; no device memory): a fixed pool of
/// <see cref="BlockTokens"/>-token blocks, and a block table row per request slot in the layout the MLA
/// kernels read: int32 [<see cref="MaxRequests"/>, <see cref="MaxBlocksPerRequest"/>], the token at
/// position p of slot s in block <c>table[s, p / 64]</c>, row <c>p % 64</c>; unused entries are −1.
/// Every allocation is all-or-nothing: a refusal leaves the pool and the table as they were.
/// Not thread-safe (the scheduler owns it).
/// </summary>
public sealed class KvBlockManager
{
    /// <summary>Tokens per cache block.</summary>
    public const int BlockTokens = Kernels.PagedLatentCache.BlockSize;

    private readonly int[] _table;       // [MaxRequests, MaxBlocksPerRequest]
    private readonly int[] _blockCount;  // blocks owned per slot; -1: slot unused
    private readonly int[] _capacity;    // tokens reserved per slot
    private readonly Stack<int> _freeBlocks;
    private readonly Stack<int> _freeSlots;

    /// <summary>Creates a pool of <paramref name="totalBlocks"/> blocks for up to <paramref name="maxRequests"/> requests.</summary>
    public KvBlockManager(int totalBlocks, int maxRequests, int maxBlocksPerRequest)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(totalBlocks);
        ArgumentOutOfRangeException.ThrowIfLessThan(maxRequests, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(maxBlocksPerRequest, 1);
        TotalBlocks = totalBlocks;
        MaxRequests = maxRequests;
        MaxBlocksPerRequest = maxBlocksPerRequest;
        _table = new int[checked(maxRequests * maxBlocksPerRequest)];
        _table.AsSpan().Fill(-1);
        _blockCount = new int[maxRequests];
        _blockCount.AsSpan().Fill(-1);
        _capacity = new int[maxRequests];
        // Lowest ids come out first, so tables are easy to read in tests and logs.
        _freeBlocks = new Stack<int>(Enumerable.Range(0, totalBlocks).Reverse());
        _freeSlots = new Stack<int>(Enumerable.Range(0, maxRequests).Reverse());
    }

    /// <summary>Blocks in the pool (after the runner's attach, what <see cref="ShrinkToFit"/> left).</summary>
    public int TotalBlocks { get; private set; }

    /// <summary>
    /// Whether <see cref="TotalBlocks"/> is an upper bound a paged runner lowers, when the scheduler attaches it, to what its
    /// devices' memory holds beside the weights and the step buffers (<see cref="PagedStepRunner.Attach"/>). False (default):
    /// the pool is exactly <see cref="TotalBlocks"/>, and a runner that measures its devices refuses one that does not fit.
    /// </summary>
    public bool ShrinkToFit { get; init; }

    /// <summary>Rows of the block table.</summary>
    public int MaxRequests { get; }

    /// <summary>Columns of the block table: the longest request is this many blocks.</summary>
    public int MaxBlocksPerRequest { get; }

    /// <summary>The longest request in tokens.</summary>
    public int MaxTokensPerRequest => MaxBlocksPerRequest * BlockTokens;

    /// <summary>Blocks not owned by any request.</summary>
    public int FreeBlocks => _freeBlocks.Count;

    /// <summary>Request slots not in use.</summary>
    public int FreeSlots => _freeSlots.Count;

    /// <summary>The whole block table, int32 [MaxRequests, MaxBlocksPerRequest] row-major (what a GPU step uploads).</summary>
    public ReadOnlySpan<int> Table => _table;

    /// <summary>Changes of <see cref="Table"/> so far: a runner copies the table only when this moved.</summary>
    public long Version { get; private set; }

    /// <summary>
    /// Lowers the pool to <paramref name="totalBlocks"/> (a runner's attach, <see cref="ShrinkToFit"/>), before any block is
    /// handed out.
    /// </summary>
    internal void ShrinkTo(int totalBlocks)
    {
        if (!ShrinkToFit || _freeBlocks.Count != TotalBlocks || _freeSlots.Count != MaxRequests)
        {
            throw new InvalidOperationException("only a pool made to shrink to fit, with nothing handed out, can shrink");
        }

        ArgumentOutOfRangeException.ThrowIfNegative(totalBlocks);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(totalBlocks, TotalBlocks);
        TotalBlocks = totalBlocks;
        _freeBlocks.Clear();
        for (var b = totalBlocks - 1; b >= 0; b--)
        {
            _freeBlocks.Push(b);
        }
    }

    /// <summary>Blocks needed to hold <paramref name="tokens"/> tokens.</summary>
    public static int BlocksFor(int tokens) => (int)(((long)tokens + BlockTokens - 1) / BlockTokens);

    /// <summary>Whether <paramref name="slot"/> holds a request.</summary>
    public bool IsActive(int slot) => (uint)slot < (uint)MaxRequests && _blockCount[slot] >= 0;

    /// <summary>Tokens <paramref name="slot"/> has room for (its blocks × 64 is at least this).</summary>
    public int Capacity(int slot) => _capacity[CheckActive(slot)];

    /// <summary>The blocks of <paramref name="slot"/>, in position order.</summary>
    public ReadOnlySpan<int> Blocks(int slot) => _table.AsSpan(CheckActive(slot) * MaxBlocksPerRequest, _blockCount[slot]);

    /// <summary>The physical place of position <paramref name="position"/> of <paramref name="slot"/>: (block, row).</summary>
    public (int Block, int Row) Locate(int slot, int position)
    {
        CheckActive(slot);
        if ((uint)position >= (uint)_capacity[slot])
        {
            throw new ArgumentOutOfRangeException(nameof(position), position, $"slot {slot} holds {_capacity[slot]} tokens");
        }

        return (_table[slot * MaxBlocksPerRequest + position / BlockTokens], position % BlockTokens);
    }

    /// <summary>Whether a new request of <paramref name="tokens"/> tokens would be admitted now.</summary>
    public bool CanAdmit(int tokens) =>
        tokens >= 0 && tokens <= MaxTokensPerRequest && _freeSlots.Count > 0 && BlocksFor(tokens) <= _freeBlocks.Count;

    /// <summary>
    /// Takes a slot and the blocks for <paramref name="tokens"/> tokens (a prompt), or returns false and
    /// takes nothing when there is no free slot or too few free blocks.
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="tokens"/> is negative or longer than any request may be.</exception>
    public bool TryAdmit(int tokens, out int slot)
    {
        CheckLength(tokens);
        slot = -1;
        if (!CanAdmit(tokens))
        {
            return false;
        }

        slot = _freeSlots.Pop();
        _blockCount[slot] = 0;
        _capacity[slot] = 0;
        var grown = TryReserve(slot, tokens);
        System.Diagnostics.Debug.Assert(grown, "checked by CanAdmit");
        return true;
    }

    /// <summary>As <see cref="TryAdmit"/>, throwing <see cref="KvCacheFullException"/> on refusal.</summary>
    public int Admit(int tokens) => TryAdmit(tokens, out var slot)
        ? slot
        : throw new KvCacheFullException($"cannot admit {tokens} tokens: {_freeBlocks.Count} of {TotalBlocks} blocks and {_freeSlots.Count} of {MaxRequests} slots free");

    /// <summary>
    /// Makes room for <paramref name="tokens"/> tokens in <paramref name="slot"/> (growth by decode steps or
    /// draft tokens), taking the blocks that crosses into; false, with nothing taken, when too few are free.
    /// A smaller value than the current capacity changes nothing (see <see cref="Truncate"/>).
    /// </summary>
    public bool TryReserve(int slot, int tokens)
    {
        CheckActive(slot);
        CheckLength(tokens);
        var have = _blockCount[slot];
        var need = BlocksFor(tokens) - have;
        if (need > _freeBlocks.Count)
        {
            return false;
        }

        var row = slot * MaxBlocksPerRequest;
        for (var i = 0; i < need; i++)
        {
            _table[row + have + i] = _freeBlocks.Pop();
        }

        if (need > 0)
        {
            Version++;
        }

        _blockCount[slot] = Math.Max(have, have + need);
        _capacity[slot] = Math.Max(_capacity[slot], tokens);
        return true;
    }

    /// <summary>As <see cref="TryReserve"/>, throwing <see cref="KvCacheFullException"/> on refusal.</summary>
    public void Reserve(int slot, int tokens)
    {
        if (!TryReserve(slot, tokens))
        {
            throw new KvCacheFullException($"slot {slot} cannot grow to {tokens} tokens: {_freeBlocks.Count} of {TotalBlocks} blocks free");
        }
    }

    /// <summary>
    /// Keeps the first <paramref name="length"/> tokens of <paramref name="slot"/> (speculative-decoding
    /// rollback) and returns the blocks past them to the pool. Returns how many blocks were freed.
    /// </summary>
    public int Truncate(int slot, int length)
    {
        CheckActive(slot);
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(length, _capacity[slot]);
        var keep = BlocksFor(length);
        var freed = _blockCount[slot] - keep;
        var row = slot * MaxBlocksPerRequest;
        for (var i = _blockCount[slot] - 1; i >= keep; i--)
        {
            _freeBlocks.Push(_table[row + i]);
            _table[row + i] = -1;
        }

        if (freed > 0)
        {
            Version++;
        }

        _blockCount[slot] = keep;
        _capacity[slot] = length;
        return freed;
    }

    /// <summary>Returns every block of <paramref name="slot"/> and the slot itself (request finished or cancelled).</summary>
    public void Free(int slot)
    {
        Truncate(slot, 0);
        _blockCount[slot] = -1;
        _freeSlots.Push(slot);
    }

    private int CheckActive(int slot)
    {
        if (!IsActive(slot))
        {
            throw new ArgumentException($"slot {slot} holds no request", nameof(slot));
        }

        return slot;
    }

    private void CheckLength(int tokens)
    {
        if (tokens < 0 || tokens > MaxTokensPerRequest)
        {
            throw new ArgumentOutOfRangeException(nameof(tokens), tokens, $"a request holds 0..{MaxTokensPerRequest} tokens");
        }
    }
}
