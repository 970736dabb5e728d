using System.Globalization;
using System.Text.RegularExpressions;

namespace DeepSeekCuda.Cuda.Inspection;

/// <summary>What one kernel of a CUBIN image uses, read statically (no GPU).</summary>
/// <param name="Family">Kernel family.</param>
/// <param name="Arch">Compile target.</param>
/// <param name="Kernel">The specialization's name expression, e.g. <c>fp8_gemm_mma_kernel&lt;7168, 2048&gt;</c>.</param>
/// <param name="Mangled">Its symbol in the image.</param>
/// <param name="Registers">Registers per thread.</param>
/// <param name="StackBytes">Stack frame per thread (spills and local arrays live here).</param>
/// <param name="LocalBytes">Local memory per thread beyond the stack.</param>
/// <param name="StaticSharedBytes">Static shared memory per block.</param>
/// <param name="DynamicSharedBytes">Dynamic shared memory the launcher gives each block.</param>
/// <param name="MaxThreads">Threads per block (the kernel's <c>__launch_bounds__</c>).</param>
/// <param name="BlocksPerSm">Resident blocks per SM from warps, registers and shared memory (0: does not fit).</param>
/// <param name="Limiter">What limits <paramref name="BlocksPerSm"/>.</param>
/// <param name="TensorOps">Tensor-core instructions in the SASS by class (HMMA, QMMA, HGMMA, QGMMA, IMMA, ...).</param>
/// <param name="PtxFp8Mma">FP8 <c>mma.sync</c> instructions in the PTX ptxas was given.</param>
internal sealed record KernelResources(
    string Family, string Arch, string Kernel, string Mangled, int Registers, int StackBytes, int LocalBytes,
    int StaticSharedBytes, int DynamicSharedBytes, int MaxThreads, int BlocksPerSm, string Limiter,
    IReadOnlyDictionary<string, int> TensorOps, int PtxFp8Mma)
{
    /// <summary>The template's name without arguments (<c>fp8_gemm_mma_kernel</c>).</summary>
    public string Template => Kernel.Split('<', 2)[0].Trim();

    /// <summary>Static plus dynamic shared memory per block.</summary>
    public int SharedBytes => StaticSharedBytes + DynamicSharedBytes;
}

/// <summary>
/// Reads a CUBIN with <c>cuobjdump</c> (<c>-res-usage</c>, <c>-elf</c>, <c>-sass</c>) and the PTX NVRTC
/// produced for it, and returns each kernel's <see cref="KernelResources"/>. The parsers are pure functions
/// of the tools' text so they are tested on their own.
/// </summary>
internal static partial class CubinInspector
{
    /// <summary>Inspects every specialization of <paramref name="compiled"/> (a CUBIN with its PTX).</summary>
    public static IReadOnlyList<KernelResources> Inspect(CompiledKernel compiled, IReadOnlyList<KernelInstance> instances, CudaBinaryTools tools)
    {
        if (compiled.IsPtx || compiled.Ptx is null)
        {
            throw new ArgumentException($"{compiled.Family} {compiled.Arch}: inspection needs a fresh CUBIN compile with its PTX (a compiler with keepPtx, no cache hit)", nameof(compiled));
        }

        var limits = ArchLimits.For(compiled.Arch);
        var file = Path.Combine(Path.GetTempPath(), $"dscuda-inspect-{Guid.NewGuid():N}.cubin");
        File.WriteAllBytes(file, compiled.Image);
        try
        {
            var usage = ParseResourceUsage(tools.Dump("-res-usage", file));
            var threads = ParseMaxThreads(tools.Dump("-elf", file));
            var ops = ParseTensorOps(tools.Dump("-sass", file));
            var fp8 = CountPtxFp8Mma(compiled.Ptx);
            var rows = new List<KernelResources>();
            foreach (var instance in instances)
            {
                var mangled = compiled.LoweredNames[instance.NameExpression];
                if (!usage.TryGetValue(mangled, out var u))
                {
                    throw new InvalidOperationException($"{compiled.Family} {compiled.Arch}: cuobjdump reports no resource usage for {mangled} ({instance.NameExpression})");
                }

                if (!threads.TryGetValue(mangled, out var maxThreads))
                {
                    throw new InvalidOperationException($"{compiled.Family} {compiled.Arch}: {instance.NameExpression} has no EIATTR_MAX_THREADS; every kernel declares __launch_bounds__");
                }

                var (blocks, limiter) = limits.ResidentBlocks(maxThreads, u.Registers, u.Shared + instance.DynamicSharedBytes);
                rows.Add(new KernelResources(compiled.Family, compiled.Arch, instance.NameExpression, mangled, u.Registers, u.Stack, u.Local,
                    u.Shared, instance.DynamicSharedBytes, maxThreads, blocks, limiter,
                    ops.GetValueOrDefault(mangled) ?? new Dictionary<string, int>(), fp8.GetValueOrDefault(mangled)));
            }

            return rows;
        }
        finally
        {
            File.Delete(file);
        }
    }

    /// <summary>One function's line of <c>cuobjdump -res-usage</c>.</summary>
    public readonly record struct Usage(int Registers, int Stack, int Shared, int Local);

    /// <summary>
    /// <c>cuobjdump -res-usage</c>: " Function NAME:" followed by "REG:n STACK:n SHARED:n LOCAL:n ...".
    /// </summary>
    public static IReadOnlyDictionary<string, Usage> ParseResourceUsage(string text)
    {
        var result = new Dictionary<string, Usage>(StringComparer.Ordinal);
        string? function = null;
        foreach (var raw in text.Split('\n'))
        {
            var line = raw.Trim();
            if (line.StartsWith("Function ", StringComparison.Ordinal) && line.EndsWith(':'))
            {
                function = line["Function ".Length..^1].Trim();
            }
            else if (function is not null && line.StartsWith("REG:", StringComparison.Ordinal))
            {
                var fields = line.Split(' ', StringSplitOptions.RemoveEmptyEntries).Select(f => f.Split(':', 2)).Where(f => f.Length == 2)
                    .GroupBy(f => f[0]).ToDictionary(g => g.Key, g => int.Parse(g.First()[1], CultureInfo.InvariantCulture), StringComparer.Ordinal);
                result[function] = new Usage(fields["REG"], fields["STACK"], fields["SHARED"], fields["LOCAL"]);
                function = null;
            }
        }

        return result;
    }

    /// <summary><c>cuobjdump -elf</c>: the x dimension of EIATTR_MAX_THREADS in each <c>.nv.info.NAME</c> section.</summary>
    public static IReadOnlyDictionary<string, int> ParseMaxThreads(string text)
    {
        var result = new Dictionary<string, int>(StringComparer.Ordinal);
        string? function = null;
        var pendingMaxThreads = false;
        foreach (var raw in text.Split('\n'))
        {
            var line = raw.Trim();
            if (line.StartsWith(".nv.info.", StringComparison.Ordinal) && !line.Contains(' ', StringComparison.Ordinal))
            {
                function = line[".nv.info.".Length..];
                pendingMaxThreads = false;
            }
            else if (line.StartsWith('.'))
            {
                function = null;
            }
            else if (function is not null && line.StartsWith("Attribute:", StringComparison.Ordinal))
            {
                pendingMaxThreads = line.EndsWith("EIATTR_MAX_THREADS", StringComparison.Ordinal);
            }
            else if (function is not null && pendingMaxThreads && line.StartsWith("Value:", StringComparison.Ordinal))
            {
                var x = line["Value:".Length..].Trim().Split(' ', StringSplitOptions.RemoveEmptyEntries)[0];
                result[function] = Convert.ToInt32(x, 16);
                pendingMaxThreads = false;
            }
        }

        return result;
    }

    /// <summary>
    /// <c>cuobjdump -sass</c>: per function, the count of each tensor-core opcode (any opcode ending in MMA:
    /// HMMA, IMMA, QMMA, DMMA, HGMMA, QGMMA, IGMMA, ...), modifiers stripped.
    /// </summary>
    public static IReadOnlyDictionary<string, IReadOnlyDictionary<string, int>> ParseTensorOps(string text)
    {
        var result = new Dictionary<string, IReadOnlyDictionary<string, int>>(StringComparer.Ordinal);
        Dictionary<string, int>? current = null;
        foreach (var raw in text.Split('\n'))
        {
            var header = SassFunction().Match(raw);
            if (header.Success)
            {
                current = [];
                result[header.Groups[1].Value] = current;
                continue;
            }

            var instruction = SassInstruction().Match(raw);
            if (current is not null && instruction.Success)
            {
                var opcode = instruction.Groups[1].Value;
                if (opcode.EndsWith("MMA", StringComparison.Ordinal))
                {
                    current[opcode] = current.GetValueOrDefault(opcode) + 1;
                }
            }
        }

        return result;
    }

    /// <summary>
    /// FP8 <c>mma.sync</c> instructions (an <c>.e4m3</c> or <c>.e5m2</c> operand type) per <c>.entry</c> of a PTX
    /// module. One inside a non-inlined <c>.func</c> counts for every entry, since any of them may call it.
    /// </summary>
    public static IReadOnlyDictionary<string, int> CountPtxFp8Mma(string ptx)
    {
        var perEntry = new Dictionary<string, int>(StringComparer.Ordinal);
        var inFunctions = 0;
        string? entry = null;
        var isFunc = false;
        foreach (var raw in ptx.Split('\n'))
        {
            var start = PtxFunction().Match(raw);
            if (start.Success)
            {
                isFunc = start.Groups[1].Value == "func";
                entry = isFunc ? null : start.Groups[2].Value;
                if (entry is not null)
                {
                    perEntry.TryAdd(entry, 0);
                }

                continue;
            }

            if (PtxFp8Mma().IsMatch(raw))
            {
                if (entry is not null)
                {
                    perEntry[entry]++;
                }
                else if (isFunc)
                {
                    inFunctions++;
                }
            }
        }

        return perEntry.ToDictionary(kv => kv.Key, kv => kv.Value + inFunctions, StringComparer.Ordinal);
    }

    [GeneratedRegex(@"^\s*Function\s*:\s*(\S+)\s*$")]
    private static partial Regex SassFunction();

    // "        /*0a40*/   @!P0 HMMA.16816.F32 R4, R8, R12, R4 ;   /* 0x... */"
    [GeneratedRegex(@"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")]
    private static partial Regex SassInstruction();

    [GeneratedRegex(@"^\s*(?:\.visible\s+|\.weak\s+|\.extern\s+)*\.(entry|func)\s+(?:\([^)]*\)\s*)?([A-Za-z_$][\w$]*)")]
    private static partial Regex PtxFunction();

    [GeneratedRegex(@"\bmma\.sync\.aligned\.\S*\.(?:e4m3|e5m2)\b")]
    private static partial Regex PtxFp8Mma();
}
