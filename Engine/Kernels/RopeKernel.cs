using System.Runtime.InteropServices;
using DeepSeekCuda.Cuda;

namespace DeepSeekCuda.Kernels;

/// <summary>Mirror of <c>RopeParams</c> in Kernels/rope.cu.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct RopeParams
{
    public ulong X;
    public ulong Cos;
    public ulong Sin;
    public ulong Positions;
    public long TokenStride;
    public long HeadStride;
    public int Tokens;
    public int Heads;
    public int RopeOffset;
    public int Pairs;
    public int Start;
    public int TablePositions;
}

/// <summary>A rotary table on the device: f32 cos and sin [<paramref name="Positions"/>, <paramref name="Pairs"/>] (<c>YarnRope.Table</c>).</summary>
internal readonly record struct RopeTableView(ulong Cos, ulong Sin, int Positions, int Pairs);

/// <summary>Where the rope slices of a row lie: <paramref name="Heads"/> slices of 2·pairs values, head h's at h·headStride + ropeOffset.</summary>
internal readonly record struct RopeLayout(int Heads, long HeadStride, int RopeOffset);

/// <summary>
/// The engine's one rotary embedding on interleaved pairs, in place, from the host's cos/sin table: bit for bit
/// <c>CpuBackend.ApplyRope</c> (each product and sum rounded on its own).
/// </summary>
internal sealed class RopeKernel(CudaDevice device, NvrtcCompiler compiler) : KernelLauncher(device, compiler, FamilyName)
{
    /// <summary>Kernels/rope.cu.</summary>
    public const string FamilyName = "rope";

    /// <summary>CUDA name of the params struct.</summary>
    public const string ParamsType = "RopeParams";

    /// <summary>Threads per block (one pair each).</summary>
    public const int Block = 256;

    private const long MaxGrid = 65535;

    /// <summary>
    /// The specialization for a storage type; <paramref name="round"/> (f32 only: f32 storage holding bf16 values) rounds the
    /// results to bf16 values. A bf16 store rounds anyway.
    /// </summary>
    public static KernelInstance Instance(ElementType type, bool round) =>
        new($"rope_kernel<{Block}, {Flag(type)}, {(round && type == ElementType.F32 ? 1 : 0)}>", ParamsType);

    /// <summary>Every specialization the launcher can request.</summary>
    public static IReadOnlyList<KernelInstance> AllInstances() =>
        [Instance(ElementType.F32, round: false), Instance(ElementType.F32, round: true), Instance(ElementType.BF16, round: false)];

    /// <summary>
    /// Rotates the rope slices of every row of <paramref name="x"/> in place, row t at position positions[t] (a device int32
    /// per row) or, without <paramref name="positions"/>, at start + t. q: heads = H, headStride = qk_head_dim, ropeOffset =
    /// nope. On the device a position outside the table leaves its row as it is; the host's <paramref name="start"/> form is
    /// checked here.
    /// </summary>
    public void Launch(CudaStream stream, DeviceRows x, bool round, RopeLayout layout, RopeTableView table, DeviceInts? positions = null, int start = 0)
    {
        var p = Params(x, layout, table, positions, start);
        if (p.Tokens == 0)
        {
            return;
        }

        var work = (long)p.Tokens * layout.Heads * table.Pairs;
        Get(Instance(x.Type, round)).Launch(new Dim3((uint)Math.Min(MaxGrid, Blocks(work, Block))), Block, 0, stream, in p);
    }

    /// <summary>The kernel's arguments for one call, the layout checked against the rows and the positions against the table.</summary>
    public static RopeParams Params(DeviceRows x, RopeLayout layout, RopeTableView table, DeviceInts? positions, int start)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(table.Pairs);
        if (layout.Heads <= 0 || layout.RopeOffset < 0 || layout.RopeOffset + 2 * table.Pairs > layout.HeadStride ||
            x.Cols < (layout.Heads - 1) * layout.HeadStride + layout.RopeOffset + 2 * table.Pairs)
        {
            throw new ArgumentException($"RoPE: layout {layout} with {table.Pairs} pairs does not fit rows of {x.Cols}", nameof(layout));
        }

        if (positions is { } device && device.Length != x.Rows)
        {
            throw new ArgumentException($"RoPE: {device.Length} positions for {x.Rows} rows", nameof(positions));
        }

        if (positions is not null && start != 0)
        {
            throw new ArgumentException($"RoPE: a start ({start}) with device positions, which say where every row is", nameof(start));
        }

        if (positions is null && (start < 0 || start + x.Rows > table.Positions))
        {
            throw new ArgumentOutOfRangeException(nameof(start), $"positions {start}..{start + x.Rows - 1} exceed the rotary table (0..{table.Positions - 1})");
        }

        return new RopeParams
        {
            X = x.Pointer, Cos = table.Cos, Sin = table.Sin, Positions = positions?.Pointer ?? 0, TokenStride = x.Stride, HeadStride = layout.HeadStride,
            Tokens = x.Rows, Heads = layout.Heads, RopeOffset = layout.RopeOffset, Pairs = table.Pairs, Start = start,
            TablePositions = table.Positions,
        };
    }
}
