using System.Text;

namespace DeepSeekCuda.Text;

/// <summary>Which DeepSeek prompt format <see cref="ChatTemplate"/> renders.</summary>
public enum ChatTemplateKind
{
    /// <summary>
    /// DeepSeek-V3: the <c>chat_template</c> of V3's tokenizer_config.json, reproduced exactly, quirks
    /// included. The generation prompt is a bare <c>&lt;｜Assistant｜&gt;</c>; past assistant turns are not stripped.
    /// </summary>
    V3,

    /// <summary>
    /// DeepSeek-R1 (later revision, MODEL.md §8): the generation prompt forces <c>&lt;think&gt;\n</c>, and past
    /// assistant turns keep only the text after their last <c>&lt;/think&gt;</c>.
    /// </summary>
    R1,
}

/// <summary>The role of a <see cref="ChatTurn"/>.</summary>
public enum ChatTurnRole
{
    /// <summary>System prompt; all of them are joined and placed right after BOS.</summary>
    System,

    /// <summary>A user turn.</summary>
    User,

    /// <summary>An assistant turn: text, tool calls, or both.</summary>
    Assistant,

    /// <summary>The output of one tool call.</summary>
    Tool,
}

/// <summary>A tool call made by the assistant.</summary>
/// <param name="Name">The function name.</param>
/// <param name="Arguments">The arguments as JSON text, inserted verbatim.</param>
/// <param name="Type">The tool type; the templates write it before the name (normally "function").</param>
public sealed record ChatToolCall(string Name, string Arguments, string Type = "function");

/// <summary>One message of a conversation, as the DeepSeek templates see it.</summary>
/// <param name="Role">Who speaks.</param>
/// <param name="Content">The text; null for an assistant turn made only of tool calls (the V3 template tells the two apart by it).</param>
/// <param name="ToolCalls">The assistant's tool calls, if any.</param>
public sealed record ChatTurn(ChatTurnRole Role, string? Content, IReadOnlyList<ChatToolCall>? ToolCalls = null)
{
    /// <summary>A system prompt.</summary>
    public static ChatTurn System(string content) => new(ChatTurnRole.System, content);

    /// <summary>A user turn.</summary>
    public static ChatTurn User(string content) => new(ChatTurnRole.User, content);

    /// <summary>An assistant turn with text.</summary>
    public static ChatTurn Assistant(string content) => new(ChatTurnRole.Assistant, content);

    /// <summary>An assistant turn made of tool calls, with optional text before them.</summary>
    public static ChatTurn AssistantToolCalls(IReadOnlyList<ChatToolCall> calls, string? content = null) => new(ChatTurnRole.Assistant, content, calls);

    /// <summary>The output of a tool call.</summary>
    public static ChatTurn Tool(string output) => new(ChatTurnRole.Tool, output);
}

/// <summary>Options of <see cref="ChatTemplate.Render"/>.</summary>
public sealed record ChatTemplateOptions
{
    /// <summary>V3 or R1 format. Default R1.</summary>
    public ChatTemplateKind Kind { get; init; } = ChatTemplateKind.R1;

    /// <summary>Append the assistant prefix the model continues from (Jinja's <c>add_generation_prompt</c>). Default true.</summary>
    public bool AddGenerationPrompt { get; init; } = true;
}

/// <summary>
/// Renders a conversation into DeepSeek-V3/R1 prompt text. The text starts with the BOS marker written
/// as text, so encode it with <c>addBos: false</c>; the tokenizer recognizes the markers as added tokens.
/// </summary>
public static class ChatTemplate
{
    /// <summary>Beginning of sentence (id 0).</summary>
    public const string Bos = "<｜begin▁of▁sentence｜>";

    /// <summary>End of sentence (id 1); closes each past assistant turn.</summary>
    public const string Eos = "<｜end▁of▁sentence｜>";

    /// <summary>Opens a user turn.</summary>
    public const string User = "<｜User｜>";

    /// <summary>Opens an assistant turn.</summary>
    public const string Assistant = "<｜Assistant｜>";

    /// <summary>Opens the reasoning block (an added token in R1's tokenizer, plain text in V3's).</summary>
    public const string ThinkOpen = "<think>";

    /// <summary>Closes the reasoning block.</summary>
    public const string ThinkClose = "</think>";

    /// <summary>Opens the list of tool calls.</summary>
    public const string ToolCallsBegin = "<｜tool▁calls▁begin｜>";

    /// <summary>Closes the list of tool calls.</summary>
    public const string ToolCallsEnd = "<｜tool▁calls▁end｜>";

    /// <summary>Opens one tool call.</summary>
    public const string ToolCallBegin = "<｜tool▁call▁begin｜>";

    /// <summary>Closes one tool call.</summary>
    public const string ToolCallEnd = "<｜tool▁call▁end｜>";

    /// <summary>Separates a tool call's type from its name.</summary>
    public const string ToolSep = "<｜tool▁sep｜>";

    /// <summary>Opens a run of tool outputs.</summary>
    public const string ToolOutputsBegin = "<｜tool▁outputs▁begin｜>";

    /// <summary>Closes a run of tool outputs.</summary>
    public const string ToolOutputsEnd = "<｜tool▁outputs▁end｜>";

    /// <summary>Opens one tool output.</summary>
    public const string ToolOutputBegin = "<｜tool▁output▁begin｜>";

    /// <summary>Closes one tool output.</summary>
    public const string ToolOutputEnd = "<｜tool▁output▁end｜>";

    /// <summary>Renders <paramref name="messages"/> in the format <paramref name="options"/> names (default: R1 with the generation prompt).</summary>
    public static string Render(IReadOnlyList<ChatTurn> messages, ChatTemplateOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(messages);
        options ??= new ChatTemplateOptions();
        var sb = new StringBuilder();
        sb.Append(Bos);
        AppendSystemPrompt(sb, messages);
        if (options.Kind == ChatTemplateKind.V3)
        {
            RenderV3(sb, messages, options.AddGenerationPrompt);
        }
        else
        {
            RenderR1(sb, messages, options.AddGenerationPrompt);
        }

        return sb.ToString();
    }

    /// <summary>
    /// Keeps only what follows the last <c>&lt;/think&gt;</c>, as R1's template does to past assistant turns
    /// (reasoning is never fed back to the model).
    /// </summary>
    public static string StripReasoning(string content)
    {
        var i = content.LastIndexOf(ThinkClose, StringComparison.Ordinal);
        return i < 0 ? content : content[(i + ThinkClose.Length)..];
    }

    private static void AppendSystemPrompt(StringBuilder sb, IReadOnlyList<ChatTurn> messages)
    {
        var first = true;
        foreach (var m in messages)
        {
            if (m.Role != ChatTurnRole.System)
            {
                continue;
            }

            if (!first)
            {
                sb.Append("\n\n");
            }

            sb.Append(m.Content);
            first = false;
        }
    }

    private static void AppendCall(StringBuilder sb, ChatToolCall call)
    {
        sb.Append(ToolCallBegin).Append(call.Type).Append(ToolSep).Append(call.Name)
          .Append("\n```json\n").Append(call.Arguments).Append("\n```").Append(ToolCallEnd);
    }

    // A line-for-line transcription of V3's Jinja, whose namespace flags we keep with the same names.
    // Its quirks are deliberate here, because this is the prompt every other runtime sends a V3 model:
    // - is_first is never reset, so only the very first tool call of the conversation gets
    //   "<｜Assistant｜><｜tool▁calls▁begin｜>", and every later call (in any message) is written as
    //   "\n<｜tool▁call▁begin｜>…<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>"; a message with a
    //   single first call therefore has no "<｜tool▁calls▁end｜>".
    // - tool calls are rendered only when the assistant's content is null; with text, the calls are dropped.
    // - is_output_first is never reset, so only the first tool output of the conversation opens with
    //   "<｜tool▁outputs▁begin｜>".
    private static void RenderV3(StringBuilder sb, IReadOnlyList<ChatTurn> messages, bool addGenerationPrompt)
    {
        bool isFirst = false, isTool = false, isOutputFirst = true;
        foreach (var m in messages)
        {
            switch (m.Role)
            {
                case ChatTurnRole.User:
                    isTool = false;
                    sb.Append(User).Append(m.Content);
                    break;
                case ChatTurnRole.Assistant when m.Content is null:
                    isTool = false;
                    foreach (var call in m.ToolCalls ?? [])
                    {
                        if (!isFirst)
                        {
                            sb.Append(Assistant).Append(ToolCallsBegin);
                            AppendCall(sb, call);
                            isFirst = true;
                        }
                        else
                        {
                            sb.Append('\n');
                            AppendCall(sb, call);
                            sb.Append(ToolCallsEnd).Append(Eos);
                        }
                    }

                    break;
                case ChatTurnRole.Assistant:
                    if (isTool)
                    {
                        sb.Append(ToolOutputsEnd).Append(m.Content).Append(Eos);
                        isTool = false;
                    }
                    else
                    {
                        sb.Append(Assistant).Append(m.Content).Append(Eos);
                    }

                    break;
                case ChatTurnRole.Tool:
                    isTool = true;
                    if (isOutputFirst)
                    {
                        sb.Append(ToolOutputsBegin).Append(ToolOutputBegin).Append(m.Content).Append(ToolOutputEnd);
                        isOutputFirst = false;
                    }
                    else
                    {
                        sb.Append('\n').Append(ToolOutputBegin).Append(m.Content).Append(ToolOutputEnd);
                    }

                    break;
            }
        }

        if (isTool)
        {
            sb.Append(ToolOutputsEnd);
        }

        if (addGenerationPrompt && !isTool)
        {
            sb.Append(Assistant);
        }
    }

    // MODEL.md §8, "R1 template, later revision". Where §8 describes a per-message structure (each
    // tool-call message opens with <｜Assistant｜> and closes with <｜tool▁calls▁end｜><｜end▁of▁sentence｜>;
    // each run of tool results opens with <｜tool▁outputs▁begin｜>) we follow it rather than V3's
    // never-reset flags. Outputs within a run are separated by "\n" as in both published templates.
    private static void RenderR1(StringBuilder sb, IReadOnlyList<ChatTurn> messages, bool addGenerationPrompt)
    {
        var isTool = false;
        foreach (var m in messages)
        {
            switch (m.Role)
            {
                case ChatTurnRole.User:
                    isTool = false;
                    sb.Append(User).Append(m.Content);
                    break;
                case ChatTurnRole.Assistant when m.ToolCalls is { Count: > 0 }:
                    isTool = false;
                    sb.Append(Assistant).Append(m.Content).Append(ToolCallsBegin);
                    for (var i = 0; i < m.ToolCalls.Count; i++)
                    {
                        if (i > 0)
                        {
                            sb.Append('\n');
                        }

                        AppendCall(sb, m.ToolCalls[i]);
                    }

                    sb.Append(ToolCallsEnd).Append(Eos);
                    break;
                case ChatTurnRole.Assistant:
                    // Reasoning is stripped after tool results too: R1 must never see its own past thoughts.
                    var content = StripReasoning(m.Content ?? string.Empty);
                    if (isTool)
                    {
                        sb.Append(ToolOutputsEnd).Append(content).Append(Eos);
                        isTool = false;
                    }
                    else
                    {
                        sb.Append(Assistant).Append(content).Append(Eos);
                    }

                    break;
                case ChatTurnRole.Tool:
                    if (!isTool)
                    {
                        sb.Append(ToolOutputsBegin);
                    }
                    else
                    {
                        sb.Append('\n');
                    }

                    sb.Append(ToolOutputBegin).Append(m.Content).Append(ToolOutputEnd);
                    isTool = true;
                    break;
            }
        }

        if (isTool)
        {
            sb.Append(ToolOutputsEnd);
        }

        if (addGenerationPrompt && !isTool)
        {
            sb.Append(Assistant).Append(ThinkOpen).Append('\n');
        }
    }
}
