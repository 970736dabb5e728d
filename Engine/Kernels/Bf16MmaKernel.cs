using System.Runtime.InteropServices;
using DeepSeekCuda.Cuda;

namespace DeepSeekCuda.Kernels;

/// <summary>Mirror of <c>Bf16MmaParams</c> in Kernels/bf16_gemm_mma.cu.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct Bf16MmaParams
{
    public ulong A;
    public ulong B;
    public ulong Y;
    public long Lda;
    public long Ldb;
    public long Ldy;
    public long ABatch;
    public long BBatch;
    public long YBatch;
    public long YSplit;
    public int M;
    public int N;
    public int K;
    public int Batch;
    public int Splits;
    public int KChunk;
}

/// <summary>
/// One (batched, optionally split-K) GEMM for <see cref="Bf16MmaKernel"/>: for every batch b,
/// <c>Y[b][M, N] = A[b][M, K] · B[b]</c> with B bf16 stored [N, K] (a linear's weight rows) or, when
/// <see cref="BKMajor"/>, [K, N]. Strides are in elements. With <see cref="Splits"/> &gt; 1 each K split writes its
/// partial sums to its own output, <see cref="YSplit"/> elements after the previous one, for a reducer to add in
/// split order.
/// </summary>
internal readonly record struct Bf16MmaProblem(
    ulong A, ElementType AType, long Lda,
    ulong B, bool BKMajor, long Ldb,
    ulong Y, ElementType YType, long Ldy,
    int M, int N, int K)
{
    /// <summary>Independent GEMMs (grid.z), each <see cref="ABatch"/>, <see cref="BBatch"/>, <see cref="YBatch"/> elements after the previous.</summary>
    public int Batch { get; init; } = 1;

    /// <summary>Elements between the batches' activations.</summary>
    public long ABatch { get; init; }

    /// <summary>Elements between the batches' weights.</summary>
    public long BBatch { get; init; }

    /// <summary>Elements between the batches' outputs.</summary>
    public long YBatch { get; init; }

    /// <summary>K splits (each writes partial sums); 1 writes the result.</summary>
    public int Splits { get; init; } = 1;

    /// <summary>Elements between the K splits' outputs.</summary>
    public long YSplit { get; init; }
}

/// <summary>
/// BF16 GEMM on mma.sync tensor cores (Kernels/bf16_gemm_mma.cu, sm_80+): 64 x 128 x 32 tiles, a 3-stage cp.async
/// pipeline, fp32 accumulation; an f32 activation enters as bf16 hi + lo terms (kept to 2⁻¹⁷ of itself, products exact),
/// so results differ from an fp32 dot product only by summation order. Serves lm_head above
/// <see cref="Bf16GemmKernel.TensorCoreMinRows"/> rows, the router logits (<see cref="MoeGateKernel"/>), and MLA's fold
/// and unfold as one GEMM per head (<see cref="MlaDecodeKernel"/>), when <c>CudaBackendOptions.TensorCoreBf16Gemm</c>
/// asks for it.
/// </summary>
internal sealed class Bf16MmaKernel(CudaDevice device, NvrtcCompiler compiler) : KernelLauncher(device, compiler, FamilyName)
{
    /// <summary>Kernels/bf16_gemm_mma.cu.</summary>
    public const string FamilyName = "bf16_gemm_mma";

    /// <summary>CUDA name of the params struct.</summary>
    public const string ParamsType = "Bf16MmaParams";

    /// <summary>Rows of a block tile (kBf16MmaBM).</summary>
    public const int TileM = 64;

    /// <summary>Columns of a block tile (kBf16MmaBN).</summary>
    public const int TileN = 128;

    /// <summary>K per pipeline stage (kBf16MmaBK); a split's K is a multiple of it.</summary>
    public const int TileK = 32;

    /// <summary>Pipeline stages (kBf16MmaStages).</summary>
    public const int Stages = 3;

    /// <summary>Threads per block (kBf16MmaThreads).</summary>
    public const int Threads = 128;

    /// <summary>Fewest K a split should own: below this a split's pipeline fill and partial write dominate.</summary>
    public const int MinSplitK = 256;

    /// <summary>Most blocks along grid.y (M tiles) and grid.z (batch × splits).</summary>
    public const int MaxGridYZ = 65535;

    /// <summary>Dynamic shared memory of a block; mirrors Bf16MmaGeometry::SMEM (a compile test checks them against each other).</summary>
    public static int SharedBytes(ElementType aType, bool bKMajor)
    {
        var aBytes = Stages * TileM * (TileK + 8) * 2 * (aType == ElementType.BF16 ? 1 : 2);
        var bBytes = bKMajor ? Stages * TileK * (TileN + 8) * 2 : Stages * TileN * (TileK + 8) * 2;
        return aBytes + bBytes;
    }

    /// <summary>The specialization for operand types and B's layout.</summary>
    public static KernelInstance Instance(ElementType aType, bool bKMajor, ElementType yType) =>
        new($"bf16_gemm_mma_kernel<{Flag(aType)}, {(bKMajor ? 1 : 0)}, {Flag(yType)}>", ParamsType) { DynamicSharedBytes = SharedBytes(aType, bKMajor) };

    /// <summary>Every specialization the launcher can request.</summary>
    public static IReadOnlyList<KernelInstance> AllInstances() =>
        [.. from a in Enum.GetValues<ElementType>() from b in new[] { false, true } from y in Enum.GetValues<ElementType>() select Instance(a, b, y)];

    /// <summary>
    /// K splits that fill <paramref name="multiprocessors"/> SMs when the output tiles alone do not: K in equal chunks
    /// (whole stages, at least <see cref="MinSplitK"/>) sized for about one block per SM; no split is empty. A pure
    /// function of its arguments (a captured graph sees the same choice at every replay).
    /// </summary>
    public static int SplitsFor(int m, int n, int k, int batch, int multiprocessors)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(n);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(k);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(batch);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(multiprocessors);
        var tiles = (long)Math.Max(1, (m + TileM - 1) / TileM) * ((n + TileN - 1) / TileN) * batch;
        if (tiles >= multiprocessors || k <= MinSplitK)
        {
            return 1;
        }

        var target = Math.Min((multiprocessors + tiles - 1) / tiles, MaxGridYZ / batch);
        var chunk = Math.Max(MinSplitK, (int)((k + target - 1) / target + TileK - 1) / TileK * TileK);
        return (k + chunk - 1) / chunk;
    }

    /// <summary>K per split for <paramref name="splits"/> splits: a multiple of <see cref="TileK"/>.</summary>
    public static int ChunkFor(int k, int splits) => (k + splits * TileK - 1) / (splits * TileK) * TileK;

    /// <summary>Whether the kernel can run <paramref name="p"/> (<see cref="Refusal"/> says why not); allocates nothing.</summary>
    public static bool Runs(in Bf16MmaProblem p) => Blocker(p) == Unmet.None;

    /// <summary>Why the kernel cannot run <paramref name="p"/>, or null when it can.</summary>
    public static string? Refusal(in Bf16MmaProblem p) => Blocker(p) switch
    {
        Unmet.Shape => $"the shape M={p.M} N={p.N} K={p.K} batch {p.Batch} splits {p.Splits} is empty or negative",
        Unmet.K => $"K = {p.K} is not a multiple of 8 (the kernel moves 8 bf16 of K at a time)",
        Unmet.KMajorN => $"N = {p.N} is not a multiple of 8 (a [K, N] weight is moved 8 columns at a time)",
        Unmet.Weight => $"the weight at 0x{p.B:x} (row stride {p.Ldb}, batch stride {p.BBatch}) is not 16-byte aligned in every row",
        Unmet.Activation => $"the {p.AType} activations at 0x{p.A:x} (row stride {p.Lda}, batch stride {p.ABatch}) are not 16-byte aligned in every row",
        Unmet.Grid => $"{(p.M + TileM - 1) / TileM} row tiles or {(long)p.Batch * p.Splits} batches × splits exceed the grid's {MaxGridYZ}",
        Unmet.Splits => $"{p.Splits} splits of K = {p.K} leave a split empty (at most {(p.K + TileK - 1) / TileK}, one stage each)",
        _ => null,
    };

    // The one list of the kernel's requirements, first unmet one first.
    private static Unmet Blocker(in Bf16MmaProblem p)
    {
        if (p.M < 0 || p.N <= 0 || p.K <= 0 || p.Batch <= 0 || p.Splits <= 0)
        {
            return Unmet.Shape;
        }

        if (p.K % 8 != 0)
        {
            return Unmet.K;
        }

        if (p.BKMajor && p.N % 8 != 0)
        {
            return Unmet.KMajorN;
        }

        if ((p.B & 15) != 0 || p.Ldb % 8 != 0 || p.BBatch % 8 != 0)
        {
            return Unmet.Weight;
        }

        var elems = p.AType == ElementType.BF16 ? 8 : 4; // 16 bytes
        if ((p.A & 15) != 0 || p.Lda % elems != 0 || p.ABatch % elems != 0)
        {
            return Unmet.Activation;
        }

        if ((p.M + TileM - 1) / TileM > MaxGridYZ || (long)p.Batch * p.Splits > MaxGridYZ)
        {
            return Unmet.Grid;
        }

        // Every split must own some K (the reducer adds all of them).
        var chunk = ChunkFor(p.K, p.Splits);
        return (long)chunk * (p.Splits - 1) >= p.K ? Unmet.Splits : Unmet.None;
    }

    private enum Unmet
    {
        None,
        Shape,
        K,
        KMajorN,
        Weight,
        Activation,
        Grid,
        Splits,
    }

    /// <summary>Runs <paramref name="p"/> on <paramref name="stream"/>; throws, naming the unmet requirement, when it cannot.</summary>
    public void Launch(CudaStream stream, in Bf16MmaProblem p)
    {
        if (!TryLaunch(stream, p))
        {
            throw new ArgumentException($"BF16 tensor-core GEMM M={p.M} N={p.N} K={p.K}: {Refusal(p)}", nameof(p));
        }
    }

    /// <summary>Runs <paramref name="p"/> when the kernel can (<see cref="Runs"/>) and says whether it did; launches nothing otherwise.</summary>
    public bool TryLaunch(CudaStream stream, in Bf16MmaProblem p)
    {
        if (!Runs(p))
        {
            return false;
        }

        if (p.M == 0)
        {
            return true;
        }

        var args = new Bf16MmaParams
        {
            A = p.A, B = p.B, Y = p.Y, Lda = p.Lda, Ldb = p.Ldb, Ldy = p.Ldy, ABatch = p.ABatch, BBatch = p.BBatch, YBatch = p.YBatch,
            YSplit = p.YSplit, M = p.M, N = p.N, K = p.K, Batch = p.Batch, Splits = p.Splits, KChunk = ChunkFor(p.K, p.Splits),
        };
        var instance = Instance(p.AType, p.BKMajor, p.YType);
        Get(instance).Launch(new Dim3(Blocks(p.N, TileN), Blocks(p.M, TileM), (uint)(p.Batch * p.Splits)), Threads, (uint)instance.DynamicSharedBytes, stream, in args);
        return true;
    }
}
