using System.Diagnostics;
using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cuda;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Loader;

namespace DeepSeekCuda.Bench.Benches;

/// <summary>
/// A pass-through <see cref="IBackend"/> over a <see cref="CudaBackend"/> that, while <see cref="Recording"/>, brackets
/// every operation with two events on the backend's stream and notes the host clock when it starts. After a
/// synchronized step, <see cref="Collect"/> gives per-part GPU time (the sum of the operations' event spans: kernels,
/// and gaps inside one operation) and host wall time (from a part's first operation to the next part's), so
/// wall − GPU is the time the GPU waited for the host. Parts: -1 for embedding and head, else the main layer whose
/// weights the operation uses; weightless operations (allocation, SiLU, RoPE, copies) and norms belong to the current
/// part. Recording costs two event records per operation, so whole-step times are measured with it off.
/// </summary>
internal sealed class OpTimingBackend(CudaBackend inner) : IBackend
{
    private readonly Dictionary<object, int> _layerOf = new(ReferenceEqualityComparer.Instance);
    private readonly List<(int Part, CudaEvent Start, CudaEvent Stop, long HostTicks)> _ops = [];
    private readonly List<CudaEvent> _pool = [];
    private int _part = -1;

    /// <summary>The wrapped backend.</summary>
    public CudaBackend Inner => inner;

    /// <summary>Whether operations are being timed.</summary>
    public bool Recording { get; set; }

    public string Name => inner.Name;

    /// <summary>
    /// Per part (-1: outside the layers, then layer indices), GPU µs and host wall µs since the last collect, ending
    /// at <paramref name="endTicks"/> (a <see cref="Stopwatch"/> timestamp taken after the step returned). Waits for the stream.
    /// </summary>
    public SortedDictionary<int, (double GpuUs, double WallUs)> Collect(long endTicks)
    {
        inner.Synchronize();
        var parts = new SortedDictionary<int, (double GpuUs, double WallUs)>();
        for (var i = 0; i < _ops.Count; i++)
        {
            var (part, start, stop, ticks) = _ops[i];
            var next = i + 1 < _ops.Count ? _ops[i + 1].HostTicks : endTicks;
            var wall = Stopwatch.GetElapsedTime(ticks, next).TotalMicroseconds;
            var gpu = stop.ElapsedSince(start) * 1000.0;
            parts[part] = parts.TryGetValue(part, out var p) ? (p.GpuUs + gpu, p.WallUs + wall) : (gpu, wall);
            _pool.Add(start);
            _pool.Add(stop);
        }

        _ops.Clear();
        _part = -1;
        return parts;
    }

    private T Op<T>(object? weight, Func<T> call)
    {
        if (!Recording)
        {
            return call();
        }

        if (weight is not null && _layerOf.TryGetValue(weight, out var layer))
        {
            _part = layer;
        }

        var ticks = Stopwatch.GetTimestamp();
        var start = Event();
        start.Record(inner.Stream);
        var result = call();
        var stop = Event();
        stop.Record(inner.Stream);
        _ops.Add((_part, start, stop, ticks));
        return result;
    }

    private void Op(object? weight, Action call) => Op<bool>(weight, () =>
    {
        call();
        return true;
    });

    private CudaEvent Event()
    {
        if (_pool.Count == 0)
        {
            return new CudaEvent(inner.Device);
        }

        var e = _pool[^1];
        _pool.RemoveAt(_pool.Count - 1);
        return e;
    }

    private T Owned<T>(T weight, string name) where T : class
    {
        var prefix = "model.layers.";
        if (name.StartsWith(prefix, StringComparison.Ordinal))
        {
            var end = name.IndexOf('.', prefix.Length);
            _layerOf[weight] = int.Parse(name.AsSpan(prefix.Length, end - prefix.Length), System.Globalization.CultureInfo.InvariantCulture);
        }
        else
        {
            _layerOf[weight] = -1;
        }

        return weight;
    }

    public Tensor Allocate(int rows, int cols, TensorKind kind = TensorKind.Activation) => Op(null, () => inner.Allocate(rows, cols, kind));

    public Tensor Upload(ReadOnlySpan<float> values, int rows, int cols, TensorKind kind = TensorKind.Activation)
    {
        var copy = values.ToArray();
        return Op(null, () => inner.Upload(copy, rows, cols, kind));
    }

    public void Download(Tensor tensor, Span<float> destination)
    {
        // The download waits for the stream: its span is the wait plus the copy, so it is left out of the GPU time.
        inner.Download(tensor, destination);
    }

    public void CopyRows(Tensor source, int sourceRow, Tensor destination, int destinationRow, int count) =>
        Op(null, () => inner.CopyRows(source, sourceRow, destination, destinationRow, count));

    public void Zero(Tensor tensor) => Op(null, () => inner.Zero(tensor));

    public DeviceMemory? Memory() => inner.Memory();

    public void GatherRows(Tensor ring, int ringRows, StepRows rows, Tensor output) =>
        Op(null, () => inner.GatherRows(ring, ringRows, rows, output));

    public void ScatterRows(Tensor source, StepRows rows, int ringRows, Tensor ring) =>
        Op(null, () => inner.ScatterRows(source, rows, ringRows, ring));

    public Tensor View(Tensor tensor, int firstRow, int rows) => inner.View(tensor, firstRow, rows);

    public LinearWeight UploadLinear(Checkpoint checkpoint, LinearSpec spec) => Owned(inner.UploadLinear(checkpoint, spec), spec.Weight);

    public NormWeight UploadNorm(Checkpoint checkpoint, string name, int width, float epsilon) => inner.UploadNorm(checkpoint, name, width, epsilon);

    public EmbeddingWeight UploadEmbedding(Checkpoint checkpoint, string name, int rows, int width) =>
        Owned(inner.UploadEmbedding(checkpoint, name, rows, width), name);

    public LinearWeight UploadHead(Checkpoint checkpoint, string name, int vocab, int width) => Owned(inner.UploadHead(checkpoint, name, vocab, width), name);

    public GateWeight UploadGate(Checkpoint checkpoint, string weight, string bias, int width, GateOptions options) =>
        Owned(inner.UploadGate(checkpoint, weight, bias, width, options), weight);

    public ExpertWeights UploadExperts(Checkpoint checkpoint, IReadOnlyList<LinearSpec[]> experts, LinearSpec[]? shared) =>
        Owned(inner.UploadExperts(checkpoint, experts, shared), experts.FirstOrDefault(e => e.Length > 0)?[0].Weight ?? shared?[0].Weight ?? "");

    public RopeTable UploadRope(ReadOnlySpan<float> cos, ReadOnlySpan<float> sin, int positions, int pairs) => inner.UploadRope(cos, sin, positions, pairs);

    public LatentCache AllocateLatentCache(int capacity, int latentDim, int ropeDim) => inner.AllocateLatentCache(capacity, latentDim, ropeDim);

    public void CopyLatentCache(LatentCache source, LatentCache destination, int positions) => inner.CopyLatentCache(source, destination, positions);

    public LatentPool AllocateLatentPool(int blocks, int latentDim, int ropeDim) => inner.AllocateLatentPool(blocks, latentDim, ropeDim);

    public BlockTable AllocateBlockTable(int requests, int maxBlocksPerRequest) => inner.AllocateBlockTable(requests, maxBlocksPerRequest);

    public void UploadBlockTable(ReadOnlySpan<int> entries, BlockTable table) => inner.UploadBlockTable(entries, table);

    public LatentCache PagedCache(LatentPool pool, BlockTable table, int request) => inner.PagedCache(pool, table, request);

    public Routing AllocateRouting(int tokens, int experts, int topK) => Op(null, () => inner.AllocateRouting(tokens, experts, topK));

    public void DownloadRouting(Routing routing, Span<float> scores, Span<int> indices, Span<float> weights) =>
        inner.DownloadRouting(routing, scores, indices, weights);

    public TokenChoiceBuffer AllocateTokenChoices(int rows, int vocab) => Op(null, () => inner.AllocateTokenChoices(rows, vocab));

    public void SetTokenChoices(ReadOnlySpan<TokenChoice> choices, TokenChoiceBuffer buffer) => inner.SetTokenChoices(choices, buffer);

    public void ChooseTokenRows(Tensor logits, TokenChoiceBuffer buffer) => Op(null, () => inner.ChooseTokenRows(logits, buffer));

    public void ReadTokenChoices(TokenChoiceBuffer buffer, Span<int> tokens) => inner.ReadTokenChoices(buffer, tokens);

    public void Embedding(EmbeddingWeight table, ReadOnlySpan<int> ids, Tensor output)
    {
        var copy = ids.ToArray();
        Op(table, () => inner.Embedding(table, copy, output));
    }

    public void EmbeddingRows(EmbeddingWeight table, StepRows rows, Tensor output) => Op(table, () => inner.EmbeddingRows(table, rows, output));

    public void EmbeddingChosenRows(EmbeddingWeight table, StepRows rows, TokenChoiceBuffer chosen, Tensor output) =>
        Op(table, () => inner.EmbeddingChosenRows(table, rows, chosen, output));

    public void RmsNorm(Tensor x, NormWeight weight, Tensor output) => Op(null, () => inner.RmsNorm(x, weight, output));

    public void AddRmsNorm(Tensor residual, Tensor delta, NormWeight weight, Tensor normed) => Op(null, () => inner.AddRmsNorm(residual, delta, weight, normed));

    public void Linear(Tensor x, LinearWeight weight, Tensor y) => Op(weight, () => inner.Linear(x, weight, y));

    public void Logits(Tensor x, LinearWeight head, Tensor logits) => Op(head, () => inner.Logits(x, head, logits));

    public void SiluMul(Tensor gate, Tensor up, Tensor output) => Op(null, () => inner.SiluMul(gate, up, output));

    public void ConcatColumns(Tensor a, Tensor b, Tensor output) => Op(null, () => inner.ConcatColumns(a, b, output));

    public void ApplyRope(Tensor x, RopeTable rope, int startPosition, int headStride, int ropeOffset) =>
        Op(null, () => inner.ApplyRope(x, rope, startPosition, headStride, ropeOffset));

    public void AppendLatent(Tensor kv, NormWeight latentNorm, RopeTable rope, LatentCache cache, int startPosition) =>
        Op(null, () => inner.AppendLatent(kv, latentNorm, rope, cache, startPosition));

    public StepGraph CaptureGraph(Action record) => inner.CaptureGraph(record);

    public void ReplayGraph(StepGraph graph) => inner.ReplayGraph(graph);

    public StepRows AllocateStepRows(int capacity) => Op(null, () => inner.AllocateStepRows(capacity));

    public void UploadStepRows(ReadOnlySpan<int> tokens, ReadOnlySpan<int> slots, ReadOnlySpan<int> positions, StepRows rows) =>
        inner.UploadStepRows(tokens, slots, positions, rows);

    public void ApplyRopeRows(Tensor x, RopeTable rope, StepRows rows, int headStride, int ropeOffset) =>
        Op(null, () => inner.ApplyRopeRows(x, rope, rows, headStride, ropeOffset));

    public void AppendLatentRows(Tensor kv, NormWeight latentNorm, RopeTable rope, LatentPool pool, BlockTable table, StepRows rows) =>
        Op(null, () => inner.AppendLatentRows(kv, latentNorm, rope, pool, table, rows));

    public void MlaAttentionRows(Tensor q, LatentPool pool, BlockTable table, StepRows rows, LinearWeight kvB, MlaDims dims, float scale, Tensor output) =>
        Op(kvB, () => inner.MlaAttentionRows(q, pool, table, rows, kvB, dims, scale, output));

    public void MlaAttentionNaive(Tensor q, LatentCache cache, LinearWeight kvB, MlaDims dims, int startPosition, float scale, Tensor output) =>
        Op(kvB, () => inner.MlaAttentionNaive(q, cache, kvB, dims, startPosition, scale, output));

    public void MlaAttentionAbsorbed(Tensor q, LatentCache cache, LinearWeight kvB, MlaDims dims, int startPosition, float scale, Tensor output) =>
        Op(kvB, () => inner.MlaAttentionAbsorbed(q, cache, kvB, dims, startPosition, scale, output));

    public void MoeGate(Tensor x, GateWeight gate, Routing routing) => Op(gate, () => inner.MoeGate(x, gate, routing));

    public void MoeExperts(Tensor x, Routing routing, ExpertWeights experts, Tensor y) => Op(experts, () => inner.MoeExperts(x, routing, experts, y));

    public void Dispose()
    {
        foreach (var e in _pool.Concat(_ops.SelectMany(o => new[] { o.Start, o.Stop })))
        {
            e.Dispose();
        }

        _pool.Clear();
        _ops.Clear();
        inner.Dispose();
    }
}
