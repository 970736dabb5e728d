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

    /// <summary>Quantizes [rows, cols] into e4m3 codes [rows, cols] and fp32 scales [rows, ceil(cols/128)].</summary>
    public void Launch(CudaStream stream, ulong x, ElementType xType, ulong codes, ulong scales, int rows, int cols, bool ue8m0 = false,
        long xStride = -1, long codesStride = -1, long scalesStride = -1)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(cols);
        if (rows <= 0)
        {
            return;
        }

        var groups = GroupsFor(cols);
        var p = new ActQuantParams
        {
            X = x, Codes = codes, Scales = scales,
            XStride = xStride < 0 ? cols : xStride, CodesStride = codesStride < 0 ? cols : codesStride, ScalesStride = scalesStride < 0 ? groups : scalesStride,
            Rows = rows, Cols = cols, Groups = groups,
        };
        Get(Instance(xType, ue8m0)).Launch(new Dim3(Blocks((long)rows * groups, Warps)), Warps * 32, 0, stream, in p);
    }
}
