namespace DeepSeekCuda.Cuda.Inspection;

/// <summary>
/// The static rules every compiled kernel must meet before a GPU sees it. A violation is a sentence naming
/// the kernel, the target and the number; the allow-lists below are the only exceptions, each with its reason.
/// </summary>
internal static class ResourceGate
{
    /// <summary>
    /// The one place a kernel may keep a stack frame or local memory: each entry names the kernel template, the
    /// target (null: every target), the most bytes per thread it may use (so growth is still caught) and why.
    /// </summary>
    public static IReadOnlyList<LocalMemoryException> LocalMemoryAllowed { get; } =
    [
        new("fp8_gemv_kernel", "sm_80", 8,
            "ptxas 12.4's sm_80 schedule for the 4-row tile spills one register once before the K loop (one STL, two LDL outside it); " +
            "forcing it away with __launch_bounds__(256, 2) would halve the blocks per SM on sm_90a as well"),
        new("mla_decode_kernel", "sm_89", 8,
            "ptxas 12.4 holds the 8-warp, 64-row block to 80 registers on sm_89 and spills one 4-byte value (one STL, two LDL); " +
            "on sm_89 that tile runs only for latents up to 128 (the test shapes): V3's needs 152 KiB of shared memory, over Ada's 99 KiB"),
    ];

    /// <summary>
    /// Kernels whose work is tensor-core work: their SASS must hold the named instruction class, so a change that
    /// falls off the tensor cores (or onto an emulated path) fails here. FP8 GEMMs use QMMA where the hardware
    /// has FP8 <c>mma.sync</c> and HMMA on widened codes elsewhere; the Hopper GEMMs, FP8 wgmma (QGMMA).
    /// </summary>
    public static string? RequiredTensorOp(string template, ArchLimits arch) => template switch
    {
        "fp8_gemm_mma_kernel" or "moe_grouped_gemm_kernel" => arch.HasFp8MmaSync ? "QMMA" : "HMMA",
        "fp8_gemm_wgmma_kernel" or "fp8_gemm_wgmma_decode_kernel" or "moe_grouped_gemm_wgmma_kernel" => "QGMMA",
        "mla_decode_kernel" or "mla_prefill_attn_kernel" => "HMMA",
        _ => null,
    };

    /// <summary>Every rule <paramref name="k"/> breaks (empty when it passes).</summary>
    public static IReadOnlyList<string> Violations(KernelResources k)
    {
        var arch = ArchLimits.For(k.Arch);
        var v = new List<string>();
        var at = $"{k.Family} {k.Kernel} on {k.Arch}";
        var local = k.StackBytes + k.LocalBytes;
        if (local > 0 && !LocalMemoryAllowed.Any(e => e.Template == k.Template && (e.Arch is null || e.Arch == k.Arch) && local <= e.MaxBytes))
        {
            v.Add($"{at}: {k.StackBytes} B stack and {k.LocalBytes} B local memory per thread (spills or local arrays; only ResourceGate.LocalMemoryAllowed may, up to its bound)");
        }

        if (k.StaticSharedBytes > ArchLimits.MaxStaticSharedPerBlock)
        {
            v.Add($"{at}: {k.StaticSharedBytes} B static shared memory, over the {ArchLimits.MaxStaticSharedPerBlock} B static limit");
        }

        if (k.SharedBytes > arch.MaxSharedPerBlock)
        {
            v.Add($"{at}: {k.SharedBytes} B shared memory per block ({k.StaticSharedBytes} static + {k.DynamicSharedBytes} dynamic), over the target's {arch.MaxSharedPerBlock} B");
        }

        if (k.BlocksPerSm == 0)
        {
            v.Add($"{at}: not one block of {k.MaxThreads} threads fits on an SM (limited by {k.Limiter}: {k.Registers} registers, {k.SharedBytes} B shared)");
        }

        if (k.PtxFp8Mma > 0 && !arch.HasFp8MmaSync)
        {
            v.Add($"{at}: {k.PtxFp8Mma} FP8 mma.sync in the PTX; {k.Arch} has no FP8 mma.sync, so ptxas emulates it (NVRTC 12.4 drops the accumulator): widen to f16 and use an f16 mma.sync, or wgmma");
        }

        if (RequiredTensorOp(k.Template, arch) is { } op && k.TensorOps.GetValueOrDefault(op) == 0)
        {
            var found = k.TensorOps.Count == 0 ? "none" : string.Join(", ", k.TensorOps.Select(kv => $"{kv.Key} x{kv.Value}"));
            v.Add($"{at}: no {op} in the SASS (tensor-core instructions: {found})");
        }

        return v;
    }
}

/// <summary>A kernel allowed some stack or local memory, and why.</summary>
/// <param name="Template">Kernel template name, e.g. <c>mla_decode_kernel</c>.</param>
/// <param name="Arch">The target it applies to, or null for every target.</param>
/// <param name="MaxBytes">Most stack plus local bytes per thread allowed.</param>
/// <param name="Reason">Why, in words a reviewer can check against the SASS.</param>
internal sealed record LocalMemoryException(string Template, string? Arch, int MaxBytes, string Reason);
