using System.Runtime.InteropServices;
using DeepSeekCuda.Cuda;

namespace DeepSeekCuda.Kernels;

/// <summary>Mirror of <c>MlaCacheParams</c> in Kernels/mla_cache.cu.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct MlaCacheParams
{
    public ulong Kv;
    public ulong NormWeight;
    public ulong Cos;
    public ulong Sin;
    public ulong Requests;
    public ulong Positions;
    public ulong BlockTable;
    public ulong Cache;
    public long KvStride;
    public float Eps;
    public int Tokens;
    public int MaxBlocks;
    public int TablePositions;
}

/// <summary>
/// Appends new tokens to the paged latent cache (<see cref="PagedLatentCache"/>): RMSNorm of the latent with the
/// kv_a_layernorm weight and RoPE of k_pe at the token's position, written as BF16 to the slot that the token's
/// (request, position) resolves to through the block table. Same semantics as <c>CpuBackend.AppendLatent</c>.
/// </summary>
internal sealed class MlaCacheKernel(CudaDevice device, NvrtcCompiler compiler) : KernelLauncher(device, compiler, FamilyName)
{
    /// <summary>Kernels/mla_cache.cu.</summary>
    public const string FamilyName = "mla_cache";

    /// <summary>CUDA name of the params struct.</summary>
    public const string ParamsType = "MlaCacheParams";

    /// <summary>Threads per block (one block per token).</summary>
    public const int Block = 128;

    /// <summary>The specialization for a row shape and kv input type.</summary>
    public static KernelInstance Instance(LatentShape shape, ElementType kvType) =>
        new($"mla_cache_append_kernel<{shape.Latent}, {shape.Rope}, {Flag(kvType)}>", ParamsType);

    /// <summary>Every specialization of the known shapes.</summary>
    public static IReadOnlyList<KernelInstance> AllInstances() =>
        [.. from s in LatentShape.Known from t in Enum.GetValues<ElementType>() select Instance(s, t)];

    /// <summary>
    /// Appends <paramref name="tokens"/> rows of kv ([tokens, kvStride], latent then rope; the kv_a_proj output).
    /// Token t goes to request <c>requests[t]</c> at position <c>positions[t]</c> (device int32 arrays; a negative
    /// request marks padding, e.g. in a captured graph with fewer live tokens). rope: the table of rope/2 pairs
    /// (<c>YarnRope.Table</c>); normWeight: [latent] BF16. Tokens whose position lies outside the table or the
    /// block table are skipped.
    /// </summary>
    public void Append(CudaStream stream, LatentShape shape, ulong kv, ElementType kvType, long kvStride, ulong normWeight, float eps,
        RopeTableView rope, ulong requests, ulong positions, int tokens, ulong blockTable, int maxBlocks, ulong cache)
    {
        shape.Validate();
        ArgumentOutOfRangeException.ThrowIfNegative(tokens);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(maxBlocks);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(rope.Positions);
        if (2 * rope.Pairs != shape.Rope)
        {
            throw new ArgumentException($"a rotary table of {rope.Pairs} pairs for a latent row with {shape.Rope} rope values", nameof(rope));
        }
        ArgumentOutOfRangeException.ThrowIfLessThan(kvStride, shape.RowWidth);
        if (tokens == 0)
        {
            return;
        }

        var p = new MlaCacheParams
        {
            Kv = kv, NormWeight = normWeight, Cos = rope.Cos, Sin = rope.Sin, Requests = requests, Positions = positions, BlockTable = blockTable,
            Cache = cache, KvStride = kvStride, Eps = eps, Tokens = tokens, MaxBlocks = maxBlocks, TablePositions = rope.Positions,
        };
        Get(Instance(shape, kvType)).Launch(new Dim3((uint)tokens), Block, 0, stream, in p);
    }
}
