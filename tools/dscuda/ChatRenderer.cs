using System.Diagnostics;
using System.Globalization;
using Microsoft.Extensions.AI;

namespace DeepSeekCuda.Cli;

/// <summary>
/// Streams a chat response to a writer: reasoning dimmed on a terminal, or under a "Reasoning:" heading
/// and the answer under "Answer:" when the output is a file or pipe.
/// </summary>
internal sealed class ChatRenderer(TextWriter output, TextWriter log, bool terminal)
{
    private const string Dim = "\u001b[2m";
    private const string Reset = "\u001b[0m";

    public static ChatRenderer For(TextWriter output, TextWriter log) =>
        new(output, log, ReferenceEquals(output, Console.Out) && !Console.IsOutputRedirected);

    /// <summary>Streams one response; returns the answer text (what goes into the chat history).</summary>
    public async Task<string> StreamAsync(IChatClient client, IList<ChatMessage> messages, ChatOptions options, CancellationToken cancellationToken)
    {
        var answer = new System.Text.StringBuilder();
        var section = (string?)null;
        UsageDetails? usage = null;
        ChatFinishReason? finish = null;
        var clock = Stopwatch.StartNew();
        TimeSpan? firstToken = null;
        await foreach (var update in client.GetStreamingResponseAsync(messages, options, cancellationToken))
        {
            foreach (var content in update.Contents)
            {
                switch (content)
                {
                    case TextReasoningContent r when r.Text.Length > 0:
                        firstToken ??= clock.Elapsed;
                        await SwitchAsync(ref section, "reasoning");
                        await output.WriteAsync(terminal ? Dim + r.Text + Reset : r.Text);
                        break;
                    case TextContent t when t.Text.Length > 0:
                        firstToken ??= clock.Elapsed;
                        await SwitchAsync(ref section, "answer");
                        answer.Append(t.Text);
                        await output.WriteAsync(t.Text);
                        break;
                    case UsageContent u:
                        usage = u.Details;
                        break;
                }
            }

            finish = update.FinishReason ?? finish;
            await output.FlushAsync(cancellationToken);
        }

        await output.WriteLineAsync();
        var generated = usage?.OutputTokenCount ?? 0;
        var decodeSeconds = (clock.Elapsed - (firstToken ?? TimeSpan.Zero)).TotalSeconds;
        await log.WriteLineAsync(string.Create(CultureInfo.InvariantCulture,
            $"[{usage?.InputTokenCount ?? 0} prompt tokens, {generated} generated, first token {firstToken?.TotalSeconds ?? 0:F2} s, " +
            $"{(generated > 1 && decodeSeconds > 0 ? (generated - 1) / decodeSeconds : 0):F1} tokens/s, finish: {finish?.Value ?? "none"}]"));
        return answer.ToString();
    }

    private Task SwitchAsync(ref string? section, string next)
    {
        if (section == next)
        {
            return Task.CompletedTask;
        }

        var first = section is null;
        section = next;
        if (terminal)
        {
            return first ? Task.CompletedTask : output.WriteAsync("\n\n");
        }

        var heading = next == "reasoning" ? "Reasoning:" : "Answer:";
        return output.WriteAsync(first ? heading + "\n" : "\n\n" + heading + "\n");
    }
}
