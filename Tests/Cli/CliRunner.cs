using DeepSeekCuda.Cli;

namespace DeepSeekCuda.Tests.Cli;

/// <summary>Runs <c>dscuda</c> in-process and captures what it prints.</summary>
internal static class CliRunner
{
    public sealed record Result(int ExitCode, string Output, string Error);

    public static Result Run(params string[] args) => RunWithInput("", args);

    public static Result RunWithInput(string input, params string[] args)
    {
        var output = new StringWriter();
        var error = new StringWriter();
        var code = CliApp.RunAsync(args, new StringReader(input), output, error).GetAwaiter().GetResult();
        return new Result(code, output.ToString(), error.ToString());
    }
}
