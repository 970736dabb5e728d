using System.CommandLine;
using Microsoft.Extensions.Logging;

namespace DeepSeekCuda.Cli;

/// <summary>
/// <c>-v</c> / <c>--log-level LEVEL</c>, recursive options of the root command, and the logger they
/// configure: one line per entry on the invocation's error stream (stderr), default Warning.
/// </summary>
internal static class CliLogging
{
    private const string VerboseName = "--verbose", LevelName = "--log-level";

    /// <summary>New instances for one root command (an option remembers the commands it was added to).</summary>
    public static Option[] CreateOptions()
    {
        var verbose = new Option<bool>(VerboseName, "-v")
        {
            Description = "Log what the engine decides (backend, context length, MTP) and each generation: --log-level information",
            Recursive = true,
        };
        var level = new Option<string?>(LevelName)
        {
            Description = "trace, debug, information, warning (default), error, critical or none; wins over -v",
            Recursive = true,
        };
        level.AcceptOnlyFromAmong("trace", "debug", "information", "warning", "error", "critical", "none");
        return [verbose, level];
    }

    /// <summary>The level the options ask for.</summary>
    public static LogLevel LevelOf(ParseResult parse) => parse.GetValue<string?>(LevelName) switch
    {
        "trace" => LogLevel.Trace,
        "debug" => LogLevel.Debug,
        "information" => LogLevel.Information,
        "warning" => LogLevel.Warning,
        "error" => LogLevel.Error,
        "critical" => LogLevel.Critical,
        "none" => LogLevel.None,
        _ => parse.GetValue<bool>(VerboseName) ? LogLevel.Information : LogLevel.Warning,
    };

    /// <summary>
    /// A logger factory writing to the invocation's error stream. Not the console logger: that one writes to
    /// the process's <see cref="Console"/> streams from a background queue, while <see cref="CliApp"/> runs
    /// in-process with the streams it is given (tests, and a server hosting the same commands), and a line
    /// written on the caller's thread keeps its place among the tool's own stderr lines.
    /// </summary>
    public static ILoggerFactory CreateFactory(ParseResult parse) =>
        LoggerFactory.Create(b => b.SetMinimumLevel(LevelOf(parse)).AddProvider(CreateProvider(parse)));

    /// <summary>
    /// The same lines as a provider that applies the level itself, for a host that builds its own logging (the
    /// server's ASP.NET Core host, whose default minimum would otherwise let its information lines through).
    /// </summary>
    public static ILoggerProvider CreateProvider(ParseResult parse) => new WriterLoggerProvider(parse.InvocationConfiguration.Error, LevelOf(parse));

    private sealed class WriterLoggerProvider(TextWriter writer, LogLevel minimum) : ILoggerProvider
    {
        public ILogger CreateLogger(string categoryName) => new WriterLogger(writer, categoryName, minimum);

        public void Dispose()
        {
        }
    }

    private sealed class WriterLogger(TextWriter writer, string category, LogLevel minimum) : ILogger
    {
        public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;

        public bool IsEnabled(LogLevel logLevel) => logLevel != LogLevel.None && logLevel >= minimum;

        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
        {
            // The console logger's short level names and "level: category: message" line, on one line.
            var level = logLevel switch
            {
                LogLevel.Trace => "trce",
                LogLevel.Debug => "dbug",
                LogLevel.Information => "info",
                LogLevel.Warning => "warn",
                LogLevel.Error => "fail",
                _ => "crit",
            };
            if (!IsEnabled(logLevel))
            {
                return;
            }

            var text = formatter(state, exception) + (exception is null ? "" : " (" + exception.GetType().Name + ": " + exception.Message + ")");
            lock (writer)
            {
                writer.WriteLine($"{level}: {category}: {text.ReplaceLineEndings(" ")}");
            }
        }
    }
}
