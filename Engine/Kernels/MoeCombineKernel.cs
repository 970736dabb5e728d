using System.Runtime.InteropServices;
using DeepSeekCuda.Cuda;

namespace DeepSeekCuda.Kernels;

/// <summary>Mirror of <c>MoeCombineParams</c> in Kernels/moe_combine.cu.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct MoeCombineParams
{
    public ulong ExpertOut;
    public ulong Inv;
    public ulong Weights;
    public ulong Shared;
    public ulong Residual;
    public ulong Y;
    public long ExpertStride;
    public long SharedStride;
    public long ResidualStride;
    public long YStride;
    public int Tokens;
    public int K;
    public int Hidden;
    public int Pad0;
}

/// <summary>
/// MoE combine (Kernels/moe_combine.cu): <c>y[t] = Σ_j w[t,j]·expert_out[inv[t·k+j]] (+ shared[t]) (+ residual[t])</c>,
/// fp32 in that fixed order, one rounding at the store (deterministic, no atomics). expert_out and shared are bf16;
/// residual has y's type and may alias y.
/// </summary>
internal sealed class MoeCombineKernel(CudaDevice device, NvrtcCompiler compiler) : KernelLauncher(device, compiler, FamilyName)
{
    /// <summary>Kernels/moe_combine.cu.</summary>
    public const string FamilyName = "moe_combine";

    /// <summary>CUDA name of the params struct.</summary>
    public const string ParamsType = "MoeCombineParams";

    /// <summary>Channels per block.</summary>
    public const int Block = 256;

    /// <summary>The specialization for an output type.</summary>
    public static KernelInstance Instance(ElementType output) => new($"moe_combine_kernel<{Block}, {Flag(output)}>", ParamsType);

    /// <summary>Both output types.</summary>
    public static IReadOnlyList<KernelInstance> AllInstances() => [.. Enum.GetValues<ElementType>().Select(Instance)];

    /// <summary>
    /// Combines <paramref name="tokens"/> tokens: inv [tokens·k] slot → grouped row (negative: skipped), weights f32 [tokens, k],
    /// expertOut bf16 [rows, hidden], shared 0 or bf16 [tokens, hidden], residual 0 or [tokens, hidden] of <paramref name="yType"/>.
    /// </summary>
    public void Launch(CudaStream stream, ulong expertOut, ulong inv, ulong weights, ulong shared, ulong residual, ulong y, ElementType yType,
        int tokens, int k, int hidden, long expertStride = -1, long sharedStride = -1, long residualStride = -1, long yStride = -1)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(k);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(hidden);
        if (tokens <= 0)
        {
            return;
        }

        var p = new MoeCombineParams
        {
            ExpertOut = expertOut, Inv = inv, Weights = weights, Shared = shared, Residual = residual, Y = y,
            ExpertStride = expertStride < 0 ? hidden : expertStride, SharedStride = sharedStride < 0 ? hidden : sharedStride,
            ResidualStride = residualStride < 0 ? hidden : residualStride, YStride = yStride < 0 ? hidden : yStride,
            Tokens = tokens, K = k, Hidden = hidden,
        };
        Get(Instance(yType)).Launch(new Dim3((uint)tokens, Blocks(hidden, Block)), Block, 0, stream, in p);
    }
}
