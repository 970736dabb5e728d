using System.CommandLine;
using System.Text;
using DeepSeekCuda.Text;

namespace DeepSeekCuda.Cli.Commands;

/// <summary>
/// <c>dscuda tokenize --tokenizer DIR</c>: JSON lines <c>{"text": ...}</c> on stdin, one JSON array
/// of ids per line on stdout (no BOS or other special tokens added). Meant for comparing against
/// other tokenizer implementations from scripts.
/// </summary>
internal static class TokenizeCommand
{
    public static Command Create()
    {
        var tokenizerOption = new Option<string>("--tokenizer")
        {
            Description = "Folder holding tokenizer.json (and optionally tokenizer_config.json)",
            Required = true,
        };
        var command = new Command("tokenize", "Encode JSON lines {\"text\": ...} from stdin to id arrays on stdout");
        command.Options.Add(tokenizerOption);
        command.SetAction(parseResult => Run(parseResult.GetValue(tokenizerOption)!));
        return command;
    }

    private static int Run(string folder)
    {
        try
        {
            var tokenizer = BpeTokenizer.Load(folder);
            var utf8 = new UTF8Encoding(encoderShouldEmitUTF8Identifier: false);
            using var input = new StreamReader(Console.OpenStandardInput(), utf8);
            using var output = new StreamWriter(Console.OpenStandardOutput(), utf8) { AutoFlush = false };
            JsonLinesTokenizer.Run(input, output, tokenizer);
            return 0;
        }
        catch (Exception ex) when (ex is IOException or TokenizerFormatException or InvalidDataException or UnauthorizedAccessException)
        {
            // DirectoryNotFound/FileNotFound are IOExceptions; their messages already name the path.
            Console.Error.WriteLine($"dscuda tokenize: {ex.Message}");
            return 1;
        }
    }
}
