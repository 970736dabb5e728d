using System.CommandLine;
using DeepSeekCuda.Cli.Commands;
using DeepSeekCuda.Loader;

namespace DeepSeekCuda.Cli;

/// <summary>
/// The <c>dscuda</c> command line, callable in-process (the tests drive it this way). A user error (bad
/// checkpoint, bad argument, missing file) is one line on stderr and exit code 1; an unexpected
/// internal error exits 2 and prints its stack only with DSCUDA_DEBUG=1.
/// </summary>
public static class CliApp
{
    /// <summary>Builds the root command with every subcommand.</summary>
    public static RootCommand CreateRoot(TextReader input)
    {
        var root = new RootCommand("DeepSeekCuda: run DeepSeek-V3/R1 checkpoints from .NET")
        {
            GenerateCommand.Create(),
            ChatCommand.Create(input),
            InspectCommand.Create(),
            TokenizeCommand.Create(input),
            LogitsCommand.Create(),
            MakeModelCommand.Create(),
            ServeCommand.Create(),
        };
        foreach (var option in CliLogging.CreateOptions())
        {
            root.Add(option); // recursive: valid after any command
        }

        return root;
    }

    /// <summary>Parses and runs <paramref name="args"/>, writing to the given streams; returns the exit code.</summary>
    public static async Task<int> RunAsync(string[] args, TextReader input, TextWriter output, TextWriter error, CancellationToken cancellationToken = default)
    {
        var parse = CreateRoot(input).Parse(args);
        if (parse.Errors.Count > 0)
        {
            // System.CommandLine would print each error on its own line and then the whole help text; say
            // the problems in one line and where the usage is.
            var command = string.Join(' ', parse.CommandResult.Command.Name is var n && n == parse.RootCommandResult.Command.Name
                ? ["dscuda"] : new[] { "dscuda", n });
            var problems = string.Join("; ", parse.Errors.Select(e => e.Message.ReplaceLineEndings(" ")).Distinct());
            await error.WriteLineAsync($"dscuda: error: {problems} (see '{command} --help')");
            return 1;
        }

        // On Ctrl+C or SIGTERM the action's token is cancelled; System.CommandLine abandons an action still running
        // after ProcessTerminationTimeout (2 s by default). `serve` drains its running requests first (up to
        // ChatServerOptions.DrainTimeout), so allow that; the other commands end as soon as they are cancelled.
        var invocation = new InvocationConfiguration
        {
            EnableDefaultExceptionHandler = false,
            Output = output,
            Error = error,
            ProcessTerminationTimeout = new Server.ChatServerOptions().DrainTimeout + TimeSpan.FromSeconds(10),
        };
        try
        {
            return await parse.InvokeAsync(invocation, cancellationToken);
        }
        catch (Exception e) when (IsUserError(e))
        {
            await error.WriteLineAsync($"dscuda: error: {OneLine(e.Message)}");
            return 1;
        }
        catch (OperationCanceledException)
        {
            await error.WriteLineAsync("dscuda: cancelled");
            return 130;
        }
        catch (Exception e)
        {
            await error.WriteLineAsync($"dscuda: internal error: {e.GetType().Name}: {OneLine(e.Message)}");
            await error.WriteLineAsync(Environment.GetEnvironmentVariable("DSCUDA_DEBUG") == "1"
                ? e.ToString()
                : "(set DSCUDA_DEBUG=1 for the stack trace)");
            return 2;
        }
    }

    private static bool IsUserError(Exception e) =>
        e is CheckpointException or UserErrorException or FileNotFoundException or DirectoryNotFoundException
            or UnauthorizedAccessException or FormatException or InvalidDataException or ArgumentException
            or IOException or DeepSeekCuda.Inference.NonFiniteLogitsException
            // The model does not fit the hardware: the message says what each device needs and has.
            or DeepSeekCuda.Serving.InsufficientDeviceMemoryException or DeepSeekCuda.Model.PlacementException;

    // A mismatch report lists many tensors over several lines; keep them, but indent so the first line
    // still reads as the error.
    private static string OneLine(string message) => message.ReplaceLineEndings(Environment.NewLine + "  ");
}

/// <summary>A mistake in how the tool was called, reported as one line.</summary>
public sealed class UserErrorException(string message) : Exception(message);
