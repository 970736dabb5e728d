using System.Runtime.InteropServices;
using DeepSeekCuda.Cuda;

namespace DeepSeekCuda.Kernels;

/// <summary>Mirror of <c>SiluMulParams</c> in Kernels/silu_mul.cu.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct SiluMulParams
{
    public ulong Gate;
    public ulong Up;
    public ulong Out;
    public long GateStride;
    public long UpStride;
    public long OutStride;
    public int Rows;
    public int Cols;
}

/// <summary><c>out = silu(gate) · up</c> elementwise in fp32 (the MLP's SwiGLU).</summary>
internal sealed class SiluMulKernel(CudaDevice device, NvrtcCompiler compiler) : KernelLauncher(device, compiler, FamilyName)
{
    /// <summary>Kernels/silu_mul.cu.</summary>
    public const string FamilyName = "silu_mul";

    /// <summary>CUDA name of the params struct.</summary>
    public const string ParamsType = "SiluMulParams";

    /// <summary>Threads per block.</summary>
    public const int Block = 256;

    /// <summary>The specialization for the types; <paramref name="round"/> (f32 output holding bf16 values) exists for f32 in and out only.</summary>
    public static KernelInstance Instance(ElementType input, ElementType output, bool round = false) =>
        new($"silu_mul_kernel<{Block}, {Flag(input)}, {Flag(output)}, {(round ? 1 : 0)}>", ParamsType);

    /// <summary>Every specialization the launcher can request.</summary>
    public static IReadOnlyList<KernelInstance> AllInstances() =>
        [.. from i in Enum.GetValues<ElementType>() from o in Enum.GetValues<ElementType>() select Instance(i, o), Instance(ElementType.F32, ElementType.F32, round: true)];

    /// <summary>
    /// out[r, c] = silu(gate[r, c]) · up[r, c]. For a fused [rows, 2·cols] gate|up tensor pass
    /// <c>up = gate + cols</c> elements and both strides 2·cols. <paramref name="round"/> (f32 in and out): out rounded to bf16 values.
    /// </summary>
    public void Launch(CudaStream stream, ulong gate, ulong up, ElementType inType, ulong output, ElementType outType, int rows, int cols,
        long gateStride = -1, long upStride = -1, long outStride = -1, bool round = false)
    {
        RequireF32IfRounded(round, inType, outType, "SiLU·up");

        if (rows <= 0 || cols <= 0)
        {
            return;
        }

        if (rows > 65535)
        {
            throw new ArgumentOutOfRangeException(nameof(rows), "grid.y holds at most 65535 rows; split the call");
        }

        var p = new SiluMulParams
        {
            Gate = gate, Up = up, Out = output,
            GateStride = gateStride < 0 ? cols : gateStride, UpStride = upStride < 0 ? cols : upStride, OutStride = outStride < 0 ? cols : outStride,
            Rows = rows, Cols = cols,
        };
        Get(Instance(inType, outType, round)).Launch(new Dim3(Blocks(cols, Block), (uint)rows), Block, 0, stream, in p);
    }
}
