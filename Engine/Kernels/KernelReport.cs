using System.Text;
using System.Text.Json;
using System.Text.Json.Serialization;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Cuda.Inspection;

namespace DeepSeekCuda.Kernels;

/// <summary>One row of the report: a kernel's resources on one target and the rules it breaks.</summary>
internal sealed record KernelReportRow(
    string Family, string Arch, string Kernel, string Mangled, int Registers, int StackBytes, int LocalBytes,
    int StaticSharedBytes, int DynamicSharedBytes, int MaxThreads, int BlocksPerSm, string Limiter,
    IReadOnlyDictionary<string, int> TensorOps, int PtxFp8Mma, IReadOnlyList<string> Violations);

/// <summary>
/// The static resource report: every specialization of every family compiled to CUBIN for each target and
/// read back with cuobjdump (the whole engine's <c>-Xptxas -v</c> at once), with <see cref="ResourceGate"/>'s
/// verdict on each. Needs NVRTC and cuobjdump, no GPU.
/// </summary>
/// <param name="Nvrtc">The NVRTC version that compiled the images.</param>
/// <param name="Cuobjdump">The cuobjdump that read them (path and version).</param>
/// <param name="Targets">The compile targets.</param>
/// <param name="Kernels">One row per (specialization, target).</param>
internal sealed record KernelReport(string Nvrtc, string Cuobjdump, IReadOnlyList<string> Targets, IReadOnlyList<KernelReportRow> Kernels)
{
    /// <summary>What CI checks: the architecture Hopper runs, plain sm_90, Ada (FP8 mma.sync) and Ampere.</summary>
    public static IReadOnlyList<string> DefaultTargets { get; } = ["sm_90a", "sm_90", "sm_89", "sm_80"];

    /// <summary>Every violation in the report.</summary>
    public IEnumerable<string> Violations => Kernels.SelectMany(k => k.Violations);

    /// <summary>Compiles and inspects the <paramref name="families"/> of the catalog for each of <paramref name="targets"/>.</summary>
    /// <param name="compiler">A compiler with <c>keepPtx</c> and without a cache (inspection needs the PTX of each compile).</param>
    /// <param name="tools">cuobjdump.</param>
    /// <param name="families">Family names (see <see cref="KernelCatalog.Names"/>); each with the specializations
    /// its launcher can request on the target (<see cref="KernelCatalog.For"/>).</param>
    /// <param name="targets">CUBIN targets, e.g. <see cref="DefaultTargets"/>.</param>
    /// <param name="progress">Told each (family, target) as it starts.</param>
    public static KernelReport Build(NvrtcCompiler compiler, CudaBinaryTools tools,
        IEnumerable<string> families, IReadOnlyList<string> targets, Action<string>? progress = null)
    {
        var rows = new List<KernelReportRow>();
        foreach (var arch in targets)
        {
            var catalog = KernelCatalog.For(arch);
            foreach (var family in families.Order(StringComparer.Ordinal))
            {
                if (!catalog.TryGetValue(family, out var instances))
                {
                    continue; // a family this target does not run
                }

                progress?.Invoke($"{family} {arch}");
                var compiled = compiler.Compile(family, instances, new KernelTarget(arch));
                rows.AddRange(CubinInspector.Inspect(compiled, instances, tools).Select(Row));
            }
        }

        var (major, minor) = NvrtcCompiler.Version;
        return new KernelReport($"{major}.{minor}", $"{tools.Cuobjdump} ({tools.Version()})", targets, rows);
    }

    /// <summary>A report row with <see cref="ResourceGate"/>'s verdict.</summary>
    public static KernelReportRow Row(KernelResources k) => new(k.Family, k.Arch, k.Kernel, k.Mangled, k.Registers, k.StackBytes, k.LocalBytes,
        k.StaticSharedBytes, k.DynamicSharedBytes, k.MaxThreads, k.BlocksPerSm, k.Limiter, k.TensorOps, k.PtxFp8Mma, ResourceGate.Violations(k));

    /// <summary>The report as a fixed-width table, one line per row, violations after their row.</summary>
    public string ToTable()
    {
        var sb = new StringBuilder();
        sb.Append($"NVRTC {Nvrtc}; {Cuobjdump}\n");
        var header = new[] { "arch", "family", "kernel", "regs", "stack", "local", "smem", "dyn", "thr", "blk/SM", "limit", "tensor ops", "gate" };
        var lines = Kernels.Select(k => new[]
        {
            k.Arch, k.Family, k.Kernel, $"{k.Registers}", $"{k.StackBytes}", $"{k.LocalBytes}", $"{k.StaticSharedBytes}", $"{k.DynamicSharedBytes}",
            $"{k.MaxThreads}", $"{k.BlocksPerSm}", k.Limiter,
            k.TensorOps.Count == 0 ? "-" : string.Join(" ", k.TensorOps.OrderBy(o => o.Key, StringComparer.Ordinal).Select(o => $"{o.Key}x{o.Value}")),
            k.Violations.Count == 0 ? "ok" : "FAIL",
        }).ToList();
        var widths = Enumerable.Range(0, header.Length).Select(c => lines.Select(l => l[c].Length).Append(header[c].Length).Max()).ToArray();
        string Format(string[] cells) => string.Join("  ", cells.Select((c, i) => i is >= 3 and <= 9 ? c.PadLeft(widths[i]) : c.PadRight(widths[i]))).TrimEnd();
        sb.Append(Format(header)).Append('\n');
        for (var i = 0; i < lines.Count; i++)
        {
            sb.Append(Format(lines[i])).Append('\n');
            foreach (var v in Kernels[i].Violations)
            {
                sb.Append("    ! ").Append(v).Append('\n');
            }
        }

        var failed = Kernels.Count(k => k.Violations.Count > 0);
        sb.Append($"{Kernels.Count} kernels on {Targets.Count} targets; {failed} break the resource gate\n");
        return sb.ToString();
    }

    /// <summary>The report as JSON (snake_case; source-generated, so it works trimmed).</summary>
    public string ToJson() => JsonSerializer.Serialize(this, KernelReportJson.Default.KernelReport);

    /// <summary>Reads a report written by <see cref="ToJson"/>.</summary>
    public static KernelReport FromJson(string json) =>
        JsonSerializer.Deserialize(json, KernelReportJson.Default.KernelReport) ?? throw new JsonException("empty kernel report");
}

[JsonSourceGenerationOptions(PropertyNamingPolicy = JsonKnownNamingPolicy.SnakeCaseLower, WriteIndented = true)]
[JsonSerializable(typeof(KernelReport))]
internal sealed partial class KernelReportJson : JsonSerializerContext;
