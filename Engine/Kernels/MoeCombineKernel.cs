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
    /// Combines every row of y: <paramref name="inv"/> [tokens·k] slot → grouped row of <paramref name="expertOut"/> (bf16;
    /// negative: skipped), the routing's weights, <paramref name="shared"/> bf16 [tokens, hidden] and
    /// <paramref name="residual"/> (y's shape and type; may be y itself) when given.
    /// </summary>
    public void Launch(CudaStream stream, DeviceRows expertOut, DeviceInts inv, DeviceRouting routing, DeviceRows? shared, DeviceRows? residual, DeviceRows y)
    {
        var p = Params(expertOut, inv, routing, shared, residual, y);
        if (p.Tokens == 0)
        {
            return;
        }

        Get(Instance(y.Type)).Launch(new Dim3((uint)p.Tokens, Blocks(p.Hidden, Block)), Block, 0, stream, in p);
    }

    /// <summary>The kernel's arguments for one call, the views checked against each other.</summary>
    public static MoeCombineParams Params(DeviceRows expertOut, DeviceInts inv, DeviceRouting routing, DeviceRows? shared, DeviceRows? residual, DeviceRows y)
    {
        const string what = "MoE combine";
        ViewCheck.Wide(y, what, nameof(y));
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(routing.K);
        ViewCheck.Is(expertOut, expertOut.Rows, y.Cols, what, nameof(expertOut), ElementType.BF16);
        if (routing.Tokens != y.Rows || inv.Length != (long)y.Rows * routing.K)
        {
            throw new ArgumentException($"{what}: a routing of {routing.Tokens} tokens x {routing.K} and {inv.Length} slots for {y.Rows} rows", nameof(routing));
        }

        if (shared is { } s)
        {
            ViewCheck.Is(s, y.Rows, y.Cols, what, nameof(shared), ElementType.BF16);
        }

        if (residual is { } r)
        {
            ViewCheck.Is(r, y.Rows, y.Cols, what, nameof(residual), y.Type);
        }

        return new MoeCombineParams
        {
            ExpertOut = expertOut.Pointer, Inv = inv.Pointer, Weights = routing.Weights, Shared = shared?.Pointer ?? 0, Residual = residual?.Pointer ?? 0,
            Y = y.Pointer, ExpertStride = expertOut.Stride, SharedStride = shared?.Stride ?? y.Cols, ResidualStride = residual?.Stride ?? y.Cols,
            YStride = y.Stride, Tokens = y.Rows, K = routing.K, Hidden = y.Cols,
        };
    }
}
