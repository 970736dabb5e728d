using System.Runtime.InteropServices;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Loader;

namespace DeepSeekCuda.Kernels;

/// <summary>Mirror of <c>RopeParams</c> in Kernels/rope.cu.</summary>
[StructLayout(LayoutKind.Sequential)]
public struct RopeParams
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
/// host (<see cref="YarnInverseFrequencies(ModelConfig)"/>) and uploaded once.
/// </summary>
public sealed class RopeKernel(CudaDevice device, NvrtcCompiler compiler) : KernelLauncher(device, compiler, FamilyName)
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

    /// <summary>The model's inverse frequencies (YaRN-corrected when rope_scaling is yarn).</summary>
    public static float[] YarnInverseFrequencies(ModelConfig config) =>
        config.RopeScaling is { } s
            ? YarnInverseFrequencies(config.QkRopeHeadDim, config.RopeTheta, s.Factor, s.OriginalMaxPositionEmbeddings, s.BetaFast, s.BetaSlow)
            : YarnInverseFrequencies(config.QkRopeHeadDim, config.RopeTheta, 1, 1, 32, 1);

    /// <summary>
    /// Static YaRN (MODEL.md 4), computed in float32 in the order of the official
    /// <c>precompute_freqs_cis</c>: f_i = 1 / θ^(2i/dim), ramp between floor(d(β_fast)) and ceil(d(β_slow)),
    /// inv_f = f/factor·(1 − smooth) + f·smooth with smooth = 1 − ramp. A factor of 1 leaves f unchanged.
    /// </summary>
    public static float[] YarnInverseFrequencies(int ropeDim, double theta, double factor, int originalMax, double betaFast, double betaSlow)
    {
        if (ropeDim <= 0 || ropeDim % 2 != 0)
        {
            throw new ArgumentOutOfRangeException(nameof(ropeDim), "rope dimension must be positive and even");
        }

        var pairs = ropeDim / 2;
        var f = new float[pairs];
        for (var i = 0; i < pairs; i++)
        {
            f[i] = 1.0f / MathF.Pow((float)theta, (2 * i) / (float)ropeDim);
        }

        if (factor <= 1)
        {
            return f;
        }

        double D(double rotations) => ropeDim * Math.Log(originalMax / (rotations * 2 * Math.PI)) / (2 * Math.Log(theta));
        double low = Math.Max(Math.Floor(D(betaFast)), 0);
        double high = Math.Min(Math.Ceiling(D(betaSlow)), ropeDim - 1);
        if (low == high)
        {
            high += 0.001;
        }

        var fac = (float)factor;
        for (var i = 0; i < pairs; i++)
        {
            var ramp = Math.Clamp((i - (float)low) / ((float)high - (float)low), 0f, 1f);
            var smooth = 1f - ramp;
            f[i] = f[i] / fac * (1f - smooth) + f[i] * smooth;
        }

        return f;
    }

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
