using System.Runtime.InteropServices;
using DeepSeekCuda.Cuda;

namespace DeepSeekCuda.Kernels;

/// <summary>Mirror of <c>BackendGlueParams</c> in Kernels/backend_glue.cu.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct BackendGlueParams
{
    public ulong X;
    public ulong Y;
    public ulong Out;
    public ulong Positions;
    public ulong Slots;
    public long N;
    public long XStride;
    public long OutStride;
    public int Rows;
    public int Cols;
    public int ScaleCols;
    public int RingRows;
}

/// <summary>
/// The small elementwise kernels of <c>CudaBackend</c> (Kernels/backend_glue.cu) where a launcher's contract does
/// not fit <c>IBackend</c>: BF16 rounding of f32 storage, f32↔bf16 conversion, strided row copies, FP8 block
/// dequantization to BF16, and step rows gathered from or scattered into a per-slot ring (copies and rings of f32 or
/// bf16 elements).
/// </summary>
internal sealed class BackendGlueKernel(CudaDevice device, NvrtcCompiler compiler) : KernelLauncher(device, compiler, FamilyName)
{
    /// <summary>Kernels/backend_glue.cu.</summary>
    public const string FamilyName = "backend_glue";

    /// <summary>CUDA name of the params struct.</summary>
    public const string ParamsType = "BackendGlueParams";

    /// <summary>Threads per block.</summary>
    public const int Block = 256;

    private const long MaxGrid = 65535;

    private static readonly KernelInstance RoundInstance = new($"glue_round_kernel<{Block}>", ParamsType);
    private static readonly KernelInstance DequantInstance = new($"glue_dequant_kernel<{Block}>", ParamsType);

    /// <summary>The conversion between storage types.</summary>
    public static KernelInstance ConvertInstance(ElementType input, ElementType output) =>
        new($"glue_convert_kernel<{Block}, {Flag(input)}, {Flag(output)}>", ParamsType);

    /// <summary>The strided row copy of one storage type.</summary>
    public static KernelInstance CopyInstance(ElementType type) => new($"glue_copy_kernel<{Block}, {Flag(type)}>", ParamsType);

    /// <summary>The ring gather or scatter of one storage type.</summary>
    public static KernelInstance RingInstance(bool scatter, ElementType type) =>
        new($"glue_ring_kernel<{Block}, {(scatter ? 1 : 0)}, {Flag(type)}>", ParamsType);

    /// <summary>Every specialization the launcher can request.</summary>
    public static IReadOnlyList<KernelInstance> AllInstances() =>
    [
        RoundInstance, DequantInstance, ConvertInstance(ElementType.F32, ElementType.BF16), ConvertInstance(ElementType.BF16, ElementType.F32),
        .. from t in Enum.GetValues<ElementType>() select CopyInstance(t),
        .. from t in Enum.GetValues<ElementType>() from scatter in new[] { false, true } select RingInstance(scatter, t),
    ];

    /// <summary>values[i] = bf16(values[i]) for every element of a dense f32 view, in place.</summary>
    public void Round(CudaStream stream, DeviceRows values)
    {
        var p = RoundParams(values);
        Run(stream, RoundInstance, p.N, p);
    }

    /// <summary>The rounding kernel's arguments: a dense f32 view.</summary>
    public static BackendGlueParams RoundParams(DeviceRows values)
    {
        const string what = "bf16 rounding";
        ViewCheck.Type(values, ElementType.F32, what, nameof(values));
        ViewCheck.Dense(values, what, nameof(values));
        return new BackendGlueParams { Out = values.Pointer, N = (long)values.Rows * values.Cols };
    }

    /// <summary>output[i] = input[i] for every element of two dense views of one shape, converting f32 → bf16 (round to nearest even) or bf16 → f32.</summary>
    public void Convert(CudaStream stream, DeviceRows input, DeviceRows output)
    {
        const string what = "a conversion";
        if (input.Type == output.Type)
        {
            throw new ArgumentException($"{what} needs two different types; both are {input.Type}", nameof(output));
        }

        ViewCheck.Is(output, input.Rows, input.Cols, what, nameof(output), dense: true);
        ViewCheck.Dense(input, what, nameof(input));
        Run(stream, ConvertInstance(input.Type, output.Type), (long)input.Rows * input.Cols, new BackendGlueParams { X = input.Pointer, Out = output.Pointer, N = (long)input.Rows * input.Cols });
    }

    /// <summary>output[r, c] = input[r, c] for two views of one shape and type (strided rows).</summary>
    public void Copy(CudaStream stream, DeviceRows input, DeviceRows output) =>
        Run(stream, CopyInstance(input.Type), (long)input.Rows * input.Cols, CopyParams(input, output));

    /// <summary>The copy kernel's arguments, the views checked against each other.</summary>
    public static BackendGlueParams CopyParams(DeviceRows input, DeviceRows output)
    {
        const string what = "a row copy";
        ViewCheck.Is(output, input.Rows, input.Cols, what, nameof(output), input.Type);
        return new BackendGlueParams { X = input.Pointer, XStride = input.Stride, Out = output.Pointer, OutStride = output.Stride, Rows = input.Rows, Cols = input.Cols };
    }

    /// <summary>output bf16 [Out, In] (dense) = e4m3(codes) × scales[r/128, c/128] of an FP8 weight.</summary>
    public void Dequantize(CudaStream stream, Fp8Linear weight, DeviceRows output) =>
        Run(stream, DequantInstance, (long)weight.Out * weight.In, DequantizeParams(weight, output));

    /// <summary>The dequantization kernel's arguments: the weight's codes and scales into a dense bf16 view of its shape.</summary>
    public static BackendGlueParams DequantizeParams(Fp8Linear weight, DeviceRows output)
    {
        const string what = "FP8 dequantization";
        ViewCheck.Is(output, weight.Out, weight.In, what, nameof(output), ElementType.BF16, dense: true);
        return new BackendGlueParams
        {
            X = weight.W, Y = weight.Scales, Out = output.Pointer, Rows = weight.Out, Cols = weight.In, ScaleCols = Fp8GemmKernel.BlocksFor(weight.In),
        };
    }

    /// <summary>
    /// The rows of <paramref name="rows"/> and their places in <paramref name="ring"/> (<paramref name="ringRows"/> rows per slot):
    /// row r (device int32 <paramref name="slots"/>, <paramref name="positions"/>) at ring row slots[r]·ringRows + positions[r] mod
    /// ringRows, gathered from the ring into rows, or with <paramref name="scatter"/> scattered from rows into the ring.
    /// </summary>
    public void Ring(CudaStream stream, bool scatter, DeviceRows ring, int ringRows, DeviceRows rows, DeviceInts slots, DeviceInts positions) =>
        Run(stream, RingInstance(scatter, rows.Type), (long)rows.Rows * rows.Cols, RingParams(scatter, ring, ringRows, rows, slots, positions));

    /// <summary>The ring kernel's arguments, the views checked against each other.</summary>
    public static BackendGlueParams RingParams(bool scatter, DeviceRows ring, int ringRows, DeviceRows rows, DeviceInts slots, DeviceInts positions)
    {
        const string what = "a ring's rows";
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(ringRows);
        ViewCheck.Type(ring, rows.Type, what, nameof(ring));
        ViewCheck.Dense(ring, what, nameof(ring));
        ViewCheck.Dense(rows, what, nameof(rows));
        if (ring.Cols != rows.Cols || ring.Rows < ringRows)
        {
            throw new ArgumentException($"{what}: a ring [{ring.Rows}, {ring.Cols}] of {ringRows} rows per slot for rows of {rows.Cols}", nameof(ring));
        }

        if (slots.Length != rows.Rows || positions.Length != rows.Rows)
        {
            throw new ArgumentException($"{what}: {slots.Length} slots and {positions.Length} positions for {rows.Rows} rows", nameof(slots));
        }

        return new BackendGlueParams
        {
            X = scatter ? rows.Pointer : ring.Pointer, Out = scatter ? ring.Pointer : rows.Pointer, Slots = slots.Pointer, Positions = positions.Pointer,
            Rows = rows.Rows, Cols = rows.Cols, RingRows = ringRows,
        };
    }

    private void Run(CudaStream stream, KernelInstance instance, long work, in BackendGlueParams p)
    {
        if (work <= 0)
        {
            return;
        }

        // Grid-stride loops: at most 65535 blocks, each thread takes several elements beyond that.
        Get(instance).Launch(new Dim3((uint)Math.Min(MaxGrid, Blocks(work, Block))), Block, 0, stream, in p);
    }
}
