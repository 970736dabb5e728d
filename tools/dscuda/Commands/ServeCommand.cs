using System.CommandLine;
using DeepSeekCuda.Cli.Server;
using DeepSeekCuda.Hosting;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.Logging;

namespace DeepSeekCuda.Cli.Commands;

/// <summary>
/// <c>dscuda serve</c>: the OpenAI-compatible HTTP server. Prints <c>listening on URL</c> on standard output as soon as
/// the port is bound (before the model has loaded: <c>/health</c> says when it is ready); runs until cancelled
/// (Ctrl+C, SIGTERM, or the caller's token), then drains running requests and exits 0.
/// </summary>
internal static class ServeCommand
{
    /// <summary>The environment variable read for the API key when <c>--api-key</c> is not given.</summary>
    public const string ApiKeyVariable = "DSCUDA_API_KEY";

    public static Command Create()
    {
        var model = new ModelArguments();
        var maxBatch = new Option<int>("--max-batch")
        {
            Description = "Most requests decoding together (the rest wait for a slot), sharing the cache pool; the default context and pool are sized for this many at once",
            DefaultValueFactory = _ => new DeepSeekChatClientOptions().MaxBatch,
        };
        var host = new Option<string>("--host") { Description = "Address to bind (an IP address or localhost)", DefaultValueFactory = _ => "127.0.0.1" };
        var port = new Option<int>("--port") { Description = "TCP port; 0 picks a free one", DefaultValueFactory = _ => ChatServerOptions.DefaultPort };
        var apiKey = new Option<string?>("--api-key") { Description = $"Require 'Authorization: Bearer KEY' on every route but /health (default: ${ApiKeyVariable})" };
        var modelId = new Option<string?>("--model-id") { Description = "The model name clients ask for (default: the model folder's name)" };
        var command = new Command("serve", "Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models, /health, /metrics)")
        {
            host, port, apiKey, modelId, maxBatch,
        };
        model.AddTo(command);
        command.SetAction(async (parse, cancellationToken) =>
        {
            model.Devices(parse); // an unusable --device cuda or --gpus list is refused before the port is bound
            var output = parse.InvocationConfiguration.Output;
            var log = parse.InvocationConfiguration.Error;
            if (parse.GetValue(port) is < 0 or > 65535)
            {
                throw new UserErrorException($"--port must be in 0..65535, is {parse.GetValue(port)}");
            }

            if (parse.GetValue(host) is var h && !ChatServer.TryParseHost(h!, out _))
            {
                throw new UserErrorException($"--host must be an IP address or localhost, is '{h}'");
            }

            if (parse.GetValue(maxBatch) < 1)
            {
                throw new UserErrorException($"--max-batch must be at least 1, is {parse.GetValue(maxBatch)}");
            }

            var options = new ChatServerOptions
            {
                Host = parse.GetValue(host)!,
                Port = parse.GetValue(port),
                ApiKey = parse.GetValue(apiKey) is { Length: > 0 } given ? given
                    : Environment.GetEnvironmentVariable(ApiKeyVariable) is { Length: > 0 } fromEnvironment ? fromEnvironment : null,
                ModelId = parse.GetValue(modelId),
            };

            LocalModel? local = null;
            using var loggers = CliLogging.CreateFactory(parse);
            await using var server = ChatServer.Create(options, ct => LoadClient(model, parse, parse.GetValue(maxBatch), options.ModelId, loggers, ct, out local), CliLogging.CreateProvider(parse));
            try
            {
                var address = await server.StartAsync(cancellationToken);
                await output.WriteLineAsync($"listening on {address.ToString().TrimEnd('/')}");
                await output.FlushAsync(cancellationToken);
                await server.Ready.WaitAsync(cancellationToken);
                await log.WriteLineAsync($"model {server.ModelId} ready");
                await Task.Delay(Timeout.Infinite, cancellationToken);
            }
            catch (OperationCanceledException) when (cancellationToken.IsCancellationRequested)
            {
                await log.WriteLineAsync("stopping: draining running requests");
            }
            finally
            {
                await server.StopAsync(CancellationToken.None);
                local?.Dispose();
            }

            return 0;
        });
        return command;
    }

    /// <summary>Loads the model (with the CLI's progress bar) and creates the server's one chat client over it.</summary>
    /// <remarks>The default context and cache pool are sized for <paramref name="maxBatch"/> requests at once (<see cref="ContextSize"/>); the load stops between layers when the server stops.</remarks>
    private static IChatClient LoadClient(ModelArguments model, ParseResult parse, int maxBatch, string? modelId, ILoggerFactory loggers, CancellationToken cancellationToken, out LocalModel? local)
    {
        local = model.Load(parse, parse.InvocationConfiguration.Error, loggers, maxBatch, cancellationToken);
        var options = model.ChatClientOptions(parse, local);
        options.MaxBatch = maxBatch;
        if (modelId is not null)
        {
            options.ModelId = modelId;
        }

        return local.CreateChatClient(options, loggers.CreateLogger<DeepSeekChatClient>());
    }
}
