using System.Diagnostics;
using System.Diagnostics.Metrics;
using System.Runtime.CompilerServices;
using System.Text;
using System.Text.Json;
using DeepSeekCuda.Inference;
using DeepSeekCuda.Text;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace DeepSeekCuda.Hosting;

/// <summary>
/// <see cref="IChatClient"/> over a local DeepSeek-V3/R1 model: renders the conversation with
/// <see cref="ChatTemplate"/>, generates with <see cref="TextGenerator"/>, and returns reasoning as
/// <see cref="TextReasoningContent"/> and the answer as <see cref="TextContent"/>.
/// </summary>
/// <remarks>
/// Requests run one at a time: the CPU backend uses every core for a single sequence, so concurrent
/// requests would only slow each other down and multiply KV-cache memory. Callers queue on a
/// semaphore (cancellable while waiting). Batching several sequences arrives with the GPU engine.
/// Tool definitions in <see cref="ChatOptions.Tools"/> are not rendered (the DeepSeek templates have no
/// slot for them) and tool calls in the output are not parsed; past calls and results are rendered.
/// </remarks>
public sealed class DeepSeekChatClient : IChatClient
{
    /// <summary>The provider name in <see cref="ChatClientMetadata"/>.</summary>
    public const string ProviderName = "DeepSeekCuda";

    // Compact JSON, as tool-call arguments are written by the models and by OpenAI-style APIs.
    private static readonly JsonSerializerOptions CompactJson = new(AIJsonUtilities.DefaultOptions) { WriteIndented = false };

    private readonly TextGenerator _generator;
    private readonly DeepSeekChatClientOptions _options;
    private readonly ILogger _logger;
    private readonly DeepSeekCudaMetrics _metrics;
    // Never disposed: it has no wait handle (AvailableWaitHandle is not used), and a request still in
    // flight when the client is disposed must be able to release it.
    private readonly SemaphoreSlim _gate = new(1, 1);
    private readonly Lock _state = new();
    private readonly bool _disposeModel;
    private bool _disposed;
    private bool _running;
    private int _released;

    /// <summary>Creates a chat client.</summary>
    /// <param name="model">The model.</param>
    /// <param name="tokenizer">Its tokenizer.</param>
    /// <param name="options">Template, default sampling and model id; null for defaults (R1).</param>
    /// <param name="logger">Receives generation start/finish events.</param>
    /// <param name="meterFactory">Creates the "DeepSeekCuda" meter; null for a meter owned by this client.</param>
    /// <param name="disposeModel">Dispose <paramref name="model"/> with this client.</param>
    public DeepSeekChatClient(ILanguageModel model, ITokenizer tokenizer, DeepSeekChatClientOptions? options = null, ILogger<DeepSeekChatClient>? logger = null, IMeterFactory? meterFactory = null, bool disposeModel = false)
    {
        _generator = new TextGenerator(model, tokenizer);
        _options = options ?? new DeepSeekChatClientOptions();
        _options.DefaultSampling.Validate();
        _logger = (ILogger?)logger ?? NullLogger.Instance;
        _metrics = new DeepSeekCudaMetrics(_options.ModelId, meterFactory);
        _disposeModel = disposeModel;
        Metadata = new ChatClientMetadata(ProviderName, providerUri: null, defaultModelId: _options.ModelId);
    }

    /// <summary>Provider "DeepSeekCuda" and the configured model id.</summary>
    public ChatClientMetadata Metadata { get; }

    /// <summary>The generator, for callers that want token-level control.</summary>
    public TextGenerator Generator => _generator;

    /// <inheritdoc/>
    public async Task<ChatResponse> GetResponseAsync(IEnumerable<ChatMessage> messages, ChatOptions? options = null, CancellationToken cancellationToken = default)
    {
        var reasoning = new StringBuilder();
        var answer = new StringBuilder();
        var response = new ChatResponse { ModelId = _options.ModelId };
        await foreach (var update in GetStreamingResponseAsync(messages, options, cancellationToken).ConfigureAwait(false))
        {
            response.ResponseId ??= update.ResponseId;
            response.CreatedAt ??= update.CreatedAt;
            response.FinishReason ??= update.FinishReason;
            foreach (var content in update.Contents)
            {
                switch (content)
                {
                    case TextReasoningContent r:
                        reasoning.Append(r.Text);
                        break;
                    case TextContent t:
                        answer.Append(t.Text);
                        break;
                    case UsageContent u:
                        response.Usage = u.Details;
                        break;
                }
            }
        }

        var contents = new List<AIContent>();
        if (reasoning.Length > 0)
        {
            contents.Add(new TextReasoningContent(reasoning.ToString()));
        }

        contents.Add(new TextContent(answer.ToString()));
        response.Messages.Add(new ChatMessage(ChatRole.Assistant, contents) { MessageId = response.ResponseId, CreatedAt = response.CreatedAt });
        return response;
    }

    /// <inheritdoc/>
    public IAsyncEnumerable<ChatResponseUpdate> GetStreamingResponseAsync(IEnumerable<ChatMessage> messages, ChatOptions? options = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(messages);
        ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed), this);
        var turns = ToTurns(messages, options);
        var sampling = ToSampling(options);
        sampling.Validate();
        return Stream(turns, sampling, cancellationToken);
    }

    /// <inheritdoc/>
    public object? GetService(Type serviceType, object? serviceKey = null)
    {
        ArgumentNullException.ThrowIfNull(serviceType);
        if (serviceKey is not null)
        {
            return null;
        }

        if (serviceType == typeof(ChatClientMetadata))
        {
            return Metadata;
        }

        if (serviceType.IsInstanceOfType(this))
        {
            return this;
        }

        if (serviceType.IsInstanceOfType(_generator.Model))
        {
            return _generator.Model;
        }

        if (serviceType.IsInstanceOfType(_generator.Tokenizer))
        {
            return _generator.Tokenizer;
        }

        return serviceType == typeof(DeepSeekCudaMetrics) ? _metrics : null;
    }

    /// <summary>
    /// Disposes the client (and the model, when it owns it). A request already generating finishes first:
    /// the model is released when it ends, never under a running forward pass. Requests still queued, and
    /// any later ones, throw <see cref="ObjectDisposedException"/>.
    /// </summary>
    public void Dispose()
    {
        lock (_state)
        {
            if (_disposed)
            {
                return;
            }

            _disposed = true;
            if (_running)
            {
                return; // the running request releases everything when it ends
            }
        }

        ReleaseResources();
    }

    private void ReleaseResources()
    {
        if (Interlocked.Exchange(ref _released, 1) != 0)
        {
            return;
        }

        _metrics.Dispose();
        if (_disposeModel)
        {
            _generator.Model.Dispose();
        }
    }

    /// <summary>Maps Microsoft.Extensions.AI messages to template turns.</summary>
    /// <remarks>
    /// <see cref="ChatOptions.Instructions"/> becomes a leading system prompt. Past reasoning
    /// (<see cref="TextReasoningContent"/>) is dropped, as R1's template would strip it anyway.
    /// <see cref="FunctionCallContent"/> becomes a tool call with its arguments as JSON;
    /// each <see cref="FunctionResultContent"/> becomes a tool output.
    /// </remarks>
    internal static List<ChatTurn> ToTurns(IEnumerable<ChatMessage> messages, ChatOptions? options)
    {
        var turns = new List<ChatTurn>();
        if (!string.IsNullOrEmpty(options?.Instructions))
        {
            turns.Add(ChatTurn.System(options.Instructions));
        }

        foreach (var m in messages)
        {
            var text = string.Concat(m.Contents.OfType<TextContent>().Select(t => t.Text));
            if (m.Role == ChatRole.System)
            {
                turns.Add(ChatTurn.System(text));
            }
            else if (m.Role == ChatRole.User)
            {
                turns.Add(ChatTurn.User(text));
            }
            else if (m.Role == ChatRole.Assistant)
            {
                var calls = m.Contents.OfType<FunctionCallContent>()
                    .Select(c => new ChatToolCall(c.Name, JsonSerializer.Serialize(c.Arguments ?? new Dictionary<string, object?>(), CompactJson)))
                    .ToList();
                if (calls.Count > 0)
                {
                    turns.Add(ChatTurn.AssistantToolCalls(calls, text.Length > 0 ? text : null));
                }
                else
                {
                    turns.Add(ChatTurn.Assistant(text));
                }
            }
            else if (m.Role == ChatRole.Tool)
            {
                var results = m.Contents.OfType<FunctionResultContent>().ToList();
                if (results.Count == 0)
                {
                    turns.Add(ChatTurn.Tool(text));
                }

                foreach (var r in results)
                {
                    turns.Add(ChatTurn.Tool(r.Result switch
                    {
                        null => string.Empty,
                        string s => s,
                        JsonElement { ValueKind: JsonValueKind.String } e => e.GetString() ?? string.Empty,
                        var o => JsonSerializer.Serialize(o, CompactJson),
                    }));
                }
            }
            else
            {
                throw new NotSupportedException($"chat role '{m.Role}' is not supported");
            }
        }

        return turns;
    }

    private SamplingOptions ToSampling(ChatOptions? options)
    {
        var d = _options.DefaultSampling;
        if (options is null)
        {
            return d;
        }

        return d with
        {
            Temperature = options.Temperature ?? d.Temperature,
            TopP = options.TopP ?? d.TopP,
            TopK = options.TopK ?? d.TopK,
            Seed = options.Seed ?? d.Seed,
            MaxTokens = options.MaxOutputTokens ?? d.MaxTokens,
            StopSequences = options.StopSequences is { Count: > 0 } stops ? [.. stops] : d.StopSequences,
        };
    }

    private async IAsyncEnumerable<ChatResponseUpdate> Stream(List<ChatTurn> turns, SamplingOptions sampling, [EnumeratorCancellation] CancellationToken ct)
    {
        var prompt = ChatTemplate.Render(turns, new ChatTemplateOptions { Kind = _options.TemplateKind });

        // The rendered text carries BOS as text; encoding must not add another.
        var ids = _generator.Tokenizer.Encode(prompt, addBos: false);
        var reasoningMode = !_options.ParseReasoning ? ReasoningMode.None
            : _options.TemplateKind == ChatTemplateKind.R1 ? ReasoningMode.StartInReasoning : ReasoningMode.Detect;

        if (_gate.CurrentCount == 0)
        {
            Log.WaitingForModel(_logger);
        }

        await _gate.WaitAsync(ct).ConfigureAwait(false);
        bool disposedWhileQueued;
        lock (_state)
        {
            disposedWhileQueued = _disposed;
            _running = !disposedWhileQueued;
        }

        if (disposedWhileQueued)
        {
            _gate.Release();
            throw new ObjectDisposedException(nameof(DeepSeekChatClient));
        }

        var responseId = Guid.NewGuid().ToString("N");
        var createdAt = DateTimeOffset.UtcNow;
        var start = Stopwatch.GetTimestamp();
        long firstToken = 0;
        var generated = 0;
        var completed = false;
        try
        {
            Log.GenerationStarted(_logger, _options.ModelId, ids.Length, sampling.MaxTokens, sampling.IsGreedy ? 0 : sampling.EffectiveTemperature);
            await foreach (var u in _generator.GenerateAsync(ids, sampling, reasoningMode, ct).ConfigureAwait(false))
            {
                if (firstToken == 0 && u.Usage.GeneratedTokens > 0)
                {
                    firstToken = Stopwatch.GetTimestamp();
                    _metrics.RecordFirstToken(Stopwatch.GetElapsedTime(start, firstToken).TotalSeconds);
                }

                generated = u.Usage.GeneratedTokens;
                if (u.Text.Length > 0)
                {
                    AIContent content = u.Kind == TextKind.Reasoning ? new TextReasoningContent(u.Text) : new TextContent(u.Text);
                    yield return NewUpdate(responseId, createdAt, [content]);
                }

                if (u.FinishReason is { } finish)
                {
                    var end = Stopwatch.GetTimestamp();
                    var decodeSeconds = firstToken == 0 ? 0 : Stopwatch.GetElapsedTime(firstToken, end).TotalSeconds;
                    var tokensPerSecond = generated > 1 && decodeSeconds > 0 ? (generated - 1) / decodeSeconds : 0;
                    _metrics.RecordCompleted(u.Usage.PromptTokens, u.Usage.GeneratedTokens, tokensPerSecond);
                    Log.GenerationFinished(_logger, finish.ToString(), u.Usage.PromptTokens, u.Usage.GeneratedTokens, Stopwatch.GetElapsedTime(start, end).TotalSeconds, firstToken == 0 ? 0 : Stopwatch.GetElapsedTime(start, firstToken).TotalSeconds, tokensPerSecond);
                    completed = true;

                    var usage = new UsageDetails
                    {
                        InputTokenCount = u.Usage.PromptTokens,
                        OutputTokenCount = u.Usage.GeneratedTokens,
                        TotalTokenCount = u.Usage.TotalTokens,
                    };
                    var last = NewUpdate(responseId, createdAt, [new UsageContent(usage)]);
                    last.FinishReason = finish == Inference.FinishReason.Length ? ChatFinishReason.Length : ChatFinishReason.Stop;
                    yield return last;
                }
            }
        }
        finally
        {
            if (!completed)
            {
                Log.GenerationAborted(_logger, generated, Stopwatch.GetElapsedTime(start).TotalSeconds);
            }

            bool disposedWhileRunning;
            lock (_state)
            {
                _running = false;
                disposedWhileRunning = _disposed;
            }

            _gate.Release();
            if (disposedWhileRunning)
            {
                ReleaseResources();
            }
        }
    }

    private ChatResponseUpdate NewUpdate(string responseId, DateTimeOffset createdAt, IList<AIContent> contents) => new(ChatRole.Assistant, contents)
    {
        ResponseId = responseId,
        MessageId = responseId,
        ModelId = _options.ModelId,
        CreatedAt = createdAt,
    };
}
