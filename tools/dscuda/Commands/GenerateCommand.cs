using System.CommandLine;
using DeepSeekCuda.Hosting;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.Logging;

namespace DeepSeekCuda.Cli.Commands;

/// <summary><c>dscuda generate</c>: one prompt, the answer streamed with its reasoning shown apart.</summary>
internal static class GenerateCommand
{
    public static Command Create()
    {
        var model = new ModelArguments();
        var prompt = new Option<string>("--prompt", "-p") { Description = "The user message", Required = true };
        var system = new Option<string?>("--system") { Description = "A system prompt (R1's advice: put instructions in the user message instead)" };
        var sampling = new SamplingArguments();
        var command = new Command("generate", "Generate a reply to one prompt, streaming reasoning and answer") { prompt, system };
        model.AddTo(command);
        sampling.AddTo(command);
        command.SetAction(async (parse, cancellationToken) =>
        {
            model.Device(parse); // an unusable --device cuda is refused before anything is read
            var options = sampling.ToChatOptions(parse);
            var log = parse.InvocationConfiguration.Error;
            using var loggers = CliLogging.CreateFactory(parse);
            using var local = model.Load(parse, log, loggers, cancellationToken: cancellationToken);
            using var client = local.CreateChatClient(model.ChatClientOptions(parse, local), loggers.CreateLogger<DeepSeekChatClient>());
            var messages = new List<ChatMessage>();
            if (parse.GetValue(system) is { Length: > 0 } s)
            {
                messages.Add(new ChatMessage(ChatRole.System, s));
            }

            messages.Add(new ChatMessage(ChatRole.User, parse.GetValue(prompt)));
            await ChatRenderer.For(parse.InvocationConfiguration.Output, log).StreamAsync(client, messages, options, cancellationToken);
            return 0;
        });
        return command;
    }
}
