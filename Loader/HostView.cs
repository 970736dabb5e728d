namespace DeepSeekCuda.Loader;

/// <summary>
/// The bytes of one weight as a backend stores them, described rather than copied: a rectangle of one stored tensor
/// (<see cref="Rows"/> runs of <see cref="RowBytes"/>, <see cref="RowStride"/> apart, from byte <see cref="Start"/>; a
/// whole tensor or a band of whole rows is one run), or bytes converted on the host (<see cref="Tensor"/> null). Built
/// by <see cref="WeightReader"/>, which validates what the view covers; read with <see cref="CopyTo"/>, through
/// <see cref="Checkpoint.GetBytes(TensorInfo, long, int)"/> (finite check, read observer), straight out of the mapped shard.
/// </summary>
internal sealed class HostView
{
    private readonly byte[]? _converted;

    private HostView(string name, TensorInfo? tensor, long start, long rowBytes, long rowStride, int rows, byte[]? converted)
    {
        (Name, Tensor, Start, RowBytes, RowStride, Rows, _converted) = (name, tensor, start, rowBytes, rowStride, rows, converted);
    }

    /// <summary>The tensor's name (the one errors and upload plans name).</summary>
    public string Name { get; }

    /// <summary>The stored tensor read, or null for bytes converted on the host.</summary>
    public TensorInfo? Tensor { get; }

    /// <summary>First byte within the tensor.</summary>
    public long Start { get; }

    /// <summary>Bytes of one run.</summary>
    public long RowBytes { get; }

    /// <summary>Bytes from the start of one run to the start of the next.</summary>
    public long RowStride { get; }

    /// <summary>Runs.</summary>
    public int Rows { get; }

    /// <summary>Bytes in the view.</summary>
    public long Length => _converted?.LongLength ?? RowBytes * Rows;

    /// <summary>The whole of <paramref name="tensor"/>.</summary>
    public static HostView Of(TensorInfo tensor)
    {
        ArgumentNullException.ThrowIfNull(tensor);
        return new HostView(tensor.Name, tensor, 0, tensor.ByteLength, tensor.ByteLength, 1, null);
    }

    /// <summary>The rectangle <paramref name="slice"/> of the row-major matrix <paramref name="tensor"/>, row-major.</summary>
    /// <exception cref="ArgumentException">The tensor is not [StoredRows, StoredCols].</exception>
    public static HostView Rectangle(TensorInfo tensor, TensorSlice slice)
    {
        ArgumentNullException.ThrowIfNull(tensor);
        ArgumentNullException.ThrowIfNull(slice);
        if (tensor.Shape.Length != 2 || tensor.Shape[0] != slice.StoredRows || tensor.Shape[1] != slice.StoredCols)
        {
            throw new ArgumentException($"'{tensor.Name}' is {tensor.ShapeText}, not the [{slice.StoredRows}, {slice.StoredCols}] the slice {slice} is of", nameof(slice));
        }

        long size = DTypes.SizeOf(tensor.DType), stride = slice.StoredCols * size;
        var start = (slice.RowStart * (long)slice.StoredCols + slice.ColStart) * size;
        return slice.Cols == slice.StoredCols
            ? new HostView(tensor.Name, tensor, start, slice.Rows * stride, slice.Rows * stride, 1, null)
            : new HostView(tensor.Name, tensor, start, slice.Cols * size, stride, slice.Rows, null);
    }

    /// <summary>Bytes made on the host (a conversion), named after the tensor they came from.</summary>
    public static HostView Converted(string name, byte[] bytes)
    {
        ArgumentNullException.ThrowIfNull(bytes);
        return new HostView(name, null, 0, bytes.LongLength, bytes.LongLength, 1, bytes);
    }

    /// <summary>Where byte <paramref name="offset"/> of the view lies in its shard's data section (what orders the reads of an upload); 0 for converted bytes.</summary>
    public long FileOffset(long offset) =>
        Tensor is null ? 0 : RowBytes == 0 ? Tensor.Begin + Start : Tensor.Begin + Start + offset / RowBytes * RowStride + offset % RowBytes;

    /// <summary>Copies bytes <c>[offset, offset + destination.Length)</c> of the view into <paramref name="destination"/>.</summary>
    /// <exception cref="ArgumentOutOfRangeException">The range leaves the view.</exception>
    public void CopyTo(Checkpoint checkpoint, long offset, Span<byte> destination)
    {
        if (offset < 0 || offset + destination.Length > Length)
        {
            throw new ArgumentOutOfRangeException(nameof(offset), $"[{offset}, {offset + destination.Length}) outside the {Length} bytes of the view of '{Name}'");
        }

        if (_converted is not null)
        {
            _converted.AsSpan((int)offset, destination.Length).CopyTo(destination);
            return;
        }

        ArgumentNullException.ThrowIfNull(checkpoint);
        while (!destination.IsEmpty)
        {
            var inRow = offset % RowBytes;
            var n = (int)Math.Min(RowBytes - inRow, destination.Length);
            checkpoint.GetBytes(Tensor!, Start + offset / RowBytes * RowStride + inRow, n).CopyTo(destination);
            destination = destination[n..];
            offset += n;
        }
    }

    /// <summary>The view's bytes in a new array.</summary>
    public byte[] ToArray(Checkpoint checkpoint)
    {
        var bytes = new byte[Length];
        CopyTo(checkpoint, 0, bytes);
        return bytes;
    }

    /// <inheritdoc />
    public override string ToString() => Tensor is null ? $"{Name} (converted, {Length} bytes)" : $"{Name} ({Length} bytes in {Rows} run(s))";
}
