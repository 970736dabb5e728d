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
    public int ChosenRows;
    public ulong Chosen;
}

/// <summary>
/// Gathers bf16 embedding rows for int32 token ids, or for the ids chosen in the rows of a token choice buffer that the ids
/// name (token 0 where a row was not chosen); an out-of-range id or row gives a NaN row.
/// </summary>
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

    /// <summary>
    /// out[t] = table[ids[t]] for every id, or with <paramref name="chosen"/> table[max(chosen[ids[t]], 0)];
    /// <paramref name="table"/> bf16 [vocab, dim], dense.
    /// </summary>
    public void Launch(CudaStream stream, DeviceInts ids, DeviceRows table, DeviceRows output, DeviceInts? chosen = null)
    {
        var p = Params(ids, table, output, chosen);
        if (p.Tokens == 0)
        {
            return;
        }

        Get(Instance(output.Type)).Launch(new Dim3((uint)p.Tokens, Blocks(p.Dim, Block * 2)), Block, 0, stream, in p);
    }

    /// <summary>The kernel's arguments for one call, the views checked against each other.</summary>
    public static EmbeddingParams Params(DeviceInts ids, DeviceRows table, DeviceRows output, DeviceInts? chosen = null)
    {
        const string what = "embedding";
        ViewCheck.Bf16Weight(table, table.Rows, table.Cols, what, nameof(table));
        ViewCheck.Is(output, ids.Length, table.Cols, what, nameof(output));
        return new EmbeddingParams
        {
            Ids = ids.Pointer, Table = table.Pointer, Out = output.Pointer, OutStride = output.Stride,
            Tokens = ids.Length, Dim = table.Cols, Vocab = table.Rows,
            Chosen = chosen?.Pointer ?? 0, ChosenRows = chosen?.Length ?? 0,
        };
    }
}
