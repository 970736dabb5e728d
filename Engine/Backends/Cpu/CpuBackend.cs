using System.Numerics.Tensors;
using System.Runtime.CompilerServices;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Numerics;

namespace DeepSeekCuda.Backends.Cpu;

/// <summary>Numerics of the CPU backend.</summary>
public enum CpuNumerics
{
    /// <summary>Float32 everywhere with dequantized weights: the reference semantics (fixture tolerance (i)).</summary>
    Float32,

    /// <summary>
    /// What the GPU computes: every stored activation rounded to BF16, and activations quantized to FP8
    /// per token per 128 channels before each FP8-weight GEMM (fixture tolerance (ii)). Accumulation,
    /// norms, softmax, gating and logits stay fp32.
    /// </summary>
    GpuEmulation,
}

/// <summary>
/// The reference implementation of <see cref="IBackend"/>: float32 on the CPU, SIMD through
/// <see cref="TensorPrimitives"/> and threads over output rows, tokens and heads. Deterministic: every
/// sum has a fixed order regardless of scheduling.
/// </summary>
public sealed class CpuBackend : IBackend
{
    private readonly bool _emulate;
    private readonly ParallelOptions _parallel;

    /// <summary>Creates a CPU backend.</summary>
    /// <param name="numerics">Float32 (reference) or GPU emulation.</param>
    /// <param name="maxDegreeOfParallelism">Threads to use; null for all cores.</param>
    public CpuBackend(CpuNumerics numerics = CpuNumerics.Float32, int? maxDegreeOfParallelism = null)
    {
        Numerics = numerics;
        _emulate = numerics == CpuNumerics.GpuEmulation;
        _parallel = new ParallelOptions { MaxDegreeOfParallelism = maxDegreeOfParallelism ?? Environment.ProcessorCount };
    }

    /// <summary>The numerics mode.</summary>
    public CpuNumerics Numerics { get; }

    /// <summary>Activation group width of the FP8 quantization in <see cref="CpuNumerics.GpuEmulation"/>.</summary>
    public int ActivationGroupSize { get; init; } = ActivationQuant.DefaultGroupSize;

    /// <summary>Scale format of the FP8 quantization in <see cref="CpuNumerics.GpuEmulation"/>.</summary>
    internal ScaleFormat ActivationScaleFormat { get; init; } = ScaleFormat.Float32;

    /// <inheritdoc />
    public string Name => $"cpu ({Numerics})";

    /// <inheritdoc />
    public void Dispose() => IsDisposed = true; // managed storage: nothing to free

    /// <summary>Whether <see cref="Dispose"/> was called (tests check that failed loads dispose their backend).</summary>
    internal bool IsDisposed { get; private set; }

    // ---------------------------------------------------------------- graphs

    private CpuGraphRecording? _recording; // the graph being captured (by one thread)

    /// <inheritdoc />
    /// <remarks>Each recorded operation is the call itself, made again at every replay (its checks run then).</remarks>
    public StepGraph CaptureGraph(Action record) => new CpuStepGraph(this, Record([this], new CpuGraphRecording(), record));

    /// <summary>
    /// Records into <paramref name="recording"/>, in call order, the operations <paramref name="record"/> calls on any of
    /// <paramref name="backends"/> from this thread (<see cref="CaptureGraph"/> over several backends at once, as a host
    /// communicator's graph needs: its collectives join the same list); returns them.
    /// </summary>
    internal static Action[] Record(IReadOnlyList<CpuBackend> backends, CpuGraphRecording recording, Action record)
    {
        ArgumentNullException.ThrowIfNull(record);
        foreach (var b in backends)
        {
            b.NotCapturing(nameof(CaptureGraph));
        }

        foreach (var b in backends)
        {
            b._recording = recording;
        }

        try
        {
            record();
        }
        finally
        {
            foreach (var b in backends)
            {
                b._recording = null;
            }
        }

        return [.. recording.Operations];
    }

    /// <inheritdoc />
    public void ReplayGraph(StepGraph graph)
    {
        NotCapturing();
        CpuStepGraph.Of(graph, this).Replay();
    }

    /// <summary>While this thread captures a graph: keeps <paramref name="operation"/> (the call being made) for its replays, and says so.</summary>
    private bool Recorded(Action operation) => _recording?.Add(operation) == true;

    /// <summary>Refuses <paramref name="call"/> while this thread captures a graph (<see cref="CaptureGraph"/>).</summary>
    private void NotCapturing([CallerMemberName] string call = "")
    {
        if (_recording?.OnThisThread == true)
        {
            throw new InvalidOperationException($"{call} cannot be part of a graph (a graph holds only operations over backend memory: IBackend.CaptureGraph)");
        }
    }

    // ---------------------------------------------------------------- memory

    /// <inheritdoc />
    public Tensor Allocate(int rows, int cols, TensorKind kind = TensorKind.Activation)
    {
        NotCapturing();
        return new CpuTensor(rows, cols, kind);
    }

    /// <inheritdoc />
    /// <remarks>In <see cref="CpuNumerics.GpuEmulation"/> an activation's values are rounded to BF16, as a GPU stores them.</remarks>
    public Tensor Upload(ReadOnlySpan<float> values, int rows, int cols, TensorKind kind = TensorKind.Activation)
    {
        NotCapturing();
        var t = new CpuTensor(rows, cols, kind);
        if (values.Length != t.Data.Length)
        {
            throw new ArgumentException($"{values.Length} values for a [{rows}, {cols}] tensor", nameof(values));
        }

        values.CopyTo(t.Data);
        if (kind == TensorKind.Activation)
        {
            Store(t.Data);
        }

        return t;
    }

    /// <inheritdoc />
    public void Download(Tensor tensor, Span<float> destination)
    {
        NotCapturing();
        T(tensor).Data.CopyTo(destination);
    }

    /// <inheritdoc />
    public void CopyRows(Tensor source, int sourceRow, Tensor destination, int destinationRow, int count)
    {
        if (Recorded(() => CopyRows(source, sourceRow, destination, destinationRow, count)))
        {
            return;
        }

        CpuTensor s = T(source), d = T(destination);
        ShapeCheck.CopyRows(s, sourceRow, d, destinationRow, count);
        s.Data.Slice(sourceRow * s.Cols, count * s.Cols).CopyTo(d.Data[(destinationRow * d.Cols)..]);
    }

    /// <inheritdoc />
    /// <remarks>Null: host memory is not sized from what a step runner measures.</remarks>
    public DeviceMemory? Memory() => null;

    /// <inheritdoc />
    public void Zero(Tensor tensor)
    {
        if (!Recorded(() => Zero(tensor)))
        {
            T(tensor).Data.Clear();
        }
    }

    /// <inheritdoc />
    public void GatherRows(Tensor ring, int ringRows, StepRows rows, Tensor output)
    {
        if (!Recorded(() => GatherRows(ring, ringRows, rows, output)))
        {
            Ring(scatter: false, ring, ringRows, rows, output);
        }
    }

    /// <inheritdoc />
    public void ScatterRows(Tensor source, StepRows rows, int ringRows, Tensor ring)
    {
        if (!Recorded(() => ScatterRows(source, rows, ringRows, ring)))
        {
            Ring(scatter: true, ring, ringRows, rows, source);
        }
    }

    /// <summary>The rows of <paramref name="other"/> read from (gathered) or written to (scattered) <paramref name="ring"/>.</summary>
    private static void Ring(bool scatter, Tensor ring, int ringRows, StepRows rows, Tensor other)
    {
        ShapeCheck.Ring(ring, ringRows, rows, other);
        CpuTensor g = T(ring), x = T(other);
        for (var r = 0; r < x.Rows; r++)
        {
            var ringRow = g.Data.Slice(RingRow(rows, r, ringRows) * g.Cols, g.Cols);
            var row = x.Data.Slice(r * x.Cols, x.Cols);
            (scatter ? row : ringRow).CopyTo(scatter ? ringRow : row);
        }
    }

    private static int RingRow(StepRows rows, int r, int ringRows) => rows.Slots[r] * ringRows + rows.Positions[r] % ringRows;

    /// <inheritdoc />
    public Tensor View(Tensor tensor, int firstRow, int rows)
    {
        var t = T(tensor);
        ShapeCheck.View(t, firstRow, rows);
        return t.View(firstRow, rows);
    }

    // ---------------------------------------------------------------- weights

    /// <inheritdoc />
    public LinearWeight UploadLinear(Checkpoint checkpoint, LinearSpec spec)
    {
        NotCapturing();
        return LoadLinear(checkpoint, spec);
    }

    /// <inheritdoc />
    public NormWeight UploadNorm(Checkpoint checkpoint, string name, int width, float epsilon)
    {
        NotCapturing();
        return new CpuNormWeight(width, epsilon, WeightReader.Float32(checkpoint, name, width));
    }

    /// <inheritdoc />
    public EmbeddingWeight UploadEmbedding(Checkpoint checkpoint, string name, int rows, int width)
    {
        NotCapturing();
        return new CpuEmbeddingWeight(rows, width, WeightReader.Float32(checkpoint, name, rows, width));
    }

    /// <inheritdoc />
    public LinearWeight UploadHead(Checkpoint checkpoint, string name, int vocab, int width)
    {
        NotCapturing();
        return new CpuLinearWeight(vocab, width, false, WeightReader.Float32(checkpoint, name, vocab, width));
    }

    /// <inheritdoc />
    public GateWeight UploadGate(Checkpoint checkpoint, string weight, string bias, int width, GateOptions options)
    {
        NotCapturing();
        if (options.Experts % options.Groups != 0 || options.GroupsKept > options.Groups || options.TopK > options.Experts / options.Groups * options.GroupsKept)
        {
            throw new ArgumentException($"unsupported routing {options}", nameof(options));
        }

        return new CpuGateWeight(width, options, WeightReader.Float32(checkpoint, weight, options.Experts, width), WeightReader.Float32(checkpoint, bias, options.Experts));
    }

    /// <inheritdoc />
    public ExpertWeights UploadExperts(Checkpoint checkpoint, IReadOnlyList<LinearSpec[]> experts, LinearSpec[]? shared)
    {
        NotCapturing();
        var routed = new CpuMlp?[experts.Count];
        // Experts are independent tensors; dequantizing them in parallel is the bulk of load time.
        // An empty entry is an expert another device holds (expert parallelism): it contributes nothing here.
        DeepSeekCuda.Loading.ParallelLoad.For(0, experts.Count, _parallel, e => routed[e] = experts[e].Length == 0 ? null : LoadMlp(checkpoint, experts[e]));
        var sharedMlp = shared is null ? null : LoadMlp(checkpoint, shared);
        var firstRouted = routed.FirstOrDefault(m => m is not null);
        var first = firstRouted ?? sharedMlp ?? throw new ArgumentException("no experts", nameof(experts));
        return new CpuExpertWeights(routed, sharedMlp, first.Gate.In, firstRouted?.Gate.Out ?? 0);
    }

    /// <inheritdoc />
    public RopeTable UploadRope(ReadOnlySpan<float> cos, ReadOnlySpan<float> sin, int positions, int pairs)
    {
        NotCapturing();
        if (cos.Length != positions * pairs || sin.Length != positions * pairs)
        {
            throw new ArgumentException($"cos/sin must be [{positions}, {pairs}]");
        }

        return new CpuRopeTable(positions, pairs, cos.ToArray(), sin.ToArray());
    }

    /// <inheritdoc />
    public LatentCache AllocateLatentCache(int capacity, int latentDim, int ropeDim)
    {
        NotCapturing();
        return new CpuLatentCache(capacity, latentDim, ropeDim);
    }

    /// <inheritdoc />
    public void CopyLatentCache(LatentCache source, LatentCache destination, int positions)
    {
        NotCapturing();
        ShapeCheck.CopyLatentCache(source, destination, positions);
        ((CpuLatentCache)destination).CopyFrom((CpuLatentCache)source, positions);
    }

    /// <inheritdoc />
    public LatentPool AllocateLatentPool(int blocks, int latentDim, int ropeDim)
    {
        NotCapturing();
        ArgumentOutOfRangeException.ThrowIfNegative(blocks);
        return new CpuLatentPool(blocks, latentDim, ropeDim);
    }

    /// <inheritdoc />
    public BlockTable AllocateBlockTable(int requests, int maxBlocksPerRequest)
    {
        NotCapturing();
        ArgumentOutOfRangeException.ThrowIfLessThan(requests, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(maxBlocksPerRequest, 1);
        return new CpuBlockTable(requests, maxBlocksPerRequest);
    }

    /// <inheritdoc />
    public void UploadBlockTable(ReadOnlySpan<int> entries, BlockTable table)
    {
        NotCapturing();
        var t = (CpuBlockTable)table;
        if (entries.Length != t.Entries.Length)
        {
            throw new ArgumentException($"{entries.Length} entries for a [{t.Requests}, {t.MaxBlocksPerRequest}] block table", nameof(entries));
        }

        entries.CopyTo(t.Entries);
    }

    /// <inheritdoc />
    public LatentCache PagedCache(LatentPool pool, BlockTable table, int request)
    {
        ShapeCheck.PagedCache(pool, table, request);
        return new CpuLatentCache((CpuLatentPool)pool, (CpuBlockTable)table, request);
    }

    /// <inheritdoc />
    public StepRows AllocateStepRows(int capacity)
    {
        NotCapturing();
        ArgumentOutOfRangeException.ThrowIfNegative(capacity);
        return new CpuStepRows(capacity);
    }

    /// <inheritdoc />
    public void UploadStepRows(ReadOnlySpan<int> tokens, ReadOnlySpan<int> slots, ReadOnlySpan<int> positions, StepRows rows)
    {
        NotCapturing();
        ((CpuStepRows)rows).Set(tokens, slots, positions);
    }

    /// <inheritdoc />
    public Routing AllocateRouting(int tokens, int experts, int topK)
    {
        NotCapturing();
        return new CpuRouting(tokens, experts, topK);
    }

    /// <inheritdoc />
    public void DownloadRouting(Routing routing, Span<float> scores, Span<int> indices, Span<float> weights)
    {
        NotCapturing();
        var r = (CpuRouting)routing;
        if (!scores.IsEmpty)
        {
            r.Scores.CopyTo(scores);
        }

        if (!indices.IsEmpty)
        {
            r.Indices.CopyTo(indices);
        }

        if (!weights.IsEmpty)
        {
            r.Weights.CopyTo(weights);
        }
    }

    /// <inheritdoc />
    public TokenChoiceBuffer AllocateTokenChoices(int rows, int vocab)
    {
        NotCapturing();
        ArgumentOutOfRangeException.ThrowIfLessThan(rows, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(vocab, 1);
        return new CpuTokenChoices(rows, vocab);
    }

    /// <inheritdoc />
    /// <remarks>The settings are kept, each mask copied, as a device copies them.</remarks>
    public void SetTokenChoices(ReadOnlySpan<TokenChoice> choices, TokenChoiceBuffer buffer)
    {
        NotCapturing();
        ShapeCheck.SetChoices(choices, buffer);
        ((CpuTokenChoices)buffer).Set(choices);
    }

    /// <inheritdoc />
    public void ChooseTokenRows(Tensor logits, TokenChoiceBuffer buffer)
    {
        if (Recorded(() => ChooseTokenRows(logits, buffer)))
        {
            return;
        }

        ShapeCheck.ChooseRows(logits, buffer);
        var l = T(logits);
        var b = (CpuTokenChoices)buffer;
        for (var r = 0; r < l.Rows; r++)
        {
            b.Ids[r] = TokenSampling.Choose(l.Row(r), b.Choices[r]);
        }
    }

    /// <inheritdoc />
    public void ReadTokenChoices(TokenChoiceBuffer buffer, Span<int> tokens)
    {
        NotCapturing();
        ShapeCheck.ReadChoices(buffer, tokens);
        ((CpuTokenChoices)buffer).Ids.AsSpan(0, tokens.Length).CopyTo(tokens);
    }

    private static CpuLinearWeight LoadLinear(Checkpoint checkpoint, LinearSpec spec) =>
        new(spec.Out, spec.In, checkpoint.Get(spec.Weight).DType == DType.F8_E4M3, WeightReader.Float32(checkpoint, spec));

    private static CpuMlp LoadMlp(Checkpoint checkpoint, LinearSpec[] mlp)
    {
        if (mlp.Length != 3)
        {
            throw new ArgumentException("an MLP is [gate, up, down]", nameof(mlp));
        }

        return new CpuMlp(LoadLinear(checkpoint, mlp[0]), LoadLinear(checkpoint, mlp[1]), LoadLinear(checkpoint, mlp[2]));
    }

    // ---------------------------------------------------------------- elementwise and norms

    /// <inheritdoc />
    public void Embedding(EmbeddingWeight table, ReadOnlySpan<int> ids, Tensor output)
    {
        NotCapturing();
        ShapeCheck.Embedding(table, ids, output);
        Gather((CpuEmbeddingWeight)table, ids, T(output));
    }

    /// <summary>output[t] = table[ids[t]] for checked ids.</summary>
    private void Gather(CpuEmbeddingWeight w, ReadOnlySpan<int> ids, CpuTensor o)
    {
        for (var t = 0; t < ids.Length; t++)
        {
            w.Data.AsSpan(ids[t] * w.Width, w.Width).CopyTo(o.Row(t));
        }

        Store(o.Data);
    }

    /// <inheritdoc />
    public void EmbeddingRows(EmbeddingWeight table, StepRows rows, Tensor output)
    {
        if (Recorded(() => EmbeddingRows(table, rows, output)))
        {
            return;
        }

        ShapeCheck.EmbeddingRows(table, rows, output);
        Gather((CpuEmbeddingWeight)table, rows.Tokens[..output.Rows], T(output));
    }

    /// <inheritdoc />
    public void EmbeddingChosenRows(EmbeddingWeight table, StepRows rows, TokenChoiceBuffer chosen, Tensor output)
    {
        if (Recorded(() => EmbeddingChosenRows(table, rows, chosen, output)))
        {
            return;
        }

        ShapeCheck.EmbeddingChosenRows(table, rows, chosen, output);
        var ids = ((CpuTokenChoices)chosen).Ids;
        var tokens = rows.Tokens[..output.Rows];
        Span<int> taken = tokens.Length <= 256 ? stackalloc int[tokens.Length] : new int[tokens.Length];
        for (var t = 0; t < tokens.Length; t++)
        {
            taken[t] = Math.Max(ids[tokens[t]], 0);
        }

        Gather((CpuEmbeddingWeight)table, taken, T(output));
    }

    /// <inheritdoc />
    public void RmsNorm(Tensor x, NormWeight weight, Tensor output)
    {
        if (Recorded(() => RmsNorm(x, weight, output)))
        {
            return;
        }

        CpuTensor a = T(x), o = T(output);
        var w = (CpuNormWeight)weight;
        ShapeCheck.Require(a.Cols == w.Width && o.Cols == w.Width && a.Rows == o.Rows, "rmsnorm shapes");
        for (var t = 0; t < a.Rows; t++)
        {
            NormRow(a.Row(t), w.Data, w.Epsilon, o.Row(t));
        }

        Store(o.Data);
    }

    /// <inheritdoc />
    public void AddRmsNorm(Tensor residual, Tensor delta, NormWeight weight, Tensor normed)
    {
        if (Recorded(() => AddRmsNorm(residual, delta, weight, normed)))
        {
            return;
        }

        CpuTensor r = T(residual), d = T(delta);
        ShapeCheck.Require(r.Rows == d.Rows && r.Cols == d.Cols, "residual and delta shapes");
        TensorPrimitives.Add(r.Data, d.Data, r.Data);
        Store(r.Data);
        RmsNorm(residual, weight, normed);
    }

    private static void NormRow(ReadOnlySpan<float> x, ReadOnlySpan<float> w, float eps, Span<float> y)
    {
        // mean(x²) and rsqrt in fp32, as F.rms_norm upcasts; the weight multiplies the normalized value.
        var meanSquare = TensorPrimitives.SumOfSquares(x) / x.Length;
        var r = 1f / MathF.Sqrt(meanSquare + eps);
        TensorPrimitives.Multiply(x, r, y);
        TensorPrimitives.Multiply(y, w, y);
    }

    /// <inheritdoc />
    public void SiluMul(Tensor gate, Tensor up, Tensor output)
    {
        if (Recorded(() => SiluMul(gate, up, output)))
        {
            return;
        }

        CpuTensor g = T(gate), u = T(up), o = T(output);
        ShapeCheck.Require(g.Data.Length == u.Data.Length && g.Data.Length == o.Data.Length, "silu-mul shapes");
        SiluMulSpan(g.Data, u.Data, o.Data);
        Store(o.Data);
    }

    private static void SiluMulSpan(ReadOnlySpan<float> g, ReadOnlySpan<float> u, Span<float> o)
    {
        for (var i = 0; i < o.Length; i++)
        {
            var z = g[i];
            o[i] = z / (1f + MathF.Exp(-z)) * u[i];
        }
    }

    /// <inheritdoc />
    public void ConcatColumns(Tensor a, Tensor b, Tensor output)
    {
        if (Recorded(() => ConcatColumns(a, b, output)))
        {
            return;
        }

        CpuTensor x = T(a), y = T(b), o = T(output);
        ShapeCheck.Require(x.Rows == y.Rows && o.Rows == x.Rows && o.Cols == x.Cols + y.Cols, "concat shapes");
        for (var t = 0; t < o.Rows; t++)
        {
            x.Row(t).CopyTo(o.Row(t));
            y.Row(t).CopyTo(o.Row(t)[x.Cols..]);
        }
    }

    // ---------------------------------------------------------------- GEMM

    /// <inheritdoc />
    public void Linear(Tensor x, LinearWeight weight, Tensor y)
    {
        if (Recorded(() => Linear(x, weight, y)))
        {
            return;
        }

        CpuTensor a = T(x), o = T(y);
        var w = (CpuLinearWeight)weight;
        ShapeCheck.Require(a.Cols == w.In && o.Cols == w.Out && a.Rows == o.Rows, $"linear {a} · [{w.Out}, {w.In}]ᵀ → {o}");
        ReadOnlyMemory<float> input = _emulate && w.Fp8 ? QuantizeRows(a.Data, a.Rows, a.Cols) : a.Memory;
        Gemm(input, a.Rows, w, o.Memory, parallel: true);
        Store(o.Data);
    }

    /// <inheritdoc />
    public void Logits(Tensor x, LinearWeight head, Tensor logits)
    {
        if (Recorded(() => Logits(x, head, logits)))
        {
            return;
        }

        CpuTensor a = T(x), o = T(logits);
        var w = (CpuLinearWeight)head;
        ShapeCheck.Logits(a, w, o);
        Gemm(a.Memory, a.Rows, w, o.Memory, parallel: true);
    }

    /// <summary>The activation copy an FP8 GEMM sees: each row quantized and dequantized per group.</summary>
    private float[] QuantizeRows(ReadOnlySpan<float> x, int rows, int cols)
    {
        var q = x.ToArray();
        for (var t = 0; t < rows; t++)
        {
            ActivationQuant.QuantizeDequantize(q.AsSpan(t * cols, cols), ActivationGroupSize, ActivationScaleFormat);
        }

        return q;
    }

    /// <summary>
    /// y[t, o] = x[t, :]·W[o, :] for t &lt; rows; fp32 dot products; parallel over output row blocks. A row's sums do not
    /// depend on how many rows come with it (a token gets the same bits alone, in a batch, beside a graph step's padding,
    /// or in an expert's group of any size).
    /// </summary>
    private void Gemm(ReadOnlyMemory<float> xMemory, int rows, CpuLinearWeight w, Memory<float> yMemory, bool parallel)
    {
        int outF = w.Out, inF = w.In;
        var blocks = parallel ? Math.Min(outF, Math.Max(1, _parallel.MaxDegreeOfParallelism * 4)) : 1;
        var perBlock = (outF + blocks - 1) / blocks;

        void Block(int b)
        {
            var end = Math.Min(outF, (b + 1) * perBlock);
            var o = b * perBlock;
            Span<float> four = stackalloc float[4];
            ReadOnlySpan<float> x = xMemory.Span;
            var y = yMemory.Span;
            // Four weight rows per pass over the tokens: each x load feeds four dot products.
            for (; o + 4 <= end; o += 4)
            {
                var w4 = w.Data.AsSpan(o * inF, 4 * inF);
                for (var t = 0; t < rows; t++)
                {
                    Kernels.Dot4(x.Slice(t * inF, inF), w4, four);
                    four.CopyTo(y.Slice(t * outF + o, 4));
                }
            }

            for (; o < end; o++)
            {
                var wr = w.Data.AsSpan(o * inF, inF);
                for (var t = 0; t < rows; t++)
                {
                    y[t * outF + o] = TensorPrimitives.Dot(x.Slice(t * inF, inF), wr);
                }
            }
        }

        // Small products are not worth a thread hop.
        if (blocks == 1 || (long)rows * outF * inF < 32_768)
        {
            for (var b = 0; b < blocks; b++)
            {
                Block(b);
            }
        }
        else
        {
            Parallel.For(0, blocks, _parallel, Block);
        }
    }

    // ---------------------------------------------------------------- RoPE and the latent cache

    /// <inheritdoc />
    public void ApplyRope(Tensor x, RopeTable rope, int startPosition, int headStride, int ropeOffset)
    {
        NotCapturing();
        var a = T(x);
        var r = (CpuRopeTable)rope;
        ShapeCheck.Require(headStride > 0 && a.Cols % headStride == 0 && ropeOffset + 2 * r.Pairs <= headStride, "rope layout");
        CheckPositions(r, startPosition, a.Rows);
        var heads = a.Cols / headStride;
        for (var t = 0; t < a.Rows; t++)
        {
            var row = a.Row(t);
            for (var h = 0; h < heads; h++)
            {
                Rotate(row.Slice(h * headStride + ropeOffset, 2 * r.Pairs), r, startPosition + t);
            }
        }

        Store(a.Data);
    }

    /// <inheritdoc />
    /// <remarks>Each row through <see cref="ApplyRope"/> at its position: the specification of the batched kernels.</remarks>
    public void ApplyRopeRows(Tensor x, RopeTable rope, StepRows rows, int headStride, int ropeOffset)
    {
        if (Recorded(() => ApplyRopeRows(x, rope, rows, headStride, ropeOffset)))
        {
            return;
        }

        ShapeCheck.StepRows(rows, x.Rows, null, rope);
        var positions = rows.Positions;
        for (var t = 0; t < x.Rows; t++)
        {
            using var row = View(x, t, 1);
            ApplyRope(row, rope, positions[t], headStride, ropeOffset);
        }
    }

    /// <inheritdoc />
    /// <remarks>Each row through <see cref="AppendLatent"/> into its slot's <see cref="PagedCache"/>.</remarks>
    public void AppendLatentRows(Tensor kv, NormWeight latentNorm, RopeTable rope, LatentPool pool, BlockTable table, StepRows rows)
    {
        if (Recorded(() => AppendLatentRows(kv, latentNorm, rope, pool, table, rows)))
        {
            return;
        }

        ShapeCheck.StepRows(rows, kv.Rows, table, rope);
        var slots = rows.Slots;
        var positions = rows.Positions;
        for (var t = 0; t < kv.Rows; t++)
        {
            using var row = View(kv, t, 1);
            using var cache = PagedCache(pool, table, slots[t]);
            AppendLatent(row, latentNorm, rope, cache, positions[t]);
        }
    }

    /// <inheritdoc />
    public void AppendLatent(Tensor kv, NormWeight latentNorm, RopeTable rope, LatentCache cache, int startPosition)
    {
        NotCapturing();
        var a = T(kv);
        var c = (CpuLatentCache)cache;
        var norm = (CpuNormWeight)latentNorm;
        var r = (CpuRopeTable)rope;
        int latent = c.LatentDim, ropeDim = c.RopeDim;
        ShapeCheck.Require(a.Cols == latent + ropeDim && norm.Width == latent && ropeDim == 2 * r.Pairs, "latent append shapes");
        if (startPosition < 0 || startPosition + a.Rows > c.Capacity)
        {
            throw new ArgumentOutOfRangeException(nameof(startPosition), $"positions {startPosition}..{startPosition + a.Rows - 1} exceed the cache capacity {c.Capacity}");
        }

        CheckPositions(r, startPosition, a.Rows);
        for (var t = 0; t < a.Rows; t++)
        {
            var p = startPosition + t;
            var row = a.Row(t);
            var dstLatent = c.Latent(p, write: true);
            NormRow(row[..latent], norm.Data, norm.Epsilon, dstLatent);
            var dstRope = c.Rope(p, write: true);
            row[latent..].CopyTo(dstRope);
            Rotate(dstRope, r, p);
            Store(dstLatent);
            Store(dstRope);
        }
    }

    private static void Rotate(Span<float> x, CpuRopeTable r, int position)
    {
        // Interleaved pairs (x[2i], x[2i+1]) = x[2i] + j·x[2i+1], times e^{j·angle_i}: the checkpoint's layout.
        var cos = r.Cos.AsSpan(position * r.Pairs, r.Pairs);
        var sin = r.Sin.AsSpan(position * r.Pairs, r.Pairs);
        for (var i = 0; i < r.Pairs; i++)
        {
            float x0 = x[2 * i], x1 = x[2 * i + 1];
            x[2 * i] = x0 * cos[i] - x1 * sin[i];
            x[2 * i + 1] = x0 * sin[i] + x1 * cos[i];
        }
    }

    private static void CheckPositions(CpuRopeTable r, int start, int count)
    {
        if (start < 0 || start + count > r.Positions)
        {
            throw new ArgumentOutOfRangeException(nameof(start), $"positions {start}..{start + count - 1} exceed the rotary table (0..{r.Positions - 1})");
        }
    }

    // ---------------------------------------------------------------- MLA

    /// <inheritdoc />
    public void MlaAttentionNaive(Tensor q, LatentCache cache, LinearWeight kvB, MlaDims dims, int startPosition, float scale, Tensor output)
    {
        NotCapturing();
        var (qt, c, w, o) = CheckAttention(q, cache, kvB, dims, startPosition, output);
        var keys = startPosition + qt.Rows;
        int lora = dims.KvLora, ropeDim = dims.QkRope, kvbRow = dims.KvBHead * dims.Heads;

        // [keys, H·(nope + v)]: per-head k_nope and v decompressed from every cached latent.
        var latents = new float[keys * lora];
        for (var j = 0; j < keys; j++)
        {
            c.Latent(j).CopyTo(latents.AsSpan(j * lora));
        }

        var u = new float[keys * kvbRow];
        Gemm(_emulate && w.Fp8 ? QuantizeRows(latents, keys, lora) : latents, keys, w, u, parallel: true);
        Store(u);

        Parallel.For(0, qt.Rows * dims.Heads, _parallel, job =>
        {
            int t = job / dims.Heads, h = job % dims.Heads;
            var visible = startPosition + t + 1;
            var qh = qt.Row(t).Slice(h * dims.QkHead, dims.QkHead);
            var qNope = qh[..dims.QkNope];
            var qPe = qh[dims.QkNope..];
            var p = new float[visible];
            for (var j = 0; j < visible; j++)
            {
                var k = u.AsSpan(j * kvbRow + h * dims.KvBHead, dims.QkNope);
                p[j] = (TensorPrimitives.Dot(qNope, k) + TensorPrimitives.Dot(qPe, c.Rope(j))) * scale;
            }

            Softmax(p);
            var oh = o.Row(t).Slice(h * dims.V, dims.V);
            oh.Clear();
            for (var j = 0; j < visible; j++)
            {
                TensorPrimitives.MultiplyAdd(u.AsSpan(j * kvbRow + h * dims.KvBHead + dims.QkNope, dims.V), p[j], oh, oh);
            }

            Store(oh);
        });
    }

    /// <inheritdoc />
    public void MlaAttentionAbsorbed(Tensor q, LatentCache cache, LinearWeight kvB, MlaDims dims, int startPosition, float scale, Tensor output)
    {
        NotCapturing();
        var (qt, c, w, o) = CheckAttention(q, cache, kvB, dims, startPosition, output);
        int lora = dims.KvLora, ropeDim = dims.QkRope;

        Parallel.For(0, qt.Rows * dims.Heads, _parallel, job =>
        {
            int t = job / dims.Heads, h = job % dims.Heads;
            var visible = startPosition + t + 1;
            var qh = qt.Row(t).Slice(h * dims.QkHead, dims.QkHead);
            var qPe = qh[dims.QkNope..];

            // q̃[c] = Σ_d q_nope[d]·W_UK[h, d, c]: the query folded into latent space.
            var folded = new float[lora];
            for (var d = 0; d < dims.QkNope; d++)
            {
                TensorPrimitives.MultiplyAdd(w.Row(h * dims.KvBHead + d), qh[d], folded, folded);
            }

            Store(folded);
            var p = new float[visible];
            for (var j = 0; j < visible; j++)
            {
                p[j] = (TensorPrimitives.Dot(folded, c.Latent(j)) + TensorPrimitives.Dot(qPe, c.Rope(j))) * scale;
            }

            Softmax(p);

            // ō = Σ_j P[j]·C[j], then O[d] = W_UV[h, d, :]·ō.
            var latentSum = new float[lora];
            for (var j = 0; j < visible; j++)
            {
                TensorPrimitives.MultiplyAdd(c.Latent(j), p[j], latentSum, latentSum);
            }

            Store(latentSum);
            var oh = o.Row(t).Slice(h * dims.V, dims.V);
            for (var d = 0; d < dims.V; d++)
            {
                oh[d] = TensorPrimitives.Dot(latentSum, w.Row(h * dims.KvBHead + dims.QkNope + d));
            }

            Store(oh);
        });
    }

    /// <inheritdoc />
    /// <remarks>Each row through <see cref="MlaAttentionAbsorbed"/> alone over its slot's <see cref="PagedCache"/>.</remarks>
    public void MlaAttentionRows(Tensor q, LatentPool pool, BlockTable table, StepRows rows, LinearWeight kvB, MlaDims dims, float scale, Tensor output)
    {
        if (Recorded(() => MlaAttentionRows(q, pool, table, rows, kvB, dims, scale, output)))
        {
            return;
        }

        ShapeCheck.AttentionRows(q, pool, kvB, dims, output);
        ShapeCheck.StepRows(rows, q.Rows, table, null);
        var slots = rows.Slots;
        var positions = rows.Positions;
        for (var t = 0; t < q.Rows; t++)
        {
            using var qt = View(q, t, 1);
            using var ot = View(output, t, 1);
            using var cache = PagedCache(pool, table, slots[t]);
            MlaAttentionAbsorbed(qt, cache, kvB, dims, positions[t], scale, ot);
        }
    }

    private (CpuTensor Q, CpuLatentCache Cache, CpuLinearWeight KvB, CpuTensor Output) CheckAttention(
        Tensor q, LatentCache cache, LinearWeight kvB, MlaDims dims, int startPosition, Tensor output)
    {
        ShapeCheck.Attention(q, cache, kvB, dims, startPosition, output);
        CpuTensor qt = T(q), o = T(output);
        var c = (CpuLatentCache)cache;
        c.CheckReadable(startPosition + q.Rows);
        var w = (CpuLinearWeight)kvB;
        return (qt, c, w, o);
    }

    /// <summary>Softmax in fp32 with the maximum subtracted; BF16-rounded probabilities under emulation (the GPU feeds bf16 P to P·V).</summary>
    private void Softmax(Span<float> x)
    {
        var max = TensorPrimitives.Max(x);
        TensorPrimitives.Subtract(x, max, x);
        TensorPrimitives.Exp(x, x);
        var sum = TensorPrimitives.Sum(x);
        TensorPrimitives.Divide(x, sum, x);
        Store(x);
    }

    // ---------------------------------------------------------------- MoE

    /// <inheritdoc />
    public void MoeGate(Tensor x, GateWeight gate, Routing routing)
    {
        if (Recorded(() => MoeGate(x, gate, routing)))
        {
            return;
        }

        var a = T(x);
        var g = (CpuGateWeight)gate;
        var r = (CpuRouting)routing;
        var opt = g.Options;
        ShapeCheck.Require(a.Cols == g.Width, "gate input width");
        ShapeCheck.Routing(r, a.Rows, opt.Experts, opt.TopK);
        Parallel.For(0, a.Rows, _parallel, t => Router.Route(a.Row(t), g.Weight, g.Bias, opt,
            r.Scores.AsSpan(t * opt.Experts, opt.Experts), r.Indices.AsSpan(t * opt.TopK, opt.TopK), r.Weights.AsSpan(t * opt.TopK, opt.TopK)));
    }

    /// <inheritdoc />
    public void MoeExperts(Tensor x, Routing routing, ExpertWeights experts, Tensor y)
    {
        if (Recorded(() => MoeExperts(x, routing, experts, y)))
        {
            return;
        }

        CpuTensor a = T(x), o = T(y);
        var r = (CpuRouting)routing;
        var ew = (CpuExpertWeights)experts;
        int tokens = a.Rows, width = a.Cols, k = r.TopK;
        ShapeCheck.Require(o.Rows == tokens && o.Cols == width && ew.Width == width, "MoE shapes");
        ShapeCheck.Routing(r, tokens, ew.Experts, k);

        // Token slots (t, j) per expert, in token order, so every sum below has a fixed order.
        var slotsOf = new List<int>[ew.Experts];
        for (var s = 0; s < tokens * k; s++)
        {
            var e = r.Indices[s];
            (slotsOf[e] ??= []).Add(s);
        }

        // [T·k, D]: each chosen expert's output per token slot, combined afterwards.
        var slotOut = new float[tokens * k * width];
        for (var e = 0; e < ew.Experts; e++)
        {
            if (slotsOf[e] is not { } slots || ew.Routed[e] is not { } mlp)
            {
                continue;
            }

            var xe = new float[slots.Count * width];
            for (var i = 0; i < slots.Count; i++)
            {
                a.Row(slots[i] / k).CopyTo(xe.AsSpan(i * width));
            }

            var ye = RunMlp(mlp, xe, slots.Count);
            for (var i = 0; i < slots.Count; i++)
            {
                ye.AsSpan(i * width, width).CopyTo(slotOut.AsSpan(slots[i] * width));
            }
        }

        var shared = ew.Shared is null ? null : RunMlp(ew.Shared, a.Memory, tokens);
        for (var t = 0; t < tokens; t++)
        {
            var yt = o.Row(t);
            yt.Clear();
            for (var j = 0; j < k; j++)
            {
                var s = t * k + j;
                TensorPrimitives.MultiplyAdd(slotOut.AsSpan(s * width, width), r.Weights[s], yt, yt);
            }

            if (shared is not null)
            {
                TensorPrimitives.Add(yt, shared.AsSpan(t * width, width), yt);
            }
        }

        Store(o.Data);
    }

    /// <summary>down(silu(gate·x) ⊙ up·x) for <paramref name="rows"/> rows of x.</summary>
    private float[] RunMlp(CpuMlp mlp, ReadOnlyMemory<float> x, int rows)
    {
        var width = mlp.Gate.Out;
        var input = _emulate && mlp.Gate.Fp8 ? QuantizeRows(x.Span, rows, mlp.Gate.In) : x;
        var g = new float[rows * width];
        var u = new float[rows * width];
        Gemm(input, rows, mlp.Gate, g, parallel: true);
        Gemm(input, rows, mlp.Up, u, parallel: true);
        Store(g);
        Store(u);
        var h = new float[rows * width];
        SiluMulSpan(g, u, h);
        Store(h);
        var y = new float[rows * mlp.Down.Out];
        Gemm(_emulate && mlp.Down.Fp8 ? QuantizeRows(h, rows, width) : h, rows, mlp.Down, y, parallel: true);
        Store(y);
        return y;
    }

    // ---------------------------------------------------------------- helpers

    /// <summary>Rounds to BF16 where the GPU would store BF16; nothing in float32 mode.</summary>
    private void Store(Span<float> values)
    {
        if (_emulate)
        {
            BFloat16.Round(values);
        }
    }

    private static CpuTensor T(Tensor t) =>
        t as CpuTensor ?? throw new ArgumentException($"tensor {t} does not belong to the CPU backend", nameof(t));
}
