using System.Runtime.CompilerServices;
using System.Text;
using DeepSeekCuda.Inference;
using DeepSeekCuda.Text;

namespace DeepSeekCuda.Serving;

/// <summary>
/// Autoregressive generation over an <see cref="ILanguageModel"/>, streaming the decoded text: UTF-8
/// reassembly, special tokens skipped, stop sequences, reasoning split. Tokens always come from a
/// <see cref="BatchScheduler"/>:
/// <list type="bullet">
/// <item>given one, each call is a request of that scheduler: concurrent calls share its steps (continuous
/// batching), and each one's tokens are those it would get alone;</item>
/// <item>without, each call runs on a scheduler of its own (one request, the model's whole context, the runner
/// <see cref="StepRunners.For"/> picks), disposed with its runner when the enumeration ends, so calls do not
/// share state.</item>
/// </list>
/// </summary>
public sealed class TextGenerator
{
    private readonly ILanguageModel _model;
    private readonly ITokenizer _tokenizer;
    private readonly string? _bosText;
    private readonly BatchScheduler? _scheduler;

    // The longest token's bytes: a text of B UTF-8 bytes needs at least B / _maxTokenBytes tokens, which
    // refuses an over-long prompt before encoding it (see ThrowIfSurelyTooLong).
    private readonly int _maxTokenBytes;

    /// <summary>Creates a generator for <paramref name="model"/> and <paramref name="tokenizer"/>; each call runs on a scheduler of its own.</summary>
    public TextGenerator(ILanguageModel model, ITokenizer tokenizer)
        : this(model, tokenizer, null)
    {
    }

    /// <summary>
    /// Creates a generator whose calls are requests of <paramref name="scheduler"/> (not owned), which must
    /// be running (<see cref="BatchScheduler.RunAsync"/>) over <paramref name="model"/>, with the
    /// tokenizer's EOS as <see cref="SchedulerOptions.EosId"/> and, when the model's vocabulary is padded
    /// past the tokenizer's, the tokenizer's size as <see cref="SchedulerOptions.SamplingVocabSize"/>
    /// (<see cref="SchedulerOptionsFor"/> gives both). Null: each call runs on a scheduler of its own.
    /// </summary>
    /// <exception cref="ArgumentException">The scheduler's EOS or sampling vocabulary does not match the tokenizer.</exception>
    public TextGenerator(ILanguageModel model, ITokenizer tokenizer, BatchScheduler? scheduler)
    {
        _model = model ?? throw new ArgumentNullException(nameof(model));
        _tokenizer = tokenizer ?? throw new ArgumentNullException(nameof(tokenizer));
        _bosText = tokenizer.BosId is { } bos ? Encoding.UTF8.GetString(tokenizer.GetTokenBytes(bos)) : null;
        _maxTokenBytes = 1;
        for (var id = 0; id < tokenizer.VocabSize; id++)
        {
            _maxTokenBytes = Math.Max(_maxTokenBytes, tokenizer.GetTokenBytes(id).Length);
        }

        if (scheduler is not null)
        {
            var o = scheduler.Options;
            if (o.EosId != tokenizer.EosId)
            {
                throw new ArgumentException($"the scheduler ends requests at token {o.EosId?.ToString(System.Globalization.CultureInfo.InvariantCulture) ?? "none"}, the tokenizer's EOS is {tokenizer.EosId?.ToString(System.Globalization.CultureInfo.InvariantCulture) ?? "none"}", nameof(scheduler));
            }

            if (tokenizer.VocabSize < model.VocabSize && (o.SamplingVocabSize ?? model.VocabSize) > tokenizer.VocabSize)
            {
                throw new ArgumentException($"the scheduler samples ids up to {o.SamplingVocabSize ?? model.VocabSize}, past the tokenizer's {tokenizer.VocabSize}", nameof(scheduler));
            }
        }

        _scheduler = scheduler;
    }

    /// <summary>
    /// Scheduler options that match <paramref name="tokenizer"/> (<see cref="SchedulerOptions.EosId"/>,
    /// <see cref="SchedulerOptions.SamplingVocabSize"/>) on top of <paramref name="options"/>.
    /// </summary>
    public static SchedulerOptions SchedulerOptionsFor(ITokenizer tokenizer, SchedulerOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(tokenizer);
        return (options ?? new SchedulerOptions()) with { EosId = tokenizer.EosId, SamplingVocabSize = tokenizer.VocabSize };
    }

    /// <summary>The scheduler the calls run on; null when each call runs on one of its own.</summary>
    public BatchScheduler? Scheduler => _scheduler;

    /// <summary>The model.</summary>
    public ILanguageModel Model => _model;

    /// <summary>The tokenizer.</summary>
    public ITokenizer Tokenizer => _tokenizer;

    /// <summary>
    /// Encodes a prompt: BOS is prepended when the tokenizer asks for it (<see cref="ITokenizer.AddBosToken"/>)
    /// unless the text already starts with the BOS marker, as a rendered <see cref="ChatTemplate"/> does.
    /// </summary>
    public int[] EncodePrompt(string prompt)
    {
        ArgumentNullException.ThrowIfNull(prompt);
        var hasBos = _bosText is not null && prompt.StartsWith(_bosText, StringComparison.Ordinal);
        return _tokenizer.Encode(prompt, addBos: _tokenizer.AddBosToken && !hasBos);
    }

    /// <summary>
    /// Encodes a conversation with <see cref="ChatTemplate.Encode(ITokenizer, IReadOnlyList{ChatTurn}, ChatTemplateOptions?)"/>
    /// (only the template's markers become control tokens), refusing first, without encoding, a prompt
    /// whose UTF-8 length alone proves it longer than the context.
    /// </summary>
    /// <exception cref="ArgumentException">The prompt cannot fit in the context.</exception>
    public int[] EncodeChat(IReadOnlyList<ChatTurn> turns, ChatTemplateOptions? options = null)
    {
        var segments = ChatTemplate.RenderSegments(turns, options);
        long bytes = 0;
        foreach (var s in segments)
        {
            bytes += Encoding.UTF8.GetByteCount(s.Text);
        }

        ThrowIfSurelyTooLong(bytes, nameof(turns));
        return ChatTemplate.Encode(segments, _tokenizer);
    }

    /// <summary>Streams the continuation of a text prompt (encoded by <see cref="EncodePrompt"/>).</summary>
    public IAsyncEnumerable<GenerationUpdate> GenerateAsync(string prompt, SamplingOptions? options = null, ReasoningMode reasoning = ReasoningMode.None, CancellationToken cancellationToken = default)
        => GenerateAsync(EncodePrompt(prompt), options, reasoning, cancellationToken: cancellationToken);

    /// <summary>
    /// Streams the continuation of <paramref name="promptIds"/>. Model work runs on the thread pool (or the
    /// scheduler's thread), so an awaiting caller's thread is never blocked by a forward pass. The last
    /// update carries the finish reason. With a scheduler, the request is submitted at the first
    /// <c>MoveNextAsync</c> and cancelled when the enumeration ends early. With <paramref name="constraint"/>
    /// (one instance per call: it holds the call's state), only the ids it allows are sampled.
    /// </summary>
    /// <exception cref="ArgumentException">Empty prompt, or a prompt that leaves no room in the context.</exception>
    /// <exception cref="OperationCanceledException"><paramref name="cancellationToken"/> was cancelled; checked before every token
    /// (with a scheduler, the request is removed and its cache blocks are free when the exception arrives).</exception>
    public IAsyncEnumerable<GenerationUpdate> GenerateAsync(IReadOnlyList<int> promptIds, SamplingOptions? options = null, ReasoningMode reasoning = ReasoningMode.None, ITokenConstraint? constraint = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(promptIds);
        options ??= new SamplingOptions();
        options.Validate();
        if (promptIds.Count == 0)
        {
            throw new ArgumentException("the prompt has no tokens", nameof(promptIds));
        }

        if (promptIds.Count > ContextLimit)
        {
            throw new ArgumentException($"the prompt has {promptIds.Count} tokens; the context holds {ContextLimit}", nameof(promptIds));
        }

        // Validation above runs at the call, not at the first MoveNextAsync.
        return Run(promptIds.ToArray(), options, reasoning, constraint, cancellationToken);
    }

    /// <summary>Generates to the end and returns the whole result.</summary>
    public async Task<GenerationResult> GenerateTextAsync(IReadOnlyList<int> promptIds, SamplingOptions? options = null, ReasoningMode reasoning = ReasoningMode.None, ITokenConstraint? constraint = null, CancellationToken cancellationToken = default)
    {
        var all = new StringBuilder();
        var reasoningText = new StringBuilder();
        var answer = new StringBuilder();
        var ids = new List<int>();
        GenerationUpdate? last = null;
        await foreach (var u in GenerateAsync(promptIds, options, reasoning, constraint, cancellationToken).ConfigureAwait(false))
        {
            // A token whose text splits into several segments yields several updates; count it once.
            if (u.TokenId is { } id && ids.Count < u.Usage.GeneratedTokens)
            {
                ids.Add(id);
            }

            all.Append(u.Text);
            (u.Kind == TextKind.Reasoning ? reasoningText : answer).Append(u.Text);
            last = u;
        }

        return new GenerationResult(all.ToString(), reasoningText.ToString(), answer.ToString(), ids, last!.FinishReason!.Value, last.Usage);
    }

    /// <summary>Generates to the end from a text prompt and returns the whole result.</summary>
    public Task<GenerationResult> GenerateTextAsync(string prompt, SamplingOptions? options = null, ReasoningMode reasoning = ReasoningMode.None, CancellationToken cancellationToken = default)
        => GenerateTextAsync(EncodePrompt(prompt), options, reasoning, cancellationToken: cancellationToken);

    /// <summary>The most prompt tokens a call accepts: the model's context, or less when the scheduler's requests hold fewer.</summary>
    private int ContextLimit => _scheduler?.ContextLimit ?? _model.MaxSequenceLength;

    /// <summary>
    /// Refuses a chat prompt of <paramref name="utf8Bytes"/> bytes that needs more tokens than the context
    /// holds even if every token were the longest: each marker is one token of its own bytes, and
    /// <see cref="ITokenizer.EncodeLiteral"/> never yields fewer token bytes than the text's UTF-8, so this
    /// never refuses a prompt that would fit. (Not for raw prompts: an added token with lstrip/rstrip
    /// absorbs any amount of whitespace.)
    /// </summary>
    private void ThrowIfSurelyTooLong(long utf8Bytes, string parameter)
    {
        var atLeast = (utf8Bytes + _maxTokenBytes - 1) / _maxTokenBytes;
        if (atLeast > ContextLimit)
        {
            throw new ArgumentException($"the prompt has at least {atLeast} tokens ({utf8Bytes} UTF-8 bytes, at most {_maxTokenBytes} per token); the context holds {ContextLimit}", parameter);
        }
    }

    private async IAsyncEnumerable<GenerationUpdate> Run(int[] prompt, SamplingOptions options, ReasoningMode reasoningMode, ITokenConstraint? constraint, [EnumeratorCancellation] CancellationToken ct)
    {
        ct.ThrowIfCancellationRequested();
        var tokens = _scheduler is null ? OwnScheduledTokens(prompt, options, constraint, ct) : ScheduledTokens(_scheduler, prompt, options, constraint, ct);
        var stops = new StopSequenceMatcher(options.StopSequences ?? []);
        var parser = reasoningMode == ReasoningMode.None ? null : new ReasoningParser(reasoningMode == ReasoningMode.StartInReasoning);
        var defaultKind = reasoningMode == ReasoningMode.StartInReasoning ? TextKind.Reasoning : TextKind.Answer;
        var utf8 = new UTF8Encoding(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: false).GetDecoder();
        var chars = new char[64];
        var eos = _tokenizer.EosId;
        var generated = 0;
        var finish = FinishReason.Length; // the source ran out: max tokens or a full context
        var updates = new List<GenerationUpdate>();

        // Disposing the source (any exit: end, stop sequence, cancellation, error) ends its scheduled request
        // (and a scheduler of the call's own), so a consumer that stops early never leaves model work or cache blocks behind.
        var source = tokens.GetAsyncEnumerator(ct);
        try
        {
            while (await source.MoveNextAsync().ConfigureAwait(false))
            {
                var next = source.Current;
                generated++;
                if (next == eos)
                {
                    finish = FinishReason.EndOfSequence;
                    break;
                }

                // Special tokens (chat markers, BOS) are control, not text: like Hugging Face's
                // skip_special_tokens. R1's <think>/</think> are non-special added tokens and stay.
                var bytes = _tokenizer.IsSpecial(next) ? ReadOnlySpan<byte>.Empty : _tokenizer.GetTokenBytes(next);
                if (chars.Length < bytes.Length + 4)
                {
                    chars = new char[bytes.Length + 4];
                }

                var text = new string(chars, 0, utf8.GetChars(bytes, chars, flush: false));
                var emit = stops.Push(text);
                updates.Clear();
                Route(updates, next, emit, parser, defaultKind, new GenerationUsage(prompt.Length, generated));
                foreach (var u in updates)
                {
                    yield return u;
                }

                if (stops.Stopped)
                {
                    finish = FinishReason.Stop;
                    break;
                }
            }
        }
        finally
        {
            await source.DisposeAsync().ConfigureAwait(false);
        }

        // End of stream: an incomplete UTF-8 sequence becomes U+FFFD, which may still complete a stop sequence.
        var usage = new GenerationUsage(prompt.Length, generated);
        updates.Clear();
        if (!stops.Stopped)
        {
            var tail = new string(chars, 0, utf8.GetChars([], chars, flush: true));
            var emit = stops.Push(tail);
            if (stops.Stopped)
            {
                finish = FinishReason.Stop;
            }
            else
            {
                emit += stops.Flush();
            }

            Route(updates, null, emit, parser, defaultKind, usage);
        }

        if (parser is not null)
        {
            foreach (var s in parser.Flush())
            {
                updates.Add(new GenerationUpdate(null, s.Text, s.Kind, null, usage));
            }
        }

        foreach (var u in updates)
        {
            if (u.Text.Length > 0)
            {
                yield return u;
            }
        }

        var finalKind = parser is null ? defaultKind : parser.InReasoning ? TextKind.Reasoning : TextKind.Answer;
        yield return new GenerationUpdate(finish == FinishReason.EndOfSequence ? eos : null, string.Empty, finalKind, finish, usage);
    }

    /// <summary>
    /// The token source of a generator without a scheduler: a scheduler of the call's own (one request slot, blocks
    /// for the model's whole context), stepped on a worker thread until the enumeration ends, then disposed with its runner.
    /// </summary>
    private async IAsyncEnumerable<int> OwnScheduledTokens(int[] prompt, SamplingOptions options, ITokenConstraint? constraint, [EnumeratorCancellation] CancellationToken ct)
    {
        if (options.MaxTokens == 0)
        {
            yield break;
        }

        var blocksPerRequest = KvBlockManager.BlocksFor(_model.MaxSequenceLength);
        using var runner = StepRunners.For(_model);
        using var scheduler = new BatchScheduler(runner, new KvBlockManager(blocksPerRequest, 1, blocksPerRequest),
            SchedulerOptionsFor(_tokenizer, new SchedulerOptions { MaxBatch = 1 }));
        using var stop = new CancellationTokenSource();
        var loop = scheduler.RunAsync(stop.Token);
        try
        {
            await foreach (var token in ScheduledTokens(scheduler, prompt, options, constraint, ct).ConfigureAwait(false))
            {
                yield return token;
            }
        }
        finally
        {
            await stop.CancelAsync().ConfigureAwait(false);
            await loop.ConfigureAwait(false);
        }
    }

    /// <summary>
    /// The token source of a scheduled generator: the request's output stream. Cancellation, and disposal
    /// before the request ended (a stop sequence), cancel the request, and the enumeration ends only once the
    /// scheduler has removed it, so its cache blocks are free again when the caller sees the end.
    /// </summary>
    private static async IAsyncEnumerable<int> ScheduledTokens(BatchScheduler scheduler, int[] prompt, SamplingOptions options, ITokenConstraint? constraint, [EnumeratorCancellation] CancellationToken ct)
    {
        if (options.MaxTokens == 0)
        {
            yield break;
        }

        var request = scheduler.Submit(prompt, options, constraint);
        try
        {
            using var registration = ct.Register(request.Cancel);
            var output = request.Output;
            while (true)
            {
                // Checked per token, not only per wait: tokens may already be buffered.
                ct.ThrowIfCancellationRequested();
                if (output.TryRead(out var token))
                {
                    yield return token;
                }
                else if (!await output.WaitToReadAsync(ct).ConfigureAwait(false))
                {
                    yield break;
                }
            }
        }
        finally
        {
            if (!request.Completion.IsCompleted)
            {
                request.Cancel();
                await ((Task)request.Completion).ConfigureAwait(ConfigureAwaitOptions.SuppressThrowing);
            }
        }
    }

    private static void Route(List<GenerationUpdate> updates, int? tokenId, string text, ReasoningParser? parser, TextKind defaultKind, GenerationUsage usage)
    {
        if (parser is null)
        {
            updates.Add(new GenerationUpdate(tokenId, text, defaultKind, null, usage));
            return;
        }

        var segments = parser.Push(text);
        if (segments.Count == 0)
        {
            updates.Add(new GenerationUpdate(tokenId, string.Empty, parser.InReasoning ? TextKind.Reasoning : TextKind.Answer, null, usage));
            return;
        }

        foreach (var s in segments)
        {
            updates.Add(new GenerationUpdate(tokenId, s.Text, s.Kind, null, usage));
        }
    }
}
