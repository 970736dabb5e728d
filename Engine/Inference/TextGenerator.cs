using System.Runtime.CompilerServices;
using System.Text;
using DeepSeekCuda.Text;

namespace DeepSeekCuda.Inference;

/// <summary>
/// Autoregressive generation over an <see cref="ILanguageModel"/>: prefill the prompt, then sample and
/// feed back one token at a time, streaming the decoded text. Each call owns a fresh model session,
/// disposed when the enumeration ends, so calls do not share state; whether the model tolerates
/// concurrent sessions is the model's business (the chat client serializes them).
/// </summary>
public sealed class TextGenerator
{
    private readonly ILanguageModel _model;
    private readonly ITokenizer _tokenizer;
    private readonly string? _bosText;

    /// <summary>Creates a generator for <paramref name="model"/> and <paramref name="tokenizer"/>.</summary>
    public TextGenerator(ILanguageModel model, ITokenizer tokenizer)
    {
        _model = model ?? throw new ArgumentNullException(nameof(model));
        _tokenizer = tokenizer ?? throw new ArgumentNullException(nameof(tokenizer));
        _bosText = tokenizer.BosId is { } bos ? Encoding.UTF8.GetString(tokenizer.GetTokenBytes(bos)) : null;
    }

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

    /// <summary>Streams the continuation of a text prompt (encoded by <see cref="EncodePrompt"/>).</summary>
    public IAsyncEnumerable<GenerationUpdate> GenerateAsync(string prompt, SamplingOptions? options = null, ReasoningMode reasoning = ReasoningMode.None, CancellationToken cancellationToken = default)
        => GenerateAsync(EncodePrompt(prompt), options, reasoning, cancellationToken);

    /// <summary>
    /// Streams the continuation of <paramref name="promptIds"/>. Model work runs on the thread pool, so an
    /// awaiting caller's thread is never blocked by a forward pass. The last update carries the finish reason.
    /// </summary>
    /// <exception cref="ArgumentException">Empty prompt, or a prompt that leaves no room in the context.</exception>
    /// <exception cref="OperationCanceledException"><paramref name="cancellationToken"/> was cancelled; checked before every model step.</exception>
    public IAsyncEnumerable<GenerationUpdate> GenerateAsync(IReadOnlyList<int> promptIds, SamplingOptions? options = null, ReasoningMode reasoning = ReasoningMode.None, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(promptIds);
        options ??= new SamplingOptions();
        options.Validate();
        if (promptIds.Count == 0)
        {
            throw new ArgumentException("the prompt has no tokens", nameof(promptIds));
        }

        if (promptIds.Count > _model.MaxSequenceLength)
        {
            throw new ArgumentException($"the prompt has {promptIds.Count} tokens; the context holds {_model.MaxSequenceLength}", nameof(promptIds));
        }

        // Validation above runs at the call, not at the first MoveNextAsync.
        return Run(promptIds.ToArray(), options, reasoning, cancellationToken);
    }

    /// <summary>Generates to the end and returns the whole result.</summary>
    public async Task<GenerationResult> GenerateTextAsync(IReadOnlyList<int> promptIds, SamplingOptions? options = null, ReasoningMode reasoning = ReasoningMode.None, CancellationToken cancellationToken = default)
    {
        var all = new StringBuilder();
        var reasoningText = new StringBuilder();
        var answer = new StringBuilder();
        var ids = new List<int>();
        GenerationUpdate? last = null;
        await foreach (var u in GenerateAsync(promptIds, options, reasoning, cancellationToken).ConfigureAwait(false))
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
        => GenerateTextAsync(EncodePrompt(prompt), options, reasoning, cancellationToken);

    private async IAsyncEnumerable<GenerationUpdate> Run(int[] prompt, SamplingOptions options, ReasoningMode reasoningMode, [EnumeratorCancellation] CancellationToken ct)
    {
        ct.ThrowIfCancellationRequested();
        var sampler = new Sampler(options);
        var stops = new StopSequenceMatcher(options.StopSequences ?? []);
        var parser = reasoningMode == ReasoningMode.None ? null : new ReasoningParser(reasoningMode == ReasoningMode.StartInReasoning);
        var defaultKind = reasoningMode == ReasoningMode.StartInReasoning ? TextKind.Reasoning : TextKind.Answer;
        var utf8 = new UTF8Encoding(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: false).GetDecoder();
        var chars = new char[64];
        var eos = _tokenizer.EosId;
        var maxTokens = options.MaxTokens ?? int.MaxValue;
        var maxLength = _model.MaxSequenceLength;
        var tokenizerVocab = _tokenizer.VocabSize;
        var logits = new float[_model.VocabSize];
        var generated = 0;
        FinishReason finish;
        var updates = new List<GenerationUpdate>();

        var session = _model.CreateSession();
        try
        {
            if (maxTokens == 0)
            {
                finish = FinishReason.Length;
            }
            else
            {
                var next = await Task.Run(() => Step(session, prompt, logits, sampler, tokenizerVocab), ct).ConfigureAwait(false);
                while (true)
                {
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

                    if (generated >= maxTokens || session.Length + 1 > maxLength)
                    {
                        finish = FinishReason.Length;
                        break;
                    }

                    ct.ThrowIfCancellationRequested();
                    var fed = next;
                    next = await Task.Run(() => Step(session, [fed], logits, sampler, tokenizerVocab), ct).ConfigureAwait(false);
                }
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
        finally
        {
            session.Dispose();
        }
    }

    private static int Step(IModelSession session, ReadOnlySpan<int> tokens, float[] logits, Sampler sampler, int tokenizerVocab)
    {
        session.Forward(tokens, logits);

        // The model's vocabulary may be padded past the tokenizer's; those rows mean nothing.
        if (tokenizerVocab < logits.Length)
        {
            logits.AsSpan(tokenizerVocab).Fill(float.NegativeInfinity);
        }

        return sampler.Sample(logits);
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
