using System.Net;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using DeepSeekCuda.Hosting;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;

namespace DeepSeekCuda.Cli.Server;

/// <summary>
/// The OpenAI-compatible HTTP server of <c>dscuda serve</c> (ASP.NET Core on Kestrel): <c>POST /v1/chat/completions</c>,
/// <c>GET /v1/models</c>, <c>GET /health</c> and <c>GET /metrics</c> over one chat client.
/// </summary>
/// <remarks>
/// The server listens before the model is loaded, so that <c>/health</c> can answer 503 while a large checkpoint
/// loads (the loader runs on the thread pool after <see cref="StartAsync"/>) and 200 once it is ready; other routes
/// answer 503 until then. Stopping drains: Kestrel stops accepting connections and waits, up to
/// <see cref="ChatServerOptions.DrainTimeout"/>, for running requests to finish; then the chat client is disposed
/// (when the server owns it), which itself waits for any request still in its scheduler.
/// </remarks>
public sealed class ChatServer : IAsyncDisposable
{
    private readonly WebApplication _app;
    private readonly ChatServerOptions _options;
    private readonly Func<CancellationToken, IChatClient> _load;
    private readonly bool _ownsClient;
    private readonly CancellationTokenSource _stopping = new();
    private readonly ILogger _logger;
    private readonly byte[]? _keyHash;
    private Task? _loaded;
    private volatile Loaded? _ready;
    private int _stopped;

    private sealed record Loaded(IChatClient Client, string ModelId, long Created, ChatCompletionsEndpoint Completions, PrometheusExporter? Metrics);

    private ChatServer(ChatServerOptions options, Func<CancellationToken, IChatClient> load, bool ownsClient, ILoggerProvider? logs)
    {
        ArgumentNullException.ThrowIfNull(options);
        _options = options;
        _load = load;
        _ownsClient = ownsClient;
        _keyHash = string.IsNullOrEmpty(options.ApiKey) ? null : SHA256.HashData(Encoding.UTF8.GetBytes(options.ApiKey));
        var address = ParseHost(options.Host);
        if (options.Port is < 0 or > 65535)
        {
            throw new ArgumentOutOfRangeException(nameof(options), options.Port, "the port must be in 0..65535");
        }

        var builder = WebApplication.CreateSlimBuilder(new WebApplicationOptions { ApplicationName = "dscuda", ContentRootPath = AppContext.BaseDirectory });
        builder.Logging.ClearProviders();
        if (logs is not null)
        {
            builder.Logging.AddProvider(logs);
        }

        // ASP.NET Core logs four information lines per request; -v is for what the engine and this server decide.
        // Its warnings and errors still come through.
        builder.Logging.AddFilter((category, level) => level >= LogLevel.Warning
            || category?.StartsWith("Microsoft.AspNetCore", StringComparison.Ordinal) != true);

        builder.WebHost.UseKestrel(k => k.Listen(address, options.Port));
        builder.Services.Configure<HostOptions>(h => h.ShutdownTimeout = options.DrainTimeout);
        // The caller (the CLI's cancellation token, or a test) decides when to stop, not the console's Ctrl+C.
        builder.Services.AddSingleton<IHostLifetime, CallerLifetime>();
        _app = builder.Build();
        _logger = _app.Services.GetRequiredService<ILoggerFactory>().CreateLogger("DeepSeekCuda.Server");
        Map(_app);
    }

    /// <summary>A server that loads its chat client with <paramref name="load"/> after it starts listening, and owns it (disposes it when stopped).</summary>
    /// <param name="options">Address, port, API key, model id.</param>
    /// <param name="load">Loads the model and returns the client; runs on the thread pool; the token is cancelled when the server stops.</param>
    /// <param name="logs">Receives request failures and server events; null: none.</param>
    public static ChatServer Create(ChatServerOptions options, Func<CancellationToken, IChatClient> load, ILoggerProvider? logs = null) =>
        new(options, load ?? throw new ArgumentNullException(nameof(load)), ownsClient: true, logs);

    /// <summary>A server over a client the caller owns (and disposes after stopping the server).</summary>
    public static ChatServer Create(ChatServerOptions options, IChatClient client, ILoggerProvider? logs = null)
    {
        ArgumentNullException.ThrowIfNull(client);
        return new(options, _ => client, ownsClient: false, logs);
    }

    /// <summary>The bound address, e.g. <c>http://127.0.0.1:8000</c>; set by <see cref="StartAsync"/>.</summary>
    public Uri? Address { get; private set; }

    /// <summary>Completes when the model is loaded and requests are served; faults with the loader's exception.</summary>
    public Task Ready => _loaded ?? throw new InvalidOperationException("the server has not been started");

    /// <summary>The model id served (null until loaded).</summary>
    public string? ModelId => _ready?.ModelId;

    /// <summary>Starts listening, then starts loading the model in the background; returns the bound address.</summary>
    public async Task<Uri> StartAsync(CancellationToken cancellationToken = default)
    {
        await _app.StartAsync(cancellationToken);
        var addresses = _app.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()!.Addresses;
        Address = new Uri(addresses.First());
        _loaded = Task.Run(LoadAsync, CancellationToken.None);
        return Address;
    }

    /// <summary>
    /// Stops accepting requests, waits for running ones (up to <see cref="ChatServerOptions.DrainTimeout"/>), then
    /// disposes the chat client when the server owns it.
    /// </summary>
    public async Task StopAsync(CancellationToken cancellationToken = default)
    {
        if (Interlocked.Exchange(ref _stopped, 1) != 0)
        {
            return;
        }

        await _stopping.CancelAsync();
        await _app.StopAsync(cancellationToken);
        if (_loaded is not null)
        {
            try
            {
                await _loaded;
            }
            catch (Exception)
            {
                // A failed load was reported through Ready.
            }
        }

        _ready?.Metrics?.Dispose();
        if (_ownsClient)
        {
            _ready?.Client.Dispose();
        }
    }

    /// <inheritdoc/>
    public async ValueTask DisposeAsync()
    {
        await StopAsync();
        await _app.DisposeAsync();
        _stopping.Dispose();
    }

    private void LoadAsync()
    {
        var client = _load(_stopping.Token);
        var modelId = _options.ModelId ?? client.GetService<ChatClientMetadata>()?.DefaultModelId ?? "default";
        var metrics = client.GetService<DeepSeekCudaMetrics>() is { } m ? new PrometheusExporter(m.Meter) : null;
        _ready = new Loaded(client, modelId, DateTimeOffset.UtcNow.ToUnixTimeSeconds(), new ChatCompletionsEndpoint(client, modelId, _logger), metrics);
        ServerLog.Ready(_logger, modelId);
    }

    private void Map(WebApplication app)
    {
        app.Use(GuardAsync);
        app.MapGet("/health", (RequestDelegate)HealthAsync);
        app.MapGet("/v1/models", (RequestDelegate)(c => ModelsAsync(c, null)));
        app.MapGet("/v1/models/{id}", (RequestDelegate)(c => ModelsAsync(c, (string?)c.Request.RouteValues["id"])));
        app.MapPost("/v1/chat/completions", (RequestDelegate)(c => ServeAsync(c, r => r.Completions.HandleAsync(c))));
        app.MapGet("/metrics", (RequestDelegate)MetricsAsync);
        app.MapFallback((RequestDelegate)(c => OpenAIError.RespondAsync(c, StatusCodes.Status404NotFound,
            $"no route {c.Request.Method} {c.Request.Path}", "invalid_request_error", null, "unknown_url")));
    }

    /// <summary>Checks the API key, and turns any failure of a route into OpenAI's error object.</summary>
    private async Task GuardAsync(HttpContext context, RequestDelegate next)
    {
        if (_keyHash is not null && context.Request.Path != "/health" && !Authorized(context.Request.Headers.Authorization.ToString()))
        {
            await OpenAIError.RespondAsync(context, StatusCodes.Status401Unauthorized,
                "Incorrect or missing API key: send 'Authorization: Bearer <key>'", "invalid_request_error", null, "invalid_api_key");
            return;
        }

        try
        {
            await next(context);
        }
        catch (OperationCanceledException) when (context.RequestAborted.IsCancellationRequested)
        {
            // The client went away; its requests were cancelled with it.
        }
        catch (OpenAIErrorException e) when (!context.Response.HasStarted)
        {
            await OpenAIError.RespondAsync(context, e);
        }
        catch (Exception e) when (!context.Response.HasStarted)
        {
            ServerLog.RequestFailed(_logger, context.Request.Path, e);
            await OpenAIError.RespondAsync(context, StatusCodes.Status500InternalServerError, $"internal error: {e.Message}", "server_error", null, null);
        }
    }

    /// <summary>Bearer token compared as SHA-256 digests in constant time: neither its bytes nor its length leak through timing.</summary>
    private bool Authorized(string header)
    {
        const string scheme = "Bearer ";
        if (!header.StartsWith(scheme, StringComparison.OrdinalIgnoreCase))
        {
            return false;
        }

        var given = SHA256.HashData(Encoding.UTF8.GetBytes(header[scheme.Length..].Trim()));
        return CryptographicOperations.FixedTimeEquals(given, _keyHash);
    }

    private Task ServeAsync(HttpContext context, Func<Loaded, Task> serve) =>
        _ready is { } ready ? serve(ready)
        : OpenAIError.RespondAsync(context, StatusCodes.Status503ServiceUnavailable,
            _loaded is { IsFaulted: true } ? "the model failed to load" : "the model is loading; retry when GET /health answers 200",
            "server_error", null, "model_not_ready");

    private async Task HealthAsync(HttpContext context)
    {
        var status = _ready is not null ? "ok" : _loaded is { IsFaulted: true } ? "failed" : "loading";
        context.Response.StatusCode = status == "ok" ? StatusCodes.Status200OK : StatusCodes.Status503ServiceUnavailable;
        context.Response.ContentType = "application/json";
        await using (var json = new Utf8JsonWriter(context.Response.BodyWriter))
        {
            json.WriteStartObject();
            json.WriteString("status", status);
            json.WriteEndObject();
        }
    }

    private Task ModelsAsync(HttpContext context, string? id) => ServeAsync(context, async ready =>
    {
        if (id is not null && id != ready.ModelId)
        {
            throw new OpenAIErrorException(StatusCodes.Status404NotFound, $"The model '{id}' does not exist", "model", "model_not_found");
        }

        context.Response.ContentType = "application/json";
        await using var json = new Utf8JsonWriter(context.Response.BodyWriter);
        if (id is null)
        {
            json.WriteStartObject();
            json.WriteString("object", "list");
            json.WriteStartArray("data");
        }

        json.WriteStartObject();
        json.WriteString("id", ready.ModelId);
        json.WriteString("object", "model");
        json.WriteNumber("created", ready.Created); // when this server loaded it
        json.WriteString("owned_by", "dscuda");
        json.WriteEndObject();
        if (id is null)
        {
            json.WriteEndArray();
            json.WriteEndObject();
        }
    });

    private Task MetricsAsync(HttpContext context) => ServeAsync(context, async ready =>
    {
        context.Response.ContentType = "text/plain; version=0.0.4; charset=utf-8";
        await context.Response.WriteAsync(ready.Metrics?.Scrape() ?? string.Empty, context.RequestAborted);
    });

    private static IPAddress ParseHost(string host) =>
        TryParseHost(host, out var address) ? address : throw new ArgumentException($"--host must be an IP address or localhost, is '{host}'", nameof(host));

    /// <summary>The address <paramref name="host"/> names: an IP address, or <c>localhost</c> (the IPv4 loopback).</summary>
    internal static bool TryParseHost(string host, out IPAddress address)
    {
        if (host == "localhost")
        {
            address = IPAddress.Loopback;
            return true;
        }

        return IPAddress.TryParse(host, out address!);
    }

    /// <summary>A host lifetime that leaves signals to the caller.</summary>
    private sealed class CallerLifetime : IHostLifetime
    {
        public Task WaitForStartAsync(CancellationToken cancellationToken) => Task.CompletedTask;

        public Task StopAsync(CancellationToken cancellationToken) => Task.CompletedTask;
    }
}

/// <summary>The server's log events.</summary>
internal static partial class ServerLog
{
    [LoggerMessage(1, LogLevel.Information, "serving model {ModelId}")]
    public static partial void Ready(ILogger logger, string modelId);

    [LoggerMessage(2, LogLevel.Error, "request {Path} failed")]
    public static partial void RequestFailed(ILogger logger, string path, Exception error);

    [LoggerMessage(3, LogLevel.Error, "a streamed completion failed after its first chunk; the stream ends with an error event")]
    public static partial void StreamFailed(ILogger logger, Exception error);
}
