using DeepSeekCuda.Cuda;
using DeepSeekCuda.Kernels;
using DeepSeekCuda.Loader;

namespace DeepSeekCuda.Backends.Cuda;

/// <summary>Device buffers a handle (or a bench run) owns; disposing the owner frees them (once).</summary>
internal sealed class DeviceOwnership : IDisposable
{
    private readonly List<IDisposable> _owned = [];

    public T Own<T>(T buffer)
        where T : IDisposable
    {
        _owned.Add(buffer);
        return buffer;
    }

    public void Free()
    {
        foreach (var b in _owned)
        {
            b.Dispose();
        }

        _owned.Clear();
    }

    /// <inheritdoc />
    public void Dispose() => Free();
}

/// <summary>
/// A tensor on the device in <see cref="Type"/> storage: logits f32; activations BF16, or f32 holding BF16 values (rounded
/// wherever CpuBackend's GpuEmulation rounds) when the backend keeps f32 storage.
/// </summary>
internal sealed class CudaTensor : Tensor
{
    public CudaTensor(CudaDevice device, int rows, int cols, TensorKind kind, ElementType type)
        : this(DeviceBuffer<byte>.Allocate(device, Bytes(rows, cols, kind, type)), rows, cols, kind, type)
    {
    }

    private CudaTensor(DeviceBuffer<byte> buffer, int rows, int cols, TensorKind kind, ElementType type)
        : base(rows, cols, kind)
    {
        Buffer = buffer;
        Type = type;
    }

    /// <summary>The storage, in bytes.</summary>
    public DeviceBuffer<byte> Buffer { get; }

    /// <summary>The element type of the storage.</summary>
    public ElementType Type { get; }

    /// <summary>Bytes per element.</summary>
    public int ElementBytes => Type.Bytes();

    public ulong Pointer => Buffer.Pointer;

    /// <summary>The tensor as the launchers take it: dense rows of its storage type.</summary>
    public DeviceRows Matrix => new(Pointer, Type, Rows, Cols);

    /// <summary>Address of element <paramref name="index"/> (row-major).</summary>
    public ulong At(long index) => Buffer.At(index * ElementBytes);

    /// <summary>Address of row <paramref name="row"/>.</summary>
    public ulong Row(long row) => At(row * Cols);

    /// <summary>Rows <paramref name="firstRow"/> .. + <paramref name="rows"/> − 1 over the same memory (disposing the view frees nothing).</summary>
    public CudaTensor View(int firstRow, int rows) =>
        new(DeviceBuffer<byte>.View(Buffer.Device, Row(firstRow), (long)rows * Cols * ElementBytes), rows, Cols, Kind, Type);

    /// <summary>The storage of a tensor, its arguments checked before anything is allocated (nothing leaks when they are wrong).</summary>
    private static long Bytes(int rows, int cols, TensorKind kind, ElementType type)
    {
        Check(rows, cols, kind);
        return (long)rows * cols * type.Bytes();
    }

    protected override void Dispose(bool disposing) => Buffer.Dispose();
}

/// <summary>
/// A linear weight: FP8 e4m3 codes [Out, In] with fp32 128x128 block scales, or BF16 [Out, In]. An FP8 kv_b gets a
/// BF16 dequantized copy on first use by the absorbed MLA (the decode kernel's operand).
/// </summary>
internal sealed class CudaLinearWeight(int outFeatures, int inFeatures, bool fp8) : LinearWeight(outFeatures, inFeatures, fp8)
{
    public DeviceOwnership Owned { get; } = new();

    /// <summary>FP8 codes (null for a BF16 weight).</summary>
    public DeviceBuffer<byte>? Codes { get; set; }

    /// <summary>weight_scale_inv [⌈Out/128⌉, ⌈In/128⌉] (null for a BF16 weight).</summary>
    public DeviceBuffer<float>? Scales { get; set; }

    /// <summary>The BF16 weight, or the dequantized copy of an FP8 one once made.</summary>
    public DeviceBuffer<ushort>? Bf16 { get; set; }

    /// <summary>The BF16 weight [Out, In] as the launchers take it.</summary>
    public DeviceRows Bf16Matrix => new(Bf16!.Pointer, ElementType.BF16, Out, In);

    /// <summary>The FP8 codes and block scales as the launchers take them.</summary>
    public Fp8Linear Fp8Linear => new(Codes!.Pointer, Scales!.Pointer, Out, In);

    protected override void Dispose(bool disposing) => Owned.Free();
}

internal sealed class CudaNormWeight(int width, float epsilon, DeviceBuffer<ushort> data) : NormWeight(width, epsilon)
{
    /// <summary>BF16 [Width].</summary>
    public DeviceBuffer<ushort> Data { get; } = data;

    /// <summary>The weight as the norm launcher takes it: one bf16 row.</summary>
    public DeviceRows Vector => DeviceRows.Bf16Vector(Data.Pointer, Width);

    protected override void Dispose(bool disposing) => Data.Dispose();
}

internal sealed class CudaEmbeddingWeight(int rows, int width, DeviceBuffer<ushort> data) : EmbeddingWeight(rows, width)
{
    /// <summary>BF16 [Rows, Width].</summary>
    public DeviceBuffer<ushort> Data { get; } = data;

    /// <summary>The table as the embedding launcher takes it.</summary>
    public DeviceRows Table => new(Data.Pointer, ElementType.BF16, Rows, Width);

    protected override void Dispose(bool disposing) => Data.Dispose();
}

internal sealed class CudaGateWeight(int width, GateOptions options, MoeGateShape shape, DeviceBuffer<ushort> weight, DeviceBuffer<float> bias)
    : GateWeight(width, options)
{
    public MoeGateShape Shape { get; } = shape;

    /// <summary>BF16 [E, D].</summary>
    public DeviceBuffer<ushort> Weight { get; } = weight;

    /// <summary>F32 [E].</summary>
    public DeviceBuffer<float> Bias { get; } = bias;

    /// <summary>The weight as the gate launcher takes it: bf16 [E, D].</summary>
    public DeviceRows WeightMatrix => new(Weight.Pointer, ElementType.BF16, Shape.Experts, Width);

    /// <summary>The bias as the gate launcher takes it: one f32 row of E.</summary>
    public DeviceRows BiasRow => new(Bias.Pointer, ElementType.F32, 1, Shape.Experts);

    protected override void Dispose(bool disposing)
    {
        Weight.Dispose();
        Bias.Dispose();
    }
}

/// <summary>
/// Routed experts stacked in the <see cref="MoeExpertStack"/> layout (this device's experts; <see cref="ExpertWeights.Experts"/>
/// stays the model's E, which the routing covers) and the shared expert as three FP8 linears.
/// </summary>
internal sealed class CudaExpertWeights(int experts, int width, int expertWidth, int sharedWidth) : ExpertWeights(experts, width, expertWidth, sharedWidth)
{
    public DeviceOwnership Owned { get; } = new();

    public MoeExpertStack Stack { get; set; } = null!;

    public MoeSharedExpert? Shared { get; set; }

    protected override void Dispose(bool disposing) => Owned.Free();
}

internal sealed class CudaRouting : Routing
{
    public CudaRouting(CudaDevice device, int tokens, int experts, int topK)
        : base(tokens, experts, topK)
    {
        Scores = DeviceBuffer<float>.Allocate(device, (long)tokens * experts);
        Indices = DeviceBuffer<int>.Allocate(device, (long)tokens * topK);
        Weights = DeviceBuffer<float>.Allocate(device, (long)tokens * topK);
    }

    /// <summary>[T, E] f32.</summary>
    public DeviceBuffer<float> Scores { get; }

    /// <summary>[T, k] int32.</summary>
    public DeviceBuffer<int> Indices { get; }

    /// <summary>[T, k] f32.</summary>
    public DeviceBuffer<float> Weights { get; }

    /// <summary>The expert ids and weights as the MoE launchers take them.</summary>
    public DeviceRouting View => new(Indices.Pointer, Weights.Pointer, Tokens, TopK);

    protected override void Dispose(bool disposing)
    {
        Scores.Dispose();
        Indices.Dispose();
        Weights.Dispose();
    }
}

/// <summary>
/// A token choice buffer: the rows' settings, their allowed ids and the chosen ids on the device, and their pinned host ends
/// (the settings and the masks of the rows that have one go out, at most two copies per set; the ids come back, one copy per choice).
/// </summary>
internal sealed class CudaTokenChoices : TokenChoiceBuffer
{
    public CudaTokenChoices(CudaDevice device, int rows, int vocab)
        : base(rows, vocab)
    {
        try
        {
            Choices = DeviceBuffer<TokenChoiceRow>.Allocate(device, rows);
            Ids = DeviceBuffer<int>.Allocate(device, rows);
            Allowed = DeviceBuffer<ulong>.Allocate(device, (long)rows * MaskWords);
            HostChoices = new PinnedBuffer<TokenChoiceRow>(device, rows);
            HostIds = new PinnedBuffer<int>(device, rows);
            HostAllowed = new PinnedBuffer<ulong>(device, (long)rows * MaskWords);
            Sent = new CudaEvent(device, timing: false);
            SetRows = rows; // the device rows hold whatever was there: the first set makes them all not chosen
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    /// <summary>Rows the last set gave settings (the rows past them on the device are not chosen), or every row before the first.</summary>
    public int SetRows { get; set; }

    /// <summary>Recorded after a set's copies: the next set writes the pinned ends once they have run.</summary>
    public CudaEvent Sent { get; } = null!;

    /// <summary>[rows] the settings the kernel reads.</summary>
    public DeviceBuffer<TokenChoiceRow> Choices { get; } = null!;

    /// <summary>[rows] int32 ids the kernel writes.</summary>
    public DeviceBuffer<int> Ids { get; } = null!;

    /// <summary>u64 words of one row's allowed ids.</summary>
    public int MaskWords => TokenChoice.MaskWords(Vocab);

    /// <summary>[rows, <see cref="MaskWords"/>] the allowed ids of the rows that have them, in row order (a row's TokenChoiceRow.AllowedRow).</summary>
    public DeviceBuffer<ulong> Allowed { get; } = null!;

    /// <summary>[rows, <see cref="MaskWords"/>] pinned: the allowed ids written by the host.</summary>
    public PinnedBuffer<ulong> HostAllowed { get; } = null!;

    /// <summary>[rows] pinned: the settings written by the host.</summary>
    public PinnedBuffer<TokenChoiceRow> HostChoices { get; } = null!;

    /// <summary>[rows] pinned: the ids read by the host.</summary>
    public PinnedBuffer<int> HostIds { get; } = null!;

    protected override void Dispose(bool disposing)
    {
        Choices?.Dispose();
        Ids?.Dispose();
        Allowed?.Dispose();
        HostChoices?.Dispose();
        HostIds?.Dispose();
        HostAllowed?.Dispose();
        Sent?.Dispose();
    }
}

/// <summary>
/// Step rows on the device: int32 [4, capacity], the slots, the positions, the lengths (position + 1: the keys a row's query
/// sees) and the tokens that the row kernels read. Uploads copy from pageable host memory, so the host may reuse its arrays
/// at once.
/// </summary>
internal sealed class CudaStepRows : StepRows
{
    private readonly int[] _lengths;

    public CudaStepRows(CudaDevice device, int capacity)
        : base(capacity)
    {
        Data = DeviceBuffer<int>.Allocate(device, Math.Max(1, 4L * capacity));
        _lengths = new int[capacity];
    }

    /// <summary>[4, capacity]: slots, positions, lengths, tokens.</summary>
    public DeviceBuffer<int> Data { get; }

    /// <summary>The first <paramref name="rows"/> rows' slots.</summary>
    public DeviceInts DeviceSlots(int rows) => Part(0, rows);

    /// <summary>The first <paramref name="rows"/> rows' positions.</summary>
    public DeviceInts DevicePositions(int rows) => Part(1, rows);

    /// <summary>The first <paramref name="rows"/> rows' lengths (position + 1: the cached tokens each row attends to).</summary>
    public DeviceInts DeviceLengths(int rows) => Part(2, rows);

    /// <summary>The first <paramref name="rows"/> rows' tokens.</summary>
    public DeviceInts DeviceTokens(int rows) => Part(3, rows);

    private DeviceInts Part(int part, int rows)
    {
        ArgumentOutOfRangeException.ThrowIfGreaterThan(rows, Capacity);
        return new DeviceInts(Data.At((long)part * Capacity), rows);
    }

    /// <summary>Keeps the rows on the host (checked) and queues their copy.</summary>
    public void Upload(ReadOnlySpan<int> tokens, ReadOnlySpan<int> slots, ReadOnlySpan<int> positions, CudaStream stream)
    {
        Set(tokens, slots, positions);
        var n = tokens.Length;
        if (n == 0)
        {
            return;
        }

        for (var t = 0; t < n; t++)
        {
            _lengths[t] = positions[t] + 1;
        }

        Data.Upload(slots, stream);
        Data.Upload(positions, stream, Capacity);
        Data.Upload(_lengths.AsSpan(0, n), stream, 2L * Capacity);
        Data.Upload(tokens, stream, 3L * Capacity);
    }

    protected override void Dispose(bool disposing) => Data.Dispose();
}

internal sealed class CudaRopeTable(int positions, int pairs, DeviceBuffer<float> cos, DeviceBuffer<float> sin) : RopeTable(positions, pairs)
{
    /// <summary>[positions, pairs] f32.</summary>
    public DeviceBuffer<float> Cos { get; } = cos;

    /// <summary>[positions, pairs] f32.</summary>
    public DeviceBuffer<float> Sin { get; } = sin;

    /// <summary>The table as the kernels take it.</summary>
    public RopeTableView View => new(Cos.Pointer, Sin.Pointer, Positions, Pairs);

    protected override void Dispose(bool disposing)
    {
        Cos.Dispose();
        Sin.Dispose();
    }
}

/// <summary>One layer's shared paged latent pool (<see cref="PagedLatentCache"/>): BF16 [blocks, 64, latent + rope].</summary>
internal sealed class CudaLatentPool : LatentPool
{
    public CudaLatentPool(CudaDevice device, CudaStream stream, int blocks, int latentDim, int ropeDim)
        : base(blocks, latentDim, ropeDim)
    {
        Shape = new LatentShape(latentDim, ropeDim).Validate();
        Cache = DeviceBuffer<ushort>.Allocate(device, Math.Max(1, PagedLatentCache.Bytes(blocks, Shape) / 2));
        // Rows are only read at positions already appended; zero them anyway so nothing stale is ever visible.
        Cache.Fill8(0, stream);
    }

    public LatentShape Shape { get; }

    public DeviceBuffer<ushort> Cache { get; }

    protected override void Dispose(bool disposing) => Cache.Dispose();
}

/// <summary>A block table: int32 [requests, maxBlocksPerRequest] on the device.</summary>
internal sealed class CudaBlockTable : BlockTable
{
    public CudaBlockTable(CudaDevice device, CudaStream stream, int requests, int maxBlocksPerRequest)
        : base(requests, maxBlocksPerRequest)
    {
        var entries = new int[checked(requests * maxBlocksPerRequest)];
        entries.AsSpan().Fill(-1);
        Entries = DeviceBuffer<int>.From(device, entries, stream);
    }

    public DeviceBuffer<int> Entries { get; }

    /// <summary><paramref name="pool"/> under the table's rows from <paramref name="firstRequest"/> on, as the MLA kernels address it.</summary>
    public LatentPages Over(CudaLatentPool pool, int firstRequest = 0) =>
        new(pool.Cache.Pointer, Entries.At((long)firstRequest * MaxBlocksPerRequest), MaxBlocksPerRequest);

    protected override void Dispose(bool disposing) => Entries.Dispose();
}

/// <summary>
/// One request's latent cache of one layer in the paged layout (<see cref="PagedLatentCache"/>): the kernels see a
/// one-request block table over a pool (<see cref="Pages"/>). A cache of its own
/// owns a pool of ⌈capacity / 64⌉ blocks and the identity table; a paged view owns nothing.
/// </summary>
internal sealed class CudaLatentCache : LatentCache
{
    private readonly IDisposable[] _owned;

    public CudaLatentCache(CudaDevice device, CudaStream stream, int capacity, int latentDim, int ropeDim)
        : base(capacity, latentDim, ropeDim)
    {
        var table = CudaBackendLayout.IdentityBlockTable(capacity);
        var pool = new CudaLatentPool(device, stream, table.Length, latentDim, ropeDim);
        try
        {
            var tableBuffer = DeviceBuffer<int>.From(device, table, stream);
            _owned = [pool, tableBuffer];
            Pool = pool;
            Shape = pool.Shape;
            Pages = new LatentPages(pool.Cache.Pointer, tableBuffer.Pointer, table.Length);
        }
        catch
        {
            pool.Dispose();
            throw;
        }
    }

    public CudaLatentCache(CudaLatentPool pool, CudaBlockTable table, int request)
        : base(table.Positions, pool.LatentDim, pool.RopeDim)
    {
        _owned = [];
        IsView = true;
        Shape = pool.Shape;
        Pages = table.Over(pool, request);
    }

    public LatentShape Shape { get; }

    /// <summary>A cache of its own's pool, whose blocks hold positions in order (the identity table); null for a paged view.</summary>
    public CudaLatentPool? Pool { get; }

    /// <summary>
    /// The pool (bf16 [blocks, 64, latent + rope]) under the request's block-table row (int32 [MaxBlocks]), as the MLA kernels
    /// address it.
    /// </summary>
    public LatentPages Pages { get; }

    protected override void Dispose(bool disposing)
    {
        foreach (var owned in _owned)
        {
            owned.Dispose();
        }
    }
}

/// <summary>The host-side layout rules of <see cref="CudaBackend"/> (pure functions, unit-tested without a GPU).</summary>
internal static class CudaBackendLayout
{
    /// <summary>The prefill kernel's shape of a model's attention dims.</summary>
    public static MlaPrefillShape PrefillShape(MlaDims d) => new(d.QkNope, d.QkRope, d.V, d.KvLora);

    /// <summary>The block table of a one-sequence cache of <paramref name="capacity"/> positions: blocks 0 .. ⌈capacity/64⌉ − 1 in order.</summary>
    public static int[] IdentityBlockTable(int capacity)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(capacity);
        return [.. Enumerable.Range(0, PagedLatentCache.BlocksFor(capacity))];
    }

    /// <summary>
    /// The append kernel's per-token int32 arguments for <paramref name="count"/> tokens of one sequence from
    /// <paramref name="start"/>: request ids (all 0) then positions start .. start + count − 1, in one array.
    /// </summary>
    public static int[] AppendArguments(int start, int count)
    {
        var a = new int[2 * count];
        for (var t = 0; t < count; t++)
        {
            a[count + t] = start + t;
        }

        return a;
    }

    /// <summary>
    /// Where each held expert's FP8 parts go in a compact stack: slot s's gate and up codes and scales into W13 (gate
    /// rows first), its down codes and scales into W2, at the offsets of <paramref name="layout"/> from the four base
    /// addresses. One upload of all of them fills the stack.
    /// </summary>
    /// <exception cref="ArgumentException">A part is not the layout's shape.</exception>
    public static IEnumerable<(HostView Source, ulong Destination)> ExpertStackWrites(ExpertStackLayout layout, IReadOnlyList<ExpertParts> slots,
        ulong w13, ulong w13Scales, ulong w2, ulong w2Scales)
    {
        ArgumentNullException.ThrowIfNull(slots);
        if (slots.Count != layout.Experts)
        {
            throw new ArgumentException($"{slots.Count} experts for a stack of {layout.Experts}", nameof(slots));
        }

        var writes = new List<(HostView, ulong)>(6 * slots.Count);
        for (var e = 0; e < slots.Count; e++)
        {
            var (gate, up, down) = slots[e];
            Check(gate, layout.Inter, layout.Hidden, e);
            Check(up, layout.Inter, layout.Hidden, e);
            Check(down, layout.Hidden, layout.Inter, e);
            writes.Add((gate.Codes, w13 + (ulong)layout.Gate(e)));
            writes.Add((gate.Scales, w13Scales + (ulong)(layout.GateScales(e) * sizeof(float))));
            writes.Add((up.Codes, w13 + (ulong)layout.Up(e)));
            writes.Add((up.Scales, w13Scales + (ulong)(layout.UpScales(e) * sizeof(float))));
            writes.Add((down.Codes, w2 + (ulong)layout.Down(e)));
            writes.Add((down.Scales, w2Scales + (ulong)(layout.DownScales(e) * sizeof(float))));
        }

        return writes;

        static void Check(Fp8View part, int rows, int cols, int slot)
        {
            if (part.Rows != rows || part.Cols != cols || part.Codes.Length != (long)rows * cols
                || part.Scales.Length != (long)Fp8GemmKernel.BlocksFor(rows) * Fp8GemmKernel.BlocksFor(cols) * sizeof(float))
            {
                throw new ArgumentException($"slot {slot}: '{part.Codes.Name}' is [{part.Rows}, {part.Cols}] ({part.Codes.Length} code and {part.Scales.Length} scale bytes); the stack takes [{rows}, {cols}] on the {Fp8GemmKernel.Block}x{Fp8GemmKernel.Block} grid", nameof(slots));
            }
        }
    }
}

/// <summary>One expert's gate, up and down projections as FP8 views (what a stack slot holds).</summary>
/// <param name="Gate">gate_proj [I, H].</param>
/// <param name="Up">up_proj [I, H].</param>
/// <param name="Down">down_proj [H, I].</param>
internal readonly record struct ExpertParts(Fp8View Gate, Fp8View Up, Fp8View Down);

/// <summary>
/// Element offsets of one expert's parts in the stacked routed-expert arrays of <see cref="MoeExpertStack"/>:
/// W13 [E, 2·I, H] (gate rows, then up rows), W13 scales [E, 2·⌈I/128⌉, ⌈H/128⌉] (gate's, then up's), W2 [E, H, I],
/// W2 scales [E, ⌈H/128⌉, ⌈I/128⌉].
/// </summary>
/// <param name="Experts">E.</param>
/// <param name="Hidden">H.</param>
/// <param name="Inter">I.</param>
internal readonly record struct ExpertStackLayout(int Experts, int Hidden, int Inter)
{
    private long InterBlocks => Fp8GemmKernel.BlocksFor(Inter);

    private long HiddenBlocks => Fp8GemmKernel.BlocksFor(Hidden);

    /// <summary>Bytes of W13.</summary>
    public long W13Length => 2L * Experts * Inter * Hidden;

    /// <summary>Bytes of W2.</summary>
    public long W2Length => (long)Experts * Hidden * Inter;

    /// <summary>Floats of W13's scales.</summary>
    public long W13ScaleLength => 2L * Experts * InterBlocks * HiddenBlocks;

    /// <summary>Floats of W2's scales.</summary>
    public long W2ScaleLength => Experts * HiddenBlocks * InterBlocks;

    /// <summary>Expert e's gate_proj codes in W13.</summary>
    public long Gate(int e) => 2L * e * Inter * Hidden;

    /// <summary>Expert e's up_proj codes in W13.</summary>
    public long Up(int e) => Gate(e) + (long)Inter * Hidden;

    /// <summary>Expert e's down_proj codes in W2.</summary>
    public long Down(int e) => (long)e * Hidden * Inter;

    /// <summary>Expert e's gate_proj scales in W13's scales.</summary>
    public long GateScales(int e) => 2L * e * InterBlocks * HiddenBlocks;

    /// <summary>Expert e's up_proj scales in W13's scales.</summary>
    public long UpScales(int e) => GateScales(e) + InterBlocks * HiddenBlocks;

    /// <summary>Expert e's down_proj scales in W2's scales.</summary>
    public long DownScales(int e) => e * HiddenBlocks * InterBlocks;
}

/// <summary>A captured CUDA graph of a backend's stream; disposing it lets the backend free the scratch blocks kept for it.</summary>
internal sealed class CudaStepGraph(CudaBackend owner, CudaGraph graph, int operations) : StepGraph
{
    public CudaBackend Owner { get; } = owner;

    public CudaGraph Graph { get; } = graph;

    public override int Operations { get; } = operations;

    protected override void Dispose(bool disposing) => Owner.Release(Graph);
}
