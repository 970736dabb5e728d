using System.CommandLine;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Cuda.Inspection;
using DeepSeekCuda.Kernels;

namespace DeepSeekCuda.Bench.Benches;

/// <summary>
/// <c>run-bench kernels</c>: the static resource report (registers, stack and local memory, shared memory, resident
/// blocks per SM, tensor-core instructions) of every specialization for each target, as a table and as JSON, with
/// the resource gate's verdict. No GPU: NVRTC compiles to CUBIN and cuobjdump reads it. Exits 1 when the gate fails.
/// </summary>
internal static class KernelsReport
{
    public static Command Create()
    {
        var archOption = new Option<string>("--arch")
        {
            Description = "Comma-separated CUBIN targets",
            DefaultValueFactory = _ => string.Join(",", KernelReport.DefaultTargets),
        };
        var familyOption = new Option<string[]>("--family") { Description = "Only these families (repeatable; default: all)", AllowMultipleArgumentsPerToken = true };
        var outOption = new Option<string?>("--out") { Description = "Folder to write kernels.json into" };
        var command = new Command("kernels", "Static resource report of every kernel specialization (no GPU; needs NVRTC and cuobjdump)");
        command.Options.Add(archOption);
        command.Options.Add(familyOption);
        command.Options.Add(outOption);
        command.SetAction(parseResult => Run(
            parseResult.GetValue(archOption)!.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries),
            parseResult.GetValue(familyOption) ?? [], parseResult.GetValue(outOption)));
        return command;
    }

    private static int Run(string[] targets, string[] only, string? outDir)
    {
        var unknown = only.Where(f => !KernelCatalog.Names.Contains(f)).ToArray();
        if (unknown.Length > 0)
        {
            Console.Error.WriteLine($"run-bench kernels: unknown family {string.Join(", ", unknown)} (families: {string.Join(", ", KernelCatalog.Names)})");
            return 2;
        }

        KernelReport report;
        try
        {
            foreach (var t in targets)
            {
                _ = ArchLimits.For(t);
            }

            var families = only.Length == 0 ? KernelCatalog.Names : only;
            report = KernelReport.Build(new NvrtcCompiler(keepPtx: true), CudaBinaryTools.Find(), families, targets, step => Console.Error.WriteLine($"compiling {step}"));
        }
        catch (Exception e) when (e is ArgumentException or FileNotFoundException or CudaUnavailableException or KernelCompileException or InvalidOperationException)
        {
            Console.Error.WriteLine($"run-bench kernels: {e.Message}");
            return 2;
        }

        Console.Write(report.ToTable());
        if (outDir is not null)
        {
            Directory.CreateDirectory(outDir);
            var path = Path.Combine(outDir, "kernels.json");
            File.WriteAllText(path, report.ToJson());
            Console.WriteLine($"wrote {path}");
        }

        return report.Violations.Any() ? 1 : 0;
    }
}
