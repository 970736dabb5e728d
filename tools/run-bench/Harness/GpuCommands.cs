using System.CommandLine;

namespace DeepSeekCuda.Bench.Harness;

/// <summary>A GPU bench: its subcommand name, a line of description, and the measurement (quick or full) writing one report.</summary>
internal sealed record GpuBenchSpec(string Name, string Description, Func<GpuBench, bool, BenchReport> Run);

/// <summary>
/// Builds <c>run-bench NAME [--device N] [--quick] [--out DIR]</c> for each GPU bench, and <c>run-bench all</c>
/// which runs every one of them on the same device, writing one JSON file per bench.
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
            using var gpu = GpuBench.TryOpen(name, p.GetValue(device), isQuick ? 10 : 50);
            if (gpu is null)
            {
                return 2;
            }

            foreach (var spec in specs)
            {
                Console.WriteLine($"## {spec.Name}");
                spec.Run(gpu, isQuick).Write(p.GetValue(outOption), spec.Name);
            }

            return 0;
        });
        return command;
    }
}
