using System.Runtime.InteropServices;
using DeepSeekCuda.Cuda;

namespace DeepSeekCuda.Kernels;

/// <summary>Mirror of <c>MoeDispatchParams</c> in Kernels/moe_dispatch.cu.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct MoeDispatchParams
{
    public ulong TopkIdx;
    public ulong ExpertMap;
    public ulong LocalIdx;
    public ulong NumTokens;
    public ulong Counts;
    public ulong Offsets;
    public ulong Perm;
    public ulong Inv;
    public ulong Hist;
    public int Tokens;
    public int TMax;
    public int K;
    public int Tile;
    public int RowsMax;
    public int Chunks;
    public int MapExperts;
    public int Pad0;
}

/// <summary>
/// The device buffers the dispatch writes for up to <paramref name="TMax"/> tokens of <paramref name="K"/> slots over
/// <paramref name="Experts"/> expert slots in tiles of <paramref name="Tile"/> rows (int32 each): counts [E], offsets [E + 1],
/// perm [<see cref="RowsMax"/>], inv [TMax · K], and its workspace [<see cref="MoeDispatchKernel.WorkspaceInts"/>]. The host
/// mirror of what they hold is <see cref="MoeDispatchLayout"/>.
/// </summary>
internal readonly record struct MoeDispatchBuffers(ulong Counts, ulong Offsets, ulong Perm, ulong Inv, ulong Workspace, int TMax, int K, int Experts, int Tile)
{
    /// <summary>Rows of perm: the bound for any routing.</summary>
    public int RowsMax => MoeDispatch.RowsMax(TMax, K, Experts, Tile);
}

/// <summary>
/// Expert parallelism's translation on the device: <paramref name="Map"/> int32 [<paramref name="Experts"/>] from the model's
/// routed experts to this device's slots or −1 (<see cref="MoeDispatch.ExpertMap"/>), and where the localized ids go.
/// </summary>
/// <param name="Map">Address of the map.</param>
/// <param name="Experts">The model's routed experts (the map's length).</param>
/// <param name="LocalIdx">int32 [TMax · K] for the localized ids.</param>
internal readonly record struct DeviceExpertMap(ulong Map, int Experts, DeviceInts LocalIdx);

/// <summary>The expert-contiguous layout of one batch's routed token slots (see <see cref="MoeDispatch"/>).</summary>
/// <param name="Counts">[E] slots per expert.</param>
/// <param name="Offsets">[E + 1] padded exclusive offsets; Offsets[E] is the number of rows in use.</param>
/// <param name="Perm">[rowsMax] row → slot (token · k + j), −1 for padding and unused rows.</param>
/// <param name="Inv">[tMax · k] slot → row, −1 for entries outside [0, E) and tokens past the count.</param>
internal sealed record MoeDispatchLayout(int[] Counts, int[] Offsets, int[] Perm, int[] Inv);

/// <summary>
/// CPU reference of the MoE dispatch (pure C#, no CUDA). Slot s = token · k + j of topk_idx [tokens, k].
/// Each expert e owns rows [Offsets[e], Offsets[e + 1]): first its Counts[e] slots in increasing s (by
/// token, then slot), then padding up to a multiple of <c>tile</c>. Expert ids outside [0, E) are not routed.
/// </summary>
internal static class MoeDispatch
{
    /// <summary>Rows the permutation needs for any routing of up to <paramref name="tMax"/> tokens.</summary>
    public static int RowsMax(int tMax, int k, int experts, int tile) => checked((tMax * k) + (experts * (tile - 1)));

    /// <summary>
    /// The expert map of a device that holds the routed experts <paramref name="held"/> (ascending, distinct) of
    /// <paramref name="experts"/>: [experts] global expert → its slot in the device's compact stack (the position in
    /// <paramref name="held"/>), −1 for an expert another device holds.
    /// </summary>
    /// <exception cref="ArgumentException"><paramref name="held"/> is empty, not ascending and distinct, or outside [0, experts).</exception>
    public static int[] ExpertMap(int experts, IReadOnlyList<int> held)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(experts);
        if (held.Count == 0)
        {
            throw new ArgumentException("a device holds at least one routed expert", nameof(held));
        }

        var map = new int[experts];
        Array.Fill(map, -1);
        for (var slot = 0; slot < held.Count; slot++)
        {
            var e = held[slot];
            if ((uint)e >= (uint)experts || (slot > 0 && e <= held[slot - 1]))
            {
                throw new ArgumentException($"held experts must be ascending, distinct and in [0, {experts}); entry {slot} is {e}", nameof(held));
            }

            map[e] = slot;
        }

        return map;
    }

    /// <summary>
    /// The local experts of the first <paramref name="slots"/> token slots under <paramref name="expertMap"/>: map[g] for a
    /// global id g in [0, map length), else −1 (not routed here). What the dispatch's count pass writes to local_idx.
    /// </summary>
    public static int[] Localize(ReadOnlySpan<int> topkIdx, int slots, ReadOnlySpan<int> expertMap)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(slots);
        ArgumentOutOfRangeException.ThrowIfLessThan(topkIdx.Length, slots);
        var local = new int[slots];
        for (var s = 0; s < slots; s++)
        {
            var g = topkIdx[s];
            local[s] = (uint)g < (uint)expertMap.Length ? expertMap[g] : -1;
        }

        return local;
    }

    /// <summary>The layout of <paramref name="tokens"/> tokens, perm sized for <paramref name="tMax"/> tokens (default: tokens).</summary>
    public static MoeDispatchLayout Compute(ReadOnlySpan<int> topkIdx, int tokens, int k, int experts, int tile, int tMax = -1)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(k);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(experts);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(tile);
        ArgumentOutOfRangeException.ThrowIfNegative(tokens);
        tMax = tMax < 0 ? tokens : tMax;
        ArgumentOutOfRangeException.ThrowIfGreaterThan(tokens, tMax);
        ArgumentOutOfRangeException.ThrowIfLessThan(topkIdx.Length, tokens * k);
        var n = tokens * k;
        var counts = new int[experts];
        for (var s = 0; s < n; s++)
        {
            if ((uint)topkIdx[s] < (uint)experts)
            {
                counts[topkIdx[s]]++;
            }
        }

        var offsets = new int[experts + 1];
        for (var e = 0; e < experts; e++)
        {
            offsets[e + 1] = offsets[e] + ((counts[e] + tile - 1) / tile * tile);
        }

        var perm = new int[RowsMax(tMax, k, experts, tile)];
        Array.Fill(perm, -1);
        var inv = new int[tMax * k];
        Array.Fill(inv, -1);
        var next = offsets[..experts];
        for (var s = 0; s < n; s++)
        {
            var e = topkIdx[s];
            if ((uint)e < (uint)experts)
            {
                var row = next[e]++;
                perm[row] = s;
                inv[s] = row;
            }
        }

        return new MoeDispatchLayout(counts, offsets, perm, inv);
    }
}

/// <summary>
/// MoE dispatch on the GPU: counts, padded offsets, permutation and inverse exactly as <see cref="MoeDispatch"/>,
/// deterministically (no order-dependent atomics) in three launches whose grids depend only on t_max, so the
/// sequence can be captured in a CUDA graph; the live token count may be read from device memory.
/// </summary>
internal sealed class MoeDispatchKernel(CudaDevice device, NvrtcCompiler compiler) : KernelLauncher(device, compiler, FamilyName)
{
    /// <summary>Kernels/moe_dispatch.cu.</summary>
    public const string FamilyName = "moe_dispatch";

    /// <summary>CUDA name of the params struct.</summary>
    public const string ParamsType = "MoeDispatchParams";

    /// <summary>Threads per block.</summary>
    public const int Block = 256;

    /// <summary>Token slots per block of the count and scatter launches.</summary>
    public const int Chunk = 4096;

    /// <summary>
    /// Expert counts of the known models: V3 256, tiny-a 16, Tiny preset 12; and the slots of V3's compact stacks under
    /// expert parallelism over 8 and 4 devices (32, 64). Other counts compile on first use.
    /// </summary>
    public static IReadOnlyList<int> KnownExperts => [256, 16, 12, 32, 64];

    /// <summary>The three specializations (count, scan, scatter) for an expert count.</summary>
    public static (KernelInstance Count, KernelInstance Scan, KernelInstance Scatter) Instances(int experts) =>
        (new($"moe_dispatch_count<{experts}, {Block}, {Chunk}>", ParamsType),
         new($"moe_dispatch_scan<{experts}, {Block}, {Chunk}>", ParamsType),
         new($"moe_dispatch_scatter<{experts}, {Block}, {Chunk}>", ParamsType));

    /// <summary>Every specialization of the known expert counts.</summary>
    public static IReadOnlyList<KernelInstance> AllInstances() =>
        [.. KnownExperts.SelectMany(e => { var (c, s, x) = Instances(e); return new[] { c, s, x }; })];

    /// <summary>Blocks of the count and scatter launches for a capacity.</summary>
    public static int Chunks(int tMax, int k) => Math.Max(1, checked((tMax * k) + Chunk - 1) / Chunk);

    /// <summary>Int32 elements of the workspace for a capacity.</summary>
    public static long WorkspaceInts(int tMax, int k, int experts) => (long)Chunks(tMax, k) * experts;

    /// <summary>
    /// Builds the layout for <paramref name="tokens"/> tokens of topkIdx [TMax, K] (or for the int32 count at
    /// <paramref name="numTokens"/> when it is not 0, clamped to TMax) into <paramref name="buffers"/>. With an expert
    /// <paramref name="map"/> topkIdx holds global ids and the live slots' local experts are written to the map's LocalIdx
    /// (<see cref="MoeDispatch.Localize"/>), which the layout then follows: what the masked layout must read in place of topkIdx.
    /// </summary>
    public void Launch(CudaStream stream, DeviceInts topkIdx, int tokens, MoeDispatchBuffers buffers, ulong numTokens = 0, DeviceExpertMap? map = null)
    {
        var p = Params(topkIdx, tokens, buffers, numTokens, map);
        var (count, scan, scatter) = Instances(buffers.Experts);
        var grid = new Dim3((uint)p.Chunks);
        Get(count).Launch(grid, Block, 0, stream, in p);
        Get(scan).Launch(new Dim3(1), Block, 0, stream, in p);
        Get(scatter).Launch(grid, Block, 0, stream, in p);
    }

    /// <summary>The three kernels' arguments, the ids and map checked against the buffers' sizes.</summary>
    public static MoeDispatchParams Params(DeviceInts topkIdx, int tokens, MoeDispatchBuffers buffers, ulong numTokens, DeviceExpertMap? map)
    {
        const string what = "MoE dispatch";
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(buffers.TMax, nameof(buffers));
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(buffers.K, nameof(buffers));
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(buffers.Experts, nameof(buffers));
        ArgumentOutOfRangeException.ThrowIfGreaterThan(buffers.Experts, 1024, nameof(buffers)); // the scatter's [warps][E] table and running bases fit in 48 KiB of shared memory
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(buffers.Tile, nameof(buffers));
        ArgumentOutOfRangeException.ThrowIfNegative(tokens);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(tokens, buffers.TMax);
        var read = (long)(numTokens != 0 ? buffers.TMax : tokens) * buffers.K;
        if (topkIdx.Length < read)
        {
            throw new ArgumentException($"{what}: {topkIdx.Length} expert ids where the dispatch may read {read}", nameof(topkIdx));
        }

        if (map is { } m && (m.Experts <= 0 || m.LocalIdx.Length < (long)buffers.TMax * buffers.K))
        {
            throw new ArgumentException($"{what}: an expert map of {m.Experts} experts with {m.LocalIdx.Length} local ids for {buffers.TMax} x {buffers.K} slots", nameof(map));
        }

        return new MoeDispatchParams
        {
            TopkIdx = topkIdx.Pointer, NumTokens = numTokens, Counts = buffers.Counts, Offsets = buffers.Offsets, Perm = buffers.Perm, Inv = buffers.Inv,
            Hist = buffers.Workspace, ExpertMap = map?.Map ?? 0, LocalIdx = map?.LocalIdx.Pointer ?? 0, MapExperts = map?.Experts ?? 0,
            Tokens = tokens, TMax = buffers.TMax, K = buffers.K, Tile = buffers.Tile, RowsMax = buffers.RowsMax, Chunks = Chunks(buffers.TMax, buffers.K),
        };
    }
}
