using Spectre.Console;

namespace DeepSeekCuda.Cli;

/// <summary>A progress bar on a terminal; a start and an end line otherwise (logs, pipes, CI).</summary>
internal static class Progress
{
    public static void Run(string what, TextWriter log, Action<IProgress<double>> work)
    {
        if (ReferenceEquals(log, Console.Error) && !Console.IsErrorRedirected && AnsiConsole.Profile.Capabilities.Interactive)
        {
            AnsiConsole.Progress().AutoClear(true).Start(context =>
            {
                var task = context.AddTask(Markup.Escape(what), maxValue: 1.0);
                work(new Reporter(f => task.Value = f));
            });
            return;
        }

        log.WriteLine(what + " ...");
        var started = System.Diagnostics.Stopwatch.StartNew();
        work(new Reporter(_ => { }));
        log.WriteLine($"{what}: done in {started.Elapsed.TotalSeconds:F1} s");
    }

    /// <summary>Reports synchronously: <see cref="Progress{T}"/> would post to a thread-pool context.</summary>
    private sealed class Reporter(Action<double> report) : IProgress<double>
    {
        public void Report(double value) => report(Math.Clamp(value, 0, 1));
    }
}
