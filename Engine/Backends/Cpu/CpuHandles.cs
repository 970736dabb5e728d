using DeepSeekCuda.Kernels;

namespace DeepSeekCuda.Backends.Cpu;

/// <summary>An activation: rows × cols floats of a managed array, from <see cref="Offset"/> (a view shares its owner's array).</summary>
internal sealed class CpuTensor : Tensor
{
    public CpuTensor(int rows, int cols, TensorKind kind = TensorKind.Activation)
        : this(new float[checked(rows * cols)], 0, rows, cols, kind)
    {
    }

    private CpuTensor(float[] buffer, int offset, int rows, int cols, TensorKind kind)
        : base(rows, cols, kind)
    {
        Buffer = buffer;
        Offset = offset;
    }

    /// <summary>The array the values live in (shared by views).</summary>
    public float[] Buffer { get; }

    /// <summary>Index of the first value in <see cref="Buffer"/>.</summary>
    public int Offset { get; }

    /// <summary>The values, row-major.</summary>
    public Span<float> Data => Buffer.AsSpan(Offset, (int)Length);

    /// <summary>The values, for work split over threads.</summary>
    public Memory<float> Memory => Buffer.AsMemory(Offset, (int)Length);

    public Span<float> Row(int row) => Buffer.AsSpan(Offset + row * Cols, Cols);

    /// <summary>Rows <paramref name="firstRow"/> .. + <paramref name="rows"/> − 1, sharing the array.</summary>
    public CpuTensor View(int firstRow, int rows) => new(Buffer, Offset + firstRow * Cols, rows, Cols, Kind);
}

internal sealed class CpuLinearWeight(int outFeatures, int inFeatures, bool fp8, float[] data) : LinearWeight(outFeatures, inFeatures, fp8)
{
    /// <summary>W [Out, In] in float32 (FP8 dequantized).</summary>
    public float[] Data { get; } = data;

    public ReadOnlySpan<float> Row(int row) => Data.AsSpan(row * In, In);
}

internal sealed class CpuNormWeight(int width, float epsilon, float[] data) : NormWeight(width, epsilon)
{
    public float[] Data { get; } = data;
}

internal sealed class CpuEmbeddingWeight(int rows, int width, float[] data) : EmbeddingWeight(rows, width)
{
    public float[] Data { get; } = data;
}

internal sealed class CpuGateWeight(int width, GateOptions options, float[] weight, float[] bias) : GateWeight(width, options)
{
    /// <summary>[E, D].</summary>
    public float[] Weight { get; } = weight;

    /// <summary>[E].</summary>
    public float[] Bias { get; } = bias;
}

/// <summary>One SwiGLU MLP: gate [W, D], up [W, D], down [D, W].</summary>
internal sealed record CpuMlp(CpuLinearWeight Gate, CpuLinearWeight Up, CpuLinearWeight Down);

internal sealed class CpuExpertWeights(CpuMlp?[] experts, CpuMlp? shared, int width, int expertWidth)
    : ExpertWeights(experts.Length, width, expertWidth, shared?.Gate.Out ?? 0)
{
    /// <summary>Routed experts by index; null where another device holds the expert.</summary>
    public CpuMlp?[] Routed { get; } = experts;

    public CpuMlp? Shared { get; } = shared;
}

internal sealed class CpuRouting(int tokens, int experts, int topK) : Routing(tokens, experts, topK)
{
    /// <summary>[T, E].</summary>
    public float[] Scores { get; } = new float[tokens * experts];

    /// <summary>[T, k].</summary>
    public int[] Indices { get; } = new int[tokens * topK];

    /// <summary>[T, k].</summary>
    public float[] Weights { get; } = new float[tokens * topK];
}

/// <summary>A token choice buffer in host memory: the rows' settings (their masks copied), and the ids chosen.</summary>
internal sealed class CpuTokenChoices(int rows, int vocab) : TokenChoiceBuffer(rows, vocab)
{
    private readonly ulong[][] _masks = new ulong[rows][];

    /// <summary>[rows] the settings; a row past the last <see cref="Set"/>'s is <c>default</c> (not chosen).</summary>
    public TokenChoice[] Choices { get; } = new TokenChoice[rows];

    /// <summary>[rows] the ids the last choice wrote (before the first, none: <see cref="TokenSampling.NotChosen"/>).</summary>
    public int[] Ids { get; } = Enumerable.Repeat(TokenSampling.NotChosen, rows).ToArray();

    /// <summary>Holds <paramref name="choices"/> (checked), each mask copied into the row's own words, and clears the rows past them.</summary>
    public void Set(ReadOnlySpan<TokenChoice> choices)
    {
        for (var r = 0; r < choices.Length; r++)
        {
            var c = choices[r];
            if (c.Allowed is { } allowed && c.OnDevice)
            {
                var words = TokenChoice.MaskWords(c.VocabLimit);
                var mask = _masks[r] ??= new ulong[TokenChoice.MaskWords(Vocab)];
                allowed.AsSpan(0, words).CopyTo(mask);
                c = c with { Allowed = mask };
            }

            Choices[r] = c;
        }

        Choices.AsSpan(choices.Length).Clear();
    }
}

/// <summary>A CPU graph: the calls recorded, made again in order at each replay; owned by the backend (or host communicator) that captured them.</summary>
internal sealed class CpuStepGraph(object owner, Action[] recorded) : StepGraph
{
    public object Owner { get; } = owner;

    public Action[] Recorded { get; } = recorded;

    public override int Operations => Recorded.Length;

    /// <summary><paramref name="graph"/>, when <paramref name="owner"/> captured it.</summary>
    /// <exception cref="ArgumentException">Another backend or communicator captured it.</exception>
    public static CpuStepGraph Of(StepGraph graph, object owner) =>
        graph is CpuStepGraph g && ReferenceEquals(g.Owner, owner) ? g : throw new ArgumentException($"the graph does not belong to this {(owner is IBackend ? "backend" : "communicator")}", nameof(graph));

    /// <summary>Makes the recorded calls again.</summary>
    public void Replay()
    {
        ObjectDisposedException.ThrowIf(IsDisposed, this);
        foreach (var operation in Recorded)
        {
            operation();
        }
    }
}

/// <summary>The operations of a graph being captured on the CPU, by one thread, from one or several backends (and a host communicator's collectives).</summary>
internal sealed class CpuGraphRecording
{
    private readonly List<Action> _operations = [];
    private readonly int _thread = Environment.CurrentManagedThreadId;

    /// <summary>Whether the capturing thread is the calling one.</summary>
    public bool OnThisThread => Environment.CurrentManagedThreadId == _thread;

    public IReadOnlyList<Action> Operations => _operations;

    /// <summary>Keeps <paramref name="operation"/> when called on the capturing thread; says whether it did.</summary>
    public bool Add(Action operation)
    {
        if (!OnThisThread)
        {
            return false;
        }

        _operations.Add(operation);
        return true;
    }
}

/// <summary>Step rows: the host copy <see cref="StepRows"/> keeps is all the CPU backend needs.</summary>
internal sealed class CpuStepRows(int capacity) : StepRows(capacity);

internal sealed class CpuRopeTable(int positions, int pairs, float[] cos, float[] sin) : RopeTable(positions, pairs)
{
    /// <summary>[positions, pairs].</summary>
    public float[] Cos { get; } = cos;

    /// <summary>[positions, pairs].</summary>
    public float[] Sin { get; } = sin;
}

/// <summary>
/// One layer's paged latent pool: per block 64 rows of latent + rope floats. A block's array is made when a row of it
/// is first written (host memory; a pool sized for many long requests costs only what is used).
/// </summary>
internal sealed class CpuLatentPool(int blocks, int latentDim, int ropeDim) : LatentPool(blocks, latentDim, ropeDim)
{
    private readonly float[]?[] _blocks = new float[]?[blocks];

    /// <summary>Row <paramref name="row"/> of block <paramref name="block"/>: latent then rope.</summary>
    public Span<float> Row(int block, int row, bool write)
    {
        if ((uint)block >= (uint)Blocks)
        {
            throw new InvalidOperationException($"block {block} is not a block of the pool (0..{Blocks - 1})");
        }

        var data = _blocks[block];
        if (data is null)
        {
            if (!write)
            {
                throw new InvalidOperationException($"block {block} of the latent pool is read before any row of it was written");
            }

            data = _blocks[block] = new float[PagedLatentCache.BlockSize * (LatentDim + RopeDim)];
        }

        var width = LatentDim + RopeDim;
        return data.AsSpan(row * width, width);
    }
}

/// <summary>A block table: int32 [requests, maxBlocksPerRequest] in a managed array.</summary>
internal sealed class CpuBlockTable : BlockTable
{
    public CpuBlockTable(int requests, int maxBlocksPerRequest)
        : base(requests, maxBlocksPerRequest)
    {
        Entries = new int[checked(requests * maxBlocksPerRequest)];
        Entries.AsSpan().Fill(-1);
    }

    public int[] Entries { get; }
}

/// <summary>
/// A latent cache: the rows of one request of a pool, through one row of a block table. A cache of its own is a
/// pool of ⌈capacity / 64⌉ blocks with the identity table.
/// </summary>
internal sealed class CpuLatentCache : LatentCache
{
    private readonly CpuLatentPool _pool;
    private readonly int[] _table;
    private readonly int _row;

    public CpuLatentCache(int capacity, int latentDim, int ropeDim)
        : base(capacity, latentDim, ropeDim)
    {
        var blocks = PagedLatentCache.BlocksFor(capacity);
        _pool = new CpuLatentPool(blocks, latentDim, ropeDim);
        _table = [.. Enumerable.Range(0, blocks)];
    }

    public CpuLatentCache(CpuLatentPool pool, CpuBlockTable table, int request)
        : base(table.Positions, pool.LatentDim, pool.RopeDim)
    {
        IsView = true;
        _pool = pool;
        _table = table.Entries;
        _row = request * table.MaxBlocksPerRequest;
    }

    /// <summary>The normalized latent of position <paramref name="position"/> [latent].</summary>
    public Span<float> Latent(int position, bool write = false) => RowOf(position, write)[..LatentDim];

    /// <summary>The rotated shared key of position <paramref name="position"/> [rope].</summary>
    public Span<float> Rope(int position, bool write = false) => RowOf(position, write)[LatentDim..];

    /// <summary>Copies positions 0 .. <paramref name="positions"/> − 1 of <paramref name="source"/> into the same positions here.</summary>
    public void CopyFrom(CpuLatentCache source, int positions)
    {
        for (var p = 0; p < positions; p++)
        {
            source.RowOf(p, write: false).CopyTo(RowOf(p, write: true));
        }
    }

    /// <summary>Throws unless positions 0 .. <paramref name="count"/> − 1 lie in written blocks (checked before threads read them).</summary>
    public void CheckReadable(int count)
    {
        for (var p = 0; p < count; p += PagedLatentCache.BlockSize)
        {
            RowOf(p, write: false);
        }

        if (count > 0)
        {
            RowOf(count - 1, write: false);
        }
    }

    private Span<float> RowOf(int position, bool write)
    {
        if ((uint)position >= (uint)Capacity)
        {
            throw new ArgumentOutOfRangeException(nameof(position), position, $"the cache holds positions 0..{Capacity - 1}");
        }

        var block = _table[_row + position / PagedLatentCache.BlockSize];
        if (block < 0)
        {
            throw new InvalidOperationException($"position {position} lies in no block of the table");
        }

        return _pool.Row(block, position % PagedLatentCache.BlockSize, write);
    }
}
