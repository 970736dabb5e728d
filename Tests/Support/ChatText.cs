using Microsoft.Extensions.AI;

namespace DeepSeekCuda.Tests.Support;

/// <summary>A chat reply's text with its parts marked, for comparing replies: "[r]" before reasoning, "[a]" before answer text.</summary>
internal static class ChatText
{
    public static string Marked(IEnumerable<AIContent> contents) => string.Concat(contents.Select(c => c switch
    {
        TextReasoningContent r => "[r]" + r.Text,
        TextContent t => "[a]" + t.Text,
        _ => "",
    }));
}
