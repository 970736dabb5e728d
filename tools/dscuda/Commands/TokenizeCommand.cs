using System.CommandLine;
using DeepSeekCuda.Text;

namespace DeepSeekCuda.Cli.Commands;

/// <summary>
/// <c>dscuda tokenize --tokenizer DIR</c>: JSON lines <c>{"text": ...}</c> on stdin, one JSON array
/// of ids per line on stdout (no BOS or other special tokens added). Meant for comparing against
/// other tokenizer implementations from scripts.
/// </summary>
internal static class TokenizeCommand
{
    public static Command Create(TextReader input)
    {
        var tokenizerOption = new Option<string>("--tokenizer")
        {
            Description = "Folder holding tokenizer.json (and optionally tokenizer_config.json)",
            Required = true,
        };
        var command = new Command("tokenize", "Encode JSON lines {\"text\": ...} from stdin to id arrays on stdout");
        command.Options.Add(tokenizerOption);
        command.SetAction(parse =>
        {
            // Errors (missing folder, malformed tokenizer.json, a bad input line) are reported by CliApp as one line.
            var tokenizer = BpeTokenizer.Load(parse.GetValue(tokenizerOption)!);
            var output = parse.InvocationConfiguration.Output;
            JsonLinesTokenizer.Run(input, output, tokenizer);
            output.Flush();
            return 0;
        });
        return command;
    }
}
