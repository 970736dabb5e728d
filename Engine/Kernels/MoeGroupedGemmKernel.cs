using System.Collections.Concurrent;
using System.Runtime.InteropServices;
using DeepSeekCuda.Cuda;

namespace DeepSeekCuda.Kernels;

/// <summary>Mirror of <c>MoeGroupedGemmParams</c> in Kernels/moe_grouped_gemm.cu.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct MoeGroupedGemmParams
{
    public ulong XCodes;
    public ulong XScales;
    public ulong W;
    public ulong WScales;
    public ulong Y;
    public ulong Counts;
    public ulong Offsets;
    public ulong Gather;
    public long XStride;
    public long XScalesStride;
    public long YStride;
    public int Experts;
    public int Capacity;
    public int GatherDiv;
    public int Pad0;
}

/// <summary>Mirror of <c>MoeWgmmaParams</c> in Kernels/moe_grouped_gemm_wgmma.cu (64-byte aligned there, hence the size).</summary>
[StructLayout(LayoutKind.Sequential, Size = 256)]
internal struct MoeWgmmaParams
{
    public TensorMap WMap;
    public MoeGroupedGemmParams G;
}

/// <summary>Mirror of <c>MoeMaskedLayoutParams</c> in Kernels/moe_grouped_gemm.cu.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct MoeMaskedLayoutParams
{
    public ulong TopkIdx;
    public ulong Counts;
    public ulong Offsets;
    public ulong Perm;
    public ulong Inv;
    public ulong Gather;
    public ulong Minv;
    public int Experts;
    public int Capacity;
    public int Slots;
    public int Pad0;
}

/// <summary>
/// Where the grouped expert GEMM finds each expert's rows (device int32 arrays from the dispatch): counts [E], the contiguous
/// layout's padded offsets [E + 1], and the gather map (grouped row → slot, activation row = slot / <paramref name="GatherDiv"/>;
/// 0: the activation row is the grouped row).
/// </summary>
/// <param name="Layout">Contiguous (prefill) or masked (decode).</param>
/// <param name="Counts">Slots per expert.</param>
/// <param name="Offsets">The dispatch's padded offsets (the contiguous layout finds each tile's expert in them).</param>
/// <param name="Gather">Grouped row → slot, or 0.</param>
/// <param name="GatherDiv">Slots per activation row (k when gathering token slots).</param>
/// <param name="Rows">Contiguous: the bound of rows launched (<see cref="MoeGroupedGemmKernel.RowsBound"/>).</param>
/// <param name="Capacity">Masked: rows per expert.</param>
internal readonly record struct GroupedRows(MoeGroupedLayout Layout, ulong Counts, ulong Offsets, ulong Gather, int GatherDiv, int Rows, int Capacity);

/// <summary>How the grouped expert GEMM finds each expert's rows.</summary>
internal enum MoeGroupedLayout
{
    /// <summary>
    /// Prefill: expert e owns rows [offsets[e], offsets[e] + counts[e]) of one array, offsets padded to
    /// multiples of <see cref="MoeGroupedGemmKernel.Tile"/> (the dispatch's tile), so no tile straddles two experts.
    /// </summary>
    Contiguous = 0,

    /// <summary>Decode: expert e owns the fixed slot [e·capacity, (e + 1)·capacity), live up to min(counts[e], capacity).</summary>
    Masked = 1,
}

/// <summary>
/// One layer's routed experts as stacked FP8 e4m3 weights with fp32 128x128 block scales (device pointers):
/// <c>W13</c> [E, 2·I, H] = each expert's [gate; up], <c>W13Scales</c> [E, 2·⌈I/128⌉, ⌈H/128⌉] (gate's scale rows,
/// then up's), <c>W2</c> [E, H, I] the down projections, <c>W2Scales</c> [E, ⌈H/128⌉, ⌈I/128⌉].
/// </summary>
/// <param name="W13">Gate and up codes.</param>
/// <param name="W13Scales">Their weight_scale_inv blocks.</param>
/// <param name="W2">Down codes.</param>
/// <param name="W2Scales">Their weight_scale_inv blocks.</param>
/// <param name="Experts">E, the slots of the stack.</param>
/// <param name="Hidden">H, the model width.</param>
/// <param name="Inter">I, each expert's intermediate width.</param>
/// <remarks>
/// Under expert parallelism a device stacks only the experts it holds: <see cref="ExpertMap"/> then points to int32
/// [<see cref="MapExperts"/>], each of the model's routed experts → its slot here or −1 (<see cref="MoeDispatch.ExpertMap"/>),
/// and the routing's global ids go through it (<see cref="MoeDispatchKernel"/>). Without a map the slots are the model's experts.
/// </remarks>
internal sealed record MoeExpertStack(ulong W13, ulong W13Scales, ulong W2, ulong W2Scales, int Experts, int Hidden, int Inter)
{
    /// <summary>Global expert → slot (device int32 [<see cref="MapExperts"/>]), or 0 when the slots are the model's experts.</summary>
    public ulong ExpertMap { get; init; }

    /// <summary>The model's routed experts, the length of <see cref="ExpertMap"/> (0 without a map).</summary>
    public int MapExperts { get; init; }

    /// <summary>The routed experts of the model the routing chooses among: <see cref="MapExperts"/> with a map, else <see cref="Experts"/>.</summary>
    public int RoutedExperts => ExpertMap != 0 ? MapExperts : Experts;

    /// <summary>Bytes of one expert's codes (gate, up and down).</summary>
    public long ExpertBytes => 3L * Hidden * Inter;

    /// <summary>Float32 scale blocks of one expert's W13.</summary>
    public long W13ScaleCount => 2L * Fp8GemmKernel.BlocksFor(Inter) * Fp8GemmKernel.BlocksFor(Hidden);

    /// <summary>Float32 scale blocks of one expert's W2.</summary>
    public long W2ScaleCount => (long)Fp8GemmKernel.BlocksFor(Hidden) * Fp8GemmKernel.BlocksFor(Inter);
}

/// <summary>
/// Grouped FP8 expert GEMM (Kernels/moe_grouped_gemm.cu): every expert's rows times its own block-scaled
/// weights in one launch, either gate/up fused with SiLU(gate)·up in the epilogue (BF16 h [rows, I]) or the
/// down projection (BF16 [rows, H]). Activations are pre-quantized by <see cref="ActQuantKernel"/>; the
/// gate/up pass can read them through the dispatch's permutation (row → token slot) without a permuted copy.
/// N and K are compiled in; token counts and routing are run-time (device) data.
/// </summary>
internal sealed class MoeGroupedGemmKernel : KernelLauncher
{
    /// <summary>Kernels/moe_grouped_gemm.cu.</summary>
    public const string FamilyName = "moe_grouped_gemm";

    /// <summary>CUDA name of the GEMM params struct.</summary>
    public const string ParamsType = "MoeGroupedGemmParams";

    /// <summary>CUDA name of the masked-layout params struct.</summary>
    public const string MaskedLayoutParamsType = "MoeMaskedLayoutParams";

    /// <summary>Rows per tile: the contiguous layout's offsets must be padded to a multiple of it (dispatch tile).</summary>
    public const int Tile = 64;

    /// <summary>Output columns per block of the gate/up pass (gate and up rows share the 64-row weight tile).</summary>
    public const int SwigluColumns = 32;

    /// <summary>Output columns per block of the down pass.</summary>
    public const int DownColumns = 64;

    /// <summary>Expert (hidden, inter) shapes of the known models: V3, tiny-a, the Tiny preset.</summary>
    public static IReadOnlyList<(int Hidden, int Inter)> KnownShapes => [(7168, 2048), (256, 128), (192, 96)];

    /// <summary>Shapes with widths that are not multiples of 128 (or 16) the tests use.</summary>
    public static IReadOnlyList<(int Hidden, int Inter)> RaggedShapes => [(200, 72), (136, 100)];

    /// <summary>The gate/up (SwiGLU) specialization for a shape and layout.</summary>
    public static KernelInstance GateUpInstance(int hidden, int inter, MoeGroupedLayout layout) =>
        new($"moe_grouped_gemm_kernel<{2 * inter}, {hidden}, 1, {(int)layout}>", ParamsType);

    /// <summary>The down specialization for a shape and layout.</summary>
    public static KernelInstance DownInstance(int hidden, int inter, MoeGroupedLayout layout) =>
        new($"moe_grouped_gemm_kernel<{hidden}, {inter}, 0, {(int)layout}>", ParamsType);

    /// <summary>Kernels/moe_grouped_gemm_wgmma.cu: the Hopper kernels (sm_90a), same semantics.</summary>
    public const string WgmmaFamily = "moe_grouped_gemm_wgmma";

    /// <summary>CUDA name of the Hopper kernels' params struct.</summary>
    public const string WgmmaParamsType = "MoeWgmmaParams";

    /// <summary>Output columns per block of the Hopper gate/up pass (256 weight rows: gate and up of 128 columns).</summary>
    public const int WgmmaSwigluColumns = 128;

    /// <summary>Output columns per block of the Hopper down pass.</summary>
    public const int WgmmaDownColumns = 256;

    /// <summary>Pipeline stages of the Hopper kernels (64 activation rows and 256 weight rows of 128 bytes each).</summary>
    public const int WgmmaStages = 5;

    /// <summary>Threads per Hopper block: two consumer warpgroups and the producer's.</summary>
    public const int WgmmaThreads = 384;

    /// <summary>Dynamic shared memory of a Hopper block: the stages, 1 KiB to align them, two mbarriers per stage.</summary>
    public const int WgmmaSharedBytes = 1024 + WgmmaStages * (Tile + 4 * 64) * Fp8GemmKernel.Block + 2 * WgmmaStages * 8;

    private readonly WgmmaLauncher? _wgmma;

    /// <summary>Creates the launcher on <paramref name="device"/>.</summary>
    /// <param name="device">The device.</param>
    /// <param name="compiler">The compiler.</param>
    /// <param name="preferWgmma">Run the passes on the Hopper kernels where they can (sm_90a, K and the activation row
    /// stride multiples of 16); not yet confirmed on a GPU, so off by default.</param>
    public MoeGroupedGemmKernel(CudaDevice device, NvrtcCompiler compiler, bool preferWgmma = false)
        : base(device, compiler, FamilyName)
    {
        _wgmma = preferWgmma && Fp8GemmKernel.HasWgmma(device.Target) ? new WgmmaLauncher(device, compiler) : null;
    }

    /// <summary>Whether the passes run on the Hopper kernels where they can.</summary>
    public bool PreferWgmma => _wgmma is not null;

    /// <summary>The Hopper gate/up specialization for a shape and layout.</summary>
    public static KernelInstance WgmmaGateUpInstance(int hidden, int inter, MoeGroupedLayout layout) =>
        new($"moe_grouped_gemm_wgmma_kernel<{2 * inter}, {hidden}, 1, {(int)layout}>", WgmmaParamsType) { DynamicSharedBytes = WgmmaSharedBytes };

    /// <summary>The Hopper down specialization for a shape and layout.</summary>
    public static KernelInstance WgmmaDownInstance(int hidden, int inter, MoeGroupedLayout layout) =>
        new($"moe_grouped_gemm_wgmma_kernel<{hidden}, {inter}, 0, {(int)layout}>", WgmmaParamsType) { DynamicSharedBytes = WgmmaSharedBytes };

    /// <summary>Every Hopper specialization of the known and ragged shapes whose widths it takes (multiples of 16).</summary>
    public static IReadOnlyList<KernelInstance> AllWgmmaInstances() =>
        [.. from s in KnownShapes.Concat(RaggedShapes)
            where s.Hidden % 16 == 0 && s.Inter % 16 == 0
            from l in Enum.GetValues<MoeGroupedLayout>()
            from i in new[] { WgmmaGateUpInstance(s.Hidden, s.Inter, l), WgmmaDownInstance(s.Hidden, s.Inter, l) }
            select i];

    /// <summary>
    /// Whether a pass runs on the Hopper kernel: preferred, and able to (<see cref="Fp8GemmKernel.WgmmaRefusal"/>: sm_90a,
    /// <paramref name="k"/> and the activation row stride multiples of 16, the codes 16-byte aligned); else on mma.sync.
    /// </summary>
    public static bool UsesWgmma(bool prefer, KernelTarget target, int k, long xStride, ulong xCodes) =>
        prefer && Fp8GemmKernel.WgmmaRuns(target, k, xStride, xCodes);

    /// <summary>The masked-layout builder.</summary>
    public static KernelInstance MaskedLayoutInstance { get; } = new("moe_masked_layout_kernel<256>", MaskedLayoutParamsType);

    /// <summary>Every specialization for <paramref name="shapes"/>.</summary>
    public static IReadOnlyList<KernelInstance> Instances(IEnumerable<(int Hidden, int Inter)> shapes) =>
        [.. from s in shapes from l in Enum.GetValues<MoeGroupedLayout>() from i in new[] { GateUpInstance(s.Hidden, s.Inter, l), DownInstance(s.Hidden, s.Inter, l) } select i,
            MaskedLayoutInstance];

    /// <summary>Every specialization of the known and ragged shapes.</summary>
    public static IReadOnlyList<KernelInstance> AllInstances() => Instances(KnownShapes.Concat(RaggedShapes));

    /// <summary>
    /// Upper bound of the contiguous layout's rows in use for <paramref name="tokens"/> tokens: every slot, plus
    /// at most <c>tile − 1</c> padding rows for each expert that can receive a slot (at most min(E, tokens·k)).
    /// The grid and the down pass's activation quantization cover this many rows, not the t_max-sized perm.
    /// </summary>
    public static int RowsBound(int tokens, int k, int experts, int tile = Tile)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(tokens);
        var slots = checked(tokens * k);
        return checked(slots + (Math.Min(experts, slots) * (tile - 1)));
    }

    /// <summary>
    /// The expert a contiguous tile starting at <paramref name="row0"/> belongs to, as the kernel finds it (the last e
    /// with offsets[e] ≤ row0), or −1 when the tile lies past offsets[E].
    /// </summary>
    public static int ExpertOfTile(ReadOnlySpan<int> offsets, int row0)
    {
        var experts = offsets.Length - 1;
        if (row0 >= offsets[experts])
        {
            return -1;
        }

        int lo = 0, hi = experts - 1;
        while (lo < hi)
        {
            var mid = (lo + hi + 1) >> 1;
            if (offsets[mid] <= row0)
            {
                lo = mid;
            }
            else
            {
                hi = mid - 1;
            }
        }

        return lo;
    }

    /// <summary>
    /// The contiguous tile schedule the kernel runs for a dispatch layout: per tile of <see cref="Tile"/> rows its expert and
    /// live rows (tiles with none are skipped). Throws when an offset is not a multiple of the tile (a tile would straddle
    /// two experts) or a count does not fit its expert's rows.
    /// </summary>
    public static IReadOnlyList<(int Row0, int Expert, int Live)> Schedule(ReadOnlySpan<int> counts, ReadOnlySpan<int> offsets, int rows)
    {
        ValidateContiguous(counts, offsets);
        var tiles = new List<(int, int, int)>();
        for (var row0 = 0; row0 < rows; row0 += Tile)
        {
            var e = ExpertOfTile(offsets, row0);
            if (e < 0)
            {
                continue;
            }

            var live = Math.Min(Tile, offsets[e] + counts[e] - row0);
            if (live > 0)
            {
                tiles.Add((row0, e, live));
            }
        }

        return tiles;
    }

    /// <summary>Throws unless offsets are ascending multiples of <see cref="Tile"/> that hold each expert's count.</summary>
    public static void ValidateContiguous(ReadOnlySpan<int> counts, ReadOnlySpan<int> offsets)
    {
        if (offsets.Length != counts.Length + 1 || offsets[0] != 0)
        {
            throw new ArgumentException($"offsets must be [E + 1] = {counts.Length + 1} values starting at 0", nameof(offsets));
        }

        for (var e = 0; e < counts.Length; e++)
        {
            if (offsets[e] % Tile != 0 || offsets[e + 1] < offsets[e] + counts[e] || counts[e] < 0)
            {
                throw new ArgumentException(
                    $"expert {e}: rows [{offsets[e]}, {offsets[e + 1]}) for {counts[e]} slots; the contiguous layout needs offsets padded to multiples of the tile ({Tile}): dispatch with tile {Tile}",
                    nameof(offsets));
            }
        }
    }

    /// <summary>
    /// h = SiLU(x·gateᵀ)·(x·upᵀ) per expert, bf16 at the grouped rows of <paramref name="rows"/> (its gather: activation row =
    /// slot / GatherDiv, or the grouped row itself without one).
    /// </summary>
    public void GateUp(CudaStream stream, MoeExpertStack w, GroupedRows rows, Fp8Rows x, DeviceRows h) => Run(stream, swiglu: true, w, rows, x, h);

    /// <summary>y = hq·downᵀ per expert, bf16 at the grouped rows, from h's FP8 codes (activation row = grouped row: no gather).</summary>
    public void Down(CudaStream stream, MoeExpertStack w, GroupedRows rows, Fp8Rows h, DeviceRows y) =>
        Run(stream, swiglu: false, w, rows with { Gather = 0, GatherDiv = 1 }, h, y);

    /// <summary>
    /// Masked layout from a contiguous dispatch of <paramref name="topkIdx"/> (the ids it dispatched; read only at routed
    /// slots): gather
    /// [E·capacity] (masked row → slot, −1 empty) and minv [TMax·K] (slot → masked row, −1 when not routed). Needs capacity ≥
    /// the live token count, as <see cref="MoeLayer"/> passes it: a token routes to an expert at most once, so no expert then
    /// drops a slot.
    /// </summary>
    public void MaskedLayout(CudaStream stream, DeviceInts topkIdx, MoeDispatchBuffers dispatch, int capacity, DeviceInts gather, DeviceInts minv)
    {
        var p = MaskedLayoutParams(topkIdx, dispatch, capacity, gather, minv);
        Get(MaskedLayoutInstance).Launch(new Dim3(Blocks(Math.Max((long)p.Experts * capacity, p.Slots), 256)), 256, 0, stream, in p);
    }

    /// <summary>The masked-layout kernel's arguments, the arrays checked against the dispatch's sizes.</summary>
    public static MoeMaskedLayoutParams MaskedLayoutParams(DeviceInts topkIdx, MoeDispatchBuffers dispatch, int capacity, DeviceInts gather, DeviceInts minv)
    {
        const string what = "masked MoE layout";
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(capacity);
        var slots = checked(dispatch.TMax * dispatch.K);
        if (minv.Length < slots || gather.Length < (long)dispatch.Experts * capacity)
        {
            throw new ArgumentException($"{what}: {minv.Length} inverse slots and {gather.Length} gather rows for {slots} slots and {dispatch.Experts} experts of {capacity}",
                nameof(gather));
        }

        return new MoeMaskedLayoutParams
        {
            TopkIdx = topkIdx.Pointer, Counts = dispatch.Counts, Offsets = dispatch.Offsets, Perm = dispatch.Perm, Inv = dispatch.Inv, Gather = gather.Pointer,
            Minv = minv.Pointer, Experts = dispatch.Experts, Capacity = capacity, Slots = slots,
        };
    }

    /// <summary>
    /// The kernels' arguments for the gate/up (<paramref name="swiglu"/>) or down pass of <paramref name="w"/>, the activations
    /// and output checked against the stack's widths and the grouped rows.
    /// </summary>
    public static MoeGroupedGemmParams Params(bool swiglu, MoeExpertStack w, GroupedRows rows, Fp8Rows x, DeviceRows y)
    {
        var what = swiglu ? "grouped gate/up" : "grouped down";
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(w.Experts);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(rows.GatherDiv);
        if ((w.W13 & 15) != 0 || (w.W2 & 15) != 0)
        {
            throw new ArgumentException($"{what}: FP8 weights must be 16-byte aligned", nameof(w));
        }

        int k = swiglu ? w.Hidden : w.Inter, n = swiglu ? w.Inter : w.Hidden;
        if (x.Cols != k)
        {
            throw new ArgumentException($"{what}: x has {x.Cols} channels, the experts take {k}", nameof(x));
        }

        ViewCheck.Is(y, y.Rows, n, what, nameof(y), ElementType.BF16);
        var needed = rows.Layout == MoeGroupedLayout.Masked ? (long)w.Experts * rows.Capacity : rows.Rows;
        if (y.Rows < needed)
        {
            throw new ArgumentException($"{what}: y holds {y.Rows} rows, the grouped rows need {needed}", nameof(y));
        }

        if (rows.Layout == MoeGroupedLayout.Contiguous && rows.Offsets == 0)
        {
            throw new ArgumentException($"{what}: the contiguous layout needs the dispatch offsets", nameof(rows));
        }

        return new MoeGroupedGemmParams
        {
            XCodes = x.Codes, XScales = x.Scales, W = swiglu ? w.W13 : w.W2, WScales = swiglu ? w.W13Scales : w.W2Scales, Y = y.Pointer, Counts = rows.Counts,
            Offsets = rows.Offsets, Gather = rows.Gather, XStride = x.CodesStride, XScalesStride = x.ScalesStride, YStride = y.Stride, Experts = w.Experts,
            Capacity = rows.Layout == MoeGroupedLayout.Masked ? rows.Capacity : 0, GatherDiv = rows.GatherDiv,
        };
    }

    private void Run(CudaStream stream, bool swiglu, MoeExpertStack w, GroupedRows rows, Fp8Rows x, DeviceRows y)
    {
        var p = Params(swiglu, w, rows, x, y);
        uint rowTiles;
        uint z = 1;
        if (rows.Layout == MoeGroupedLayout.Masked)
        {
            ArgumentOutOfRangeException.ThrowIfNegativeOrZero(rows.Capacity, nameof(rows));
            rowTiles = Blocks(rows.Capacity, Tile);
            z = (uint)w.Experts;
            if (z > 65535)
            {
                throw new ArgumentOutOfRangeException(nameof(w), w.Experts, "the masked layout puts experts on grid.z: at most 65535");
            }
        }
        else
        {
            if (rows.Rows <= 0)
            {
                return;
            }

            rowTiles = Blocks(rows.Rows, Tile);
        }

        if (rowTiles > 65535)
        {
            throw new ArgumentOutOfRangeException(nameof(rows), rows.Rows, $"grid.y holds at most 65535 row tiles of {Tile} rows");
        }

        int hidden = w.Hidden, inter = w.Inter, n = swiglu ? 2 * inter : hidden, k = swiglu ? hidden : inter;
        if (UsesWgmma(PreferWgmma, Device.Target, k, p.XStride, p.XCodes))
        {
            var columns = Blocks(swiglu ? inter : hidden, swiglu ? WgmmaSwigluColumns : WgmmaDownColumns);
            _wgmma!.Run(stream, swiglu ? WgmmaGateUpInstance(hidden, inter, rows.Layout) : WgmmaDownInstance(hidden, inter, rows.Layout),
                new Dim3(columns, rowTiles, z), in p, n, k);
            return;
        }

        var instance = swiglu ? GateUpInstance(hidden, inter, rows.Layout) : DownInstance(hidden, inter, rows.Layout);
        var columnBlocks = swiglu ? Blocks(inter, SwigluColumns) : Blocks(hidden, DownColumns);
        Get(instance).Launch(new Dim3(columnBlocks, rowTiles, z), 128, 0, stream, in p);
    }

    /// <inheritdoc />
    public override void Dispose()
    {
        _wgmma?.Dispose();
        base.Dispose();
    }

    private sealed class WgmmaLauncher(CudaDevice device, NvrtcCompiler compiler) : KernelLauncher(device, compiler, WgmmaFamily)
    {
        private readonly ConcurrentDictionary<(ulong W, int N, int K, int E), TensorMap> _maps = new();

        public void Run(CudaStream stream, KernelInstance instance, Dim3 grid, in MoeGroupedGemmParams p, int n, int k)
        {
            // The weights [E, N, K] as a 3-D map, so a box past an expert's N rows reads zeros instead of the next expert;
            // encoded on the stack's first pass, not on every one.
            var map = _maps.GetOrAdd((p.W, n, k, p.Experts), key =>
                new TmaTile(key.W, key.K, key.N, key.K, Fp8GemmKernel.Block, 64, TmaSwizzle.Swizzle128B) { Planes = key.E, PlaneStride = (long)key.N * key.K }
                    .Encode("grouped expert GEMM weight codes", Device.Ordinal));
            var wp = new MoeWgmmaParams { WMap = map, G = p };
            Get(instance).Launch(grid, WgmmaThreads, (uint)instance.DynamicSharedBytes, stream, in wp);
        }
    }
}
