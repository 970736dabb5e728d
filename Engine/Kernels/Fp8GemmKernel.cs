using System.Collections.Concurrent;
using System.Runtime.InteropServices;
using DeepSeekCuda.Cuda;

namespace DeepSeekCuda.Kernels;

/// <summary>Mirror of <c>Fp8GemmParams</c> in Kernels/fp8_gemm.cuh (shared by fp8_gemm_gemv and fp8_gemm_mma).</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct Fp8GemmParams
{
    public ulong XCodes;
    public ulong XScales;
    public ulong W;
    public ulong WScales;
    public ulong Y;
    public ulong Residual;
    public ulong Partial;
    public long XStride;
    public long XScalesStride;
    public long YStride;
    public long ResidualStride;
    public int M;
    public int OutBf16;
    public int Splits;
    public int SplitK;
}

/// <summary>Mirror of <c>Fp8WgmmaParams</c> in Kernels/fp8_gemm_wgmma.cu (64-byte aligned there, hence the size).</summary>
[StructLayout(LayoutKind.Sequential, Size = 384)]
internal struct Fp8WgmmaParams
{
    public TensorMap XMap;
    public TensorMap WMap;
    public Fp8GemmParams Gemm;
    public int TilesM;
    public int TilesN;
    public int GroupM;
}

/// <summary>Which kernel computes an FP8 GEMM.</summary>
internal enum Fp8GemmPath
{
    /// <summary>By M: <see cref="Gemv"/> up to <see cref="Fp8GemmKernel.GemvMaxM"/> rows, <see cref="Mma"/> above.</summary>
    Auto = 0,

    /// <summary>The memory-bound decode kernel (Kernels/fp8_gemm_gemv.cu), split-K when N is small.</summary>
    Gemv = 1,

    /// <summary>The mma.sync tensor-core kernel (Kernels/fp8_gemm_mma.cu).</summary>
    Mma = 2,

    /// <summary>
    /// The Hopper kernels (Kernels/fp8_gemm_wgmma.cu: wgmma, TMA, warp specialization, persistent grid), the decode
    /// variant up to <see cref="Fp8GemmKernel.WgmmaDecodeRows"/> rows, the prefill one above; sm_90a only, K and the
    /// activation row stride multiples of 16 bytes (<see cref="Fp8GemmKernel.WgmmaRefusal"/>).
    /// </summary>
    Wgmma = 3,
}

/// <summary>
/// FP8 e4m3 GEMM with 128x128 block scales: <c>Y[M,N] = X[M,K]·Wᵀ</c> (+ residual), W e4m3 [N,K] with fp32
/// weight_scale_inv [⌈N/128⌉, ⌈K/128⌉], X pre-quantized by <see cref="ActQuantKernel"/> (e4m3 codes
/// [M,K] and fp32 scales [M,⌈K/128⌉], float32 scale format). FP32 accumulation, promoted at least every
/// 128 of K; BF16 or FP32 output. N and K are compiled in (one specialization per weight shape), M is a
/// run-time argument. Owns the split-K workspace: one launcher per stream.
/// </summary>
internal sealed class Fp8GemmKernel : IDisposable
{
    /// <summary>Kernels/fp8_gemm_gemv.cu.</summary>
    public const string GemvFamily = "fp8_gemm_gemv";

    /// <summary>Kernels/fp8_gemm_mma.cu.</summary>
    public const string MmaFamily = "fp8_gemm_mma";

    /// <summary>CUDA name of the params struct (Kernels/fp8_gemm.cuh).</summary>
    public const string ParamsType = "Fp8GemmParams";

    /// <summary>Scale block edge (both operands).</summary>
    public const int Block = 128;

    /// <summary>Warps (output columns) per gemv block.</summary>
    public const int GemvWarps = 8;

    /// <summary>Largest M the automatic choice sends to the gemv kernel (a first guess: to be tuned on a GPU).</summary>
    public const int GemvMaxM = 64;

    /// <summary>K bytes a gemv warp covers per iteration; split-K boundaries are multiples of it.</summary>
    public const int GemvStep = 512;

    /// <summary>Activation rows per gemv weight pass, by M.</summary>
    public static readonly int[] GemvRowTiles = [1, 4];

    /// <summary>Output tile of the mma kernel.</summary>
    public const int MmaTile = 64;

    /// <summary>Kernels/fp8_gemm_wgmma.cu.</summary>
    public const string WgmmaFamily = "fp8_gemm_wgmma";

    /// <summary>CUDA name of the wgmma kernel's params struct.</summary>
    public const string WgmmaParamsType = "Fp8WgmmaParams";

    /// <summary>Output tile edge (M and N) of the wgmma prefill kernel; weight rows per tile of the decode one.</summary>
    public const int WgmmaTileEdge = 128;

    /// <summary>Pipeline stages of the wgmma prefill kernel (a 128 x 128-byte box of each operand per stage).</summary>
    public const int WgmmaStages = 6;

    /// <summary>Most rows the wgmma decode kernel takes (its wgmma N: weights and activations swapped).</summary>
    public const int WgmmaDecodeRows = 64;

    /// <summary>Pipeline stages of the wgmma decode kernel (128 weight rows and 64 activation rows of 128 bytes per stage).</summary>
    public const int WgmmaDecodeStages = 8;

    /// <summary>Threads per wgmma block: two consumer warpgroups and the producer's.</summary>
    public const int WgmmaThreads = 384;

    /// <summary>M tiles per group of the wgmma kernel's tile order (<see cref="WgmmaTileAt"/>).</summary>
    public const int WgmmaGroupM = 16;

    /// <summary>Dynamic shared memory of a wgmma block: the stages, 1 KiB to align them to 1024 bytes, two mbarriers per stage.</summary>
    public const int WgmmaSharedBytes = 1024 + WgmmaStages * 2 * WgmmaTileEdge * Block + 2 * WgmmaStages * 8;

    /// <summary>Dynamic shared memory of a wgmma decode block, laid out as <see cref="WgmmaSharedBytes"/>.</summary>
    public const int WgmmaDecodeSharedBytes = 1024 + WgmmaDecodeStages * (WgmmaTileEdge + WgmmaDecodeRows) * Block + 2 * WgmmaDecodeStages * 8;

    /// <summary>
    /// The DeepSeek-V3 linear shapes (N, K): q_a, q_b (128 heads x 192), kv_a (512 + 64), kv_b (128 x 256
    /// from 512), o_proj, dense gate/up and down, expert gate/up and down (the shared expert has the same),
    /// plus DeepGEMM's fused q_a+kv_a (2112) and 4096x7168.
    /// </summary>
    public static readonly (int N, int K)[] DeepSeekV3Shapes =
    [
        (1536, 7168), (24576, 1536), (576, 7168), (32768, 512), (7168, 16384),
        (18432, 7168), (7168, 18432), (2048, 7168), (7168, 2048), (2112, 7168), (4096, 7168),
    ];

    /// <summary>Shapes with N and/or K not multiples of 128 (and K not a multiple of 16) the tests use.</summary>
    /// <remarks>(300, 208) and (1000, 1040) have K a multiple of 16 but not of 128: the wgmma kernel runs them with a partial last K box.</remarks>
    public static readonly (int N, int K)[] RaggedShapes = [(300, 200), (129, 1000), (1000, 129), (72, 72), (200, 640), (129, 4100), (300, 208), (1000, 1040)];

    private readonly GemvLauncher _gemv;
    private readonly MmaLauncher _mma;
    private readonly WgmmaLauncher? _wgmma;
    private DeviceBuffer<float>? _workspace;
    private readonly List<DeviceBuffer<float>> _retired = []; // outgrown workspaces a captured graph may still point into

    /// <summary>Creates the launcher on <paramref name="device"/>.</summary>
    /// <param name="device">The device.</param>
    /// <param name="compiler">The compiler.</param>
    /// <param name="preferWgmma">Whether <see cref="Fp8GemmPath.Auto"/> takes the Hopper kernels where they can run (not yet
    /// confirmed on a GPU, so off by default); <see cref="Fp8GemmPath.Wgmma"/> can be asked for either way.</param>
    public Fp8GemmKernel(CudaDevice device, NvrtcCompiler compiler, bool preferWgmma = false)
    {
        Device = device;
        _gemv = new GemvLauncher(device, compiler);
        _mma = new MmaLauncher(device, compiler);
        _wgmma = HasWgmma(device.Target) ? new WgmmaLauncher(device, compiler) : null;
        PreferWgmma = preferWgmma && _wgmma is not null;
    }

    /// <summary>The device.</summary>
    public CudaDevice Device { get; }

    /// <summary>Whether the device runs the wgmma kernels (<see cref="Fp8GemmPath.Wgmma"/>): sm_90a.</summary>
    public bool Wgmma => _wgmma is not null;

    /// <summary>Whether <see cref="Fp8GemmPath.Auto"/> sends every call the wgmma kernels can run to them (<see cref="Choose"/>).</summary>
    public bool PreferWgmma { get; }

    /// <summary>Scale blocks along <paramref name="n"/> elements.</summary>
    public static int BlocksFor(int n) => (n + Block - 1) / Block;

    /// <summary>The gemv specialization for a shape and a row tile.</summary>
    public static KernelInstance GemvInstance(int n, int k, int rowTile) =>
        new($"fp8_gemv_kernel<{n}, {k}, {rowTile}, {GemvWarps}>", ParamsType);

    /// <summary>The split-K reduction for an N.</summary>
    public static KernelInstance ReduceInstance(int n) => new($"fp8_gemv_reduce_kernel<{n}>", ParamsType);

    /// <summary>The mma specialization for a shape.</summary>
    public static KernelInstance MmaInstance(int n, int k) => new($"fp8_gemm_mma_kernel<{n}, {k}>", ParamsType);

    /// <summary>Every gemv-family specialization the launcher requests for <paramref name="shapes"/>.</summary>
    public static IReadOnlyList<KernelInstance> GemvInstances(IEnumerable<(int N, int K)> shapes) =>
        [.. shapes.SelectMany(s => GemvRowTiles.Select(t => GemvInstance(s.N, s.K, t))),
            .. shapes.Select(s => s.N).Distinct().Select(ReduceInstance)];

    /// <summary>Every mma-family specialization the launcher requests for <paramref name="shapes"/>.</summary>
    public static IReadOnlyList<KernelInstance> MmaInstances(IEnumerable<(int N, int K)> shapes) =>
        [.. shapes.Select(s => MmaInstance(s.N, s.K))];

    /// <summary>The gemv specializations of the DeepSeek-V3 and ragged shapes.</summary>
    public static IReadOnlyList<KernelInstance> AllGemvInstances() => GemvInstances(DeepSeekV3Shapes.Concat(RaggedShapes).Distinct());

    /// <summary>The mma specializations of the DeepSeek-V3 and ragged shapes.</summary>
    public static IReadOnlyList<KernelInstance> AllMmaInstances() => MmaInstances(DeepSeekV3Shapes.Concat(RaggedShapes).Distinct());

    /// <summary>The wgmma specialization for a shape.</summary>
    public static KernelInstance WgmmaInstance(int n, int k) =>
        new($"fp8_gemm_wgmma_kernel<{n}, {k}>", WgmmaParamsType) { DynamicSharedBytes = WgmmaSharedBytes };

    /// <summary>The wgmma decode specialization for a shape.</summary>
    public static KernelInstance WgmmaDecodeInstance(int n, int k) =>
        new($"fp8_gemm_wgmma_decode_kernel<{n}, {k}>", WgmmaParamsType) { DynamicSharedBytes = WgmmaDecodeSharedBytes };

    /// <summary>
    /// The wgmma specializations (prefill and decode) of the DeepSeek-V3 and ragged shapes whose K the kernels take
    /// (a multiple of 16).
    /// </summary>
    public static IReadOnlyList<KernelInstance> AllWgmmaInstances() =>
        [.. DeepSeekV3Shapes.Concat(RaggedShapes).Distinct().Where(s => s.K % 16 == 0).SelectMany(s => new[] { WgmmaInstance(s.N, s.K), WgmmaDecodeInstance(s.N, s.K) })];

    /// <summary>Whether <paramref name="target"/> runs the wgmma kernel: sm_90a, the only target with wgmma and TMA.</summary>
    public static bool HasWgmma(KernelTarget target) => target.Arch == "sm_90a";

    /// <summary>Whether the wgmma kernels can run a GEMM (<see cref="WgmmaRefusal"/> says why not); allocates nothing.</summary>
    public static bool WgmmaRuns(KernelTarget target, int k, long xStride, ulong xCodes) => Blocker(target, k, xStride, xCodes) == WgmmaBlocker.None;

    /// <summary>Why the wgmma kernel cannot run a GEMM, or null when it can.</summary>
    /// <param name="target">The compile target of the device.</param>
    /// <param name="k">K.</param>
    /// <param name="xStride">Bytes between activation rows.</param>
    /// <param name="xCodes">The activation codes' address.</param>
    public static string? WgmmaRefusal(KernelTarget target, int k, long xStride, ulong xCodes) => Blocker(target, k, xStride, xCodes) switch
    {
        WgmmaBlocker.Target => $"it needs sm_90a (wgmma and TMA), the device compiles for {target.Arch}",
        WgmmaBlocker.K => $"K = {k} is not a multiple of 16 (TMA row strides are whole 16-byte units)",
        WgmmaBlocker.Stride => $"the activation row stride {xStride} B is not a multiple of 16",
        WgmmaBlocker.Alignment => $"the activation codes at 0x{xCodes:x} are not 16-byte aligned",
        _ => null,
    };

    // The one list of the wgmma kernels' requirements, first unmet one first.
    private static WgmmaBlocker Blocker(KernelTarget target, int k, long xStride, ulong xCodes) =>
        !HasWgmma(target) ? WgmmaBlocker.Target
        : k % 16 != 0 ? WgmmaBlocker.K
        : xStride % 16 != 0 ? WgmmaBlocker.Stride
        : (xCodes & 15) != 0 ? WgmmaBlocker.Alignment
        : WgmmaBlocker.None;

    private enum WgmmaBlocker
    {
        None,
        Target,
        K,
        Stride,
        Alignment,
    }

    /// <summary>
    /// The path <see cref="Fp8GemmPath.Auto"/> takes for <paramref name="m"/> rows: the wgmma kernels when
    /// <paramref name="wgmma"/> (preferred and able to run the call), else gemv up to <see cref="GemvMaxM"/> rows and mma above.
    /// </summary>
    public static Fp8GemmPath Choose(int m, bool wgmma = false) =>
        wgmma ? Fp8GemmPath.Wgmma : m <= GemvMaxM ? Fp8GemmPath.Gemv : Fp8GemmPath.Mma;

    /// <summary>Whether <see cref="Fp8GemmPath.Wgmma"/> runs <paramref name="m"/> rows on the decode variant (else the prefill one).</summary>
    public static bool WgmmaDecodes(int m) => m <= WgmmaDecodeRows;

    /// <summary>
    /// K splits of the wgmma decode kernel and the 128-wide K blocks of each: none while the weight tiles alone give
    /// every SM a block; otherwise as many splits as keep tiles x splits within one block per SM, rounded so every
    /// split holds the same number of blocks but the last.
    /// </summary>
    public static (int Splits, int BlocksPerSplit) WgmmaDecodeSplits(int n, int k, int multiprocessors)
    {
        var tiles = WgmmaTiles(n);
        var kb = BlocksFor(k);
        var wanted = Math.Clamp(multiprocessors / tiles, 1, kb);
        var per = (kb + wanted - 1) / wanted;
        return ((kb + per - 1) / per, per);
    }

    /// <summary>
    /// Tile <paramref name="t"/> of the wgmma kernel's persistent order (fp8_wgmma_tile in Kernels/fp8_gemm_wgmma.cu):
    /// groups of <paramref name="groupM"/> M tiles (fewer in the last group), M fastest inside a group, then N.
    /// </summary>
    public static (int M, int N) WgmmaTileAt(int t, int tilesM, int tilesN, int groupM)
    {
        var perGroup = groupM * tilesN;
        var g = t / perGroup;
        var first = g * groupM;
        var rows = Math.Min(groupM, tilesM - first);
        var r = t - g * perGroup;
        return (first + r % rows, r / rows);
    }

    /// <summary>Blocks of the wgmma prefill kernel's persistent grid: one per SM, no more than there are tiles.</summary>
    public static int WgmmaGrid(int m, int n, int multiprocessors) =>
        (int)Math.Min((long)WgmmaTiles(m) * WgmmaTiles(n), multiprocessors);

    private static int WgmmaTiles(int rows) => (rows + WgmmaTileEdge - 1) / WgmmaTileEdge;

    /// <summary>Smallest gemv row tile holding <paramref name="m"/> rows (the largest when none does).</summary>
    public static int RowTileFor(int m) => GemvRowTiles.FirstOrDefault(t => t >= m, GemvRowTiles[^1]);

    /// <summary>
    /// K splits for the gemv kernel: 1 when the blocks already cover the GPU about twice, otherwise enough
    /// splits (each at least 4 warp steps of K) to reach that, at most 16.
    /// </summary>
    public static int SplitsFor(int m, int n, int k, int multiprocessors)
    {
        var blocks = (long)Math.Max(1, (n + GemvWarps - 1) / GemvWarps) * ((m + RowTileFor(m) - 1) / RowTileFor(m));
        var target = 2L * multiprocessors;
        var maxByK = Math.Max(1, k / (4 * GemvStep));
        if (blocks >= target || maxByK == 1)
        {
            return 1;
        }

        return (int)Math.Min(Math.Min(16, maxByK), (target + blocks - 1) / blocks);
    }

    /// <summary>
    /// y[m, n] = Σ_kb sa[m,kb]·sb[n/128,kb]·Σ e4m3(xq)·e4m3(w) (+ residual[m, n]) for every row of <paramref name="x"/>.
    /// <paramref name="residual"/> has y's shape and type and may be y itself. Codes and weights must be 16-byte aligned
    /// (device allocations are).
    /// </summary>
    public void Launch(CudaStream stream, Fp8Rows x, Fp8Linear w, DeviceRows y, DeviceRows? residual = null, Fp8GemmPath path = Fp8GemmPath.Auto)
    {
        var p = Params(x, w, y, residual);
        int m = p.M, n = w.Out, k = w.In;
        if (m == 0)
        {
            return;
        }

        if (path == Fp8GemmPath.Auto)
        {
            path = Choose(m, PreferWgmma && WgmmaRuns(Device.Target, k, p.XStride, p.XCodes));
        }

        if (path == Fp8GemmPath.Mma)
        {
            _mma.Run(stream, in p, n, k);
            return;
        }

        if (path == Fp8GemmPath.Wgmma)
        {
            if (!WgmmaRuns(Device.Target, k, p.XStride, p.XCodes))
            {
                throw new ArgumentException($"FP8 GEMM M={m} N={n} K={k}: the wgmma kernel cannot run it: {WgmmaRefusal(Device.Target, k, p.XStride, p.XCodes)}", nameof(path));
            }

            if (!WgmmaDecodes(m))
            {
                _wgmma!.Run(stream, in p, n, k);
                return;
            }

            var (wgmmaSplits, perSplit) = WgmmaDecodeSplits(n, k, Device.MultiprocessorCount);
            p.Splits = wgmmaSplits;
            p.SplitK = perSplit * Block;
            p.Partial = Workspace(p.Splits, m, n);
            _wgmma!.RunDecode(stream, in p, n, k);
            if (p.Splits > 1)
            {
                _gemv.Reduce(stream, in p, n);
            }

            return;
        }

        var tile = RowTileFor(m);
        var splits = SplitsFor(m, n, k, Device.MultiprocessorCount);
        if (splits > 1)
        {
            p.SplitK = RoundUp((k + splits - 1) / splits, GemvStep);
            p.Splits = (k + p.SplitK - 1) / p.SplitK;
        }

        p.Partial = Workspace(p.Splits, m, n);
        _gemv.Run(stream, in p, n, k, tile);
    }

    /// <summary>The kernels' arguments for one call without a split, the views checked against each other.</summary>
    public static Fp8GemmParams Params(Fp8Rows x, Fp8Linear w, DeviceRows y, DeviceRows? residual)
    {
        const string what = "FP8 GEMM";
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(w.Out);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(w.In);
        if (x.Cols != w.In)
        {
            throw new ArgumentException($"{what}: x has {x.Cols} channels, the weight [{w.Out}, {w.In}] takes {w.In}", nameof(x));
        }

        if ((w.W & 15) != 0)
        {
            throw new ArgumentException($"{what}: the weight codes at 0x{w.W:x} are not 16-byte aligned", nameof(w));
        }

        ViewCheck.Is(y, x.Rows, w.Out, what, nameof(y));
        if (residual is { } r)
        {
            ViewCheck.Is(r, y.Rows, y.Cols, what, nameof(residual), y.Type);
        }

        return new Fp8GemmParams
        {
            XCodes = x.Codes, XScales = x.Scales, W = w.W, WScales = w.Scales, Y = y.Pointer, Residual = residual?.Pointer ?? 0,
            XStride = x.CodesStride, XScalesStride = x.ScalesStride, YStride = y.Stride, ResidualStride = residual?.Stride ?? y.Stride,
            M = x.Rows, OutBf16 = y.Type == ElementType.BF16 ? 1 : 0, Splits = 1, SplitK = RoundUp(w.In, GemvStep),
        };
    }

    /// <summary>
    /// The split-K workspace for <paramref name="splits"/> fp32 partials of [m, n]; 0 without a split. It grows at least
    /// twofold, and an outgrown one is kept until disposal, not freed: queued work or a captured CUDA graph may still
    /// point into it (what is kept stays below the current size).
    /// </summary>
    private ulong Workspace(int splits, int m, int n)
    {
        if (splits <= 1)
        {
            return 0;
        }

        var need = (long)splits * m * n;
        if (_workspace is null || _workspace.Length < need)
        {
            if (_workspace is not null)
            {
                _retired.Add(_workspace);
            }

            _workspace = DeviceBuffer<float>.Allocate(Device, Math.Max(need, 2 * (_workspace?.Length ?? 0)));
        }

        return _workspace.Pointer;
    }

    private static int RoundUp(int v, int to) => (v + to - 1) / to * to;

    /// <inheritdoc />
    public void Dispose()
    {
        _gemv.Dispose();
        _mma.Dispose();
        _wgmma?.Dispose();
        _workspace?.Dispose();
        _workspace = null;
        foreach (var w in _retired)
        {
            w.Dispose();
        }

        _retired.Clear();
    }

    private sealed class GemvLauncher(CudaDevice device, NvrtcCompiler compiler) : KernelLauncher(device, compiler, GemvFamily)
    {
        public void Run(CudaStream stream, in Fp8GemmParams p, int n, int k, int tile)
        {
            var grid = new Dim3(Blocks(n, GemvWarps), (uint)p.Splits, Blocks(p.M, tile));
            Get(GemvInstance(n, k, tile)).Launch(grid, GemvWarps * 32, 0, stream, in p);
            if (p.Splits > 1)
            {
                Reduce(stream, in p, n);
            }
        }

        /// <summary>Sums the split-K partials in split order and applies the epilogue (the gemv's and the wgmma decode's).</summary>
        public void Reduce(CudaStream stream, in Fp8GemmParams p, int n) =>
            Get(ReduceInstance(n)).Launch(new Dim3(Blocks((long)p.M * n, 256)), 256, 0, stream, in p);
    }

    private sealed class MmaLauncher(CudaDevice device, NvrtcCompiler compiler) : KernelLauncher(device, compiler, MmaFamily)
    {
        public void Run(CudaStream stream, in Fp8GemmParams p, int n, int k) =>
            Get(MmaInstance(n, k)).Launch(new Dim3(Blocks(n, MmaTile), Blocks(p.M, MmaTile)), 128, 0, stream, in p);
    }

    private sealed class WgmmaLauncher(CudaDevice device, NvrtcCompiler compiler) : KernelLauncher(device, compiler, WgmmaFamily)
    {
        // A weight's map depends only on its pointer and shape: encoded on its first GEMM, not on every one.
        private readonly ConcurrentDictionary<(ulong W, int N, int K), TensorMap> _weightMaps = new();

        public void Run(CudaStream stream, in Fp8GemmParams p, int n, int k)
        {
            var wp = Params(in p, n, k, WgmmaTileEdge, WgmmaTiles(p.M));
            var instance = WgmmaInstance(n, k);
            Get(instance).Launch(new Dim3((uint)WgmmaGrid(p.M, n, Device.MultiprocessorCount)), WgmmaThreads, (uint)instance.DynamicSharedBytes, stream, in wp);
        }

        public void RunDecode(CudaStream stream, in Fp8GemmParams p, int n, int k)
        {
            var wp = Params(in p, n, k, WgmmaDecodeRows, 1);
            var units = wp.TilesN * p.Splits;
            var instance = WgmmaDecodeInstance(n, k);
            Get(instance).Launch(new Dim3((uint)Math.Min(units, Device.MultiprocessorCount)), WgmmaThreads, (uint)instance.DynamicSharedBytes, stream, in wp);
        }

        // The activation map holds the activation pointer and M, so it is encoded per call (host only, about a microsecond).
        private Fp8WgmmaParams Params(in Fp8GemmParams p, int n, int k, int activationBox, int tilesM)
        {
            var w = p.W;
            return new Fp8WgmmaParams
            {
                XMap = new TmaTile(p.XCodes, k, p.M, p.XStride, Block, activationBox, TmaSwizzle.Swizzle128B).Encode("FP8 GEMM activation codes", Device.Ordinal),
                WMap = _weightMaps.GetOrAdd((w, n, k), key =>
                    new TmaTile(key.W, key.K, key.N, key.K, Block, WgmmaTileEdge, TmaSwizzle.Swizzle128B).Encode("FP8 GEMM weight codes", Device.Ordinal)),
                Gemm = p,
                TilesM = tilesM,
                TilesN = WgmmaTiles(n),
                GroupM = WgmmaGroupM,
            };
        }
    }
}
