using DeepSeekCuda.Backends;
using DeepSeekCuda.Loader;

namespace DeepSeekCuda.Tests.Distributed;

/// <summary>
/// A simulated device: forwards every call to an inner backend and records which checkpoint tensors (and
/// which slices of them) the device received, so tests can hold loading to the placement plan; counts
/// the calls that allocate backend memory (a step runner's steps must make none after warm-up) and can fail one as an
/// out-of-memory would (<see cref="FailAtAllocation"/>); and logs every operation
/// with the host values it was given (<see cref="Operations"/>: what a CUDA graph of the call would bake in).
/// </summary>
internal sealed class RecordingBackend(IBackend inner) : IBackend
{
    private readonly List<(string Tensor, TensorSlice? Slice)> _received = [];

    /// <summary>Every weight uploaded: tensor name and slice (null for the whole tensor). Scale grids come with their FP8 weight.</summary>
    public IReadOnlyList<(string Tensor, TensorSlice? Slice)> Received => _received;

    private readonly List<BackendResource> _weights = [];
    private readonly List<string> _weightNames = [];

    /// <summary>Every weight handle this device returned, in upload order (tests check that a cancelled load disposed them all).</summary>
    public IReadOnlyList<BackendResource> Weights => _weights;

    private int _allocations;

    public string Name => "recording " + inner.Name;

    /// <summary>Calls so far that allocate backend memory: Allocate, Upload, and the Allocate* of caches, pools, tables, routing, token choices and step rows.</summary>
    public int Allocations => _allocations;

    /// <summary>Block tables copied to the backend so far.</summary>
    public int TableUploads { get; private set; }

    private readonly Dictionary<BackendResource, int> _names = new(ReferenceEqualityComparer.Instance);
    private readonly List<string> _operations = [];

    /// <summary>
    /// Every operation so far, in call order, as its name and host arguments: a tensor as its shape, a weight, pool, table,
    /// step rows or other handle this backend returned as <c>#n</c> (its n-th), integers and token ids as their values.
    /// Memory calls (allocations, uploads, downloads, views, setting and reading token choices) are not operations; <see cref="ChooseTokenRows"/> is.
    /// A graph's operations are logged as it is captured, and each replay as <see cref="ReplayGraph"/>.
    /// </summary>
    public IReadOnlyList<string> Operations => _operations;

    /// <summary>How many of <see cref="Operations"/> from index <paramref name="first"/> on have each name (an operation's name is the text before its arguments).</summary>
    public Dictionary<string, int> Calls(int first) =>
        _operations.Skip(first).GroupBy(o => o[..o.IndexOf('(')]).ToDictionary(g => g.Key, g => g.Count());

    /// <summary>Logs the operation, then makes the call.</summary>
    private void Run(string name, Action call, params object[] arguments)
    {
        Op(name, arguments);
        call();
    }

    private void Op(string name, params object[] arguments) =>
        _operations.Add($"{name}({string.Join(", ", arguments.Select(a => a switch
        {
            Tensor t => $"[{t.Rows}x{t.Cols}]",
            BackendResource r => _names.TryGetValue(r, out var n) ? $"#{n}" : r.GetType().Name,
            _ => a.ToString(),
        }))})");

    private T Named<T>(T resource)
        where T : BackendResource
    {
        _names.Add(resource, _names.Count);
        return resource;
    }

    private T Kept<T>(T weight, string name)
        where T : BackendResource
    {
        if (_weights.Count + 1 == FailAtWeight)
        {
            weight.Dispose();
            throw new InvalidOperationException($"{Name}: simulated out of memory at weight {FailAtWeight} ({name})");
        }

        _weights.Add(weight);
        _weightNames.Add(name);
        return Named(weight);
    }

    /// <summary>The weight upload (counted as <see cref="Weights"/> counts, from 1) that fails as an out-of-memory would, nothing kept; 0: none.</summary>
    public int FailAtWeight { get; set; }

    /// <summary>The checkpoint tensor each of <see cref="Weights"/> was uploaded from (its first, for a gate or an expert stack; "rope" for the rotary table).</summary>
    public IReadOnlyList<string> WeightNames => _weightNames;

    /// <summary>The allocation (counted as <see cref="Allocations"/> counts) that fails as an out-of-memory would, nothing allocated; 0: none.</summary>
    public int FailAtAllocation { get; set; }

    /// <summary>When set, receives every allocation from then on (tests check that a failure part way released them all).</summary>
    public List<BackendResource>? Allocated { get; set; }

    /// <summary>
    /// The simulated GPU this device is (or, shared with other devices, is a logical rank on): every allocation from then on
    /// takes from it, and <see cref="Memory"/> reports it. Null (default): the inner backend's <see cref="Memory"/>.
    /// </summary>
    public SimulatedGpu? Gpu { get; set; }

    public DeviceMemory? Memory() => Gpu?.Memory ?? inner.Memory();

    private T Counted<T>(T resource, long bytes)
        where T : BackendResource
    {
        if (++_allocations == FailAtAllocation)
        {
            resource.Dispose();
            throw new InvalidOperationException($"{Name}: simulated out of memory at allocation {_allocations}");
        }

        Gpu?.Take(bytes);
        Allocated?.Add(resource);
        return resource is Tensor ? resource : Named(resource);
    }

    private static long TensorBytes(int rows, int cols, TensorKind kind) => (long)rows * cols * (kind == TensorKind.Logits ? 4 : 2);

    public Tensor Allocate(int rows, int cols, TensorKind kind = TensorKind.Activation) => Counted(inner.Allocate(rows, cols, kind), TensorBytes(rows, cols, kind));
    public Tensor Upload(ReadOnlySpan<float> values, int rows, int cols, TensorKind kind = TensorKind.Activation) =>
        Counted(inner.Upload(values, rows, cols, kind), TensorBytes(rows, cols, kind));
    public void Download(Tensor tensor, Span<float> destination)
    {
        DownloadedValues += tensor.Length;
        inner.Download(tensor, destination);
    }

    /// <summary>Values copied to the host by <see cref="Download"/> so far.</summary>
    public long DownloadedValues { get; private set; }

    /// <summary>Ids <see cref="ReadTokenChoices"/> brought back so far, and how many of them were tokens (not <see cref="TokenSampling.NotChosen"/>).</summary>
    public (long Rows, long Chosen) Choices { get; private set; }

    public TokenChoiceBuffer AllocateTokenChoices(int rows, int vocab) => Counted(inner.AllocateTokenChoices(rows, vocab), rows * 16L);

    public void SetTokenChoices(ReadOnlySpan<TokenChoice> choices, TokenChoiceBuffer buffer) => inner.SetTokenChoices(choices, buffer);

    public void ChooseTokenRows(Tensor logits, TokenChoiceBuffer buffer) =>
        Run(nameof(ChooseTokenRows), () => inner.ChooseTokenRows(logits, buffer), logits, buffer);

    public void ReadTokenChoices(TokenChoiceBuffer buffer, Span<int> tokens)
    {
        inner.ReadTokenChoices(buffer, tokens);
        var chosen = 0;
        foreach (var t in tokens)
        {
            chosen += t >= 0 ? 1 : 0;
        }

        Choices = (Choices.Rows + tokens.Length, Choices.Chosen + chosen);
    }

    public void CopyRows(Tensor source, int sourceRow, Tensor destination, int destinationRow, int count) =>
        Run(nameof(CopyRows), () => inner.CopyRows(source, sourceRow, destination, destinationRow, count), source, sourceRow, destination, destinationRow, count);

    public void Zero(Tensor tensor) => Run(nameof(Zero), () => inner.Zero(tensor), tensor);

    public void GatherRows(Tensor ring, int ringRows, StepRows rows, Tensor output) =>
        Run(nameof(GatherRows), () => inner.GatherRows(ring, ringRows, rows, output), ring, ringRows, rows, output);

    public void ScatterRows(Tensor source, StepRows rows, int ringRows, Tensor ring) =>
        Run(nameof(ScatterRows), () => inner.ScatterRows(source, rows, ringRows, ring), source, rows, ringRows, ring);

    public Tensor View(Tensor tensor, int firstRow, int rows) => inner.View(tensor, firstRow, rows);

    public LinearWeight UploadLinear(Checkpoint checkpoint, LinearSpec spec)
    {
        Record(spec);
        return Kept(inner.UploadLinear(checkpoint, spec), spec.Weight);
    }

    public NormWeight UploadNorm(Checkpoint checkpoint, string name, int width, float epsilon)
    {
        _received.Add((name, null));
        return Kept(inner.UploadNorm(checkpoint, name, width, epsilon), name);
    }

    public EmbeddingWeight UploadEmbedding(Checkpoint checkpoint, string name, int rows, int width)
    {
        _received.Add((name, null));
        return Kept(inner.UploadEmbedding(checkpoint, name, rows, width), name);
    }

    public LinearWeight UploadHead(Checkpoint checkpoint, string name, int vocab, int width)
    {
        _received.Add((name, null));
        return Kept(inner.UploadHead(checkpoint, name, vocab, width), name);
    }

    public GateWeight UploadGate(Checkpoint checkpoint, string weight, string bias, int width, GateOptions options)
    {
        _received.Add((weight, null));
        _received.Add((bias, null));
        return Kept(inner.UploadGate(checkpoint, weight, bias, width, options), weight);
    }

    public ExpertWeights UploadExperts(Checkpoint checkpoint, IReadOnlyList<LinearSpec[]> experts, LinearSpec[]? shared)
    {
        foreach (var spec in experts.SelectMany(e => e).Concat(shared ?? []))
        {
            Record(spec);
        }

        return Kept(inner.UploadExperts(checkpoint, experts, shared), experts.SelectMany(e => e).Concat(shared ?? []).FirstOrDefault()?.Weight ?? "experts");
    }

    public RopeTable UploadRope(ReadOnlySpan<float> cos, ReadOnlySpan<float> sin, int positions, int pairs) => Kept(inner.UploadRope(cos, sin, positions, pairs), "rope");
    public LatentCache AllocateLatentCache(int capacity, int latentDim, int ropeDim) =>
        Counted(inner.AllocateLatentCache(capacity, latentDim, ropeDim), (long)capacity * (latentDim + ropeDim) * 2);

    public void CopyLatentCache(LatentCache source, LatentCache destination, int positions) =>
        Run(nameof(CopyLatentCache), () => inner.CopyLatentCache(source, destination, positions), source, destination, positions);

    public LatentPool AllocateLatentPool(int blocks, int latentDim, int ropeDim) =>
        Counted(inner.AllocateLatentPool(blocks, latentDim, ropeDim), (long)blocks * 64 * (latentDim + ropeDim) * 2);

    public BlockTable AllocateBlockTable(int requests, int maxBlocksPerRequest) =>
        Counted(inner.AllocateBlockTable(requests, maxBlocksPerRequest), (long)requests * maxBlocksPerRequest * 4);

    public void UploadBlockTable(ReadOnlySpan<int> entries, BlockTable table)
    {
        TableUploads++;
        inner.UploadBlockTable(entries, table);
    }

    public LatentCache PagedCache(LatentPool pool, BlockTable table, int request) => inner.PagedCache(pool, table, request);
    public Routing AllocateRouting(int tokens, int experts, int topK) => Counted(inner.AllocateRouting(tokens, experts, topK), (long)tokens * (experts * 4 + topK * 8));
    public void DownloadRouting(Routing routing, Span<float> scores, Span<int> indices, Span<float> weights) =>
        inner.DownloadRouting(routing, scores, indices, weights);
    public void Embedding(EmbeddingWeight table, ReadOnlySpan<int> ids, Tensor output)
    {
        Op(nameof(Embedding), table, string.Join(" ", ids.ToArray()), output);
        inner.Embedding(table, ids, output);
    }

    public void EmbeddingRows(EmbeddingWeight table, StepRows rows, Tensor output) =>
        Run(nameof(EmbeddingRows), () => inner.EmbeddingRows(table, rows, output), table, rows, output);

    public void EmbeddingChosenRows(EmbeddingWeight table, StepRows rows, TokenChoiceBuffer chosen, Tensor output) =>
        Run(nameof(EmbeddingChosenRows), () => inner.EmbeddingChosenRows(table, rows, chosen, output), table, rows, chosen, output);

    public void RmsNorm(Tensor x, NormWeight weight, Tensor output) =>
        Run(nameof(RmsNorm), () => inner.RmsNorm(x, weight, output), x, weight, output);

    public void AddRmsNorm(Tensor residual, Tensor delta, NormWeight weight, Tensor normed) =>
        Run(nameof(AddRmsNorm), () => inner.AddRmsNorm(residual, delta, weight, normed), residual, delta, weight, normed);

    public void Linear(Tensor x, LinearWeight weight, Tensor y) =>
        Run(nameof(Linear), () => inner.Linear(x, weight, y), x, weight, y);

    public void Logits(Tensor x, LinearWeight head, Tensor logits) =>
        Run(nameof(Logits), () => inner.Logits(x, head, logits), x, head, logits);

    public void SiluMul(Tensor gate, Tensor up, Tensor output) =>
        Run(nameof(SiluMul), () => inner.SiluMul(gate, up, output), gate, up, output);

    public void ConcatColumns(Tensor a, Tensor b, Tensor output) =>
        Run(nameof(ConcatColumns), () => inner.ConcatColumns(a, b, output), a, b, output);

    public StepGraph CaptureGraph(Action record) => Named(inner.CaptureGraph(record));

    public void ReplayGraph(StepGraph graph) =>
        Run(nameof(ReplayGraph), () => inner.ReplayGraph(graph), graph);

    public StepRows AllocateStepRows(int capacity) => Counted(inner.AllocateStepRows(capacity), capacity * 12L);

    public void UploadStepRows(ReadOnlySpan<int> tokens, ReadOnlySpan<int> slots, ReadOnlySpan<int> positions, StepRows rows) =>
        inner.UploadStepRows(tokens, slots, positions, rows);

    public void ApplyRope(Tensor x, RopeTable rope, int startPosition, int headStride, int ropeOffset) =>
        Run(nameof(ApplyRope), () => inner.ApplyRope(x, rope, startPosition, headStride, ropeOffset), x, rope, startPosition, headStride, ropeOffset);

    public void ApplyRopeRows(Tensor x, RopeTable rope, StepRows rows, int headStride, int ropeOffset) =>
        Run(nameof(ApplyRopeRows), () => inner.ApplyRopeRows(x, rope, rows, headStride, ropeOffset), x, rope, rows, headStride, ropeOffset);

    public void AppendLatent(Tensor kv, NormWeight latentNorm, RopeTable rope, LatentCache cache, int startPosition) =>
        Run(nameof(AppendLatent), () => inner.AppendLatent(kv, latentNorm, rope, cache, startPosition), kv, latentNorm, rope, cache, startPosition);

    public void AppendLatentRows(Tensor kv, NormWeight latentNorm, RopeTable rope, LatentPool pool, BlockTable table, StepRows rows) =>
        Run(nameof(AppendLatentRows), () => inner.AppendLatentRows(kv, latentNorm, rope, pool, table, rows), kv, latentNorm, rope, pool, table, rows);

    public void MlaAttentionNaive(Tensor q, LatentCache cache, LinearWeight kvB, MlaDims dims, int startPosition, float scale, Tensor output) =>
        Run(nameof(MlaAttentionNaive), () => inner.MlaAttentionNaive(q, cache, kvB, dims, startPosition, scale, output), q, cache, kvB, dims, startPosition, scale, output);

    public void MlaAttentionAbsorbed(Tensor q, LatentCache cache, LinearWeight kvB, MlaDims dims, int startPosition, float scale, Tensor output) =>
        Run(nameof(MlaAttentionAbsorbed), () => inner.MlaAttentionAbsorbed(q, cache, kvB, dims, startPosition, scale, output), q, cache, kvB, dims, startPosition, scale, output);

    public void MlaAttentionRows(Tensor q, LatentPool pool, BlockTable table, StepRows rows, LinearWeight kvB, MlaDims dims, float scale, Tensor output) =>
        Run(nameof(MlaAttentionRows), () => inner.MlaAttentionRows(q, pool, table, rows, kvB, dims, scale, output), q, pool, table, rows, kvB, dims, scale, output);

    public void MoeGate(Tensor x, GateWeight gate, Routing routing) =>
        Run(nameof(MoeGate), () => inner.MoeGate(x, gate, routing), x, gate, routing);

    public void MoeExperts(Tensor x, Routing routing, ExpertWeights experts, Tensor y) =>
        Run(nameof(MoeExperts), () => inner.MoeExperts(x, routing, experts, y), x, routing, experts, y);

    public void Dispose() => inner.Dispose();

    private void Record(LinearSpec spec) => _received.Add((spec.Weight, spec.Slice is { IsWhole: false } s ? s : null));
}

/// <summary>
/// A GPU's memory for <see cref="RecordingBackend.Gpu"/>: <paramref name="freeBytes"/> free when made, of
/// <paramref name="totalBytes"/>. Each allocation of a device on it takes what a GPU would hold for it (BF16 activations and
/// cache rows, fp32 logits, int32 tables and step rows); frees give nothing back.
/// </summary>
internal sealed class SimulatedGpu(string name, long totalBytes, long freeBytes)
{
    /// <summary>The memory of the simulated GPUs the pool tests make: 16 GiB.</summary>
    public const long Total = 16L << 30;

    /// <summary>What a step runner leaves untouched on a GPU of <paramref name="total"/> bytes: 5% of them, at least 512 MiB.</summary>
    public static long Reserve(long total = Total) => Math.Max(512L << 20, total / 20);

    /// <summary>One cache block over <paramref name="pools"/> layers' pools: 64 positions of a BF16 latent and rotated key each.</summary>
    public static long BlockBytes(ModelConfig config, int pools) => 64L * (config.KvLoraRank + config.QkRopeHeadDim) * 2 * pools;

    /// <summary>
    /// What a client's step buffers and block table take on each of <paramref name="devices"/> (cache blocks of
    /// <paramref name="blockBytes"/> there): each is made a GPU of <see cref="Total"/> bytes, and <paramref name="poolOfOne"/> makes a
    /// client whose pool is one block (two with the padding block), at once disposed.
    /// </summary>
    public static long[] StepBytes(IReadOnlyList<RecordingBackend> devices, IReadOnlyList<long> blockBytes, Func<IDisposable> poolOfOne)
    {
        for (var d = 0; d < devices.Count; d++)
        {
            devices[d].Gpu = new SimulatedGpu($"gpu:{d}", Total, Total);
        }

        using (poolOfOne())
        {
        }

        return [.. devices.Select((device, d) => device.Gpu!.AllocatedBytes - 2 * blockBytes[d])];
    }

    /// <summary>GPU <paramref name="name"/> with room for exactly <paramref name="blocks"/> blocks of <paramref name="blockBytes"/> (and the padding block) beside <paramref name="steps"/> bytes and the reserve.</summary>
    public static SimulatedGpu Holding(string name, int blocks, long blockBytes, long steps) =>
        new(name, Total, Reserve() + steps + (blocks + 1) * blockBytes + blockBytes / 2);

    /// <summary>Bytes its devices allocated since it was made.</summary>
    public long AllocatedBytes { get; private set; }

    public DeviceMemory Memory => new(freeBytes - AllocatedBytes, totalBytes, name);

    public void Take(long bytes) => AllocatedBytes += bytes;
}

