using System.Text.Json;
using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.AI;

namespace DeepSeekCuda.Cli.Server;

/// <summary>
/// A validated <c>POST /v1/chat/completions</c> body. Every field is checked here, before any model work, and a
/// problem is an <see cref="OpenAIErrorException"/> naming the field (<c>messages[2].role</c>, <c>stop[1]</c>, ...).
/// </summary>
/// <remarks>
/// Policy (the engine must not silently drop what a client asked for):
/// fields the engine honours are mapped to <see cref="ChatOptions"/>; fields it cannot honour are refused with 400
/// when set to anything but their neutral value (penalties 0, <c>response_format</c> text, <c>logprobs</c> false,
/// empty <c>tools</c>/<c>functions</c>/<c>logit_bias</c>, <c>tool_choice</c> "none", <c>store</c> false);
/// <c>user</c>, <c>metadata</c> and <c>parallel_tool_calls</c> are accepted and have no effect on the output
/// (labels for the caller's own bookkeeping; no tools run here); any other field is refused as unrecognized,
/// as OpenAI does.
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

            if (so.ValueKind != JsonValueKind.Object)
            {
                throw WrongType("stream_options", "an object");
            }

            foreach (var p in so.EnumerateObject())
            {
                if (p.Name != "include_usage")
                {
                    throw OpenAIErrorException.Invalid($"stream_options.{p.Name}", $"Unrecognized request argument supplied: stream_options.{p.Name}", "unrecognized_argument");
                }
            }

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

        if (Present(root, "response_format", out var format))
        {
            var type = format.ValueKind == JsonValueKind.Object ? String(format, "type", "response_format.type") : throw WrongType("response_format", "an object");
            if (type != "text")
            {
                throw OpenAIErrorException.Unsupported("response_format", $"output is not constrained (only {{\"type\": \"text\"}}), got type '{type}'");
            }
        }

        foreach (var list in (string[])["tools", "functions"])
        {
            if (Present(root, list, out var value) && (value.ValueKind != JsonValueKind.Array || value.GetArrayLength() > 0))
            {
                throw OpenAIErrorException.Unsupported(list, "tool definitions are not given to the model and tool calls are not parsed");
            }
        }

        foreach (var choice in (string[])["tool_choice", "function_call"])
        {
            if (Present(root, choice, out var value) && !(value.ValueKind == JsonValueKind.String && value.GetString() == "none"))
            {
                throw OpenAIErrorException.Unsupported(choice, "no tools are available (only \"none\" is accepted)");
            }
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

            foreach (var p in m.EnumerateObject())
            {
                if (p.Name is not ("role" or "content" or "reasoning_content"))
                {
                    // name, tool_calls, tool_call_id, ...: the templates have no place for them.
                    throw OpenAIErrorException.Invalid($"{at}.{p.Name}", $"Unrecognized message field: {at}.{p.Name}", "unrecognized_argument");
                }
            }

            var role = String(m, "role", at + ".role") ?? throw OpenAIErrorException.Invalid(at + ".role", $"'{at}.role' is required");
            var chatRole = role switch
            {
                "system" or "developer" => ChatRole.System,
                "user" => ChatRole.User,
                "assistant" => ChatRole.Assistant,
                "tool" or "function" => throw OpenAIErrorException.Unsupported(at + ".role", $"role '{role}': tools are not supported"),
                _ => throw OpenAIErrorException.Invalid(at + ".role", $"unknown role '{role}' (system, developer, user, assistant)"),
            };

            var contents = new List<AIContent>();
            // Past reasoning is kept as reasoning: the chat client drops it, as R1's template does.
            if (String(m, "reasoning_content", at + ".reasoning_content") is { } reasoning)
            {
                contents.Add(new TextReasoningContent(reasoning));
            }

            contents.Add(new TextContent(Content(m, at, chatRole)));
            list.Add(new ChatMessage(chatRole, contents));
        }

        return list;
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
