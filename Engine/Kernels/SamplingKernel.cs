using System.Runtime.InteropServices;
using DeepSeekCuda.Cuda;

namespace DeepSeekCuda.Kernels;

/// <summary>Mirror of <c>SamplingParams</c> in Kernels/sampling.cu.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct SamplingParams
{
    public ulong Logits;
    public ulong OutIds;
    public long LogitsStride;
    public ulong Seed;
    public ulong Step;
    public int Rows;
    public int Vocab;
    public float Temperature;
    public int TopK;
    public float TopP;
    public int Pad0;
}

/// <summary>Sampling settings; temperature 0 is greedy.</summary>
/// <param name="Temperature">Logits are divided by it; &lt;= 0 means argmax.</param>
/// <param name="TopK">Keep the k largest logits (ties at the threshold kept); &lt;= 0 is off.</param>
/// <param name="TopP">Keep the smallest top set with at least this probability mass; &gt;= 1 is off.</param>
/// <param name="Seed">Seed of the counter-based generator; a draw depends only on (seed, step, row).</param>
internal readonly record struct SamplingKernelOptions(float Temperature = 0, int TopK = 0, float TopP = 1, ulong Seed = 0);

/// <summary>
/// Greedy (argmax, lowest index on ties, NaN ignored) and seeded temperature/top-k/top-p sampling, one
/// block per row, writing int32 ids on the device (no host round trip inside the decode loop).
/// </summary>
internal sealed class SamplingKernel(CudaDevice device, NvrtcCompiler compiler) : KernelLauncher(device, compiler, FamilyName)
{
    /// <summary>Kernels/sampling.cu.</summary>
    public const string FamilyName = "sampling";

    /// <summary>CUDA name of the params struct.</summary>
    public const string ParamsType = "SamplingParams";

    /// <summary>Threads per block (one row per block).</summary>
    public const int Block = 1024;

    /// <summary>The argmax specialization.</summary>
    public static KernelInstance Argmax => new($"argmax_kernel<{Block}>", ParamsType);

    /// <summary>The sampling specialization.</summary>
    public static KernelInstance Sample => new($"sample_kernel<{Block}>", ParamsType);

    /// <summary>Every specialization the launcher can request.</summary>
    public static IReadOnlyList<KernelInstance> AllInstances() => [Argmax, Sample];

    /// <summary>Picks one id per row of logits [rows, vocab] into <paramref name="outIds"/>.</summary>
    public void Launch(CudaStream stream, ulong logits, int rows, int vocab, ulong outIds, in SamplingKernelOptions options, ulong step = 0, long logitsStride = -1)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(vocab);
        if (rows <= 0)
        {
            return;
        }

        var p = new SamplingParams
        {
            Logits = logits, OutIds = outIds, LogitsStride = logitsStride < 0 ? vocab : logitsStride, Seed = options.Seed, Step = step,
            Rows = rows, Vocab = vocab, Temperature = options.Temperature, TopK = options.TopK, TopP = options.TopP,
        };
        var kernel = Get(options.Temperature <= 0 ? Argmax : Sample);
        kernel.Launch(new Dim3((uint)rows), Block, 0, stream, in p);
    }

    /// <summary>The draw in [0, 1) for (seed, step, row), bit-identical to the kernel's.</summary>
    public static float Uniform(ulong seed, ulong step, uint row)
    {
        var h = SplitMix64(seed ^ SplitMix64(step * 0x10000UL + row));
        return (uint)(h >> 40) * (1.0f / 16777216.0f);
    }

    private static ulong SplitMix64(ulong x)
    {
        unchecked
        {
            x += 0x9E3779B97F4A7C15UL;
            x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9UL;
            x = (x ^ (x >> 27)) * 0x94D049BB133111EBUL;
            return x ^ (x >> 31);
        }
    }
}
