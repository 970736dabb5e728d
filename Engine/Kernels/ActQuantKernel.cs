using System.Runtime.InteropServices;
using DeepSeekCuda.Cuda;

namespace DeepSeekCuda.Kernels;

/// <summary>Mirror of <c>ActQuantParams</c> in Kernels/act_quant.cu.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct ActQuantParams
{
    public ulong X;
    public ulong Codes;
    public ulong Scales;
    public long XStride;
    public long CodesStride;
    public long ScalesStride;
    public int Rows;
    public int Cols;
    public int Groups;
    public int Pad0;
}

/// <summary>
/// FP8 e4m3 activation quantization per row per 128 channels with the official rule
/// (<c>s = max(amax, 1e-4) / 448</c>, optionally rounded up to a power of two for UE8M0 configs;
/// <c>q = e4m3(x / s)</c>); a narrower last group when the width is not a multiple of 128.
/// </summary>
internal sealed class ActQuantKernel(CudaDevice device, NvrtcCompiler compiler) : KernelLauncher(device, compiler, FamilyName)
{
    /// <summary>Kernels/act_quant.cu.</summary>
    public const string FamilyName = "act_quant";

    /// <summary>CUDA name of the params struct.</summary>
    public const string ParamsType = "ActQuantParams";

    /// <summary>Channels per scale.</summary>
    public const int Group = 128;

    /// <summary>Groups (warps) per block.</summary>
    public const int Warps = 8;

    /// <summary>Scales per row for <paramref name="cols"/> channels.</summary>
    public static int GroupsFor(int cols) => (cols + Group - 1) / Group;

    /// <summary>The specialization for an input type and scale format.</summary>
    public static KernelInstance Instance(ElementType input, bool ue8m0) =>
        new($"act_quant_kernel<{Warps}, {Flag(input)}, {(ue8m0 ? 1 : 0)}>", ParamsType);

    /// <summary>Every specialization the launcher can request.</summary>
    public static IReadOnlyList<KernelInstance> AllInstances() =>
        [.. from i in Enum.GetValues<ElementType>() from u in new[] { false, true } select Instance(i, u)];

    /// <summary>Quantizes every row of <paramref name="x"/> into <paramref name="output"/>'s e4m3 codes and fp32 scales.</summary>
    public void Launch(CudaStream stream, DeviceRows x, Fp8Rows output, bool ue8m0 = false)
    {
        var p = Params(x, output);
        if (p.Rows == 0)
        {
            return;
        }

        Get(Instance(x.Type, ue8m0)).Launch(new Dim3(Blocks((long)p.Rows * p.Groups, Warps)), Warps * 32, 0, stream, in p);
    }

    /// <summary>The kernel's arguments for one call, the views checked against each other.</summary>
    public static ActQuantParams Params(DeviceRows x, Fp8Rows output)
    {
        if (output.Rows != x.Rows || output.Cols != x.Cols)
        {
            throw new ArgumentException($"activation quantization: output is [{output.Rows}, {output.Cols}], expected [{x.Rows}, {x.Cols}]", nameof(output));
        }

        return new ActQuantParams
        {
            X = x.Pointer, Codes = output.Codes, Scales = output.Scales,
            XStride = x.Stride, CodesStride = output.CodesStride, ScalesStride = output.ScalesStride,
            Rows = x.Rows, Cols = x.Cols, Groups = output.Groups,
        };
    }
}
