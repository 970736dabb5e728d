using System.Runtime.InteropServices;
using DeepSeekCuda.Cuda;

namespace DeepSeekCuda.Kernels;

/// <summary>Mirror of <c>RmsNormParams</c> in Kernels/rmsnorm.cu.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct RmsNormParams
{
    public ulong X;
    public ulong Residual;
    public ulong Weight;
    public ulong Y;
    public long XStride;
    public long ResidualStride;
    public long YStride;
    public int Rows;
    public int Dim;
    public float Eps;
    public int Pad0;
}

/// <summary>
/// RMSNorm, fp32 math, bf16 weight: <c>y = x / sqrt(mean(x²) + eps) · w</c>; the fused form adds the
/// update into the residual stream first (<c>h += x; y = norm(h)</c>), h of x's storage type (a bf16 h holds the rounded
/// sum, and the norm reads it). One block per row. Rounded (f32 in and out only: f32 storage holding bf16 values, as
/// <c>CpuBackend</c>'s GpuEmulation): h rounded to bf16 after the add, y to bf16 values.
/// </summary>
internal sealed class RmsNormKernel(CudaDevice device, NvrtcCompiler compiler) : KernelLauncher(device, compiler, FamilyName)
{
    /// <summary>Kernels/rmsnorm.cu.</summary>
    public const string FamilyName = "rmsnorm";

    /// <summary>CUDA name of the params struct.</summary>
    public const string ParamsType = "RmsNormParams";

    private static readonly int[] BlockSizes = [128, 256, 512];

    /// <summary>The block size for a row width: enough threads that each handles at most ~16 elements.</summary>
    public static int BlockFor(int dim) => dim <= 512 ? 128 : dim <= 4096 ? 256 : 512;

    /// <summary>The specialization for a shape and types; <paramref name="round"/> exists for f32 in and out only.</summary>
    public static KernelInstance Instance(int block, bool fused, ElementType input, ElementType output, bool round = false) =>
        new($"rmsnorm_kernel<{block}, {(fused ? 1 : 0)}, {Flag(input)}, {Flag(output)}, {(round ? 1 : 0)}>", ParamsType);

    /// <summary>Every specialization the launcher can request.</summary>
    public static IReadOnlyList<KernelInstance> AllInstances() =>
    [
        .. from b in BlockSizes from f in new[] { false, true } from i in Enum.GetValues<ElementType>() from o in Enum.GetValues<ElementType>()
            select Instance(b, f, i, o),
        .. from b in BlockSizes from f in new[] { false, true } select Instance(b, f, ElementType.F32, ElementType.F32, round: true),
    ];

    /// <summary>y[r] = RMSNorm(x[r]) · w for <paramref name="rows"/> rows of <paramref name="dim"/>.</summary>
    public void Launch(CudaStream stream, ulong x, ElementType xType, ulong weight, ulong y, ElementType yType, int rows, int dim, float eps,
        long xStride = -1, long yStride = -1, bool round = false) =>
        Run(stream, fused: false, x, xType, 0, weight, y, yType, rows, dim, eps, xStride, 0, yStride, round);

    /// <summary>
    /// h[r] += x[r] (h of <paramref name="xType"/>, written back; bf16 or rounded: bf16(h[r] + x[r])), then y[r] = RMSNorm(h[r]) · w.
    /// </summary>
    public void LaunchFused(CudaStream stream, ulong residual, ulong x, ElementType xType, ulong weight, ulong y, ElementType yType, int rows, int dim,
        float eps, long xStride = -1, long residualStride = -1, long yStride = -1, bool round = false) =>
        Run(stream, fused: true, x, xType, residual, weight, y, yType, rows, dim, eps, xStride, residualStride, yStride, round);

    private void Run(CudaStream stream, bool fused, ulong x, ElementType xType, ulong residual, ulong weight, ulong y, ElementType yType,
        int rows, int dim, float eps, long xStride, long residualStride, long yStride, bool round)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(dim);
        ArgumentOutOfRangeException.ThrowIfNegative(rows);
        RequireF32IfRounded(round, xType, yType, "RMSNorm");

        if (rows == 0)
        {
            return;
        }

        var p = new RmsNormParams
        {
            X = x, Residual = residual, Weight = weight, Y = y,
            XStride = xStride < 0 ? dim : xStride, ResidualStride = residualStride < 0 ? dim : residualStride, YStride = yStride < 0 ? dim : yStride,
            Rows = rows, Dim = dim, Eps = eps,
        };
        var block = BlockFor(dim);
        Get(Instance(block, fused, xType, yType, round)).Launch(new Dim3((uint)rows), block, 0, stream, in p);
    }
}
