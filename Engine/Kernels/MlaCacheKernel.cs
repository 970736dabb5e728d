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
    /// Appends every row of kv (latent then rope; the kv_a_proj output) to the paged cache. Row t goes to request
    /// <c>requests[t]</c> at position <c>positions[t]</c> (device int32 arrays; a negative request marks padding, e.g. in a
    /// captured graph with fewer live tokens). rope: the table of rope/2 pairs (<c>YarnRope.Table</c>); normWeight: bf16
    /// [1, latent]. Rows whose position lies outside the table or the block table are skipped.
    /// </summary>
    public void Append(CudaStream stream, LatentShape shape, DeviceRows kv, DeviceRows normWeight, float eps, RopeTableView rope, DeviceInts requests,
        DeviceInts positions, LatentPages pages)
    {
        var p = Params(shape, kv, normWeight, eps, rope, requests, positions, pages);
        if (p.Tokens == 0)
        {
            return;
        }

        Get(Instance(shape, kv.Type)).Launch(new Dim3((uint)p.Tokens), Block, 0, stream, in p);
    }

    /// <summary>The kernel's arguments for one call, the views checked against the row shape and each other.</summary>
    public static MlaCacheParams Params(LatentShape shape, DeviceRows kv, DeviceRows normWeight, float eps, RopeTableView rope, DeviceInts requests,
        DeviceInts positions, LatentPages pages)
    {
        const string what = "latent append";
        shape.Validate();
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(pages.MaxBlocks);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(rope.Positions);
        if (2 * rope.Pairs != shape.Rope)
        {
            throw new ArgumentException($"{what}: a rotary table of {rope.Pairs} pairs for a latent row with {shape.Rope} rope values", nameof(rope));
        }

        ViewCheck.Is(kv, kv.Rows, shape.RowWidth, what, nameof(kv));
        ViewCheck.Bf16Weight(normWeight, 1, shape.Latent, what, nameof(normWeight));
        if (requests.Length != kv.Rows || positions.Length != kv.Rows)
        {
            throw new ArgumentException($"{what}: {requests.Length} requests and {positions.Length} positions for {kv.Rows} rows", nameof(requests));
        }

        return new MlaCacheParams
        {
            Kv = kv.Pointer, NormWeight = normWeight.Pointer, Cos = rope.Cos, Sin = rope.Sin, Requests = requests.Pointer, Positions = positions.Pointer,
            BlockTable = pages.BlockTable, Cache = pages.Cache, KvStride = kv.Stride, Eps = eps, Tokens = kv.Rows, MaxBlocks = pages.MaxBlocks,
            TablePositions = rope.Positions,
        };
    }
}
