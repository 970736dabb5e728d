using System.Runtime.InteropServices;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Loader;

namespace DeepSeekCuda.Kernels;

/// <summary>Mirror of <c>RopeParams</c> in Kernels/rope.cu.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct RopeParams
{
    public ulong X;
    public ulong Positions;
    public ulong InvFreq;
    public long TokenStride;
    public long HeadStride;
    public int Tokens;
    public int Heads;
    public int RopeOffset;
    public int Pairs;
}

/// <summary>
/// Rotary embedding on interleaved pairs, in place, with a YaRN-corrected frequency table computed on the
/// host (<c>YarnRope.InverseFrequencies</c>) and uploaded once.
/// </summary>
internal sealed class RopeKernel(CudaDevice device, NvrtcCompiler compiler) : KernelLauncher(device, compiler, FamilyName)
{
    /// <summary>Kernels/rope.cu.</summary>
    public const string FamilyName = "rope";

    /// <summary>CUDA name of the params struct.</summary>
    public const string ParamsType = "RopeParams";

    /// <summary>Threads per block (one pair each).</summary>
    public const int Block = 256;

    /// <summary>The specialization for a storage type.</summary>
    public static KernelInstance Instance(ElementType type) => new($"rope_kernel<{Block}, {Flag(type)}>", ParamsType);

    /// <summary>Every specialization the launcher can request.</summary>
    public static IReadOnlyList<KernelInstance> AllInstances() => [Instance(ElementType.F32), Instance(ElementType.BF16)];

    /// <summary>
    /// Rotates the rope slice of every head of every token in place: slice = x[t·tokenStride + h·headStride
    /// + ropeOffset ..][0 .. 2·pairs). q: heads = H, headStride = qk_head_dim, ropeOffset = nope;
    /// k_pe: heads = 1, ropeOffset = kv_lora_rank.
    /// </summary>
    public void Launch(CudaStream stream, ulong x, ElementType type, ulong positions, ulong invFreq, int pairs, int tokens, int heads,
        long tokenStride, long headStride, int ropeOffset)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(pairs);
        if (tokens <= 0 || heads <= 0)
        {
            return;
        }

        var p = new RopeParams
        {
            X = x, Positions = positions, InvFreq = invFreq, TokenStride = tokenStride, HeadStride = headStride,
            Tokens = tokens, Heads = heads, RopeOffset = ropeOffset, Pairs = pairs,
        };
        Get(Instance(type)).Launch(new Dim3(Blocks((long)tokens * heads * pairs, Block)), Block, 0, stream, in p);
    }
}
