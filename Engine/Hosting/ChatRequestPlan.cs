using System.Collections.Concurrent;
using System.Text;
using System.Text.Json;
using DeepSeekCuda.Inference;
using DeepSeekCuda.Inference.Constraints;
using DeepSeekCuda.Text;
using Microsoft.Extensions.AI;

namespace DeepSeekCuda.Hosting;

/// <summary>
/// What one chat request asks of the engine beyond sampling: the tool definitions the prompt carries, whether the
/// answer is parsed for tool calls, and the grammar its answer is held to (a forced tool call, JSON, a JSON Schema).
/// Made from <see cref="ChatOptions"/> before any model work; a request the engine cannot honour throws here.
/// </summary>
/// <remarks>
/// <list type="bullet">
/// <item><see cref="ChatOptions.ToolMode"/> auto (or unset) with tools: the tools are in the prompt and tool calls in
/// the answer are parsed; the model decides.</item>
/// <item>None: the tools are left out of the prompt and nothing is parsed, so no call can come back (the
/// conversation's past calls and results are still rendered).</item>
/// <item>Required (any, or one named function): the answer is forced to open with a call of an allowed function
/// whose arguments follow that function's parameter schema (or any JSON object where the schema uses keywords the
/// grammar cannot enforce); more calls may follow (up to <see cref="MaxCalls"/>), and the block's end, then EOS.</item>
/// <item><see cref="ChatOptions.ResponseFormat"/> JSON: the answer is one JSON object; with a schema, a JSON value
/// valid against it (a schema the grammar cannot enforce is refused with <see cref="NotSupportedException"/>). With
/// tools in auto mode as well, the answer is either a tool call or that JSON.</item>
/// <item>Where the prompt opens the model's reasoning (R1's generation prompt), only the text after
/// <c>&lt;/think&gt;</c> is constrained.</item>
/// </list>
/// </remarks>
internal sealed class ChatRequestPlan
{
    /// <summary>The most calls a constrained tool-call block may hold.</summary>
    public const int MaxCalls = 16;

    private ChatRequestPlan(IReadOnlyList<ChatToolDefinition>? tools, bool parseToolCalls, Grammar? grammar, string? startAfter)
    {
        Tools = tools;
        ParseToolCalls = parseToolCalls;
        Grammar = grammar;
        StartAfter = startAfter;
    }

    /// <summary>Tool definitions for the prompt; null when the prompt carries none.</summary>
    public IReadOnlyList<ChatToolDefinition>? Tools { get; }

    /// <summary>Whether the answer is parsed for tool calls.</summary>
    public bool ParseToolCalls { get; }

    /// <summary>The grammar the answer is held to; null when it is free.</summary>
    public Grammar? Grammar { get; }

    /// <summary>The text after which the grammar starts (R1's end of reasoning); null: from the first token.</summary>
    public string? StartAfter { get; }

    /// <summary>
    /// The plan of a request with <paramref name="options"/> for a model using <paramref name="tokenizer"/>;
    /// <paramref name="startsInReasoning"/>: the prompt opens a think block, so the answer follows <c>&lt;/think&gt;</c>.
    /// </summary>
    /// <exception cref="NotSupportedException">A tool that is not a function, or a response schema the grammar cannot enforce.</exception>
    /// <exception cref="ArgumentException">A required tool mode without tools, or naming a function that is not among them.</exception>
    public static ChatRequestPlan Create(ChatOptions? options, ITokenizer tokenizer, bool startsInReasoning)
    {
        var startAfter = startsInReasoning ? ChatTemplate.ThinkClose : null;
        var functions = Functions(options?.Tools);
        var mode = options?.ToolMode;
        if (mode is RequiredChatToolMode && functions.Count == 0)
        {
            throw new ArgumentException($"{nameof(ChatOptions)}.{nameof(ChatOptions.ToolMode)} requires a tool call, and {nameof(ChatOptions)}.{nameof(ChatOptions.Tools)} has no function", nameof(options));
        }

        var response = ResponseGrammar(options?.ResponseFormat);
        if (functions.Count == 0 || mode is NoneChatToolMode)
        {
            return new ChatRequestPlan(null, false, response, startAfter);
        }

        var tools = functions.Select(f => new ChatToolDefinition(f.Name, string.IsNullOrEmpty(f.Description) ? null : f.Description, f.JsonSchema)).ToList();
        if (mode is RequiredChatToolMode required)
        {
            var allowed = functions;
            if (required.RequiredFunctionName is { } name)
            {
                allowed = functions.Where(f => f.Name == name).ToList();
                if (allowed.Count == 0)
                {
                    throw new ArgumentException($"{nameof(ChatOptions)}.{nameof(ChatOptions.ToolMode)} requires function '{name}', which is not among {nameof(ChatOptions)}.{nameof(ChatOptions.Tools)} ({string.Join(", ", functions.Select(f => f.Name))})", nameof(options));
                }
            }

            return new ChatRequestPlan(tools, true, ForcedCall(allowed, tokenizer), startAfter);
        }

        // Auto: the model decides; with a response format, its answer is a call or that JSON.
        var grammar = response is null ? null : Grammar.Choice(ForcedCall(functions, tokenizer), response);
        return new ChatRequestPlan(tools, true, grammar, startAfter);
    }

    /// <summary>
    /// The plan of <see cref="Create(ChatOptions?, ITokenizer, bool)"/>, reused from <paramref name="cache"/> when an earlier request asked the same
    /// (tools, tool mode, response format, reasoning): a <see cref="Grammar"/> keeps the masks it has computed, so
    /// requests that share a schema share that work. The cache holds at most <see cref="MaxCachedPlans"/> plans and
    /// starts over when full.
    /// </summary>
    public static ChatRequestPlan Create(ChatOptions? options, ITokenizer tokenizer, bool startsInReasoning, ConcurrentDictionary<string, ChatRequestPlan> cache)
    {
        var key = Key(options, startsInReasoning);
        if (key is null)
        {
            return Create(options, tokenizer, startsInReasoning);
        }

        if (cache.TryGetValue(key, out var plan))
        {
            return plan;
        }

        plan = Create(options, tokenizer, startsInReasoning);
        if (cache.Count >= MaxCachedPlans)
        {
            cache.Clear();
        }

        return cache.GetOrAdd(key, plan);
    }

    /// <summary>The most plans a client keeps (<see cref="Create(ChatOptions?, ITokenizer, bool, ConcurrentDictionary{string, ChatRequestPlan})"/>).</summary>
    public const int MaxCachedPlans = 64;

    /// <summary>What decides a plan, as text; null when the request has nothing to plan (no tools, no format).</summary>
    private static string? Key(ChatOptions? options, bool startsInReasoning)
    {
        if (options is null || (options.Tools is not { Count: > 0 } && options.ResponseFormat is null or ChatResponseFormatText))
        {
            return null;
        }

        var key = new StringBuilder();
        key.Append(startsInReasoning ? 'R' : 'A').Append('|').Append(options.ToolMode switch
        {
            null => "-",
            NoneChatToolMode => "none",
            RequiredChatToolMode r => "required:" + r.RequiredFunctionName,
            _ => "auto",
        });
        foreach (var tool in options.Tools ?? [])
        {
            if (tool is not AIFunctionDeclaration f)
            {
                return null; // refused by Create, never cached
            }

            key.Append('|').Append(f.Name).Append('\u0001').Append(f.Description).Append('\u0001').Append(f.JsonSchema.GetRawText());
        }

        key.Append('|').Append(options.ResponseFormat switch
        {
            null or ChatResponseFormatText => "text",
            ChatResponseFormatJson { Schema: { } schema } => "schema:" + schema.GetRawText(),
            ChatResponseFormatJson => "json",
            _ => null,
        } ?? string.Empty);
        return key.ToString();
    }

    /// <summary>A fresh constraint for one request (it holds that request's state); null when the answer is free (the vocabulary is not built then).</summary>
    public ITokenConstraint? CreateConstraint(Lazy<TokenVocabulary> vocabulary) =>
        Grammar is null ? null : new GrammarConstraint(Grammar, vocabulary.Value, StartAfter);

    private static List<AIFunctionDeclaration> Functions(IList<AITool>? tools)
    {
        var functions = new List<AIFunctionDeclaration>();
        var names = new HashSet<string>(StringComparer.Ordinal);
        foreach (var tool in tools ?? [])
        {
            if (tool is not AIFunctionDeclaration f)
            {
                throw new NotSupportedException($"{nameof(ChatOptions)}.{nameof(ChatOptions.Tools)}: '{tool?.Name}' ({tool?.GetType().Name}) is not supported; only functions ({nameof(AIFunctionDeclaration)}) are given to the model");
            }

            if (string.IsNullOrEmpty(f.Name) || !names.Add(f.Name))
            {
                throw new ArgumentException($"{nameof(ChatOptions)}.{nameof(ChatOptions.Tools)}: function names must be non-empty and distinct ('{f.Name}')", "options");
            }

            functions.Add(f);
        }

        return functions;
    }

    private static Grammar? ResponseGrammar(ChatResponseFormat? format)
    {
        try
        {
            return format switch
            {
                null or ChatResponseFormatText => null,
                ChatResponseFormatJson { Schema: { } schema } => Grammar.JsonSchema(schema),
                ChatResponseFormatJson => Grammar.JsonObject(),
                _ => throw new NotSupportedException($"{format.GetType().Name} is not a known format"),
            };
        }
        catch (NotSupportedException e)
        {
            throw new NotSupportedException($"{nameof(ChatOptions)}.{nameof(ChatOptions.ResponseFormat)} cannot be enforced: {e.Message}", e);
        }
    }

    /// <summary>
    /// A tool-call block in the V3/R1 format (the one the templates render and <see cref="ToolCallParser"/> reads) of 1
    /// to <see cref="MaxCalls"/> calls to <paramref name="functions"/>, separated by a newline:
    /// <c>&lt;｜tool▁calls▁begin｜&gt;</c>, then per call <c>&lt;｜tool▁call▁begin｜&gt;function&lt;｜tool▁sep｜&gt;NAME\n```json\nARGS\n```&lt;｜tool▁call▁end｜&gt;</c>,
    /// then <c>&lt;｜tool▁calls▁end｜&gt;</c>; after it only EOS, as the templates end a tool-call turn.
    /// </summary>
    private static Grammar ForcedCall(IReadOnlyList<AIFunctionDeclaration> functions, ITokenizer tokenizer)
    {
        var named = functions.Select(f => Grammar.Sequence(Grammar.Literal(f.Name + "\n```json\n"), Arguments(f.JsonSchema), Grammar.Literal("\n```"))).ToArray();
        var call = Grammar.Sequence(
            Marker(ChatTemplate.ToolCallBegin, tokenizer),
            Grammar.Literal("function"),
            Marker(ChatTemplate.ToolSep, tokenizer),
            named.Length == 1 ? named[0] : Grammar.Choice(named),
            Marker(ChatTemplate.ToolCallEnd, tokenizer));
        var end = Marker(ChatTemplate.ToolCallsEnd, tokenizer);
        var rest = end;
        for (var i = 1; i < MaxCalls; i++)
        {
            rest = Grammar.Choice(Grammar.Sequence(Grammar.Literal("\n"), call, rest), end);
        }

        return Grammar.Sequence(Marker(ChatTemplate.ToolCallsBegin, tokenizer), call, rest);
    }

    /// <summary>The arguments' grammar: the function's parameter schema, or any JSON object where the grammar cannot enforce it (the function still validates its arguments).</summary>
    private static Grammar Arguments(JsonElement schema)
    {
        try
        {
            return Grammar.JsonSchema(schema);
        }
        catch (NotSupportedException)
        {
            return Grammar.JsonObject();
        }
    }

    /// <summary>A template marker: its added token where the tokenizer has one (DeepSeek's), else its text.</summary>
    private static Grammar Marker(string marker, ITokenizer tokenizer) =>
        tokenizer.AddedTokenId(marker) is not null ? Grammar.ControlToken(marker) : Grammar.Literal(marker);
}
