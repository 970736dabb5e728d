using System.Runtime.InteropServices;
using DeepSeekCuda.Cuda;

namespace DeepSeekCuda.Kernels;

/// <summary>Mirror of <c>TokenChoiceRow</c> in Kernels/sampling.cu: one row's settings.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct TokenChoiceRow
{
    public int VocabLimit;
    public float Temperature;
    public int TopK;
    public float TopP;
    public ulong Seed;
    public ulong Draw;
    public int AllowedRow;
    public int Pad0;
}

/// <summary>Mirror of <c>SamplingParams</c> in Kernels/sampling.cu.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct SamplingParams
{
    public ulong Logits;
    public ulong Choices;
    public ulong Allowed;
    public ulong OutIds;
    public long LogitsStride;
    public long AllowedStride;
    public int Rows;
    public int Pad0;
}

/// <summary>
/// Token choice on the device, one block per row of logits, each row under its own <see cref="TokenChoiceRow"/>: greedy
/// (argmax, lowest index on ties) or a seeded temperature/top-k/top-p draw, among the ids its mask allows when it has one,
/// writing int32 ids (−1: a row not chosen there, or one that cannot be sampled). The rule is the CPU backend's
/// (Engine/Backends/TokenChoice.cs).
/// </summary>
internal sealed class SamplingKernel(CudaDevice device, NvrtcCompiler compiler) : KernelLauncher(device, compiler, FamilyName)
{
    /// <summary>Kernels/sampling.cu.</summary>
    public const string FamilyName = "sampling";

    /// <summary>CUDA name of the params struct.</summary>
    public const string ParamsType = "SamplingParams";

    /// <summary>CUDA name of a row's settings.</summary>
    public const string RowType = "TokenChoiceRow";

    /// <summary>Threads per block (one row per block).</summary>
    public const int Block = 1024;

    /// <summary>The one specialization.</summary>
    public static KernelInstance Choose => new($"choose_kernel<{Block}>", ParamsType);

    /// <summary>Every specialization the launcher can request.</summary>
    public static IReadOnlyList<KernelInstance> AllInstances() => [Choose];

    /// <summary>
    /// Chooses one id per row of <paramref name="logits"/> (f32) under <paramref name="choices"/> (a device
    /// <see cref="TokenChoiceRow"/> per row) into <paramref name="ids"/>; a row whose <see cref="TokenChoiceRow.AllowedRow"/> is
    /// m ≥ 0 chooses among the ids set in row m of <paramref name="allowed"/> [masks, <paramref name="allowedWords"/> u64 words]
    /// (0 when no row has one).
    /// </summary>
    public void Launch(CudaStream stream, DeviceRows logits, ulong choices, DeviceInts ids, ulong allowed = 0, long allowedWords = 0)
    {
        var p = Params(logits, choices, ids, allowed, allowedWords);
        if (p.Rows == 0)
        {
            return;
        }

        Get(Choose).Launch(new Dim3((uint)p.Rows), Block, 0, stream, in p);
    }

    /// <summary>The kernel's arguments for one call, the views checked against each other.</summary>
    public static SamplingParams Params(DeviceRows logits, ulong choices, DeviceInts ids, ulong allowed, long allowedWords)
    {
        const string what = "token choice";
        ViewCheck.Type(logits, ElementType.F32, what, nameof(logits));
        ViewCheck.Wide(logits, what, nameof(logits));
        ArgumentOutOfRangeException.ThrowIfNegative(allowedWords);
        if (ids.Length != logits.Rows)
        {
            throw new ArgumentException($"{what}: {ids.Length} ids for {logits.Rows} rows of logits", nameof(ids));
        }

        return new SamplingParams
        {
            Logits = logits.Pointer, Choices = choices, Allowed = allowed, OutIds = ids.Pointer, LogitsStride = logits.Stride, AllowedStride = 2 * allowedWords,
            Rows = logits.Rows,
        };
    }
}
