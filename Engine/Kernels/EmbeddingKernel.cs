using System.Runtime.InteropServices;
using DeepSeekCuda.Cuda;

namespace DeepSeekCuda.Kernels;

/// <summary>Mirror of <c>EmbeddingParams</c> in Kernels/embedding.cu.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct EmbeddingParams
{
    public ulong Ids;
    public ulong Table;
    public ulong Out;
    public long OutStride;
    public int Tokens;
    public int Dim;
    public int Vocab;
    public int Pad0;
}

/// <summary>Gathers bf16 embedding rows for int32 token ids; an out-of-range id gives a NaN row.</summary>
internal sealed class EmbeddingKernel(CudaDevice device, NvrtcCompiler compiler) : KernelLauncher(device, compiler, FamilyName)
{
    /// <summary>Kernels/embedding.cu.</summary>
    public const string FamilyName = "embedding";

    /// <summary>CUDA name of the params struct.</summary>
    public const string ParamsType = "EmbeddingParams";

    /// <summary>Threads per block (each moves two elements).</summary>
    public const int Block = 256;

    /// <summary>The specialization for an output type.</summary>
    public static KernelInstance Instance(ElementType output) => new($"embedding_kernel<{Block}, {Flag(output)}>", ParamsType);

    /// <summary>Every specialization the launcher can request.</summary>
    public static IReadOnlyList<KernelInstance> AllInstances() => [Instance(ElementType.F32), Instance(ElementType.BF16)];

    /// <summary>out[t] = table[ids[t]] for <paramref name="tokens"/> ids.</summary>
    public void Launch(CudaStream stream, ulong ids, ulong table, int vocab, int dim, ulong output, ElementType outType, int tokens, long outStride = -1)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(dim);
        if (tokens <= 0)
        {
            return;
        }

        var p = new EmbeddingParams { Ids = ids, Table = table, Out = output, OutStride = outStride < 0 ? dim : outStride, Tokens = tokens, Dim = dim, Vocab = vocab };
        Get(Instance(outType)).Launch(new Dim3((uint)tokens, Blocks(dim, Block * 2)), Block, 0, stream, in p);
    }
}
