using System.Collections.Concurrent;
using System.Diagnostics;
using System.Diagnostics.Metrics;
using System.Runtime.CompilerServices;
using System.Text;
using System.Text.Json;
using DeepSeekCuda.Inference;
using DeepSeekCuda.Inference.Constraints;
using DeepSeekCuda.Serving;
using DeepSeekCuda.Text;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace DeepSeekCuda.Hosting;

/// <summary>
/// <see cref="IChatClient"/> over a local DeepSeek-V3/R1 model: renders the conversation with
/// <see cref="ChatTemplate"/>, generates with <see cref="TextGenerator"/>, and returns reasoning as
/// <see cref="TextReasoningContent"/>, the answer as <see cref="TextContent"/> and the model's tool calls as
/// <see cref="FunctionCallContent"/>.
/// </summary>
/// <remarks>
/// Every request is submitted to one shared <see cref="BatchScheduler"/> (continuous batching): concurrent
/// calls join and leave the running batch between steps, up to <see cref="DeepSeekChatClientOptions.MaxBatch"/>
/// at once, and each one's output is what it would be alone. Cancelling a call removes its request and
/// returns its cache blocks before the call's enumeration ends. The step runner does the model work: by
/// default the one <see cref="StepRunners.For"/> picks (batched and paged for the DeepSeek models, on one device or
/// several); another plugs in through the constructor.
/// Functions in <see cref="ChatOptions.Tools"/> are described to the model in the system prompt (SGLang's
/// DeepSeek-V3 tool convention, see <see cref="ChatTemplateOptions.Tools"/>) and the calls it writes come back as
/// <see cref="FunctionCallContent"/> (arguments that are not a JSON object carry the parse error in
/// <see cref="FunctionCallContent.Exception"/>), with <see cref="ChatFinishReason.ToolCalls"/>; so
/// Microsoft.Extensions.AI's function-invocation middleware runs them. <see cref="ChatOptions.ToolMode"/> and a JSON
/// <see cref="ChatOptions.ResponseFormat"/> are enforced by constrained decoding (see <c>ChatRequestPlan</c>).
/// Options the engine cannot honour are refused before any work, never silently dropped: tools other than
/// functions, a response schema the grammar cannot enforce, and non-zero <see cref="ChatOptions.FrequencyPenalty"/>
/// or <see cref="ChatOptions.PresencePenalty"/> throw <see cref="NotSupportedException"/> naming the option.
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
    private readonly IStepRunner _runner;
    private readonly BatchScheduler _scheduler;
    private readonly CancellationTokenSource _stopScheduler = new();
    private readonly Lock _state = new();
    private readonly bool _disposeModel;
    private readonly Lazy<TokenVocabulary> _vocabulary; // built at the first constrained request
    private readonly ConcurrentDictionary<string, ChatRequestPlan> _plans = new(StringComparer.Ordinal);
    private bool _disposed;
    private int _active;
    private int _released;

    /// <summary>Creates a chat client.</summary>
    /// <param name="model">The model.</param>
    /// <param name="tokenizer">Its tokenizer.</param>
    /// <param name="options">Template, default sampling and model id; null for defaults (R1).</param>
    /// <param name="logger">Receives generation start/finish events.</param>
    /// <param name="meterFactory">Creates the "DeepSeekCuda" meter; null for a meter owned by this client.</param>
    /// <param name="disposeModel">Dispose <paramref name="model"/> with this client.</param>
    /// <param name="stepRunner">
    /// Runs the scheduler's steps over <paramref name="model"/>; owned by this client (disposed with it).
    /// Null: <see cref="StepRunners.For"/> <paramref name="model"/>.
    /// </param>
    /// <exception cref="ArgumentException">Speculative decoding is On but the runner cannot draft.</exception>
    /// <exception cref="InsufficientDeviceMemoryException">The devices cannot hold the cache pool (see <see cref="DeepSeekChatClientOptions.KvCacheBlocks"/>); nothing stays allocated.</exception>
    public DeepSeekChatClient(ILanguageModel model, ITokenizer tokenizer, DeepSeekChatClientOptions? options = null, ILogger<DeepSeekChatClient>? logger = null, IMeterFactory? meterFactory = null, bool disposeModel = false, IStepRunner? stepRunner = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(tokenizer);
        _options = options ?? new DeepSeekChatClientOptions();
        _options.Validate();
        _logger = (ILogger?)logger ?? NullLogger.Instance;
        _runner = stepRunner ?? StepRunners.For(model);
        try
        {
            // A paged runner allocates the pool when the scheduler attaches it: by default, what its devices hold then, at most
            // what MaxBatch full-length requests use (the rest could never be used).
            var blocksPerRequest = KvBlockManager.BlocksFor(_runner.MaxSequenceLength);
            var cap = checked(_options.MaxBatch * blocksPerRequest);
            var blocks = _options.KvCacheBlocks is { } given
                ? new KvBlockManager(given, _options.MaxBatch, blocksPerRequest)
                : new KvBlockManager(cap, _options.MaxBatch, blocksPerRequest) { ShrinkToFit = true };
            _scheduler = new BatchScheduler(_runner, blocks, TextGenerator.SchedulerOptionsFor(tokenizer, new SchedulerOptions
            {
                MaxBatch = _options.MaxBatch,
                MaxTokensPerStep = _options.MaxTokensPerStep,
                SpeculativeDecoding = _options.SpeculativeDecoding,
                AutoWindow = _options.SpeculativeAutoWindow,
                AutoMinAcceptanceRate = _options.SpeculativeAutoMinAcceptanceRate,
            }), _logger);
            var pool = blocks.TotalBlocks;
            var why = _options.KvCacheBlocks is not null ? "KvCacheBlocks"
                : pool < cap ? "what the devices hold beside the weights, the step buffers and a reserve"
                : $"room for {_options.MaxBatch} full-length requests";
            Log.CachePool(_logger, pool, (long)pool * KvBlockManager.BlockTokens, _options.MaxBatch, blocks.MaxTokensPerRequest, why);
        }
        catch
        {
            if (stepRunner is null)
            {
                _runner.Dispose();
            }

            throw;
        }

        _generator = new TextGenerator(model, tokenizer, _scheduler);
        _vocabulary = new Lazy<TokenVocabulary>(() => TokenVocabulary.Create(tokenizer));
        _metrics = new DeepSeekCudaMetrics(_options.ModelId, meterFactory);
        _metrics.ObserveScheduler(_scheduler);
        _disposeModel = disposeModel;
        Metadata = new ChatClientMetadata(ProviderName, providerUri: null, defaultModelId: _options.ModelId);
        _ = _scheduler.RunAsync(_stopScheduler.Token); // ends at ReleaseResources; a failed step is logged and fails only its requests
    }

    /// <summary>Provider "DeepSeekCuda" and the configured model id.</summary>
    public ChatClientMetadata Metadata { get; }

    /// <summary>The generator, for callers that want token-level control (its calls run on <see cref="Scheduler"/> too).</summary>
    public TextGenerator Generator => _generator;

    /// <summary>The scheduler every request of this client runs on: its counters, running requests and block pool.</summary>
    public BatchScheduler Scheduler => _scheduler;

    /// <summary>
    /// Opens a session (logits of tokens the caller feeds: scoring, perplexity, a caller's own decoding) whose calls run in this
    /// client's steps, in its cache pool, beside its requests (<see cref="BatchScheduler.CreateSession"/>): on a GPU whose memory
    /// the pool has taken, the way to run one. It holds a slot of <see cref="DeepSeekChatClientOptions.MaxBatch"/> and its blocks
    /// until disposed; disposing the client ends it.
    /// </summary>
    /// <exception cref="ObjectDisposedException">The client was disposed.</exception>
    public ScheduledSession CreateSession()
    {
        ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed), this);
        return _scheduler.CreateSession();
    }

    /// <inheritdoc/>
    public async Task<ChatResponse> GetResponseAsync(IEnumerable<ChatMessage> messages, ChatOptions? options = null, CancellationToken cancellationToken = default)
    {
        var reasoning = new StringBuilder();
        var answer = new StringBuilder();
        var calls = new List<FunctionCallContent>();
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
                    case FunctionCallContent c:
                        calls.Add(c);
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

        var text = answer.ToString();
        if (calls.Count == 0 || !string.IsNullOrWhiteSpace(text))
        {
            // Beside tool calls, the blank lines R1 writes after </think> are not an answer.
            contents.Add(new TextContent(text));
        }

        contents.AddRange(calls);
        response.Messages.Add(new ChatMessage(ChatRole.Assistant, contents) { MessageId = response.ResponseId, CreatedAt = response.CreatedAt });
        return response;
    }

    /// <inheritdoc/>
    public IAsyncEnumerable<ChatResponseUpdate> GetStreamingResponseAsync(IEnumerable<ChatMessage> messages, ChatOptions? options = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(messages);
        ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed), this);
        ThrowIfUnsupported(options);
        var turns = ToTurns(messages, options);
        // R1's generation prompt opens a think block; after tool outputs the templates add no generation prompt,
        // and the model answers (or thinks, in a block it opens itself) right after them.
        var startsInReasoning = _options.TemplateKind == ChatTemplateKind.R1 && turns is not [.., { Role: ChatTurnRole.Tool }];
        var plan = ChatRequestPlan.Create(options, _generator.Tokenizer, startsInReasoning, _plans);
        var sampling = ToSampling(options);
        sampling.Validate();
        var reasoning = !_options.ParseReasoning ? ReasoningMode.None : startsInReasoning ? ReasoningMode.StartInReasoning : ReasoningMode.Detect;
        return Stream(turns, sampling, plan, reasoning, cancellationToken);
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

        if (serviceType == typeof(BatchScheduler))
        {
            return _scheduler;
        }

        return serviceType == typeof(DeepSeekCudaMetrics) ? _metrics : null;
    }

    /// <summary>
    /// Disposes the client (and the model, when it owns it). Requests already submitted (running or
    /// waiting for a slot) finish first: the scheduler, the runner and the model are released when the last
    /// one ends, never under a running forward pass. Later requests throw <see cref="ObjectDisposedException"/>.
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
            if (_active > 0)
            {
                return; // the last request releases everything when it ends
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

        // Dispose takes the step lock, so it waits for a step in flight; the loop then sees the disposed
        // scheduler (or the stop token) and ends without touching the runner again.
        _stopScheduler.Cancel();
        _scheduler.Dispose();
        _runner.Dispose();
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

    /// <summary>Refuses the options the engine would otherwise ignore, naming the first one found.</summary>
    internal static void ThrowIfUnsupported(ChatOptions? options)
    {
        if (options is null)
        {
            return;
        }

        if (options.FrequencyPenalty is { } f && f != 0)
        {
            throw new NotSupportedException($"{nameof(ChatOptions)}.{nameof(ChatOptions.FrequencyPenalty)} is not supported (only 0)");
        }

        if (options.PresencePenalty is { } p && p != 0)
        {
            throw new NotSupportedException($"{nameof(ChatOptions)}.{nameof(ChatOptions.PresencePenalty)} is not supported (only 0)");
        }
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

    private async IAsyncEnumerable<ChatResponseUpdate> Stream(List<ChatTurn> turns, SamplingOptions sampling, ChatRequestPlan plan, ReasoningMode reasoningMode, [EnumeratorCancellation] CancellationToken ct)
    {
        // Only the template's markers become control tokens: message text that spells one stays text.
        var ids = _generator.EncodeChat(turns, new ChatTemplateOptions { Kind = _options.TemplateKind, Tools = plan.Tools });
        var constraint = plan.CreateConstraint(_vocabulary);
        var toolCalls = plan.ParseToolCalls ? new ToolCallReader() : null;

        lock (_state)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            _active++;
        }

        if (_scheduler.RunningCount >= _options.MaxBatch)
        {
            Log.WaitingForSlot(_logger, _options.MaxBatch);
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
            await foreach (var u in _generator.GenerateAsync(ids, sampling, reasoningMode, constraint, ct).ConfigureAwait(false))
            {
                if (firstToken == 0 && u.Usage.GeneratedTokens > 0)
                {
                    firstToken = Stopwatch.GetTimestamp();
                    _metrics.RecordFirstToken(Stopwatch.GetElapsedTime(start, firstToken).TotalSeconds);
                }

                generated = u.Usage.GeneratedTokens;
                if (u.Text.Length > 0)
                {
                    List<AIContent> contents = u.Kind == TextKind.Reasoning ? [new TextReasoningContent(u.Text)]
                        : toolCalls is null ? [new TextContent(u.Text)]
                        : toolCalls.Push(u.Text);
                    if (contents.Count > 0)
                    {
                        yield return NewUpdate(responseId, createdAt, contents);
                    }
                }

                if (u.FinishReason is { } finish)
                {
                    if (toolCalls?.Flush() is { Count: > 0 } rest)
                    {
                        yield return NewUpdate(responseId, createdAt, rest);
                    }

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
                    last.FinishReason = finish == Inference.FinishReason.Length ? ChatFinishReason.Length
                        : toolCalls is { Calls: > 0 } ? ChatFinishReason.ToolCalls
                        : ChatFinishReason.Stop;
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

            bool releaseNow;
            lock (_state)
            {
                releaseNow = --_active == 0 && _disposed;
            }

            if (releaseNow)
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
