using System.Collections.Concurrent;
using System.Runtime.InteropServices;
using DeepSeekCuda.Cuda;

namespace DeepSeekCuda.Kernels;

/// <summary>Mirror of <c>AllReduceParams</c> in Kernels/allreduce.cu.</summary>
[StructLayout(LayoutKind.Sequential)]
internal unsafe struct AllReduceParams
{
    /// <summary>Each rank's input pointer, rank order.</summary>
    public fixed ulong Inputs[AllReduceKernel.MaxRanks];

    /// <summary>Each rank's output pointer.</summary>
    public fixed ulong Outputs[AllReduceKernel.MaxRanks];

    /// <summary>Each rank's flag array (u32 [MaxBlocks][3][MaxRanks], then u32 [MaxBlocks] epoch counters; zeroed once).</summary>
    public fixed ulong Flags[AllReduceKernel.MaxRanks];

    /// <summary>This rank's int32 error word.</summary>
    public ulong Error;

    /// <summary>Elements (0: load the kernel and return).</summary>
    public long Count;

    /// <summary>Barrier wait limit in clock64 cycles.</summary>
    public long TimeoutCycles;

    /// <summary>This rank.</summary>
    public int Rank;
}

/// <summary>The two all-reduce kernels.</summary>
internal enum AllReduceAlgorithm
{
    /// <summary>Each rank reads every peer's whole input: lowest latency, for small (decode) messages.</summary>
    OneShot,

    /// <summary>Reduce-scatter then all-gather: about 2·(N−1)/N of the message per rank, for large messages.</summary>
    TwoStep,
}

/// <summary>
/// Launcher of Kernels/allreduce.cu (see its header for the flag protocol). One launch per rank, each on
/// that rank's stream with the same grid; <see cref="Distributed.DeviceMesh"/> drives it. The call numbers the barriers
/// match on are counted on the device, so a launch captured in a CUDA graph is replayed correctly. The sum is float32
/// in rank order, so every rank's output is bit-identical and equals the host reference summed the same way.
/// </summary>
internal sealed class AllReduceKernel(CudaDevice device, NvrtcCompiler compiler) : KernelLauncher(device, compiler, FamilyName)
{
    private readonly ConcurrentDictionary<string, bool> _warm = new(StringComparer.Ordinal);

    /// <summary>Kernels/allreduce.cu.</summary>
    public const string FamilyName = "allreduce";

    /// <summary>CUDA name of the params struct.</summary>
    public const string ParamsType = "AllReduceParams";

    /// <summary>Most ranks (AR_MAX_RANKS).</summary>
    public const int MaxRanks = 8;

    /// <summary>Most blocks per rank (AR_MAX_BLOCKS): sizes the flag arrays.</summary>
    public const int MaxBlocks = 64;

    /// <summary>Barriers per call (entry, mid, exit).</summary>
    public const int Phases = 3;

    /// <summary>Bytes of one rank's flag array: the barrier flags, then one epoch counter per block.</summary>
    public const int FlagBytes = (MaxBlocks * Phases * MaxRanks + MaxBlocks) * sizeof(uint);

    /// <summary>Threads per block.</summary>
    public const int Block = 512;

    /// <summary>Messages up to this many bytes use <see cref="AllReduceAlgorithm.OneShot"/> (decode: 7168 × batch × 2 bytes is 14 KiB per token).</summary>
    public const long OneShotMaxBytes = 512 * 1024;

    /// <summary>Rank counts compiled.</summary>
    public static IReadOnlyList<int> RankCounts => [2, 4, 8];

    /// <summary>The specialization for an algorithm, rank count and payload type.</summary>
    public static KernelInstance Instance(AllReduceAlgorithm algorithm, int ranks, ElementType type) =>
        new($"allreduce_{(algorithm == AllReduceAlgorithm.OneShot ? "oneshot" : "twostep")}<{ranks}, {Flag(type)}, {Block}>", ParamsType);

    /// <summary>Every specialization.</summary>
    public static IReadOnlyList<KernelInstance> AllInstances() =>
    [
        .. from a in new[] { AllReduceAlgorithm.OneShot, AllReduceAlgorithm.TwoStep }
           from r in RankCounts
           from t in new[] { ElementType.F32, ElementType.BF16 }
           select Instance(a, r, t),
    ];

    /// <summary>The algorithm for a message size.</summary>
    public static AllReduceAlgorithm Choose(long bytes) => bytes <= OneShotMaxBytes ? AllReduceAlgorithm.OneShot : AllReduceAlgorithm.TwoStep;

    /// <summary>
    /// Blocks per rank: enough to cover the message, at most <see cref="MaxBlocks"/>, and few enough that the
    /// blocks of all ranks sharing a GPU (<paramref name="ranksPerGpu"/>) are resident together (one per SM).
    /// </summary>
    public static int Grid(int multiprocessors, int ranksPerGpu, long count)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(multiprocessors);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(ranksPerGpu);
        var resident = Math.Max(1, multiprocessors / ranksPerGpu);
        var needed = (int)Math.Min(MaxBlocks, Math.Max(1, (count + Block - 1) / Block));
        return Math.Min(Math.Min(MaxBlocks, resident), needed);
    }

    /// <summary>
    /// Loads the specialization on this device by launching it empty (count 0 returns before any barrier)
    /// and waiting: a lazily loaded kernel must not be loaded while a peer rank's kernel spins. While
    /// <paramref name="capturing"/> a graph, the specialization must already be loaded (nothing can wait then).
    /// </summary>
    public void Prepare(KernelInstance instance, CudaStream stream, bool capturing = false)
    {
        if (_warm.ContainsKey(instance.NameExpression))
        {
            return;
        }

        if (capturing)
        {
            throw new InvalidOperationException(
                $"the all-reduce kernel {instance.NameExpression} has not run before the graph capture (its first run loads it and waits): run the captured work once before capturing it");
        }

        var p = default(AllReduceParams);
        Get(instance).Launch(new Dim3(1), Block, 0, stream, in p);
        stream.Synchronize();
        _warm[instance.NameExpression] = true;
    }

    /// <summary>Queues one rank's part of an all-reduce (<paramref name="parameters"/> filled by the mesh).</summary>
    public void Launch(CudaStream stream, AllReduceAlgorithm algorithm, int ranks, ElementType type, int grid, in AllReduceParams parameters)
    {
        if (!RankCounts.Contains(ranks))
        {
            throw new ArgumentOutOfRangeException(nameof(ranks), ranks, $"the all-reduce kernels are compiled for {string.Join(", ", RankCounts)} ranks");
        }

        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(grid);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(grid, MaxBlocks);
        Get(Instance(algorithm, ranks, type)).Launch(new Dim3((uint)grid), Block, 0, stream, in parameters);
    }
}
