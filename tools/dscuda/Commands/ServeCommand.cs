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
        var model = ModelOption.Create();
        var device = DeviceOption.Create();
        var host = new Option<string>("--host") { Description = "Address to bind (an IP address or localhost)", DefaultValueFactory = _ => "127.0.0.1" };
        var port = new Option<int>("--port") { Description = "TCP port; 0 picks a free one", DefaultValueFactory = _ => ChatServerOptions.DefaultPort };
        var apiKey = new Option<string?>("--api-key") { Description = $"Require 'Authorization: Bearer KEY' on every route but /health (default: ${ApiKeyVariable})" };
        var modelId = new Option<string?>("--model-id") { Description = "The model name clients ask for (default: the model folder's name)" };
        var command = new Command("serve", "Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models, /health, /metrics)")
        {
            model, device, host, port, apiKey, modelId,
        };
        command.SetAction(async (parse, cancellationToken) =>
        {
            var computeDevice = DeviceOption.Parse(parse.GetValue(device));
            var output = parse.InvocationConfiguration.Output;
            var log = parse.InvocationConfiguration.Error;
            if (parse.GetValue(port) is < 0 or > 65535)
            {
                throw new UserErrorException($"--port must be in 0..65535, is {parse.GetValue(port)}");
            }

            if (parse.GetValue(host) is var h && h != "localhost" && !System.Net.IPAddress.TryParse(h, out _))
            {
                throw new UserErrorException($"--host must be an IP address or localhost, is '{h}'");
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
            await using var server = ChatServer.Create(options, _ => LoadClient(parse.GetValue(model), options.ModelId, computeDevice, log, out local), new LineLogger.Provider(log));
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
    private static IChatClient LoadClient(string? model, string? modelId, ComputeDevice device, TextWriter log, out LocalModel? local)
    {
        local = ModelLoading.Load(model, log, device);
        return local.CreateChatClient(modelId is null ? null : new DeepSeekChatClientOptions { TemplateKind = local.TemplateKind, ModelId = modelId });
    }

    /// <summary>Server log events as one line each on the CLI's error writer (warnings and errors only).</summary>
    private sealed class LineLogger(TextWriter log, string category) : ILogger
    {
        public IDisposable? BeginScope<TState>(TState state)
            where TState : notnull => null;

        public bool IsEnabled(LogLevel logLevel) => logLevel >= LogLevel.Warning;

        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
        {
            if (!IsEnabled(logLevel))
            {
                return;
            }

            lock (log)
            {
                log.WriteLine($"{logLevel.ToString().ToLowerInvariant()}: {category}: {formatter(state, exception)}{(exception is null ? "" : $": {exception.GetType().Name}: {exception.Message}")}");
            }
        }

        public sealed class Provider(TextWriter log) : ILoggerProvider
        {
            public ILogger CreateLogger(string categoryName) => new LineLogger(log, categoryName);

            public void Dispose()
            {
            }
        }
    }
}
