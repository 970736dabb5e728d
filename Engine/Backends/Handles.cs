namespace DeepSeekCuda.Backends;

/// <summary>
/// Anything a backend allocates (activations, weights, caches, routing buffers). The CPU backend's
/// resources are plain managed arrays; a GPU backend frees device memory on disposal.
/// </summary>
public abstract class BackendResource : IDisposable
{
    /// <summary>Releases the backend memory (once: later calls do nothing).</summary>
    public void Dispose()
    {
        if (IsDisposed)
        {
            return;
        }

        IsDisposed = true;
        Dispose(true);
        GC.SuppressFinalize(this);
    }

    /// <summary>Whether <see cref="Dispose()"/> was called (tests check that failed loads release what they uploaded).</summary>
    internal bool IsDisposed { get; private set; }

    /// <summary>Releases the backend memory; nothing to do for managed storage.</summary>
    protected virtual void Dispose(bool disposing)
    {
    }
}

/// <summary>What a <see cref="Tensor"/> holds, which decides how a backend stores it.</summary>
public enum TensorKind
{
    /// <summary>
    /// Values between the forward pass's operations: BF16 values (DESIGN.md), stored as BF16 on a GPU backend (or as f32
    /// holding BF16 values) and rounded to BF16 where they are written, uploads included, by every backend but the CPU
    /// backend's float32 reference.
    /// </summary>
    Activation,

    /// <summary>Fp32 values never rounded: what <see cref="IBackend.Logits"/> writes and <see cref="IBackend.ChooseTokenRows"/> reads.</summary>
    Logits,
}

/// <summary>
/// A matrix owned by a backend: <see cref="Rows"/> tokens (or other rows) of <see cref="Cols"/> values, row-major, of a
/// <see cref="Kind"/>. Host code never sees its storage; it moves data with <see cref="IBackend.Upload"/> and
/// <see cref="IBackend.Download"/> (as f32 values).
/// </summary>
public abstract class Tensor : BackendResource
{
    /// <summary>Creates the shape part of a handle.</summary>
    protected Tensor(int rows, int cols, TensorKind kind = TensorKind.Activation)
    {
        Check(rows, cols, kind);
        Rows = rows;
        Cols = cols;
        Kind = kind;
    }

    /// <summary>Rows (tokens).</summary>
    public int Rows { get; }

    /// <summary>Values per row.</summary>
    public int Cols { get; }

    /// <summary>What the tensor holds.</summary>
    public TensorKind Kind { get; }

    /// <summary>Rows × cols.</summary>
    public long Length => (long)Rows * Cols;

    /// <inheritdoc />
    public override string ToString() => Kind == TensorKind.Activation ? $"[{Rows}, {Cols}]" : $"{Kind.ToString().ToLowerInvariant()} [{Rows}, {Cols}]";

    /// <summary>Throws unless rows and cols are not negative and <paramref name="kind"/> is a kind (a backend may check before it allocates).</summary>
    private protected static void Check(int rows, int cols, TensorKind kind)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(rows);
        ArgumentOutOfRangeException.ThrowIfNegative(cols);
        if (!Enum.IsDefined(kind))
        {
            throw new ArgumentOutOfRangeException(nameof(kind), kind, "not a tensor kind");
        }
    }
}

/// <summary>A linear weight W [Out, In] (<c>y = x·Wᵀ</c>) in the backend's storage format.</summary>
public abstract class LinearWeight(int outFeatures, int inFeatures, bool fp8) : BackendResource
{
    /// <summary>Rows of W.</summary>
    public int Out { get; } = outFeatures;

    /// <summary>Columns of W.</summary>
    public int In { get; } = inFeatures;

    /// <summary>Stored as FP8 with block scales in the checkpoint (its GEMM quantizes activations on a GPU).</summary>
    public bool Fp8 { get; } = fp8;
}

/// <summary>An RMSNorm weight [Width].</summary>
public abstract class NormWeight(int width, float epsilon) : BackendResource
{
    /// <summary>Elements.</summary>
    public int Width { get; } = width;

    /// <summary>The epsilon inside the rsqrt.</summary>
    public float Epsilon { get; } = epsilon;
}

/// <summary>An embedding table [Rows, Width].</summary>
public abstract class EmbeddingWeight(int rows, int width) : BackendResource
{
    /// <summary>Vocabulary rows.</summary>
    public int Rows { get; } = rows;

    /// <summary>Width of a row.</summary>
    public int Width { get; } = width;
}

/// <summary>Routing hyper-parameters of a MoE gate (MODEL.md §5).</summary>
/// <param name="Experts">Routed experts E.</param>
/// <param name="Groups">Expert groups (n_group).</param>
/// <param name="GroupsKept">Groups kept per token (topk_group).</param>
/// <param name="TopK">Experts per token.</param>
/// <param name="Normalize">Renormalize the chosen weights (norm_topk_prob).</param>
/// <param name="ScalingFactor">routed_scaling_factor.</param>
public sealed record GateOptions(int Experts, int Groups, int GroupsKept, int TopK, bool Normalize, float ScalingFactor);

/// <summary>A MoE router: weight [E, D] and the selection-only correction bias [E].</summary>
public abstract class GateWeight(int width, GateOptions options) : BackendResource
{
    /// <summary>Input width D.</summary>
    public int Width { get; } = width;

    /// <summary>Routing rule.</summary>
    public GateOptions Options { get; } = options;
}

/// <summary>The routed experts of one MoE layer (each gate, up, down) and its shared experts.</summary>
public abstract class ExpertWeights(int experts, int width, int expertWidth, int sharedWidth) : BackendResource
{
    /// <summary>Routed experts.</summary>
    public int Experts { get; } = experts;

    /// <summary>Model width D.</summary>
    public int Width { get; } = width;

    /// <summary>Hidden width of a routed expert.</summary>
    public int ExpertWidth { get; } = expertWidth;

    /// <summary>Hidden width of the shared experts (0 when there are none).</summary>
    public int SharedWidth { get; } = sharedWidth;
}

/// <summary>Per-token routing decisions: sigmoid scores [T, E], chosen experts [T, k] and their weights [T, k].</summary>
public abstract class Routing(int tokens, int experts, int topK) : BackendResource
{
    /// <summary>Tokens routed.</summary>
    public int Tokens { get; } = tokens;

    /// <summary>Routed experts E.</summary>
    public int Experts { get; } = experts;

    /// <summary>Experts per token.</summary>
    public int TopK { get; } = topK;
}

/// <summary>
/// Room to choose tokens from up to <see cref="Rows"/> logit rows (<see cref="IBackend.SetTokenChoices"/>,
/// <see cref="IBackend.ChooseTokenRows"/>, <see cref="IBackend.ReadTokenChoices"/>): the rows' settings and allowed ids over up
/// to <see cref="Vocab"/> ids, and their chosen ids.
/// </summary>
public abstract class TokenChoiceBuffer(int rows, int vocab) : BackendResource
{
    /// <summary>Most rows one call chooses from.</summary>
    public int Rows { get; } = rows;

    /// <summary>The widest vocabulary limit of a row (<see cref="TokenChoice.VocabLimit"/>): the logits chosen from are at least this wide.</summary>
    public int Vocab { get; } = vocab;
}

/// <summary>Precomputed rotary table: cos and sin of position × inv_freq[pair], [Positions, Pairs].</summary>
public abstract class RopeTable(int positions, int pairs) : BackendResource
{
    /// <summary>Positions covered (0 .. Positions−1).</summary>
    public int Positions { get; } = positions;

    /// <summary>Rotated pairs (qk_rope_head_dim / 2).</summary>
    public int Pairs { get; } = pairs;
}

/// <summary>
/// One layer's MLA latent cache of one sequence: per position the normalized latent (kv_lora_rank) and
/// the rotated shared key (qk_rope_head_dim). Addressed by absolute position: a cache of its own
/// (<see cref="IBackend.AllocateLatentCache"/>) or one request's rows of a shared pool (<see cref="IBackend.PagedCache"/>).
/// </summary>
public abstract class LatentCache(int capacity, int latentDim, int ropeDim) : BackendResource
{
    /// <summary>Positions it can hold.</summary>
    public int Capacity { get; } = capacity;

    /// <summary>Latent width (kv_lora_rank).</summary>
    public int LatentDim { get; } = latentDim;

    /// <summary>Rotated key width (qk_rope_head_dim).</summary>
    public int RopeDim { get; } = ropeDim;

    /// <summary>Whether it is one request's rows of a shared pool (<see cref="IBackend.PagedCache"/>), not a cache of its own.</summary>
    internal bool IsView { get; init; }
}

/// <summary>
/// One layer's shared paged latent pool: <see cref="Blocks"/> blocks of 64 token rows, each row the normalized
/// latent (<see cref="LatentDim"/>) then the rotated shared key (<see cref="RopeDim"/>). Requests reach their rows
/// through a <see cref="BlockTable"/> (<see cref="IBackend.PagedCache"/>).
/// </summary>
public abstract class LatentPool(int blocks, int latentDim, int ropeDim) : BackendResource
{
    /// <summary>Blocks in the pool.</summary>
    public int Blocks { get; } = blocks;

    /// <summary>Latent width (kv_lora_rank).</summary>
    public int LatentDim { get; } = latentDim;

    /// <summary>Rotated key width (qk_rope_head_dim).</summary>
    public int RopeDim { get; } = ropeDim;
}

/// <summary>
/// A block table in the backend's memory: int32 [<see cref="Requests"/>, <see cref="MaxBlocksPerRequest"/>], position p
/// of request r in block <c>table[r, p / 64]</c>, row <c>p % 64</c>; −1 where no block is assigned.
/// </summary>
public abstract class BlockTable(int requests, int maxBlocksPerRequest) : BackendResource
{
    /// <summary>Rows (request slots).</summary>
    public int Requests { get; } = requests;

    /// <summary>Columns: blocks of the longest request.</summary>
    public int MaxBlocksPerRequest { get; } = maxBlocksPerRequest;

    /// <summary>Positions one row addresses: <see cref="MaxBlocksPerRequest"/> blocks of 64 (a request's cache capacity).</summary>
    public int Positions => MaxBlocksPerRequest * Kernels.PagedLatentCache.BlockSize;
}

/// <summary>
/// Each row of a step's token stream in the backend's memory (<see cref="IBackend.UploadStepRows"/>): row t feeds token
/// <c>Tokens[t]</c> at position <c>Positions[t]</c> of block-table row <c>Slots[t]</c>. The row operations
/// (<see cref="IBackend.EmbeddingRows"/>, <see cref="IBackend.ApplyRopeRows"/>, <see cref="IBackend.AppendLatentRows"/>,
/// <see cref="IBackend.MlaAttentionRows"/>) read it where they run, so one call serves every sequence of a step and the
/// host passes no token, slot or position per call: a step's work after the upload depends on its row count only.
/// </summary>
public abstract class StepRows(int capacity) : BackendResource
{
    private readonly int[] _tokens = new int[capacity];
    private readonly int[] _slots = new int[capacity];
    private readonly int[] _positions = new int[capacity];

    /// <summary>Most rows one upload holds.</summary>
    public int Capacity { get; } = capacity;

    /// <summary>Rows of the last upload.</summary>
    public int Count { get; private set; }

    /// <summary>The largest token id of the last upload (−1 when it was empty).</summary>
    public int MaxToken { get; private set; } = -1;

    /// <summary>The largest slot of the last upload (−1 when it was empty).</summary>
    public int MaxSlot { get; private set; } = -1;

    /// <summary>The largest position of the last upload (−1 when it was empty).</summary>
    public int MaxPosition { get; private set; } = -1;

    /// <summary>The host's copy of the last upload's tokens.</summary>
    public ReadOnlySpan<int> Tokens => _tokens.AsSpan(0, Count);

    /// <summary>The host's copy of the last upload's slots.</summary>
    public ReadOnlySpan<int> Slots => _slots.AsSpan(0, Count);

    /// <summary>The host's copy of the last upload's positions.</summary>
    public ReadOnlySpan<int> Positions => _positions.AsSpan(0, Count);

    /// <summary>Checks and keeps a new upload (what a backend's <see cref="IBackend.UploadStepRows"/> does on the host).</summary>
    internal void Set(ReadOnlySpan<int> tokens, ReadOnlySpan<int> slots, ReadOnlySpan<int> positions)
    {
        if (slots.Length != tokens.Length || positions.Length != tokens.Length)
        {
            throw new ArgumentException($"{tokens.Length} tokens, {slots.Length} slots and {positions.Length} positions", nameof(positions));
        }

        if (tokens.Length > Capacity)
        {
            throw new ArgumentOutOfRangeException(nameof(tokens), tokens.Length, $"the step rows hold at most {Capacity} rows");
        }

        int maxToken = -1, maxSlot = -1, maxPosition = -1;
        for (var t = 0; t < tokens.Length; t++)
        {
            if (tokens[t] < 0 || slots[t] < 0 || positions[t] < 0)
            {
                throw new ArgumentOutOfRangeException(nameof(tokens), $"row {t}: token {tokens[t]}, slot {slots[t]}, position {positions[t]} (each must be ≥ 0)");
            }

            maxToken = Math.Max(maxToken, tokens[t]);
            maxSlot = Math.Max(maxSlot, slots[t]);
            maxPosition = Math.Max(maxPosition, positions[t]);
        }

        tokens.CopyTo(_tokens);
        slots.CopyTo(_slots);
        positions.CopyTo(_positions);
        Count = tokens.Length;
        (MaxToken, MaxSlot, MaxPosition) = (maxToken, maxSlot, maxPosition);
    }
}

/// <summary>
/// Operations recorded once and run again as one (<see cref="IBackend.CaptureGraph"/>, <see cref="IBackend.ReplayGraph"/>; a
/// CUDA graph on the GPU). A replay reads and writes the backend memory its operations name (tensors, step rows, block
/// tables, pools) as it is then; host values (shapes, row offsets, weights, KV splits) are those of the capture.
/// </summary>
public abstract class StepGraph : BackendResource
{
    /// <summary>Operations recorded.</summary>
    public abstract int Operations { get; }
}

/// <summary>The head geometry of MLA (MODEL.md §3).</summary>
/// <param name="Heads">Attention heads H.</param>
/// <param name="QkNope">Non-rotary q/k width per head.</param>
/// <param name="QkRope">Rotary q/k width (shared k_pe).</param>
/// <param name="V">Value width per head.</param>
/// <param name="KvLora">Latent width.</param>
public readonly record struct MlaDims(int Heads, int QkNope, int QkRope, int V, int KvLora)
{
    /// <summary>q/k width per head: nope + rope.</summary>
    public int QkHead => QkNope + QkRope;

    /// <summary>kv_b rows per head: k_nope + v.</summary>
    public int KvBHead => QkNope + V;
}
