using System.CommandLine;
using DeepSeekCuda.Hosting;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.Logging;

namespace DeepSeekCuda.Cli.Commands;

/// <summary><c>dscuda chat</c>: an interactive chat with history; <c>/reset</c> clears it, <c>/exit</c> or end of input quits.</summary>
internal static class ChatCommand
{
    public static Command Create(TextReader input)
    {
        var model = new ModelArguments();
        var system = new Option<string?>("--system") { Description = "A system prompt" };
        var sampling = new SamplingArguments();
        var command = new Command("chat", "Chat interactively (history kept; /reset, /exit)") { system };
        model.AddTo(command);
        sampling.AddTo(command);
        command.SetAction(async (parse, cancellationToken) =>
        {
            model.Device(parse); // an unusable --device cuda is refused before anything is read
            var options = sampling.ToChatOptions(parse);
            var output = parse.InvocationConfiguration.Output;
            var log = parse.InvocationConfiguration.Error;
            using var loggers = CliLogging.CreateFactory(parse);
            using var local = model.Load(parse, log, loggers, cancellationToken: cancellationToken);
            using var client = local.CreateChatClient(model.ChatClientOptions(parse, local), loggers.CreateLogger<DeepSeekChatClient>());
            var renderer = ChatRenderer.For(output, log);
            var history = new List<ChatMessage>();
            if (parse.GetValue(system) is { Length: > 0 } s)
            {
                history.Add(new ChatMessage(ChatRole.System, s));
            }

            var baseline = history.Count;
            await log.WriteLineAsync("Type a message; /reset clears the history, /exit quits.");
            while (true)
            {
                await output.WriteAsync("> ");
                await output.FlushAsync(cancellationToken);
                var line = await input.ReadLineAsync(cancellationToken);
                if (line is null || line.Trim() == "/exit")
                {
                    break;
                }

                if (line.Trim() == "/reset")
                {
                    history.RemoveRange(baseline, history.Count - baseline);
                    await log.WriteLineAsync("(history cleared)");
                    continue;
                }

                if (line.Trim().Length == 0)
                {
                    continue;
                }

                history.Add(new ChatMessage(ChatRole.User, line));
                var answer = await renderer.StreamAsync(client, history, options, cancellationToken);
                // The template drops past reasoning anyway; keep only the answer in the history.
                history.Add(new ChatMessage(ChatRole.Assistant, answer));
            }

            return 0;
        });
        return command;
    }
}
