using System.Text;
using System.Text.Json;

namespace DeepSeekCuda.Text;

/// <summary>
/// The line protocol of <c>dscuda tokenize</c>: each input line is a JSON object
/// <c>{"text": "..."}</c>; each output line is the JSON array of its ids (no BOS, no special
/// tokens added). Kept in the engine so it is testable without the CLI.
/// </summary>
internal static class JsonLinesTokenizer
{
    /// <summary>Processes all lines of <paramref name="input"/>; returns the number of lines written.</summary>
    /// <exception cref="InvalidDataException">A line is not a JSON object with a string "text"; the message names the line.</exception>
    public static int Run(TextReader input, TextWriter output, ITokenizer tokenizer)
    {
        ArgumentNullException.ThrowIfNull(input);
        ArgumentNullException.ThrowIfNull(output);
        ArgumentNullException.ThrowIfNull(tokenizer);
        var lineNumber = 0;
        var sb = new StringBuilder();
        while (input.ReadLine() is { } line)
        {
            lineNumber++;
            var text = ReadText(line, lineNumber);
            var ids = tokenizer.Encode(text, addBos: false);
            sb.Clear().Append('[');
            for (var i = 0; i < ids.Length; i++)
            {
                if (i > 0)
                {
                    sb.Append(',');
                }

                sb.Append(ids[i]);
            }

            output.WriteLine(sb.Append(']'));
        }

        return lineNumber;
    }

    private static string ReadText(string line, int lineNumber)
    {
        try
        {
            using var doc = JsonDocument.Parse(line);
            if (doc.RootElement.ValueKind == JsonValueKind.Object
                && doc.RootElement.TryGetProperty("text", out var text)
                && text.ValueKind == JsonValueKind.String)
            {
                return text.GetString()!;
            }
        }
        catch (JsonException ex)
        {
            throw new InvalidDataException($"line {lineNumber}: invalid JSON ({ex.Message})", ex);
        }
        catch (InvalidOperationException ex)
        {
            // An escaped unpaired surrogate ("\ud800") names no Unicode character; refused rather than
            // replaced, since the JSON reader cannot give the rest of the string without it.
            throw new InvalidDataException($"line {lineNumber}: \"text\" {BpeTokenizer.UnpairedSurrogate}", ex);
        }

        throw new InvalidDataException($"line {lineNumber}: expected a JSON object with a string \"text\"");
    }
}
