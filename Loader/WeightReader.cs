using System.Runtime.InteropServices;
using DeepSeekCuda.Loader.Numerics;

namespace DeepSeekCuda.Loader;

/// <summary>An FP8 weight as the FP8 kernels take it: e4m3 codes [Rows, Cols] and the block scales on the weight's own grid.</summary>
/// <param name="Codes">The codes, row-major.</param>
/// <param name="Scales">The F32 scales [⌈Rows/BlockRows⌉, ⌈Cols/BlockCols⌉], row-major.</param>
/// <param name="Rows">Rows of the weight (of the slice, for a slice).</param>
/// <param name="Cols">Columns of the weight.</param>
/// <param name="BlockRows">Rows of a scale block (the config's <c>weight_block_size</c>, 128 by default).</param>
/// <param name="BlockCols">Columns of a scale block.</param>
internal sealed record Fp8View(HostView Codes, HostView Scales, int Rows, int Cols, int BlockRows, int BlockCols);

/// <summary>
/// The one way backends read weights out of a checkpoint: each call checks the tensor's shape and type against what
/// the model needs (naming the tensor), and yields either host views of the stored bytes the device backends upload
/// as they are (FP8 codes and block scales, re-gridded exactly for a slice; BF16 bits; F32), or the float32 values
/// the CPU backend computes with. Nothing here is backend-specific; a backend's own limits (the CUDA kernels' 128x128
/// scale blocks) stay with the backend.
/// </summary>
internal static class WeightReader
{
    /// <summary>The tensor <paramref name="name"/>, checked to have <paramref name="shape"/>.</summary>
    /// <exception cref="CheckpointException">It is missing or has another shape.</exception>
    public static TensorInfo Require(Checkpoint checkpoint, string name, params int[] shape)
    {
        ArgumentNullException.ThrowIfNull(checkpoint);
        var info = checkpoint.Get(name);
        if (info.Shape.Length != shape.Length || !info.Shape.Select(s => (int)s).SequenceEqual(shape))
        {
            throw new CheckpointException(
                $"{checkpoint.Directory}: tensor '{name}' has shape {info.ShapeText}, the model needs {TensorInfo.FormatShape(shape.Select(s => (long)s))}",
                checkpoint.Directory, name);
        }

        return info;
    }

    /// <summary>
    /// The e4m3 codes and block scales of <paramref name="spec"/>: the stored tensors, or for a slice its rectangle of
    /// codes and the scales of the stored blocks it covers, which are exactly its own grid's scales when, in rows and
    /// in columns, the slice starts on a block edge or lies inside one stored block (nothing is requantized).
    /// </summary>
    /// <param name="checkpoint">The checkpoint.</param>
    /// <param name="spec">The weight, possibly a slice.</param>
    /// <param name="user">Who takes the weight, for the messages (<c>"the FP8 GEMM kernels"</c>).</param>
    /// <exception cref="CheckpointException">The weight or its scale grid is missing or misshapen.</exception>
    /// <exception cref="NotSupportedException">The weight is not e4m3, the scales are not F32, or the slice cuts scale blocks in a way its own grid cannot express.</exception>
    public static Fp8View Fp8(Checkpoint checkpoint, LinearSpec spec, string user)
    {
        ArgumentNullException.ThrowIfNull(spec);
        var (rows, cols) = spec.StoredShape;
        var info = Require(checkpoint, spec.Weight, rows, cols);
        if (info.DType != DType.F8_E4M3)
        {
            throw new NotSupportedException($"'{spec.Weight}' is {info.DType}: {user} take FP8 e4m3 weights only");
        }

        var block = checkpoint.Config.Quantization ?? Fp8Quantization.Default;
        var (br, bc) = (block.BlockRows, block.BlockCols);
        int gridRows = CheckpointLayout.CeilDiv(rows, br), gridCols = CheckpointLayout.CeilDiv(cols, bc);
        var scale = Require(checkpoint, spec.Scale, gridRows, gridCols);
        if (scale.DType != DType.F32)
        {
            throw new NotSupportedException($"'{spec.Scale}' is {scale.DType}; {user} take F32 block scales");
        }

        if (spec.Slice is not { IsWhole: false } slice)
        {
            return new Fp8View(HostView.Of(info), HostView.Of(scale), rows, cols, br, bc);
        }

        var firstRow = FirstBlock(slice.RowStart, slice.Rows, br, "rows");
        var firstCol = FirstBlock(slice.ColStart, slice.Cols, bc, "columns");
        var grid = new TensorSlice(gridRows, gridCols, firstRow, CheckpointLayout.CeilDiv(slice.Rows, br), firstCol, CheckpointLayout.CeilDiv(slice.Cols, bc));
        return new Fp8View(HostView.Rectangle(info, slice), HostView.Rectangle(scale, grid), slice.Rows, slice.Cols, br, bc);

        int FirstBlock(int start, int count, int b, string what)
        {
            if (start % b != 0 && start / b != (start + count - 1) / b)
            {
                throw new NotSupportedException(
                    $"'{spec.Weight}' slice {slice}: its {what} start at {start}, inside a {b}-wide FP8 scale block, and cross into the next; the {br}x{bc} scale grid cannot express that slice without requantizing");
            }

            return start / b;
        }
    }

    /// <summary>
    /// <paramref name="name"/> (or its <paramref name="slice"/>) as BF16 bits: the stored bytes when the checkpoint stores
    /// BF16, otherwise the values converted on the host, only if every one is exactly a BF16.
    /// </summary>
    /// <param name="checkpoint">The checkpoint.</param>
    /// <param name="name">The tensor.</param>
    /// <param name="slice">A rectangle of it, or null for all of it.</param>
    /// <param name="user">Who takes the weight as BF16, for the message.</param>
    /// <param name="shape">The stored shape the model needs.</param>
    /// <exception cref="CheckpointException">The tensor is missing or misshapen.</exception>
    /// <exception cref="NotSupportedException">A value is not exactly a BF16 (<paramref name="user"/> would round it).</exception>
    public static HostView Bf16(Checkpoint checkpoint, string name, TensorSlice? slice, string user, params int[] shape)
    {
        var info = Require(checkpoint, name, shape);
        if (info.DType == DType.BF16)
        {
            return slice is { IsWhole: false } ? HostView.Rectangle(info, slice) : HostView.Of(info);
        }

        var values = checkpoint.ReadFloat32(name);
        var bits = new ushort[values.Length];
        for (var i = 0; i < values.Length; i++)
        {
            bits[i] = BFloat16.FromFloat(values[i]);
            if (BFloat16.ToFloat(bits[i]) != values[i] && !float.IsNaN(values[i]))
            {
                throw new NotSupportedException($"'{name}' is {info.DType} with values that are not BF16 (element {i}: {values[i]}); {user} take this weight as BF16 and would round it");
            }
        }

        var taken = slice is { IsWhole: false } ? slice.Extract<ushort>(bits) : bits;
        return HostView.Converted(name, MemoryMarshal.AsBytes(taken.AsSpan()).ToArray());
    }

    /// <summary><paramref name="name"/> as F32: the stored bytes when it is F32, otherwise its values widened on the host.</summary>
    /// <exception cref="CheckpointException">The tensor is missing, misshapen, or not a floating-point type.</exception>
    public static HostView F32(Checkpoint checkpoint, string name, params int[] shape)
    {
        var info = Require(checkpoint, name, shape);
        return info.DType == DType.F32
            ? HostView.Of(info)
            : HostView.Converted(name, MemoryMarshal.AsBytes(checkpoint.ReadFloat32(name).AsSpan()).ToArray());
    }

    /// <summary><paramref name="name"/>'s values as float32 (see <see cref="Checkpoint.ReadFloat32(string)"/>), checked to have <paramref name="shape"/>.</summary>
    public static float[] Float32(Checkpoint checkpoint, string name, params int[] shape)
    {
        Require(checkpoint, name, shape);
        return checkpoint.ReadFloat32(name);
    }

    /// <summary>
    /// The values <paramref name="spec"/> denotes, as float32 [Out, In]: an FP8 weight dequantized with its block
    /// scales, any other type widened; for a slice, the rectangle of the whole weight's values (so also a slice that
    /// cuts scale blocks, which the CPU can take).
    /// </summary>
    public static float[] Float32(Checkpoint checkpoint, LinearSpec spec)
    {
        ArgumentNullException.ThrowIfNull(spec);
        var (rows, cols) = spec.StoredShape;
        var stored = Float32(checkpoint, spec.Weight, rows, cols);
        return spec.Slice is { IsWhole: false } slice ? slice.Extract(stored) : stored;
    }
}
