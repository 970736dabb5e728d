namespace DeepSeekCuda.Cuda.Inspection;

/// <summary>
/// The per-SM and per-block limits of one compile target that decide whether and how many blocks of a
/// kernel fit on a multiprocessor (CUDA C Programming Guide, technical specifications per compute
/// capability). Registers are allocated per warp in units of 256; every block also reserves 1 KiB of
/// shared memory for the system.
/// </summary>
/// <param name="Arch">The target, e.g. <c>sm_90a</c>.</param>
/// <param name="MaxWarpsPerSm">Resident warps per SM.</param>
/// <param name="MaxBlocksPerSm">Resident blocks per SM.</param>
/// <param name="RegistersPerSm">32-bit registers per SM.</param>
/// <param name="SharedPerSm">Shared memory per SM available to blocks (bytes).</param>
/// <param name="MaxSharedPerBlock">Shared memory one block may opt in to (static + dynamic, bytes).</param>
/// <param name="HasFp8MmaSync">Whether the hardware runs FP8 <c>mma.sync</c> (else ptxas emulates it).</param>
internal sealed record ArchLimits(
    string Arch, int MaxWarpsPerSm, int MaxBlocksPerSm, int RegistersPerSm, int SharedPerSm, int MaxSharedPerBlock, bool HasFp8MmaSync)
{
    /// <summary>Static shared memory per block on every target (larger needs dynamic shared memory).</summary>
    public const int MaxStaticSharedPerBlock = 48 * 1024;

    /// <summary>Shared memory the system reserves per resident block.</summary>
    public const int ReservedSharedPerBlock = 1024;

    /// <summary>Register allocation unit per warp.</summary>
    public const int RegisterUnitPerWarp = 256;

    private static readonly ArchLimits[] Known =
    [
        new("sm_80", 64, 32, 65536, 164 * 1024, 163 * 1024, HasFp8MmaSync: false),
        new("sm_86", 48, 16, 65536, 100 * 1024, 99 * 1024, HasFp8MmaSync: false),
        new("sm_89", 48, 24, 65536, 100 * 1024, 99 * 1024, HasFp8MmaSync: true),
        new("sm_90", 64, 32, 65536, 228 * 1024, 227 * 1024, HasFp8MmaSync: false),
        new("sm_90a", 64, 32, 65536, 228 * 1024, 227 * 1024, HasFp8MmaSync: false),
        new("sm_120", 48, 32, 65536, 100 * 1024, 99 * 1024, HasFp8MmaSync: true),
    ];

    /// <summary>Whether <paramref name="arch"/> has a table entry (<see cref="For"/> does not throw).</summary>
    public static bool IsKnown(string arch) => Known.Any(k => k.Arch == arch);

    /// <summary>The limits of <paramref name="arch"/>; throws for a target without a table entry.</summary>
    public static ArchLimits For(string arch) =>
        Known.FirstOrDefault(k => k.Arch == arch)
        ?? throw new ArgumentException($"no resource limits known for target '{arch}' (known: {string.Join(", ", Known.Select(k => k.Arch))})", nameof(arch));

    /// <summary>
    /// Blocks of one kernel resident per SM, and which resource limits it (<c>warps</c>, <c>registers</c>,
    /// <c>shared</c> or <c>blocks</c>); 0 when one block does not fit at all.
    /// </summary>
    public (int Blocks, string Limiter) ResidentBlocks(int threadsPerBlock, int registersPerThread, int sharedPerBlock)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(threadsPerBlock);
        var warps = (threadsPerBlock + 31) / 32;
        var candidates = new List<(int Blocks, string Limiter)> { (MaxBlocksPerSm, "blocks"), (MaxWarpsPerSm / warps, "warps") };
        if (registersPerThread > 0)
        {
            var perWarp = (registersPerThread * 32 + RegisterUnitPerWarp - 1) / RegisterUnitPerWarp * RegisterUnitPerWarp;
            candidates.Add((RegistersPerSm / perWarp / warps, "registers"));
        }

        if (sharedPerBlock > 0)
        {
            candidates.Add((sharedPerBlock > MaxSharedPerBlock ? 0 : SharedPerSm / (sharedPerBlock + ReservedSharedPerBlock), "shared"));
        }

        return candidates.MinBy(c => c.Blocks);
    }
}
