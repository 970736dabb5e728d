namespace DeepSeekCuda.Cli.Server;

/// <summary>Where and how <see cref="ChatServer"/> listens.</summary>
public sealed record ChatServerOptions
{
    /// <summary>The port vLLM and most OpenAI-compatible servers default to.</summary>
    public const int DefaultPort = 8000;

    /// <summary>An IP address to bind (<c>localhost</c> means 127.0.0.1). Loopback by default: a model server is not exposed unless asked.</summary>
    public string Host { get; init; } = "127.0.0.1";

    /// <summary>TCP port; 0 picks a free one (read it from <see cref="ChatServer.Address"/>).</summary>
    public int Port { get; init; } = DefaultPort;

    /// <summary>When set, every route but <c>/health</c> requires <c>Authorization: Bearer</c> this key.</summary>
    public string? ApiKey { get; init; }

    /// <summary>The model name clients must ask for; null: the chat client's default model id.</summary>
    public string? ModelId { get; init; }

    /// <summary>
    /// How long a shutdown waits for running requests to finish before their connections are aborted (which cancels
    /// them and returns their cache blocks).
    /// </summary>
    public TimeSpan DrainTimeout { get; init; } = TimeSpan.FromSeconds(60);
}
