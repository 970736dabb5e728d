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

    /// <summary>y[r] = RMSNorm(x[r]) · w for every row of <paramref name="x"/>; <paramref name="weight"/> bf16 [1, dim].</summary>
    public void Launch(CudaStream stream, DeviceRows x, DeviceRows weight, DeviceRows y, float eps, bool round = false) =>
        Run(stream, fused: false, Params(null, x, weight, y, eps, round), x.Type, y.Type, round);

    /// <summary>
    /// h[r] += x[r] (h of x's type, written back; bf16 or rounded: bf16(h[r] + x[r])), then y[r] = RMSNorm(h[r]) · w.
    /// </summary>
    public void LaunchFused(CudaStream stream, DeviceRows residual, DeviceRows x, DeviceRows weight, DeviceRows y, float eps, bool round = false) =>
        Run(stream, fused: true, Params(residual, x, weight, y, eps, round), x.Type, y.Type, round);

    /// <summary>The kernel's arguments for one call, the views checked against each other (a null residual: the plain norm).</summary>
    public static RmsNormParams Params(DeviceRows? residual, DeviceRows x, DeviceRows weight, DeviceRows y, float eps, bool round)
    {
        const string what = "RMSNorm";
        RequireF32IfRounded(round, x.Type, y.Type, what);
        ViewCheck.Bf16Weight(weight, 1, x.Cols, what, nameof(weight));
        ViewCheck.Is(y, x.Rows, x.Cols, what, nameof(y));
        if (residual is { } h)
        {
            ViewCheck.Is(h, x.Rows, x.Cols, what, nameof(residual), x.Type);
        }

        return new RmsNormParams
        {
            X = x.Pointer, Residual = residual?.Pointer ?? 0, Weight = weight.Pointer, Y = y.Pointer,
            XStride = x.Stride, ResidualStride = residual?.Stride ?? 0, YStride = y.Stride,
            Rows = x.Rows, Dim = x.Cols, Eps = eps,
        };
    }

    private void Run(CudaStream stream, bool fused, in RmsNormParams p, ElementType xType, ElementType yType, bool round)
    {
        if (p.Rows == 0)
        {
            return;
        }

        var block = BlockFor(p.Dim);
        Get(Instance(block, fused, xType, yType, round)).Launch(new Dim3((uint)p.Rows), block, 0, stream, in p);
    }
}
