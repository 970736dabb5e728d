using System.CommandLine;

namespace DeepSeekCuda.Bench.Harness;

/// <summary>A GPU bench: its subcommand name, a line of description, and the measurement (quick or full) filling one report.</summary>
internal sealed record GpuBenchSpec(string Name, string Description, Action<GpuBench, bool, BenchReport> Run);

/// <summary>
/// Builds <c>run-bench NAME [--device N] [--quick] [--out DIR]</c> for each GPU bench, and <c>run-bench all</c>
/// which runs every one of them on the same device, writing one JSON file per bench. Every bench asked for writes its
/// file: without a device it says so (no rows); a bench that throws keeps the rows measured before, says why it
/// stopped, and the next bench still runs. Exit code: 0 every bench ran to the end, 1 one failed, 2 no device.
/// </summary>
internal static class GpuCommands
{
    public static IEnumerable<Command> Create(IReadOnlyList<GpuBenchSpec> benches)
    {
        foreach (var spec in benches)
        {
            yield return Command(spec.Name, spec.Description, [spec]);
        }

        yield return Command("all", "Every GPU bench: " + string.Join(", ", benches.Select(b => b.Name)), benches);
    }

    private static Command Command(string name, string description, IReadOnlyList<GpuBenchSpec> specs)
    {
        var quick = new Option<bool>("--quick") { Description = "Fewer shapes and runs" };
        var outOption = new Option<string?>("--out") { Description = "Folder to write one JSON file per bench into" };
        var device = new Option<int>("--device") { Description = "CUDA device ordinal", DefaultValueFactory = _ => 0 };
        var command = new Command(name, description);
        command.Options.Add(quick);
        command.Options.Add(outOption);
        command.Options.Add(device);
        command.SetAction(p =>
        {
            var isQuick = p.GetValue(quick);
            var outDir = p.GetValue(outOption);
            using var gpu = GpuBench.TryOpen(name, p.GetValue(device), isQuick ? 10 : 50, out var unavailable);
            if (gpu is null)
            {
                foreach (var spec in specs)
                {
                    BenchReport.WriteNotRun(outDir, spec.Name, unavailable);
                }

                return 2;
            }

            var failed = 0;
            foreach (var spec in specs)
            {
                Console.WriteLine($"## {spec.Name}");
                var report = new BenchReport(gpu);
                string? error = null;
                try
                {
                    spec.Run(gpu, isQuick, report);
                }
                catch (Exception e) when (e is not OutOfMemoryException)
                {
                    // One failing bench does not stop the others; its rows so far and the cause go into its file.
                    error = $"{e.GetType().Name}: {e.Message}";
                    Console.Error.WriteLine($"run-bench {spec.Name} failed after {report.Results.Count} rows: {e}");
                    failed++;
                }

                report.Write(outDir, spec.Name, error);
            }

            return failed == 0 ? 0 : 1;
        });
        return command;
    }
}
