using System.Runtime.InteropServices;
using DeepSeekCuda.Cuda;

namespace DeepSeekCuda.Kernels;

/// <summary>Mirror of <c>Bf16GemmParams</c> in Kernels/bf16_gemm.cu.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct Bf16GemmParams
{
    public ulong X;
    public ulong W;
    public ulong Y;
    public long XStride;
    public long YStride;
    public int M;
    public int N;
    public int K;
    public int Pad0;
}

/// <summary>
/// GEMM with a BF16 weight (Kernels/bf16_gemm.cu): <c>Y[M,N] = X[M,K]·Wᵀ</c>, W bf16 [N, K], X f32 or bf16,
/// FP32 accumulation, f32 or bf16 output. For the unquantized linears (lm_head, BF16 checkpoints); weights are
/// never converted to FP8. One warp per output column and 1 or 4 activation rows; given a
/// <paramref name="tensorCores"/> launcher (not owned), calls of <see cref="TensorCoreMinRows"/> rows or more that it can run
/// go to the tensor-core GEMM instead, which reads the weight once per 64 rows rather than once per 4.
/// </summary>
internal sealed class Bf16GemmKernel(CudaDevice device, NvrtcCompiler compiler, Bf16MmaKernel? tensorCores = null)
    : KernelLauncher(device, compiler, FamilyName)
{
    /// <summary>Fewest rows sent to the tensor cores: below, the warp kernel already reads the weight once (lm_head in decode).</summary>
    public const int TensorCoreMinRows = 5;

    /// <summary>Kernels/bf16_gemm.cu.</summary>
    public const string FamilyName = "bf16_gemm";

    /// <summary>CUDA name of the params struct.</summary>
    public const string ParamsType = "Bf16GemmParams";

    /// <summary>Warps (output columns) per block.</summary>
    public const int Warps = 8;

    /// <summary>Activation rows per weight pass.</summary>
    public static readonly int[] RowTiles = [1, 4];

    /// <summary>The specialization for a row tile and types.</summary>
    public static KernelInstance Instance(int rows, ElementType input, ElementType output) =>
        new($"bf16_gemm_kernel<{rows}, {Warps}, {Flag(input)}, {Flag(output)}>", ParamsType);

    /// <summary>Every specialization the launcher can request.</summary>
    public static IReadOnlyList<KernelInstance> AllInstances() =>
        [.. from r in RowTiles from i in Enum.GetValues<ElementType>() from o in Enum.GetValues<ElementType>() select Instance(r, i, o)];

    /// <summary>Whether a call of <paramref name="p"/>.M rows goes to the tensor cores when a tensor-core launcher is given.</summary>
    public static bool TakesTensorCores(in Bf16MmaProblem p) => p.M >= TensorCoreMinRows && Bf16MmaKernel.Runs(p);

    /// <summary>y[m, n] = Σ_k x[m, k]·w[n, k] for every row of <paramref name="x"/>; <paramref name="w"/> bf16 [N, K], dense.</summary>
    public void Launch(CudaStream stream, DeviceRows x, DeviceRows w, DeviceRows y)
    {
        var p = Params(x, w, y);
        if (p.M == 0)
        {
            return;
        }

        // TakesTensorCores' rule, with the operands checked once (by TryLaunch).
        if (tensorCores is not null && p.M >= TensorCoreMinRows
            && tensorCores.TryLaunch(stream, new Bf16MmaProblem(x.Pointer, x.Type, x.Stride, w.Pointer, false, p.K, y.Pointer, y.Type, y.Stride, p.M, p.N, p.K)))
        {
            return;
        }

        var tile = p.M == 1 ? 1 : 4;
        var rowBlocks = Blocks(p.M, tile);
        // grid.y holds at most 65535 row blocks: larger M runs in slices.
        for (long first = 0; first < rowBlocks; first += 65535)
        {
            var blocks = (uint)Math.Min(65535, rowBlocks - first);
            var row = first * tile;
            var slice = p;
            slice.X = x.Row(row);
            slice.Y = y.Row(row);
            slice.M = (int)Math.Min(p.M - row, (long)blocks * tile);
            Get(Instance(tile, x.Type, y.Type)).Launch(new Dim3(Blocks(p.N, Warps), blocks), Warps * 32, 0, stream, in slice);
        }
    }

    /// <summary>The kernel's arguments for one call, the views checked against each other.</summary>
    public static Bf16GemmParams Params(DeviceRows x, DeviceRows w, DeviceRows y)
    {
        const string what = "BF16 GEMM";
        ViewCheck.Bf16Weight(w, w.Rows, x.Cols, what, nameof(w));
        ViewCheck.Is(y, x.Rows, w.Rows, what, nameof(y));
        return new Bf16GemmParams { X = x.Pointer, W = w.Pointer, Y = y.Pointer, XStride = x.Stride, YStride = y.Stride, M = x.Rows, N = w.Rows, K = x.Cols };
    }
}
