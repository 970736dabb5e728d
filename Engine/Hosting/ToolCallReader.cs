using System.Text.Json;
using DeepSeekCuda.Text;
using Microsoft.Extensions.AI;

namespace DeepSeekCuda.Hosting;

/// <summary>
/// Turns a streamed answer into Microsoft.Extensions.AI contents: text as <see cref="TextContent"/>, each tool call
/// the model wrote as one <see cref="FunctionCallContent"/> once it is complete (<see cref="ToolCallParser"/> reads
/// the format). Arguments that are not a JSON object give a call whose <see cref="FunctionCallContent.Exception"/>
/// says why, which the function-invocation middleware reports back to the model instead of running the function.
/// <see cref="AIContent.RawRepresentation"/> of a call is its arguments' text as the model wrote it.
/// </summary>
internal sealed class ToolCallReader
{
    private readonly ToolCallParser _parser = new();

    /// <summary>Calls read so far.</summary>
    public int Calls { get; private set; }

    /// <summary>The contents decided by <paramref name="text"/> (a possible marker is held back).</summary>
    public List<AIContent> Push(string text) => Convert(_parser.Push(text));

    /// <summary>The contents left at the end of the answer: held-back text, an unfinished call as text.</summary>
    public List<AIContent> Flush() => Convert(_parser.Flush());

    /// <summary>A call id in OpenAI's shape (<c>call_</c> and 24 hex digits), unique per call.</summary>
    internal static string NewCallId() => "call_" + Guid.NewGuid().ToString("N")[..24];

    private List<AIContent> Convert(IReadOnlyList<ToolCallEvent> events)
    {
        var contents = new List<AIContent>();
        foreach (var e in events)
        {
            switch (e)
            {
                case ToolCallText { Text.Length: > 0 } t:
                    contents.Add(new TextContent(t.Text));
                    break;
                case ToolCallCompleted c:
                    Calls++;
                    var call = FunctionCallContent.CreateFromParsedArguments(c.Arguments, NewCallId(), c.Name, ParseArguments);
                    call.RawRepresentation = c.Arguments; // the arguments exactly as the model wrote them
                    contents.Add(call);
                    break;
            }
        }

        return contents;
    }

    /// <summary>
    /// Tool-call arguments (a JSON object) as its members' <see cref="JsonElement"/> values, what AIFunction binds
    /// from; empty text is no arguments. The server reads a client's past calls with it too.
    /// </summary>
    /// <exception cref="JsonException">Not JSON, or not an object.</exception>
    internal static Dictionary<string, object?> ParseArguments(string json)
    {
        if (string.IsNullOrWhiteSpace(json))
        {
            return [];
        }

        using var doc = JsonDocument.Parse(json);
        if (doc.RootElement.ValueKind != JsonValueKind.Object)
        {
            throw new JsonException($"tool-call arguments must be a JSON object, got {doc.RootElement.ValueKind}");
        }

        return doc.RootElement.EnumerateObject().ToDictionary(p => p.Name, p => (object?)p.Value.Clone(), StringComparer.Ordinal);
    }
}
