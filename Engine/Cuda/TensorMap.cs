using DeepSeekCuda.Cuda.Native;

namespace DeepSeekCuda.Cuda;

/// <summary>A <c>CUtensorMap</c>: 128 opaque bytes the driver encodes and the TMA unit reads (Kernels/hopper.cuh <c>TmaMap</c>).</summary>
internal unsafe struct TensorMap
{
    /// <summary>The encoded bytes.</summary>
    public fixed ulong Opaque[16];
}

/// <summary>How TMA permutes 16-byte chunks inside a row of a shared-memory box (<c>CUtensorMapSwizzle</c>).</summary>
internal enum TmaSwizzle
{
    /// <summary>Rows stored as they are.</summary>
    None = 0,

    /// <summary>The 128-byte swizzle wgmma's K-major 128-byte layout reads; the box's inner extent is at most 128 bytes.</summary>
    Swizzle128B = 3,
}

/// <summary>
/// A byte tensor in device memory as a TMA tile source: <paramref name="Inner"/> bytes per row (the contiguous
/// dimension), <paramref name="Outer"/> rows <paramref name="RowStride"/> bytes apart, copied in boxes of
/// <paramref name="BoxInner"/> x <paramref name="BoxOuter"/>; with <see cref="Planes"/> set, a stack of that many such
/// matrices <see cref="PlaneStride"/> bytes apart (3-D, boxes one matrix deep), which keeps each matrix's edge: a box
/// past its last row reads zeros, not the next matrix. <see cref="Problem"/> applies the driver's rules for
/// <c>cuTensorMapEncodeTiled</c> with a message naming the broken one, so a bad shape fails before the driver answers
/// with a bare CUDA_ERROR_INVALID_VALUE; <see cref="Encode"/> asks the driver for the map.
/// </summary>
internal readonly record struct TmaTile(ulong Address, long Inner, long Outer, long RowStride, int BoxInner, int BoxOuter, TmaSwizzle Swizzle)
{
    /// <summary>Most elements along one box edge.</summary>
    public const int MaxBox = 256;

    /// <summary>Matrices in a 3-D tile, 0 for a 2-D one.</summary>
    public long Planes { get; init; }

    /// <summary>Bytes between the matrices of a 3-D tile.</summary>
    public long PlaneStride { get; init; }

    /// <summary>2 or 3: the <c>cp.async.bulk.tensor</c> form the kernel must use.</summary>
    public int Rank => Planes > 0 ? 3 : 2;

    /// <summary>The first rule this tile breaks, or null when the driver will take it.</summary>
    public string? Problem()
    {
        if ((Address & 15) != 0)
        {
            return $"address 0x{Address:x} is not 16-byte aligned";
        }

        if (Inner <= 0 || Outer <= 0 || Inner > uint.MaxValue || Outer > uint.MaxValue || Planes < 0 || Planes > uint.MaxValue)
        {
            return $"dimensions {Inner} x {Outer}{(Planes != 0 ? $" x {Planes}" : "")} must be from 1 to 2^32";
        }

        if (RowStride % 16 != 0 || RowStride < Inner || RowStride >= 1L << 40)
        {
            return $"row stride {RowStride} B must be a multiple of 16 B, at least the row's {Inner} B and below 2^40";
        }

        if (Planes > 0 && (PlaneStride % 16 != 0 || PlaneStride < RowStride * Outer || PlaneStride >= 1L << 40))
        {
            return $"plane stride {PlaneStride} B must be a multiple of 16 B, at least the matrix's {RowStride * Outer} B and below 2^40";
        }

        if (BoxInner <= 0 || BoxOuter <= 0 || BoxInner > MaxBox || BoxOuter > MaxBox)
        {
            return $"box {BoxInner} x {BoxOuter} must have edges from 1 to {MaxBox}";
        }

        if (BoxInner % 16 != 0)
        {
            return $"box inner extent {BoxInner} B must be a multiple of 16 B";
        }

        if (Swizzle == TmaSwizzle.Swizzle128B && BoxInner > 128)
        {
            return $"box inner extent {BoxInner} B exceeds the 128 B of the 128-byte swizzle";
        }

        return null;
    }

    /// <summary>Throws <see cref="ArgumentException"/> naming <paramref name="what"/> and the rule when <see cref="Problem"/> finds one.</summary>
    public void Check(string what)
    {
        if (Problem() is { } problem)
        {
            throw new ArgumentException($"{what}: not a TMA tile source: {problem}");
        }
    }

    /// <summary>
    /// Encodes the map (uint8 elements, no interleave, zero fill outside the tensor, L2 promotion of 256 B). Needs the CUDA
    /// driver, no context.
    /// </summary>
    public unsafe TensorMap Encode(string what, int device = -1)
    {
        Check(what);
        var map = default(TensorMap);
        var dims = stackalloc ulong[3] { (ulong)Inner, (ulong)Outer, (ulong)Math.Max(1, Planes) };
        var strides = stackalloc ulong[2] { (ulong)RowStride, (ulong)PlaneStride };
        var box = stackalloc uint[3] { (uint)BoxInner, (uint)BoxOuter, 1 };
        var elementStrides = stackalloc uint[3] { 1, 1, 1 };
        const int uint8 = 0, noInterleave = 0, l2Promotion256 = 3, zeroFill = 0;
        var result = CuDriver.cuTensorMapEncodeTiled(&map, uint8, (uint)Rank, Address, dims, strides, box, elementStrides, noInterleave, (int)Swizzle,
            l2Promotion256, zeroFill);
        if (result != CuResult.Success)
        {
            CudaCheck.Driver(result, device, $"cuTensorMapEncodeTiled ({what}: {Inner} x {Outer}{(Planes > 0 ? $" x {Planes}" : "")} B at 0x{Address:x})");
        }

        return map;
    }
}
