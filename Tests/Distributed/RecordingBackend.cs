using DeepSeekCuda.Backends;
using DeepSeekCuda.Loader;

namespace DeepSeekCuda.Tests.Distributed;

/// <summary>
/// A simulated device: forwards every call to an inner backend and records which checkpoint tensors (and
/// which slices of them) the device received, so tests can hold loading to the placement plan, and counts
/// the calls that allocate backend memory (a step runner's steps must make none after warm-up).
/// </summary>
internal sealed class RecordingBackend(IBackend inner) : IBackend
{
    private readonly List<(string Tensor, TensorSlice? Slice)> _received = [];

    /// <summary>Every weight uploaded: tensor name and slice (null for the whole tensor). Scale grids come with their FP8 weight.</summary>
    public IReadOnlyList<(string Tensor, TensorSlice? Slice)> Received => _received;

    private readonly List<BackendResource> _weights = [];

    /// <summary>Every weight handle this device returned, in upload order (tests check that a cancelled load disposed them all).</summary>
    public IReadOnlyList<BackendResource> Weights => _weights;

    private int _allocations;

    public string Name => "recording " + inner.Name;

    /// <summary>Calls so far that allocate backend memory: Allocate, Upload, and the Allocate* of caches, pools, tables, routing, token choices and step rows.</summary>
    public int Allocations => _allocations;

    /// <summary>Block tables copied to the backend so far.</summary>
    public int TableUploads { get; private set; }

    private T Kept<T>(T weight)
        where T : BackendResource
    {
        _weights.Add(weight);
        return weight;
    }

    private T Counted<T>(T resource)
    {
        _allocations++;
        return resource;
    }

    public Tensor Allocate(int rows, int cols) => Counted(inner.Allocate(rows, cols));
    public Tensor Upload(ReadOnlySpan<float> values, int rows, int cols) => Counted(inner.Upload(values, rows, cols));
    public void Download(Tensor tensor, Span<float> destination)
    {
        DownloadedValues += tensor.Length;
        inner.Download(tensor, destination);
    }

    /// <summary>Values copied to the host by <see cref="Download"/> so far.</summary>
    public long DownloadedValues { get; private set; }

    /// <summary>Rows <see cref="ChooseTokens"/> chose from so far, and how many of them it gave a token.</summary>
    public (long Rows, long Chosen) Choices { get; private set; }

    public TokenChoiceBuffer AllocateTokenChoices(int rows) => Counted(inner.AllocateTokenChoices(rows));

    public void ChooseTokens(Tensor logits, ReadOnlySpan<TokenChoice> choices, TokenChoiceBuffer buffer, Span<int> tokens)
    {
        inner.ChooseTokens(logits, choices, buffer, tokens);
        var chosen = 0;
        foreach (var t in tokens[..choices.Length])
        {
            chosen += t >= 0 ? 1 : 0;
        }

        Choices = (Choices.Rows + choices.Length, Choices.Chosen + chosen);
    }
    public void CopyRows(Tensor source, int sourceRow, Tensor destination, int destinationRow, int count) =>
        inner.CopyRows(source, sourceRow, destination, destinationRow, count);
    public Tensor View(Tensor tensor, int firstRow, int rows) => inner.View(tensor, firstRow, rows);

    public LinearWeight UploadLinear(Checkpoint checkpoint, LinearSpec spec)
    {
        Record(spec);
        return Kept(inner.UploadLinear(checkpoint, spec));
    }

    public NormWeight UploadNorm(Checkpoint checkpoint, string name, int width, float epsilon)
    {
        _received.Add((name, null));
        return Kept(inner.UploadNorm(checkpoint, name, width, epsilon));
    }

    public EmbeddingWeight UploadEmbedding(Checkpoint checkpoint, string name, int rows, int width)
    {
        _received.Add((name, null));
        return Kept(inner.UploadEmbedding(checkpoint, name, rows, width));
    }

    public LinearWeight UploadHead(Checkpoint checkpoint, string name, int vocab, int width)
    {
        _received.Add((name, null));
        return Kept(inner.UploadHead(checkpoint, name, vocab, width));
    }

    public GateWeight UploadGate(Checkpoint checkpoint, string weight, string bias, int width, GateOptions options)
    {
        _received.Add((weight, null));
        _received.Add((bias, null));
        return Kept(inner.UploadGate(checkpoint, weight, bias, width, options));
    }

    public ExpertWeights UploadExperts(Checkpoint checkpoint, IReadOnlyList<LinearSpec[]> experts, LinearSpec[]? shared)
    {
        foreach (var spec in experts.SelectMany(e => e).Concat(shared ?? []))
        {
            Record(spec);
        }

        return Kept(inner.UploadExperts(checkpoint, experts, shared));
    }

    public RopeTable UploadRope(ReadOnlySpan<float> cos, ReadOnlySpan<float> sin, int positions, int pairs) => Kept(inner.UploadRope(cos, sin, positions, pairs));
    public LatentCache AllocateLatentCache(int capacity, int latentDim, int ropeDim) => Counted(inner.AllocateLatentCache(capacity, latentDim, ropeDim));

    public LatentPool AllocateLatentPool(int blocks, int latentDim, int ropeDim) => Counted(inner.AllocateLatentPool(blocks, latentDim, ropeDim));

    public BlockTable AllocateBlockTable(int requests, int maxBlocksPerRequest) => Counted(inner.AllocateBlockTable(requests, maxBlocksPerRequest));

    public void UploadBlockTable(ReadOnlySpan<int> entries, BlockTable table)
    {
        TableUploads++;
        inner.UploadBlockTable(entries, table);
    }

    public LatentCache PagedCache(LatentPool pool, BlockTable table, int request) => inner.PagedCache(pool, table, request);
    public Routing AllocateRouting(int tokens, int experts, int topK) => Counted(inner.AllocateRouting(tokens, experts, topK));
    public void DownloadRouting(Routing routing, Span<float> scores, Span<int> indices, Span<float> weights) =>
        inner.DownloadRouting(routing, scores, indices, weights);
    public void Embedding(EmbeddingWeight table, ReadOnlySpan<int> ids, Tensor output) => inner.Embedding(table, ids, output);
    public void RmsNorm(Tensor x, NormWeight weight, Tensor output) => inner.RmsNorm(x, weight, output);
    public void AddRmsNorm(Tensor residual, Tensor delta, NormWeight weight, Tensor normed) => inner.AddRmsNorm(residual, delta, weight, normed);
    public void Linear(Tensor x, LinearWeight weight, Tensor y) => inner.Linear(x, weight, y);
    public void Logits(Tensor x, LinearWeight head, Tensor logits) => inner.Logits(x, head, logits);
    public void SiluMul(Tensor gate, Tensor up, Tensor output) => inner.SiluMul(gate, up, output);
    public void ConcatColumns(Tensor a, Tensor b, Tensor output) => inner.ConcatColumns(a, b, output);
    public StepRows AllocateStepRows(int capacity) => Counted(inner.AllocateStepRows(capacity));
    public void UploadStepRows(ReadOnlySpan<int> slots, ReadOnlySpan<int> positions, StepRows rows) => inner.UploadStepRows(slots, positions, rows);

    /// <summary>Calls so far of the RoPE, latent append and MLA attention operations, per operation name (a step's launch count per layer).</summary>
    public IReadOnlyDictionary<string, int> AttentionCalls => _attentionCalls;

    private readonly Dictionary<string, int> _attentionCalls = [];

    private void Call(string op) => _attentionCalls[op] = _attentionCalls.GetValueOrDefault(op) + 1;

    public void ApplyRope(Tensor x, RopeTable rope, int startPosition, int headStride, int ropeOffset)
    {
        Call(nameof(ApplyRope));
        inner.ApplyRope(x, rope, startPosition, headStride, ropeOffset);
    }

    public void ApplyRopeRows(Tensor x, RopeTable rope, StepRows rows, int headStride, int ropeOffset)
    {
        Call(nameof(ApplyRopeRows));
        inner.ApplyRopeRows(x, rope, rows, headStride, ropeOffset);
    }

    public void AppendLatent(Tensor kv, NormWeight latentNorm, RopeTable rope, LatentCache cache, int startPosition)
    {
        Call(nameof(AppendLatent));
        inner.AppendLatent(kv, latentNorm, rope, cache, startPosition);
    }

    public void AppendLatentRows(Tensor kv, NormWeight latentNorm, RopeTable rope, LatentPool pool, BlockTable table, StepRows rows)
    {
        Call(nameof(AppendLatentRows));
        inner.AppendLatentRows(kv, latentNorm, rope, pool, table, rows);
    }

    public void MlaAttentionNaive(Tensor q, LatentCache cache, LinearWeight kvB, MlaDims dims, int startPosition, float scale, Tensor output)
    {
        Call(nameof(MlaAttentionNaive));
        inner.MlaAttentionNaive(q, cache, kvB, dims, startPosition, scale, output);
    }

    public void MlaAttentionAbsorbed(Tensor q, LatentCache cache, LinearWeight kvB, MlaDims dims, int startPosition, float scale, Tensor output)
    {
        Call(nameof(MlaAttentionAbsorbed));
        inner.MlaAttentionAbsorbed(q, cache, kvB, dims, startPosition, scale, output);
    }

    public void MlaAttentionRows(Tensor q, LatentPool pool, BlockTable table, StepRows rows, LinearWeight kvB, MlaDims dims, float scale, Tensor output)
    {
        Call(nameof(MlaAttentionRows));
        inner.MlaAttentionRows(q, pool, table, rows, kvB, dims, scale, output);
    }

    public void MoeGate(Tensor x, GateWeight gate, Routing routing) => inner.MoeGate(x, gate, routing);
    public void MoeExperts(Tensor x, Routing routing, ExpertWeights experts, Tensor y) => inner.MoeExperts(x, routing, experts, y);

    public void Dispose() => inner.Dispose();

    private void Record(LinearSpec spec) => _received.Add((spec.Weight, spec.Slice is { IsWhole: false } s ? s : null));
}
