using System.Text.Json;
using DeepSeekCuda.Hosting;
using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.AI;

namespace DeepSeekCuda.Cli.Server;

/// <summary>
/// A validated <c>POST /v1/chat/completions</c> body. Every field is checked here, before any model work, and a
/// problem is an <see cref="OpenAIErrorException"/> naming the field (<c>messages[2].role</c>, <c>stop[1]</c>, ...).
/// </summary>
/// <remarks>
/// Policy (the engine must not silently drop what a client asked for):
/// fields the engine honours are mapped to <see cref="ChatOptions"/> (<c>tools</c> of type function,
/// <c>tool_choice</c>, <c>response_format</c> text, json_object and json_schema among them) and the messages'
/// <c>tool_calls</c> and <c>tool_call_id</c> to function call and result contents; fields it cannot honour are
/// refused with 400 when set to anything but their neutral value (penalties 0, <c>logprobs</c> false, empty
/// <c>functions</c>/<c>logit_bias</c> (the deprecated function fields: use <c>tools</c>), <c>store</c> false);
/// <c>user</c>, <c>metadata</c> and <c>parallel_tool_calls</c> are accepted and have no effect on the output
/// (labels for the caller's own bookkeeping; the model may write several calls either way); any other field is
/// refused as unrecognized, as OpenAI does.
/// </remarks>
internal sealed class ChatCompletionRequest
{
    /// <summary>The most choices one request may ask for: each one is a request of its own in the scheduler.</summary>
    public const int MaxChoices = 16;

    /// <summary>OpenAI's limit on stop sequences.</summary>
    public const int MaxStops = 4;

    private static readonly HashSet<string> Known =
    [
        "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature", "top_p",
        "top_k", "seed", "stop", "n", "logprobs", "top_logprobs", "frequency_penalty", "presence_penalty",
        "response_format", "tools", "tool_choice", "functions", "function_call", "logit_bias", "parallel_tool_calls",
        "user", "metadata", "store",
    ];

    public required List<ChatMessage> Messages { get; init; }

    /// <summary>Sampling options of choice 0; choice i of a seeded request uses seed + i.</summary>
    public required ChatOptions Options { get; init; }

    public bool Stream { get; init; }

    public bool IncludeUsage { get; init; }

    public int N { get; init; } = 1;

    /// <summary>The options of choice <paramref name="index"/>: with a seed, seed + index, so that choices differ.</summary>
    public ChatOptions OptionsFor(int index)
    {
        if (index == 0 || Options.Seed is null)
        {
            return Options;
        }

        var copy = Options.Clone();
        copy.Seed = Options.Seed + index;
        return copy;
    }

    /// <summary>Validates a parsed body against the served model id.</summary>
    /// <exception cref="OpenAIErrorException">The first problem found, naming its field.</exception>
    public static ChatCompletionRequest Parse(JsonElement root, string modelId)
    {
        if (root.ValueKind != JsonValueKind.Object)
        {
            throw OpenAIErrorException.Invalid(null, "the request body must be a JSON object");
        }

        foreach (var property in root.EnumerateObject())
        {
            if (!Known.Contains(property.Name))
            {
                throw OpenAIErrorException.Invalid(property.Name, $"Unrecognized request argument supplied: {property.Name}", "unrecognized_argument");
            }
        }

        var model = String(root, "model") ?? throw OpenAIErrorException.Invalid("model", "'model' is required");
        if (model != modelId)
        {
            // OpenAI answers an unknown model with 404 and this code; clients key on it.
            throw new OpenAIErrorException(StatusCodes.Status404NotFound, $"The model '{model}' does not exist; this server serves '{modelId}'", "model", "model_not_found");
        }

        RefuseUnsupported(root);
        var stream = Bool(root, "stream") ?? false;
        var includeUsage = false;
        if (Present(root, "stream_options", out var so))
        {
            if (!stream)
            {
                throw OpenAIErrorException.Invalid("stream_options", "'stream_options' is only allowed when 'stream' is true");
            }

            Object(so, "stream_options", "include_usage");

            includeUsage = Bool(so, "include_usage", "stream_options.include_usage") ?? false;
        }

        var maxTokens = Int(root, "max_tokens");
        var maxCompletion = Int(root, "max_completion_tokens");
        if (maxTokens is not null && maxCompletion is not null && maxTokens != maxCompletion)
        {
            throw OpenAIErrorException.Invalid("max_tokens", "give 'max_completion_tokens' or 'max_tokens', not two different values");
        }

        var max = maxCompletion ?? maxTokens;
        if (max is < 1)
        {
            throw OpenAIErrorException.Invalid(maxCompletion is not null ? "max_completion_tokens" : "max_tokens", $"must be at least 1, is {max}");
        }

        var temperature = Number(root, "temperature");
        if (temperature is < 0 or > 2)
        {
            throw OpenAIErrorException.Invalid("temperature", $"must be between 0 and 2, is {temperature}");
        }

        // top_p and top_k ranges are the engine's own (SamplingOptions.Validate, before any work); the endpoint names the field.
        var topP = Number(root, "top_p");
        var topK = Int(root, "top_k");
        long? seed = null;
        if (Present(root, "seed", out var s))
        {
            seed = s.ValueKind == JsonValueKind.Number && s.TryGetInt64(out var v) ? v : throw WrongType("seed", "an integer");
        }

        var n = Int(root, "n") ?? 1;
        if (n is < 1 or > MaxChoices)
        {
            throw OpenAIErrorException.Invalid("n", $"must be between 1 and {MaxChoices}, is {n}");
        }

        var tools = ParseTools(root);
        return new ChatCompletionRequest
        {
            Messages = ParseMessages(root),
            Stream = stream,
            IncludeUsage = includeUsage,
            N = n,
            Options = new ChatOptions
            {
                ModelId = model,
                MaxOutputTokens = max,
                Temperature = (float?)temperature,
                TopP = (float?)topP,
                TopK = topK,
                Seed = seed,
                StopSequences = ParseStop(root),
                Tools = tools.Count > 0 ? tools : null,
                ToolMode = ParseToolChoice(root, tools),
                ResponseFormat = ParseResponseFormat(root),
            },
        };
    }

    private static void RefuseUnsupported(JsonElement root)
    {
        if (Bool(root, "logprobs") == true)
        {
            throw OpenAIErrorException.Unsupported("logprobs", "the engine does not report token log-probabilities");
        }

        if (Present(root, "top_logprobs", out _))
        {
            throw OpenAIErrorException.Unsupported("top_logprobs", "the engine does not report token log-probabilities");
        }

        foreach (var penalty in (string[])["frequency_penalty", "presence_penalty"])
        {
            if (Number(root, penalty) is { } p && p != 0)
            {
                throw OpenAIErrorException.Unsupported(penalty, "the sampler has no penalties (only 0 is accepted)");
            }
        }

        if (Present(root, "functions", out var functions) && (functions.ValueKind != JsonValueKind.Array || functions.GetArrayLength() > 0))
        {
            throw OpenAIErrorException.Unsupported("functions", "the deprecated 'functions' field is not supported; give the functions in 'tools'");
        }

        if (Present(root, "function_call", out var functionCall) && !(functionCall.ValueKind == JsonValueKind.String && functionCall.GetString() == "none"))
        {
            throw OpenAIErrorException.Unsupported("function_call", "the deprecated 'function_call' field is not supported; use 'tool_choice'");
        }

        if (Present(root, "logit_bias", out var bias) && (bias.ValueKind != JsonValueKind.Object || bias.EnumerateObject().Any()))
        {
            throw OpenAIErrorException.Unsupported("logit_bias", "the sampler has no logit bias");
        }

        if (Bool(root, "store") == true)
        {
            throw OpenAIErrorException.Unsupported("store", "this server stores no completions");
        }

        Bool(root, "parallel_tool_calls");
        if (Present(root, "user", out _))
        {
            String(root, "user");
        }

        if (Present(root, "metadata", out var metadata) && metadata.ValueKind != JsonValueKind.Object)
        {
            throw WrongType("metadata", "an object");
        }
    }

    /// <summary>OpenAI: omitting <c>parameters</c> defines a function with an empty parameter list.</summary>
    private static readonly JsonElement NoParameters = JsonDocument.Parse("""{"type":"object","properties":{}}""").RootElement.Clone();

    /// <summary>OpenAI's rule for function names: letters, digits, underscores and dashes, at most 64.</summary>
    private static bool IsFunctionName(string name) =>
        name.Length is > 0 and <= 64 && name.All(c => char.IsAsciiLetterOrDigit(c) || c is '_' or '-');

    private static List<AITool> ParseTools(JsonElement root)
    {
        var tools = new List<AITool>();
        if (!Present(root, "tools", out var list))
        {
            return tools;
        }

        if (list.ValueKind != JsonValueKind.Array)
        {
            throw WrongType("tools", "an array");
        }

        var names = new HashSet<string>(StringComparer.Ordinal);
        var i = 0;
        foreach (var tool in list.EnumerateArray())
        {
            var at = $"tools[{i++}]";
            Object(tool, at, "type", "function");
            var type = String(tool, "type", at + ".type") ?? throw OpenAIErrorException.Invalid(at + ".type", $"'{at}.type' is required");
            if (type != "function")
            {
                throw OpenAIErrorException.Unsupported(at + ".type", $"tool type '{type}' (only function)");
            }

            if (!Present(tool, "function", out var function))
            {
                throw OpenAIErrorException.Invalid(at + ".function", $"'{at}.function' is required");
            }

            Object(function, at + ".function", "name", "description", "parameters", "strict");
            var name = String(function, "name", at + ".function.name") ?? throw OpenAIErrorException.Invalid(at + ".function.name", $"'{at}.function.name' is required");
            if (!IsFunctionName(name))
            {
                throw OpenAIErrorException.Invalid(at + ".function.name", $"'{name}' is not a valid function name (letters, digits, '_' and '-', at most 64)");
            }

            if (!names.Add(name))
            {
                throw OpenAIErrorException.Invalid(at + ".function.name", $"function '{name}' is defined twice");
            }

            var description = String(function, "description", at + ".function.description");
            Bool(function, "strict", at + ".function.strict");
            JsonElement parameters;
            if (Present(function, "parameters", out var p))
            {
                parameters = p.ValueKind == JsonValueKind.Object ? p.Clone() : throw WrongType(at + ".function.parameters", "a JSON Schema object");
            }
            else
            {
                parameters = NoParameters;
            }

            tools.Add(AIFunctionFactory.CreateDeclaration(name, description, parameters));
        }

        return tools;
    }

    private static ChatToolMode? ParseToolChoice(JsonElement root, List<AITool> tools)
    {
        if (!Present(root, "tool_choice", out var choice))
        {
            return null;
        }

        if (choice.ValueKind == JsonValueKind.String)
        {
            var mode = choice.GetString();
            return mode switch
            {
                "none" => ChatToolMode.None,
                "auto" => ChatToolMode.Auto,
                "required" when tools.Count > 0 => ChatToolMode.RequireAny,
                "required" => throw OpenAIErrorException.Invalid("tool_choice", "'tool_choice' \"required\" needs at least one tool in 'tools'"),
                _ => throw OpenAIErrorException.Invalid("tool_choice", $"unknown tool_choice '{mode}' (none, auto, required, or a function)"),
            };
        }

        if (choice.ValueKind != JsonValueKind.Object)
        {
            throw WrongType("tool_choice", "a string or an object");
        }

        Object(choice, "tool_choice", "type", "function");
        if (String(choice, "type", "tool_choice.type") != "function")
        {
            throw OpenAIErrorException.Invalid("tool_choice.type", "'tool_choice.type' must be \"function\"");
        }

        if (!Present(choice, "function", out var function))
        {
            throw OpenAIErrorException.Invalid("tool_choice.function", "'tool_choice.function' is required");
        }

        Object(function, "tool_choice.function", "name");
        var name = String(function, "name", "tool_choice.function.name") ?? throw OpenAIErrorException.Invalid("tool_choice.function.name", "'tool_choice.function.name' is required");
        if (!tools.Any(t => t.Name == name))
        {
            throw OpenAIErrorException.Invalid("tool_choice.function.name", $"function '{name}' is not among 'tools'");
        }

        return ChatToolMode.RequireSpecific(name);
    }

    private static ChatResponseFormat? ParseResponseFormat(JsonElement root)
    {
        if (!Present(root, "response_format", out var format))
        {
            return null;
        }

        Object(format, "response_format", "type", "json_schema");
        var type = String(format, "type", "response_format.type") ?? throw OpenAIErrorException.Invalid("response_format.type", "'response_format.type' is required");
        switch (type)
        {
            case "text":
                return ChatResponseFormat.Text;
            case "json_object":
                return ChatResponseFormat.Json;
            case "json_schema":
                if (!Present(format, "json_schema", out var js))
                {
                    throw OpenAIErrorException.Invalid("response_format.json_schema", "'response_format.json_schema' is required with type json_schema");
                }

                Object(js, "response_format.json_schema", "name", "description", "schema", "strict");
                var name = String(js, "name", "response_format.json_schema.name") ?? throw OpenAIErrorException.Invalid("response_format.json_schema.name", "'response_format.json_schema.name' is required");
                var description = String(js, "description", "response_format.json_schema.description");
                Bool(js, "strict", "response_format.json_schema.strict");
                if (!Present(js, "schema", out var schema))
                {
                    return ChatResponseFormat.Json; // no schema: any JSON object, as OpenAI
                }

                return schema.ValueKind == JsonValueKind.Object
                    ? ChatResponseFormat.ForJsonSchema(schema.Clone(), name, description)
                    : throw WrongType("response_format.json_schema.schema", "a JSON Schema object");
            default:
                throw OpenAIErrorException.Invalid("response_format.type", $"unknown response_format type '{type}' (text, json_object, json_schema)");
        }
    }

    /// <summary>Checks that <paramref name="value"/> is an object whose members are all among <paramref name="known"/>.</summary>
    private static void Object(JsonElement value, string at, params string[] known)
    {
        if (value.ValueKind != JsonValueKind.Object)
        {
            throw WrongType(at, "an object");
        }

        foreach (var p in value.EnumerateObject())
        {
            if (!known.Contains(p.Name))
            {
                throw OpenAIErrorException.Invalid($"{at}.{p.Name}", $"Unrecognized request argument supplied: {at}.{p.Name}", "unrecognized_argument");
            }
        }
    }

    private static List<ChatMessage> ParseMessages(JsonElement root)
    {
        if (!Present(root, "messages", out var messages))
        {
            throw OpenAIErrorException.Invalid("messages", "'messages' is required");
        }

        if (messages.ValueKind != JsonValueKind.Array)
        {
            throw WrongType("messages", "an array");
        }

        if (messages.GetArrayLength() == 0)
        {
            throw OpenAIErrorException.Invalid("messages", "'messages' must hold at least one message");
        }

        var list = new List<ChatMessage>();
        var i = 0;
        foreach (var m in messages.EnumerateArray())
        {
            var at = $"messages[{i++}]";
            if (m.ValueKind != JsonValueKind.Object)
            {
                throw WrongType(at, "an object");
            }

            var role = String(m, "role", at + ".role") ?? throw OpenAIErrorException.Invalid(at + ".role", $"'{at}.role' is required");
            foreach (var p in m.EnumerateObject())
            {
                var known = p.Name is "role" or "content" || (p.Name is "reasoning_content" or "tool_calls" && role == "assistant") || (p.Name == "tool_call_id" && role == "tool");
                if (!known)
                {
                    // name, function_call, ...: the templates have no place for them.
                    throw OpenAIErrorException.Invalid($"{at}.{p.Name}", $"Unrecognized message field: {at}.{p.Name}", "unrecognized_argument");
                }
            }

            var chatRole = role switch
            {
                "system" or "developer" => ChatRole.System,
                "user" => ChatRole.User,
                "assistant" => ChatRole.Assistant,
                "tool" => ChatRole.Tool,
                "function" => throw OpenAIErrorException.Unsupported(at + ".role", "the deprecated role 'function' is not supported; use 'tool'"),
                _ => throw OpenAIErrorException.Invalid(at + ".role", $"unknown role '{role}' (system, developer, user, assistant, tool)"),
            };

            if (chatRole == ChatRole.Tool)
            {
                var callId = String(m, "tool_call_id", at + ".tool_call_id") ?? throw OpenAIErrorException.Invalid(at + ".tool_call_id", $"'{at}.tool_call_id' is required");
                list.Add(new ChatMessage(ChatRole.Tool, [new FunctionResultContent(callId, Content(m, at, chatRole))]));
                continue;
            }

            var contents = new List<AIContent>();
            // Past reasoning is kept as reasoning: the chat client drops it, as R1's template does.
            if (String(m, "reasoning_content", at + ".reasoning_content") is { } reasoning)
            {
                contents.Add(new TextReasoningContent(reasoning));
            }

            var calls = chatRole == ChatRole.Assistant ? ParseToolCalls(m, at) : [];
            var text = Content(m, at, chatRole);
            if (text.Length > 0 || calls.Count == 0)
            {
                contents.Add(new TextContent(text));
            }

            contents.AddRange(calls);
            list.Add(new ChatMessage(chatRole, contents));
        }

        return list;
    }

    private static List<FunctionCallContent> ParseToolCalls(JsonElement message, string at)
    {
        var calls = new List<FunctionCallContent>();
        if (!Present(message, "tool_calls", out var list))
        {
            return calls;
        }

        if (list.ValueKind != JsonValueKind.Array)
        {
            throw WrongType(at + ".tool_calls", "an array");
        }

        var i = 0;
        foreach (var call in list.EnumerateArray())
        {
            var callAt = $"{at}.tool_calls[{i++}]";
            Object(call, callAt, "id", "type", "function");
            var id = String(call, "id", callAt + ".id") ?? throw OpenAIErrorException.Invalid(callAt + ".id", $"'{callAt}.id' is required");
            if (String(call, "type", callAt + ".type") is { } type && type != "function")
            {
                throw OpenAIErrorException.Unsupported(callAt + ".type", $"tool call type '{type}' (only function)");
            }

            if (!Present(call, "function", out var function))
            {
                throw OpenAIErrorException.Invalid(callAt + ".function", $"'{callAt}.function' is required");
            }

            Object(function, callAt + ".function", "name", "arguments");
            var name = String(function, "name", callAt + ".function.name") ?? throw OpenAIErrorException.Invalid(callAt + ".function.name", $"'{callAt}.function.name' is required");
            Dictionary<string, object?> parsed;
            try
            {
                parsed = ToolCallReader.ParseArguments(String(function, "arguments", callAt + ".function.arguments") ?? string.Empty);
            }
            catch (JsonException e)
            {
                throw OpenAIErrorException.Invalid(callAt + ".function.arguments", $"'{callAt}.function.arguments' must be a JSON object: {e.Message}");
            }

            calls.Add(new FunctionCallContent(id, name, parsed));
        }

        return calls;
    }

    private static string Content(JsonElement message, string at, ChatRole role)
    {
        if (!Present(message, "content", out var content))
        {
            if (role == ChatRole.Assistant)
            {
                return string.Empty;
            }

            throw OpenAIErrorException.Invalid(at + ".content", $"'{at}.content' is required");
        }

        if (content.ValueKind == JsonValueKind.String)
        {
            return content.GetString()!;
        }

        if (content.ValueKind != JsonValueKind.Array)
        {
            throw WrongType(at + ".content", "a string or an array of text parts");
        }

        var text = new System.Text.StringBuilder();
        var j = 0;
        foreach (var part in content.EnumerateArray())
        {
            var partAt = $"{at}.content[{j++}]";
            if (part.ValueKind != JsonValueKind.Object)
            {
                throw WrongType(partAt, "an object");
            }

            var type = String(part, "type", partAt + ".type");
            if (type != "text")
            {
                throw OpenAIErrorException.Unsupported(partAt + ".type", $"content part type '{type}' (only text)");
            }

            text.Append(String(part, "text", partAt + ".text") ?? throw OpenAIErrorException.Invalid(partAt + ".text", $"'{partAt}.text' is required"));
        }

        return text.ToString();
    }

    private static List<string>? ParseStop(JsonElement root)
    {
        if (!Present(root, "stop", out var stop))
        {
            return null;
        }

        List<string> stops;
        if (stop.ValueKind == JsonValueKind.String)
        {
            stops = [stop.GetString()!];
        }
        else if (stop.ValueKind == JsonValueKind.Array)
        {
            stops = [];
            var i = 0;
            foreach (var s in stop.EnumerateArray())
            {
                stops.Add(s.ValueKind == JsonValueKind.String ? s.GetString()! : throw WrongType($"stop[{i}]", "a string"));
                i++;
            }
        }
        else
        {
            throw WrongType("stop", "a string or an array of strings");
        }

        if (stops.Count > MaxStops)
        {
            throw OpenAIErrorException.Invalid("stop", $"at most {MaxStops} stop sequences, got {stops.Count}");
        }

        var empty = stops.FindIndex(s => s.Length == 0);
        if (empty >= 0)
        {
            throw OpenAIErrorException.Invalid(stop.ValueKind == JsonValueKind.Array ? $"stop[{empty}]" : "stop", "a stop sequence must not be empty");
        }

        return stops.Count > 0 ? stops : null;
    }

    /// <summary>A field that is present and not null (OpenAI treats an explicit null as absent).</summary>
    private static bool Present(JsonElement obj, string name, out JsonElement value) =>
        obj.TryGetProperty(name, out value) && value.ValueKind != JsonValueKind.Null;

    private static string? String(JsonElement obj, string name, string? param = null) =>
        !Present(obj, name, out var v) ? null
        : v.ValueKind == JsonValueKind.String ? v.GetString() : throw WrongType(param ?? name, "a string");

    private static bool? Bool(JsonElement obj, string name, string? param = null) =>
        !Present(obj, name, out var v) ? null
        : v.ValueKind is JsonValueKind.True or JsonValueKind.False ? v.GetBoolean() : throw WrongType(param ?? name, "a boolean");

    private static int? Int(JsonElement obj, string name) =>
        !Present(obj, name, out var v) ? null
        : v.ValueKind == JsonValueKind.Number && v.TryGetInt32(out var i) ? i : throw WrongType(name, "an integer");

    private static double? Number(JsonElement obj, string name) =>
        !Present(obj, name, out var v) ? null
        : v.ValueKind == JsonValueKind.Number && v.TryGetDouble(out var d) && double.IsFinite(d) ? d : throw WrongType(name, "a number");

    private static OpenAIErrorException WrongType(string param, string expected) =>
        OpenAIErrorException.Invalid(param, $"'{param}' must be {expected}", "invalid_type");
}
