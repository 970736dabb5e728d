using System.Globalization;
using System.Text;
using System.Text.Json;

namespace DeepSeekCuda.Text;

/// <summary>A function the model may call, as the OpenAI API's <c>tools[].function</c> describes it.</summary>
/// <param name="Name">The function name the model writes after <c>&lt;｜tool▁sep｜&gt;</c>.</param>
/// <param name="Description">What the function does; left out of the prompt when null.</param>
/// <param name="Parameters">The JSON Schema object of the arguments; left out of the prompt when null.</param>
public sealed record ChatToolDefinition(string Name, string? Description, JsonElement? Parameters);

/// <summary>How <see cref="ChatTemplate"/> writes tool definitions into the prompt.</summary>
/// <remarks>
/// DeepSeek-V3's and R1's own templates render past tool calls and outputs but no definitions, so the
/// definitions follow a published convention whose example call uses the checkpoints' call format.
/// </remarks>
public enum ToolPromptFormat
{
    /// <summary>
    /// SGLang's DeepSeek tool templates (sgl-project/sglang <c>examples/chat_template/tool_chat_template_deepseekr1.jinja</c>
    /// and <c>tool_chat_template_deepseekv3.jinja</c>, the same block; vLLM's <c>examples/tool_chat_template_deepseekr1.jinja</c>
    /// is adapted from it): after the system prompt, <c>\n\n</c>, an instruction showing the
    /// <c>&lt;｜tool▁calls▁begin｜&gt;…function&lt;｜tool▁sep｜&gt;NAME\n```json\n…\n```…</c> format, then one
    /// <c>\n```json\n{tool | tojson}\n```\n</c> per tool. Used for V3 and R1 alike.
    /// </summary>
    Sglang,
}

/// <summary>
/// Writes JSON the way the chat templates' <c>tojson</c> filter does (Hugging Face's: Python's
/// <c>json.dumps</c> with <c>ensure_ascii=False</c>): members in their given order, <c>", "</c> between items,
/// <c>": "</c> after keys, non-ASCII characters as themselves.
/// </summary>
internal static class TemplateJson
{
    /// <summary>The OpenAI tool object <c>{"type": "function", "function": {...}}</c> a template iterates over.</summary>
    public static string Tool(ChatToolDefinition tool)
    {
        ArgumentNullException.ThrowIfNull(tool);
        if (string.IsNullOrEmpty(tool.Name))
        {
            throw new ArgumentException("a tool needs a name", nameof(tool));
        }

        var sb = new StringBuilder();
        sb.Append("{\"type\": \"function\", \"function\": {\"name\": ");
        String(sb, tool.Name);
        if (tool.Description is not null)
        {
            sb.Append(", \"description\": ");
            String(sb, tool.Description);
        }

        if (tool.Parameters is { } parameters)
        {
            if (parameters.ValueKind == JsonValueKind.Undefined)
            {
                throw new ArgumentException($"tool '{tool.Name}': Parameters holds no JSON value", nameof(tool));
            }

            sb.Append(", \"parameters\": ");
            Value(sb, parameters);
        }

        return sb.Append("}}").ToString();
    }

    /// <summary>
    /// Appends <paramref name="value"/>. Numbers keep their text as sent (Python would write an integral
    /// float such as <c>1.0</c> the same way; it rewrites exponents, which schemas rarely hold).
    /// </summary>
    public static void Value(StringBuilder sb, JsonElement value)
    {
        switch (value.ValueKind)
        {
            case JsonValueKind.Object:
            {
                sb.Append('{');
                var first = true;
                foreach (var p in value.EnumerateObject())
                {
                    if (!first)
                    {
                        sb.Append(", ");
                    }

                    String(sb, p.Name);
                    sb.Append(": ");
                    Value(sb, p.Value);
                    first = false;
                }

                sb.Append('}');
                break;
            }

            case JsonValueKind.Array:
            {
                sb.Append('[');
                var first = true;
                foreach (var item in value.EnumerateArray())
                {
                    if (!first)
                    {
                        sb.Append(", ");
                    }

                    Value(sb, item);
                    first = false;
                }

                sb.Append(']');
                break;
            }

            case JsonValueKind.String:
                String(sb, value.GetString()!);
                break;
            case JsonValueKind.Number:
                sb.Append(value.GetRawText());
                break;
            case JsonValueKind.True:
                sb.Append("true");
                break;
            case JsonValueKind.False:
                sb.Append("false");
                break;
            case JsonValueKind.Null:
                sb.Append("null");
                break;
            default:
                throw new ArgumentException($"no JSON value ({value.ValueKind})", nameof(value));
        }
    }

    /// <summary>A JSON string literal: <c>"</c>, <c>\</c> and control characters escaped, as Python and JavaScript both write them.</summary>
    public static void String(StringBuilder sb, string s)
    {
        sb.Append('"');
        foreach (var c in s)
        {
            switch (c)
            {
                case '"': sb.Append("\\\""); break;
                case '\\': sb.Append("\\\\"); break;
                case '\n': sb.Append("\\n"); break;
                case '\r': sb.Append("\\r"); break;
                case '\t': sb.Append("\\t"); break;
                case '\b': sb.Append("\\b"); break;
                case '\f': sb.Append("\\f"); break;
                default:
                    if (c < ' ')
                    {
                        sb.Append("\\u").Append(((int)c).ToString("x4", CultureInfo.InvariantCulture));
                    }
                    else
                    {
                        sb.Append(c);
                    }

                    break;
            }
        }

        sb.Append('"');
    }
}
