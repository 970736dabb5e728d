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

    /// <summary>values[i] = bf16(values[i]) for <paramref name="n"/> f32 values, in place.</summary>
    public void Round(CudaStream stream, ulong values, long n) => Run(stream, RoundInstance, n, new BackendGlueParams { Out = values, N = n });

    /// <summary>output[i] = input[i] for every element of two dense views of one shape, converting f32 → bf16 (round to nearest even) or bf16 → f32.</summary>
    public void Convert(CudaStream stream, DeviceRows input, DeviceRows output)
    {
        const string what = "a conversion";
        if (input.Type == output.Type)
        {
            throw new ArgumentException($"{what} needs two different types; both are {input.Type}", nameof(output));
        }

        ViewCheck.Shape(output, input.Rows, input.Cols, what, nameof(output));
        ViewCheck.Dense(input, what, nameof(input));
        ViewCheck.Dense(output, what, nameof(output));
        Run(stream, ConvertInstance(input.Type, output.Type), (long)input.Rows * input.Cols, new BackendGlueParams { X = input.Pointer, Out = output.Pointer, N = (long)input.Rows * input.Cols });
    }

    /// <summary>output[r, c] = input[r, c] for two views of one shape and type (strided rows).</summary>
    public void Copy(CudaStream stream, DeviceRows input, DeviceRows output) =>
        Run(stream, CopyInstance(input.Type), (long)input.Rows * input.Cols, CopyParams(input, output));

    /// <summary>The copy kernel's arguments, the views checked against each other.</summary>
    public static BackendGlueParams CopyParams(DeviceRows input, DeviceRows output)
    {
        const string what = "a row copy";
        ViewCheck.Shape(output, input.Rows, input.Cols, what, nameof(output));
        ViewCheck.Type(output, input.Type, what, nameof(output));
        return new BackendGlueParams { X = input.Pointer, XStride = input.Stride, Out = output.Pointer, OutStride = output.Stride, Rows = input.Rows, Cols = input.Cols };
    }

    /// <summary>output bf16 [rows, cols] = e4m3(codes) × scales[r/128, c/128] (scales f32 [⌈rows/128⌉, ⌈cols/128⌉]).</summary>
    public void Dequantize(CudaStream stream, ulong codes, ulong scales, int rows, int cols, ulong output) =>
        Run(stream, DequantInstance, (long)rows * cols, new BackendGlueParams
        {
            X = codes, Y = scales, Out = output, Rows = rows, Cols = cols, ScaleCols = (cols + 127) / 128,
        });

    /// <summary>
    /// <paramref name="count"/> × cols elements of <paramref name="type"/> between <paramref name="rows"/> and <paramref name="ring"/>,
    /// row r (device int32 <paramref name="slots"/>, <paramref name="positions"/>) at ring row slots[r]·ringRows + positions[r] mod
    /// ringRows: gathered from the ring into rows, or with <paramref name="scatter"/> scattered from rows into the ring.
    /// </summary>
    public void Ring(CudaStream stream, bool scatter, ElementType type, ulong ring, ulong rows, ulong slots, ulong positions, int count, int cols,
        int ringRows) =>
        Run(stream, RingInstance(scatter, type), (long)count * cols, new BackendGlueParams
        {
            X = scatter ? rows : ring, Out = scatter ? ring : rows, Slots = slots, Positions = positions, Rows = count, Cols = cols, RingRows = ringRows,
        });

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
