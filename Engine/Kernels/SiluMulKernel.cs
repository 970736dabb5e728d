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
    /// out[r, c] = silu(gate[r, c]) · up[r, c]. For a fused [rows, 2·cols] gate|up tensor pass its two column halves
    /// (<see cref="DeviceRows.Columns"/>). <paramref name="round"/> (f32 in and out): out rounded to bf16 values.
    /// </summary>
    public void Launch(CudaStream stream, DeviceRows gate, DeviceRows up, DeviceRows output, bool round = false)
    {
        var p = Params(gate, up, output, round);
        if (p.Rows == 0)
        {
            return;
        }

        Get(Instance(gate.Type, output.Type, round)).Launch(new Dim3(Blocks(p.Cols, Block), (uint)p.Rows), Block, 0, stream, in p);
    }

    /// <summary>The kernel's arguments for one call, the views checked against each other.</summary>
    public static SiluMulParams Params(DeviceRows gate, DeviceRows up, DeviceRows output, bool round)
    {
        const string what = "SiLU·up";
        RequireF32IfRounded(round, gate.Type, output.Type, what);
        ViewCheck.Is(up, gate.Rows, gate.Cols, what, nameof(up), gate.Type);
        ViewCheck.Is(output, gate.Rows, gate.Cols, what, nameof(output));
        if (gate.Rows > 65535)
        {
            throw new ArgumentOutOfRangeException(nameof(gate), gate.Rows, "grid.y holds at most 65535 rows; split the call");
        }

        return new SiluMulParams
        {
            Gate = gate.Pointer, Up = up.Pointer, Out = output.Pointer,
            GateStride = gate.Stride, UpStride = up.Stride, OutStride = output.Stride,
            Rows = gate.Rows, Cols = gate.Cols,
        };
    }
}
