using System.CommandLine;
using DeepSeekCuda.Hosting;
using Microsoft.Extensions.AI;

namespace DeepSeekCuda.Cli.Commands;

/// <summary><c>dscuda generate</c>: one prompt, the answer streamed with its reasoning shown apart.</summary>
internal static class GenerateCommand
{
    public static Command Create()
    {
        var model = ModelOption.Create();
        var prompt = new Option<string>("--prompt", "-p") { Description = "The user message", Required = true };
        var system = new Option<string?>("--system") { Description = "A system prompt (R1's advice: put instructions in the user message instead)" };
        var device = DeviceOption.Create();
        var sampling = new SamplingArguments();
        var command = new Command("generate", "Generate a reply to one prompt, streaming reasoning and answer") { model, prompt, system, device };
        sampling.AddTo(command);
        command.SetAction(async (parse, cancellationToken) =>
        {
            var computeDevice = DeviceOption.Parse(parse.GetValue(device));
            var options = sampling.ToChatOptions(parse);
            var log = parse.InvocationConfiguration.Error;
            using var local = ModelLoading.Load(parse.GetValue(model), log, computeDevice);
            using var client = local.CreateChatClient();
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
