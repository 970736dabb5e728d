using System.Runtime.InteropServices;
using DeepSeekCuda.Cuda;

namespace DeepSeekCuda.Kernels;

/// <summary>Mirror of <c>MlaDecodeParams</c> in Kernels/mla_decode.cu (decode and combine).</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct MlaDecodeParams
{
    public ulong Q;
    public ulong Cache;
    public ulong BlockTable;
    public ulong Requests;
    public ulong Lengths;
    public ulong Out;
    public ulong Lse;
    public ulong OPartial;
    public ulong LsePartial;
    public float Scale;
    public int Batch;
    public int Heads;
    public int QTokens;
    public int MaxBlocks;
    public int Splits;
}

/// <summary>Mirror of <c>MlaProjParams</c> in Kernels/mla_decode.cu (fold and unfold through kv_b).</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct MlaProjParams
{
    public ulong X;
    public ulong W;
    public ulong Y;
    public int Tokens;
    public int Heads;
    public int Nope;
    public int V;
}

/// <summary>The heads of the absorbed MLA projections: <paramref name="Heads"/> heads of <paramref name="Nope"/> (qk_nope_head_dim) query-key and <paramref name="V"/> (v_head_dim) value widths.</summary>
/// <param name="Heads">Attention heads (on this device).</param>
/// <param name="Nope">qk_nope_head_dim.</param>
/// <param name="V">v_head_dim.</param>
internal readonly record struct MlaHeadDims(int Heads, int Nope, int V);

/// <summary>The decode kernel's tiling: <see cref="Rows"/> query rows per block in <see cref="ColumnWarps"/> column groups.</summary>
internal readonly record struct MlaDecodeTiling(int Rows, int ColumnWarps)
{
    /// <summary>Threads per block: 32 per warp, Rows/16 × ColumnWarps warps.</summary>
    public int Threads => Rows / 16 * ColumnWarps * 32;
}

/// <summary>
/// MLA decode in the absorbed form over the paged latent cache (<see cref="PagedLatentCache"/>), as
/// <c>CpuBackend.MlaAttentionAbsorbed</c>: <see cref="Fold"/> (q_nope through W_UK), <see cref="Decode"/>
/// (tensor-core attention with Flash-Decoding KV splits, then an LSE combine), <see cref="Unfold"/> (through
/// W_UV to the V heads; o_proj stays with the FP8 GEMM). kv_b is used dequantized to BF16 ([heads·(nope + v),
/// latent], the checkpoint's row order), as the official absorb path does. Given a <paramref name="tensorCores"/> launcher
/// (not owned), fold and unfold run as one tensor-core GEMM per head where it can run the operands (W_UK read as a
/// [nope, latent] operand, W_UV as [v, latent]); the CUDA-core kernels otherwise.
/// </summary>
internal sealed class MlaDecodeKernel(CudaDevice device, NvrtcCompiler compiler, Bf16MmaKernel? tensorCores = null)
    : KernelLauncher(device, compiler, FamilyName)
{
    /// <summary>Kernels/mla_decode.cu.</summary>
    public const string FamilyName = "mla_decode";

    /// <summary>CUDA name of the decode/combine params struct.</summary>
    public const string ParamsType = "MlaDecodeParams";

    /// <summary>CUDA name of the fold/unfold params struct.</summary>
    public const string ProjParamsType = "MlaProjParams";

    /// <summary>Tokens per pipeline stage of the decode kernel (kMlaTile).</summary>
    public const int Tile = 32;

    /// <summary>Most KV splits per request (kMlaMaxSplits).</summary>
    public const int MaxSplits = 64;

    /// <summary>Fewest cached tokens a split should own: below this the combine and per-block setup dominate.</summary>
    public const int MinTokensPerSplit = 256;

    /// <summary>Wave efficiency (busy block slots / all slots over the waves) at which <see cref="SplitCount"/> stops adding splits.</summary>
    public const double GoodWaveEfficiency = 0.9;

    /// <summary>Largest qk_nope_head_dim the fold takes (kMlaMaxNope).</summary>
    public const int MaxNope = 256;

    private const int ProjTokens = 8;
    private const int ProjBlock = 128;
    private const int CombineBlock = 128;

    /// <summary>
    /// 64 query rows per block when a request has more than 32 (s_q·heads), so each cache stage feeds up to 64
    /// rows of tensor-core work; otherwise 16. Column groups split the DV output columns over warps (4 when the
    /// block has one row group, to keep 4 warps; 2 with four row groups: 8 warps, 128 accumulators per thread).
    /// A 64-row block needs more shared memory than some devices give one block (V3: 152 KiB; Ada and consumer
    /// parts allow 99 KiB), so it is taken only where it fits in <paramref name="maxSharedPerBlock"/>.
    /// </summary>
    public static MlaDecodeTiling TilingFor(LatentShape shape, int heads, int qTokens, int maxSharedPerBlock)
    {
        var t = Tiling(shape, heads * qTokens > 32 ? 64 : 16);
        return t.Rows == 64 && SharedBytes(shape, t) > maxSharedPerBlock ? Tiling(shape, 16) : t;
    }

    private static MlaDecodeTiling Tiling(LatentShape shape, int rows)
    {
        var n8 = shape.Latent / 8;
        var wc = rows == 16 && n8 % 4 == 0 ? 4 : n8 % 2 == 0 ? 2 : 1;
        return new MlaDecodeTiling(rows, wc);
    }

    /// <summary>Dynamic shared memory of a decode block; mirrors MlaDecodeGeometry::SMEM.</summary>
    public static int SharedBytes(LatentShape shape, MlaDecodeTiling t)
    {
        int dp = shape.RowWidth + 8, pp = Tile + 8;
        return 2 * (t.Rows * dp + 2 * Tile * dp + t.Rows * pp) + 4 * t.Rows * t.ColumnWarps;
    }

    /// <summary>
    /// KV splits per request. <paramref name="blocksPerSplit"/> = batch × row groups blocks exist without splitting;
    /// <paramref name="slots"/> = SMs × resident blocks per SM. Picks the fewest splits (at most <see cref="MaxSplits"/>,
    /// and at most one per <see cref="MinTokensPerSplit"/> tokens of <paramref name="contextHint"/>) whose waves are at
    /// least <see cref="GoodWaveEfficiency"/> busy, else the count that fills waves best (each split re-reads the
    /// block's queries and adds a partial write and a combine read).
    /// A pure function of its arguments, so a captured graph sees the same choice at every replay.
    /// </summary>
    public static int SplitCount(int blocksPerSplit, int slots, int contextHint)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(blocksPerSplit);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(slots);
        var cap = Math.Clamp(contextHint / MinTokensPerSplit, 1, MaxSplits);
        int best = 1;
        var bestEfficiency = 0.0;
        for (var s = 1; s <= cap; s++)
        {
            var blocks = (long)blocksPerSplit * s;
            var waves = (blocks + slots - 1) / slots;
            var efficiency = (double)blocks / (waves * slots);
            if (efficiency >= GoodWaveEfficiency)
            {
                return s;
            }

            if (efficiency > bestEfficiency + 1e-9)
            {
                best = s;
                bestEfficiency = efficiency;
            }
        }

        return best;
    }

    /// <summary>Row groups per request: ceil(s_q·heads / rows per block).</summary>
    public static int RowGroups(int heads, int qTokens, MlaDecodeTiling t) => (heads * qTokens + t.Rows - 1) / t.Rows;

    /// <summary>The split count this device would use for a batch (<see cref="SplitCount"/> with its SMs and occupancy).</summary>
    public int DefaultSplits(LatentShape shape, int batch, int heads, int qTokens, int contextHint)
    {
        var t = TilingFor(shape, heads, qTokens, Device.SharedMemoryPerBlockOptin);
        var perSm = Math.Max(1, Math.Min(Device.SharedMemoryPerMultiprocessor / (SharedBytes(shape, t) + 1024), 2048 / t.Threads));
        return SplitCount(batch * RowGroups(heads, qTokens, t), Device.MultiprocessorCount * perSm, contextHint);
    }

    /// <summary>Workspace bytes for <paramref name="splits"/> splits: fp32 partial outputs then their LSEs (0 for one split).</summary>
    public static long WorkspaceBytes(LatentShape shape, int batch, int heads, int qTokens, int splits) =>
        splits <= 1 ? 0 : (long)splits * batch * heads * qTokens * (shape.Latent + 1) * 4;

    /// <summary>The decode specialization for a shape, tiling and query type.</summary>
    public static KernelInstance DecodeInstance(LatentShape s, MlaDecodeTiling t, ElementType qType) =>
        new($"mla_decode_kernel<{s.Latent}, {s.Rope}, {t.Rows}, {t.ColumnWarps}, {Flag(qType)}>", ParamsType) { DynamicSharedBytes = SharedBytes(s, t) };

    /// <summary>The combine specialization.</summary>
    public static KernelInstance CombineInstance(LatentShape s) => new($"mla_combine_kernel<{s.Latent}>", ParamsType);

    /// <summary>The fold specialization for a q type (q_abs is BF16, the decode kernel's tensor-core input).</summary>
    public static KernelInstance FoldInstance(LatentShape s, ElementType qType) =>
        new($"mla_fold_kernel<{s.Latent}, {s.Rope}, {Flag(qType)}>", ProjParamsType);

    /// <summary>The q_pe copy that completes a tensor-core fold, for a q type.</summary>
    public static KernelInstance FoldRopeInstance(LatentShape s, ElementType qType) =>
        new($"mla_fold_rope_kernel<{s.Latent}, {s.Rope}, {Flag(qType)}>", ProjParamsType);

    /// <summary>The unfold specialization for an output type.</summary>
    public static KernelInstance UnfoldInstance(LatentShape s, ElementType outType) =>
        new($"mla_unfold_kernel<{s.Latent}, {Flag(outType)}>", ProjParamsType);

    /// <summary>
    /// Every specialization of the known shapes a device allowing <paramref name="maxSharedPerBlock"/> bytes of
    /// shared memory per block can launch (both tilings where they fit, both q types).
    /// </summary>
    public static IReadOnlyList<KernelInstance> AllInstances(int maxSharedPerBlock)
    {
        var list = new List<KernelInstance>();
        foreach (var s in LatentShape.Known)
        {
            foreach (var t in new[] { TilingFor(s, 16, 1, maxSharedPerBlock), TilingFor(s, 128, 1, maxSharedPerBlock) }.Distinct())
            {
                foreach (var q in Enum.GetValues<ElementType>())
                {
                    list.Add(DecodeInstance(s, t, q));
                }
            }

            list.Add(CombineInstance(s));
            foreach (var e in Enum.GetValues<ElementType>())
            {
                list.Add(FoldInstance(s, e));
                list.Add(FoldRopeInstance(s, e));
                list.Add(UnfoldInstance(s, e));
            }
        }

        return list;
    }

    /// <summary>
    /// q_abs [tokens, heads·(latent + rope)] (bf16) from q [tokens, heads·(nope + rope)] (the rope part already rotated): the
    /// latent part is q_nope · W_UK[h], the rope part is copied. kvB: bf16 [heads·(nope + v), latent]. All three dense.
    /// </summary>
    public void Fold(CudaStream stream, LatentShape shape, MlaHeadDims dims, DeviceRows q, DeviceRows kvB, DeviceRows qAbs)
    {
        var p = FoldParams(shape, dims, q, kvB, qAbs);
        if (p.Tokens == 0)
        {
            return;
        }

        if (tensorCores?.TryLaunch(stream, FoldProblem(shape, dims, q, kvB, qAbs)) == true)
        {
            var copies = (long)p.Tokens * dims.Heads * shape.Rope;
            Get(FoldRopeInstance(shape, q.Type)).Launch(new Dim3((uint)Math.Min(Blocks(copies, ProjBlock), 4096)), ProjBlock, 0, stream, in p);
            return;
        }

        Get(FoldInstance(shape, q.Type)).Launch(new Dim3((uint)dims.Heads, Blocks(p.Tokens, ProjTokens)), ProjBlock, 0, stream, in p);
    }

    /// <summary>The fold kernels' arguments, the views checked against the shapes.</summary>
    public static MlaProjParams FoldParams(LatentShape shape, MlaHeadDims dims, DeviceRows q, DeviceRows kvB, DeviceRows qAbs)
    {
        const string what = "MLA fold";
        CheckProj(shape, dims, kvB, what);
        ViewCheck.Is(q, q.Rows, dims.Heads * (dims.Nope + shape.Rope), what, nameof(q), dense: true);
        ViewCheck.Is(qAbs, q.Rows, dims.Heads * shape.RowWidth, what, nameof(qAbs), ElementType.BF16, dense: true);
        return new MlaProjParams { X = q.Pointer, W = kvB.Pointer, Y = qAbs.Pointer, Tokens = q.Rows, Heads = dims.Heads, Nope = dims.Nope, V = dims.V };
    }

    /// <summary>
    /// The fold's latent half as one GEMM per head (batch = heads): q_nope [tokens, nope] (row stride heads·(nope + rope))
    /// times W_UK[h] [nope, latent] (kv_b's rows h·(nope + v) ..), into q_abs's first latent columns.
    /// </summary>
    public static Bf16MmaProblem FoldProblem(LatentShape shape, MlaHeadDims dims, DeviceRows q, DeviceRows kvB, DeviceRows qAbs)
    {
        var qw = dims.Nope + shape.Rope;
        return new Bf16MmaProblem(q.Pointer, q.Type, (long)dims.Heads * qw, kvB.Pointer, true, shape.Latent, qAbs.Pointer, ElementType.BF16,
            (long)dims.Heads * shape.RowWidth, q.Rows, shape.Latent, dims.Nope)
        { Batch = dims.Heads, ABatch = qw, BBatch = (long)(dims.Nope + dims.V) * shape.Latent, YBatch = shape.RowWidth };
    }

    /// <summary>
    /// The unfold as one GEMM per head: latent [tokens, latent] (row stride heads·latent, fp32) times W_UV[h]ᵀ, W_UV[h]
    /// [v, latent] being kv_b's rows h·(nope + v) + nope ..; into output [tokens, heads·v].
    /// </summary>
    public static Bf16MmaProblem UnfoldProblem(LatentShape shape, MlaHeadDims dims, DeviceRows latent, DeviceRows kvB, DeviceRows output) =>
        new(latent.Pointer, ElementType.F32, (long)dims.Heads * shape.Latent, kvB.Pointer + (ulong)((long)dims.Nope * shape.Latent * 2), false, shape.Latent,
            output.Pointer, output.Type, (long)dims.Heads * dims.V, latent.Rows, dims.V, shape.Latent)
        { Batch = dims.Heads, ABatch = shape.Latent, BBatch = (long)(dims.Nope + dims.V) * shape.Latent, YBatch = dims.V };

    /// <summary>output [tokens, heads·v] = W_UV[h] · latent [tokens, heads·latent] (fp32 input, F32 or BF16 output), all dense.</summary>
    public void Unfold(CudaStream stream, LatentShape shape, MlaHeadDims dims, DeviceRows latent, DeviceRows kvB, DeviceRows output)
    {
        var p = UnfoldParams(shape, dims, latent, kvB, output);
        if (p.Tokens == 0)
        {
            return;
        }

        if (tensorCores?.TryLaunch(stream, UnfoldProblem(shape, dims, latent, kvB, output)) == true)
        {
            return;
        }

        Get(UnfoldInstance(shape, output.Type)).Launch(new Dim3((uint)dims.Heads, Blocks(p.Tokens, ProjTokens)), ProjBlock, 0, stream, in p);
    }

    /// <summary>The unfold kernel's arguments, the views checked against the shapes.</summary>
    public static MlaProjParams UnfoldParams(LatentShape shape, MlaHeadDims dims, DeviceRows latent, DeviceRows kvB, DeviceRows output)
    {
        const string what = "MLA unfold";
        CheckProj(shape, dims, kvB, what);
        ViewCheck.Is(latent, latent.Rows, dims.Heads * shape.Latent, what, nameof(latent), ElementType.F32, dense: true);
        ViewCheck.Is(output, latent.Rows, dims.Heads * dims.V, what, nameof(output), dense: true);
        return new MlaProjParams { X = latent.Pointer, W = kvB.Pointer, Y = output.Pointer, Tokens = latent.Rows, Heads = dims.Heads, Nope = dims.Nope, V = dims.V };
    }

    /// <summary>
    /// Attention of the requests' absorbed queries qAbs [batch·qTokens, heads·(latent + rope)] (one or two queries per request,
    /// 16-byte aligned) over the paged cache: outLatent f32 [batch·qTokens, heads·latent] and lse f32 [batch·qTokens, heads]
    /// (natural log of Σ exp(scale·score)), batch being the number of device <paramref name="lengths"/>. Lengths must be ≥
    /// qTokens (this step's tokens are already appended); query i of request r sits at position len_r − qTokens + i. Request
    /// r reads row <c>requests[r]</c> of the block table, or row r without <paramref name="requests"/>. With
    /// <paramref name="splits"/> &gt; 1, <paramref name="workspace"/> must hold <see cref="WorkspaceBytes"/>.
    /// </summary>
    public void Decode(CudaStream stream, LatentShape shape, int heads, DeviceRows qAbs, LatentPages pages, DeviceInts lengths, DeviceInts? requests,
        float scale, DeviceRows outLatent, DeviceRows lse, int splits = 1, ulong workspace = 0)
    {
        var p = DecodeParams(shape, heads, qAbs, pages, lengths, requests, scale, outLatent, lse, splits, workspace);
        if (p.Batch == 0)
        {
            return;
        }

        var t = TilingFor(shape, heads, p.QTokens, Device.SharedMemoryPerBlockOptin);
        var instance = DecodeInstance(shape, t, qAbs.Type);
        Get(instance).Launch(new Dim3((uint)RowGroups(heads, p.QTokens, t), (uint)splits, (uint)p.Batch), t.Threads, (uint)instance.DynamicSharedBytes, stream, in p);
        if (splits > 1)
        {
            Get(CombineInstance(shape)).Launch(new Dim3((uint)(heads * p.QTokens), (uint)p.Batch), CombineBlock, 0, stream, in p);
        }
    }

    /// <summary>The decode and combine kernels' arguments, the views checked against the shape and each other.</summary>
    public static MlaDecodeParams DecodeParams(LatentShape shape, int heads, DeviceRows qAbs, LatentPages pages, DeviceInts lengths, DeviceInts? requests,
        float scale, DeviceRows outLatent, DeviceRows lse, int splits, ulong workspace)
    {
        const string what = "MLA decode";
        shape.Validate();
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(heads);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(pages.MaxBlocks);
        ArgumentOutOfRangeException.ThrowIfLessThan(splits, 1);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(splits, MaxSplits);
        int batch = lengths.Length, qTokens = batch == 0 ? 1 : qAbs.Rows / batch;
        if (qAbs.Rows != batch * qTokens || qTokens is < 1 or > 2)
        {
            throw new ArgumentException($"{what}: {qAbs.Rows} queries for {batch} requests (one or two each)", nameof(qAbs));
        }

        ViewCheck.Is(qAbs, qAbs.Rows, heads * shape.RowWidth, what, nameof(qAbs), dense: true);
        if (qAbs.Pointer % 16 != 0 || pages.Cache % 16 != 0)
        {
            throw new ArgumentException($"{what}: q_abs and the cache must be 16-byte aligned (the kernel moves rows in 16-byte pieces)", nameof(qAbs));
        }

        if (requests is { } r && r.Length != batch)
        {
            throw new ArgumentException($"{what}: {r.Length} block-table rows for {batch} requests", nameof(requests));
        }

        ViewCheck.Is(outLatent, qAbs.Rows, heads * shape.Latent, what, nameof(outLatent), ElementType.F32, dense: true);
        ViewCheck.Is(lse, qAbs.Rows, heads, what, nameof(lse), ElementType.F32, dense: true);
        if (splits > 1 && workspace == 0)
        {
            throw new ArgumentException($"{what}: {splits} splits need a workspace of {WorkspaceBytes(shape, batch, heads, qTokens, splits)} bytes", nameof(workspace));
        }

        var partials = (long)splits * qAbs.Rows * heads * shape.Latent * 4;
        return new MlaDecodeParams
        {
            Q = qAbs.Pointer, Cache = pages.Cache, BlockTable = pages.BlockTable, Requests = requests?.Pointer ?? 0, Lengths = lengths.Pointer,
            Out = outLatent.Pointer, Lse = lse.Pointer, OPartial = splits > 1 ? workspace : 0, LsePartial = splits > 1 ? workspace + (ulong)partials : 0,
            Scale = scale, Batch = batch, Heads = heads, QTokens = qTokens, MaxBlocks = pages.MaxBlocks, Splits = splits,
        };
    }

    private static void CheckProj(LatentShape shape, MlaHeadDims dims, DeviceRows kvB, string what)
    {
        shape.Validate();
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(dims.Heads);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(dims.Nope);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(dims.Nope, MaxNope);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(dims.V);
        ViewCheck.Bf16Weight(kvB, dims.Heads * (dims.Nope + dims.V), shape.Latent, what, nameof(kvB));
    }
}
