namespace DeepSeekCuda.Kernels;

/// <summary>Sizes of the storage types.</summary>
internal static class ElementTypes
{
    /// <summary>Bytes of one element of <paramref name="type"/>.</summary>
    public static int Bytes(this ElementType type) => type == ElementType.F32 ? sizeof(float) : sizeof(ushort);
}

/// <summary>
/// A device matrix as a kernel reads or writes it: <see cref="Rows"/> rows of <see cref="Cols"/> elements of
/// <see cref="Type"/>, row r at <see cref="Pointer"/> + r·<see cref="Stride"/> elements. Launchers take these instead of
/// a pointer, a type, a row count, a width and a stride each, and check that the views of one call agree before
/// anything is launched. A view owns nothing.
/// </summary>
internal readonly record struct DeviceRows
{
    /// <summary>A view of <paramref name="rows"/> × <paramref name="cols"/> elements; <paramref name="stride"/> -1 means dense rows.</summary>
    public DeviceRows(ulong pointer, ElementType type, int rows, int cols, long stride = -1)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(rows);
        ArgumentOutOfRangeException.ThrowIfNegative(cols);
        stride = stride < 0 ? cols : stride;
        if (stride < cols)
        {
            throw new ArgumentOutOfRangeException(nameof(stride), stride, $"rows of {cols} elements overlap at a stride of {stride}");
        }

        Pointer = pointer;
        Type = type;
        Rows = rows;
        Cols = cols;
        Stride = stride;
    }

    /// <summary>Address of element [0, 0].</summary>
    public ulong Pointer { get; }

    /// <summary>The storage type.</summary>
    public ElementType Type { get; }

    /// <summary>Rows.</summary>
    public int Rows { get; }

    /// <summary>Elements per row.</summary>
    public int Cols { get; }

    /// <summary>Elements from one row to the next.</summary>
    public long Stride { get; }

    /// <summary>Whether the rows follow each other with no gap.</summary>
    public bool IsDense => Stride == Cols;

    /// <summary>Address of row <paramref name="row"/>.</summary>
    public ulong Row(long row) => Pointer + (ulong)(row * Stride * Type.Bytes());

    /// <summary>Rows <paramref name="first"/> .. + <paramref name="rows"/> − 1 of this view.</summary>
    public DeviceRows Slice(int first, int rows)
    {
        if (first < 0 || rows < 0 || first + rows > Rows)
        {
            throw new ArgumentOutOfRangeException(nameof(rows), $"rows {first}..{first + rows - 1} of a view of {Rows}");
        }

        return new DeviceRows(Row(first), Type, rows, Cols, Stride);
    }

    /// <summary>Columns <paramref name="first"/> .. + <paramref name="cols"/> − 1 of every row (the stride kept).</summary>
    public DeviceRows Columns(int first, int cols)
    {
        if (first < 0 || cols < 0 || first + cols > Cols)
        {
            throw new ArgumentOutOfRangeException(nameof(cols), $"columns {first}..{first + cols - 1} of a view of {Cols}");
        }

        return new DeviceRows(Pointer + (ulong)((long)first * Type.Bytes()), Type, Rows, cols, Stride);
    }

    /// <summary>A bf16 vector of <paramref name="length"/> elements (a norm weight) as one row.</summary>
    public static DeviceRows Bf16Vector(ulong pointer, int length) => new(pointer, ElementType.BF16, 1, length);

    /// <inheritdoc />
    public override string ToString() => $"{Type} [{Rows}, {Cols}]{(IsDense ? "" : $" stride {Stride}")} at 0x{Pointer:x}";
}

/// <summary>
/// Activations quantized to FP8 e4m3 per row per 128 channels (<see cref="ActQuantKernel"/>): codes [Rows, Cols] bytes,
/// fp32 scales [Rows, ⌈Cols/128⌉], each with its own row stride in elements.
/// </summary>
internal readonly record struct Fp8Rows
{
    /// <summary>A view of <paramref name="rows"/> quantized rows of <paramref name="cols"/> channels; strides -1 mean dense.</summary>
    public Fp8Rows(ulong codes, ulong scales, int rows, int cols, long codesStride = -1, long scalesStride = -1)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(rows);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(cols);
        var groups = ActQuantKernel.GroupsFor(cols);
        codesStride = codesStride < 0 ? cols : codesStride;
        scalesStride = scalesStride < 0 ? groups : scalesStride;
        if (codesStride < cols || scalesStride < groups)
        {
            throw new ArgumentOutOfRangeException(nameof(codesStride), $"rows of {cols} codes and {groups} scales overlap at strides {codesStride} and {scalesStride}");
        }

        Codes = codes;
        Scales = scales;
        Rows = rows;
        Cols = cols;
        CodesStride = codesStride;
        ScalesStride = scalesStride;
    }

    /// <summary>Address of the first row's codes.</summary>
    public ulong Codes { get; }

    /// <summary>Address of the first row's scales.</summary>
    public ulong Scales { get; }

    /// <summary>Rows.</summary>
    public int Rows { get; }

    /// <summary>Channels per row.</summary>
    public int Cols { get; }

    /// <summary>Codes (bytes) from one row to the next.</summary>
    public long CodesStride { get; }

    /// <summary>Scales (floats) from one row to the next.</summary>
    public long ScalesStride { get; }

    /// <summary>Scales per row: one per 128 channels.</summary>
    public int Groups => ActQuantKernel.GroupsFor(Cols);

    /// <inheritdoc />
    public override string ToString() => $"e4m3 [{Rows}, {Cols}] at 0x{Codes:x} (scales at 0x{Scales:x})";
}

/// <summary>One FP8 e4m3 linear weight on the device: codes [Out, In] and fp32 weight_scale_inv [⌈Out/128⌉, ⌈In/128⌉].</summary>
/// <param name="W">Codes.</param>
/// <param name="Scales">Block scales.</param>
/// <param name="Out">Output features (rows).</param>
/// <param name="In">Input features (columns).</param>
internal readonly record struct Fp8Linear(ulong W, ulong Scales, int Out, int In);

/// <summary>A device array of <paramref name="Length"/> int32 values (token ids, positions, expert indices).</summary>
/// <param name="Pointer">Address of the first value.</param>
/// <param name="Length">Values.</param>
internal readonly record struct DeviceInts(ulong Pointer, int Length)
{
    /// <summary>Values <paramref name="first"/> .. + <paramref name="length"/> − 1 of this array.</summary>
    public DeviceInts Slice(int first, int length)
    {
        if (first < 0 || length < 0 || first + length > Length)
        {
            throw new ArgumentOutOfRangeException(nameof(length), $"values {first}..{first + length - 1} of an array of {Length}");
        }

        return new DeviceInts(Pointer + (ulong)((long)first * sizeof(int)), length);
    }
}

/// <summary>
/// A routing on the device: for each of <paramref name="Tokens"/> tokens, <paramref name="K"/> expert ids int32 [Tokens, K]
/// (best first) and their weights f32 [Tokens, K].
/// </summary>
/// <param name="Indices">Address of the expert ids.</param>
/// <param name="Weights">Address of the weights.</param>
/// <param name="Tokens">Tokens.</param>
/// <param name="K">Experts per token.</param>
internal readonly record struct DeviceRouting(ulong Indices, ulong Weights, int Tokens, int K)
{
    /// <summary>Tokens <paramref name="first"/> .. + <paramref name="tokens"/> − 1 of this routing.</summary>
    public DeviceRouting Slice(int first, int tokens)
    {
        if (first < 0 || tokens < 0 || first + tokens > Tokens)
        {
            throw new ArgumentOutOfRangeException(nameof(tokens), $"tokens {first}..{first + tokens - 1} of a routing of {Tokens}");
        }

        var offset = (ulong)((long)first * K * sizeof(int));
        return new DeviceRouting(Indices + offset, Weights + offset, tokens, K);
    }
}

/// <summary>
/// The paged latent cache as the MLA kernels address it (<see cref="PagedLatentCache"/>): bf16 rows in blocks of
/// <see cref="PagedLatentCache.BlockSize"/> at <paramref name="Cache"/>, and the block table int32 [requests,
/// <paramref name="MaxBlocks"/>] at <paramref name="BlockTable"/> mapping a request's block index to a cache block.
/// </summary>
/// <param name="Cache">Address of block 0.</param>
/// <param name="BlockTable">Address of the block table.</param>
/// <param name="MaxBlocks">Entries per request in the block table.</param>
internal readonly record struct LatentPages(ulong Cache, ulong BlockTable, int MaxBlocks);

/// <summary>The checks launchers make of the views of one call, each naming the argument that disagrees.</summary>
internal static class ViewCheck
{
    /// <summary>
    /// Throws unless <paramref name="view"/> is of <paramref name="type"/> (when given), has <paramref name="rows"/> rows of
    /// <paramref name="cols"/> elements, and (when <paramref name="dense"/>) has dense rows; checked in that order.
    /// </summary>
    public static void Is(in DeviceRows view, int rows, int cols, string what, string name, ElementType? type = null, bool dense = false)
    {
        if (type is { } t)
        {
            Type(view, t, what, name);
        }

        if (view.Rows != rows || view.Cols != cols)
        {
            throw new ArgumentException($"{what}: {name} is [{view.Rows}, {view.Cols}], expected [{rows}, {cols}]", name);
        }

        if (dense)
        {
            Dense(view, what, name);
        }
    }

    /// <summary>Throws unless <paramref name="view"/> is of <paramref name="type"/>.</summary>
    public static void Type(in DeviceRows view, ElementType type, string what, string name)
    {
        if (view.Type != type)
        {
            throw new ArgumentException($"{what}: {name} is {view.Type}, expected {type}", name);
        }
    }

    /// <summary>Throws unless <paramref name="view"/>'s rows are dense (the kernel reads it without a stride).</summary>
    public static void Dense(in DeviceRows view, string what, string name)
    {
        if (!view.IsDense)
        {
            throw new ArgumentException($"{what}: {name} must be dense (rows of {view.Cols}, stride {view.Stride})", name);
        }
    }

    /// <summary>Throws unless <paramref name="routing"/> holds <paramref name="tokens"/> tokens of <paramref name="k"/> experts each.</summary>
    public static void Routing(in DeviceRouting routing, int tokens, int k, string what)
    {
        if (routing.Tokens != tokens || routing.K != k)
        {
            throw new ArgumentException($"{what}: a routing of {routing.Tokens} tokens x {routing.K} for {tokens} tokens x {k}", nameof(routing));
        }
    }

    /// <summary>Throws unless <paramref name="view"/> has columns (the kernels' width is never 0).</summary>
    public static void Wide(in DeviceRows view, string what, string name)
    {
        if (view.Cols == 0)
        {
            throw new ArgumentException($"{what}: {name} has no columns", name);
        }
    }

    /// <summary>A bf16 weight of <paramref name="rows"/> × <paramref name="cols"/>, dense, not empty.</summary>
    public static void Bf16Weight(in DeviceRows view, int rows, int cols, string what, string name)
    {
        Is(view, rows, cols, what, name, ElementType.BF16);
        Wide(view, what, name);
        Dense(view, what, name);
        if (view.Rows == 0)
        {
            throw new ArgumentException($"{what}: {name} has no rows", name);
        }
    }
}
