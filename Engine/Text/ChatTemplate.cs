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

    /// <summary>
    /// The functions the model may call, written after the system prompt as <see cref="ToolFormat"/> says
    /// (even when there is no system message). Null or empty: the prompt is unchanged, byte for byte.
    /// </summary>
    public IReadOnlyList<ChatToolDefinition>? Tools { get; init; }

    /// <summary>The convention <see cref="Tools"/> are written in. Default <see cref="ToolPromptFormat.Sglang"/>.</summary>
    public ToolPromptFormat ToolFormat { get; init; } = ToolPromptFormat.Sglang;
}

/// <summary>A piece of a rendered chat prompt: a control marker the template wrote, or text.</summary>
/// <param name="Text">The marker's or the text's characters.</param>
/// <param name="IsControl">
/// A marker of the template (<see cref="ChatTemplate.User"/>, ...), encoded as its added token; false for
/// message content and the template's plain text, in which no added token is recognized.
/// </param>
public readonly record struct PromptSegment(string Text, bool IsControl);

/// <summary>
/// Renders a conversation into DeepSeek-V3/R1 prompts. <see cref="Encode(ITokenizer, IReadOnlyList{ChatTurn}, ChatTemplateOptions?)"/>
/// gives the ids to send: only the template's markers become control tokens, so a message that spells
/// <c>&lt;｜Assistant｜&gt;</c> cannot fake a turn. <see cref="Render"/> gives the same prompt as text.
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

    /// <summary>
    /// Renders <paramref name="messages"/> as text in the format <paramref name="options"/> names (default: R1
    /// with the generation prompt): the prompt the official Jinja template writes. Encoding this text with
    /// <see cref="ITokenizer.Encode"/> would turn marker text inside messages into control tokens; send
    /// <see cref="Encode(ITokenizer, IReadOnlyList{ChatTurn}, ChatTemplateOptions?)"/>'s ids instead.
    /// </summary>
    public static string Render(IReadOnlyList<ChatTurn> messages, ChatTemplateOptions? options = null) =>
        string.Concat(RenderSegments(messages, options).Select(s => s.Text));

    /// <summary>Renders <paramref name="messages"/> as <see cref="Render"/> does, keeping the template's markers apart from text.</summary>
    public static IReadOnlyList<PromptSegment> RenderSegments(IReadOnlyList<ChatTurn> messages, ChatTemplateOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(messages);
        options ??= new ChatTemplateOptions();
        var w = new Writer();
        w.Control(Bos);
        AppendSystemPrompt(w, messages);
        if (options.Tools is { Count: > 0 } tools)
        {
            AppendTools(w, tools, options.ToolFormat);
        }

        if (options.Kind == ChatTemplateKind.V3)
        {
            RenderV3(w, messages, options.AddGenerationPrompt);
        }
        else
        {
            RenderR1(w, messages, options.AddGenerationPrompt);
        }

        return w.Segments;
    }

    /// <summary>Renders and encodes <paramref name="messages"/> (see <see cref="Encode(IReadOnlyList{PromptSegment}, ITokenizer)"/>).</summary>
    public static int[] Encode(ITokenizer tokenizer, IReadOnlyList<ChatTurn> messages, ChatTemplateOptions? options = null) =>
        Encode(RenderSegments(messages, options), tokenizer);

    /// <summary>
    /// Encodes a rendered prompt. Each marker that is an added token of <paramref name="tokenizer"/> becomes
    /// its id; everything else (message content, the template's plain text, a marker the tokenizer lacks,
    /// such as V3's <c>&lt;think&gt;</c>) is encoded with <see cref="ITokenizer.EncodeLiteral"/>, where no added
    /// token, special or not, is recognized: DeepSeek's chat markers are non-special added tokens, so
    /// skipping only special ones would still let content fake a turn. Text between two markers is
    /// encoded as one run, so a prompt whose content spells no marker gets the ids Hugging Face gives its
    /// rendered text (the markers' lstrip/rstrip flags are not applied; DeepSeek's have none).
    /// </summary>
    public static int[] Encode(IReadOnlyList<PromptSegment> segments, ITokenizer tokenizer)
    {
        ArgumentNullException.ThrowIfNull(segments);
        ArgumentNullException.ThrowIfNull(tokenizer);
        var ids = new List<int>();
        var text = new StringBuilder();
        foreach (var segment in segments)
        {
            if (segment.IsControl && tokenizer.AddedTokenId(segment.Text) is { } id)
            {
                Flush();
                ids.Add(id);
            }
            else
            {
                text.Append(segment.Text);
            }
        }

        Flush();
        return [.. ids];

        void Flush()
        {
            if (text.Length > 0)
            {
                ids.AddRange(tokenizer.EncodeLiteral(text.ToString()));
                text.Clear();
            }
        }
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

    private static void AppendSystemPrompt(Writer w, IReadOnlyList<ChatTurn> messages)
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
                w.Text("\n\n");
            }

            w.Text(m.Content);
            first = false;
        }
    }

    // ToolPromptFormat.Sglang: the tool block of sglang's tool_chat_template_deepseekr1.jinja, quirks kept
    // ("valid.## Tools", the blank line before the first tool). Its markers are the template's, so they are
    // control tokens as in Hugging Face's encoding of the rendered text; the tools' JSON is text, so a
    // description that spells a marker cannot open a call.
    private static void AppendTools(Writer w, IReadOnlyList<ChatToolDefinition> tools, ToolPromptFormat format)
    {
        if (format != ToolPromptFormat.Sglang)
        {
            throw new ArgumentOutOfRangeException(nameof(format), format, "unknown tool prompt format");
        }

        w.Text("\n\nYou are a helpful assistant with tool calling capabilities. When a tool call is needed, you MUST use the following format to issue the call:\n")
         .Control(ToolCallsBegin).Control(ToolCallBegin).Text("function").Control(ToolSep)
         .Text("FUNCTION_NAME\n```json\n{\"param1\": \"value1\", \"param2\": \"value2\"}\n```")
         .Control(ToolCallEnd).Control(ToolCallsEnd)
         .Text("\n\nMake sure the JSON is valid.## Tools\n\n### Function\n\nYou have the following functions available:\n\n");
        foreach (var tool in tools)
        {
            w.Text("\n```json\n").Text(TemplateJson.Tool(tool)).Text("\n```\n");
        }
    }

    private static void AppendCall(Writer w, ChatToolCall call)
    {
        w.Control(ToolCallBegin).Text(call.Type).Control(ToolSep).Text(call.Name)
         .Text("\n```json\n").Text(call.Arguments).Text("\n```").Control(ToolCallEnd);
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
    private static void RenderV3(Writer w, IReadOnlyList<ChatTurn> messages, bool addGenerationPrompt)
    {
        bool isFirst = false, isTool = false, isOutputFirst = true;
        foreach (var m in messages)
        {
            switch (m.Role)
            {
                case ChatTurnRole.User:
                    isTool = false;
                    w.Control(User).Text(m.Content);
                    break;
                case ChatTurnRole.Assistant when m.Content is null:
                    isTool = false;
                    foreach (var call in m.ToolCalls ?? [])
                    {
                        if (!isFirst)
                        {
                            w.Control(Assistant).Control(ToolCallsBegin);
                            AppendCall(w, call);
                            isFirst = true;
                        }
                        else
                        {
                            w.Text("\n");
                            AppendCall(w, call);
                            w.Control(ToolCallsEnd).Control(Eos);
                        }
                    }

                    break;
                case ChatTurnRole.Assistant:
                    if (isTool)
                    {
                        w.Control(ToolOutputsEnd).Text(m.Content).Control(Eos);
                        isTool = false;
                    }
                    else
                    {
                        w.Control(Assistant).Text(m.Content).Control(Eos);
                    }

                    break;
                case ChatTurnRole.Tool:
                    isTool = true;
                    if (isOutputFirst)
                    {
                        w.Control(ToolOutputsBegin).Control(ToolOutputBegin).Text(m.Content).Control(ToolOutputEnd);
                        isOutputFirst = false;
                    }
                    else
                    {
                        w.Text("\n").Control(ToolOutputBegin).Text(m.Content).Control(ToolOutputEnd);
                    }

                    break;
            }
        }

        if (isTool)
        {
            w.Control(ToolOutputsEnd);
        }

        if (addGenerationPrompt && !isTool)
        {
            w.Control(Assistant);
        }
    }

    // MODEL.md §8, "R1 template, later revision". Where §8 describes a per-message structure (each
    // tool-call message opens with <｜Assistant｜> and closes with <｜tool▁calls▁end｜><｜end▁of▁sentence｜>;
    // each run of tool results opens with <｜tool▁outputs▁begin｜>) we follow it rather than V3's
    // never-reset flags. Outputs within a run are separated by "\n" as in both published templates.
    private static void RenderR1(Writer w, IReadOnlyList<ChatTurn> messages, bool addGenerationPrompt)
    {
        var isTool = false;
        foreach (var m in messages)
        {
            switch (m.Role)
            {
                case ChatTurnRole.User:
                    isTool = false;
                    w.Control(User).Text(m.Content);
                    break;
                case ChatTurnRole.Assistant when m.ToolCalls is { Count: > 0 }:
                    isTool = false;
                    w.Control(Assistant).Text(m.Content).Control(ToolCallsBegin);
                    for (var i = 0; i < m.ToolCalls.Count; i++)
                    {
                        if (i > 0)
                        {
                            w.Text("\n");
                        }

                        AppendCall(w, m.ToolCalls[i]);
                    }

                    w.Control(ToolCallsEnd).Control(Eos);
                    break;
                case ChatTurnRole.Assistant:
                    // Reasoning is stripped after tool results too: R1 must never see its own past thoughts.
                    var content = StripReasoning(m.Content ?? string.Empty);
                    if (isTool)
                    {
                        w.Control(ToolOutputsEnd).Text(content).Control(Eos);
                        isTool = false;
                    }
                    else
                    {
                        w.Control(Assistant).Text(content).Control(Eos);
                    }

                    break;
                case ChatTurnRole.Tool:
                    if (!isTool)
                    {
                        w.Control(ToolOutputsBegin);
                    }
                    else
                    {
                        w.Text("\n");
                    }

                    w.Control(ToolOutputBegin).Text(m.Content).Control(ToolOutputEnd);
                    isTool = true;
                    break;
            }
        }

        if (isTool)
        {
            w.Control(ToolOutputsEnd);
        }

        if (addGenerationPrompt && !isTool)
        {
            w.Control(Assistant).Control(ThinkOpen).Text("\n");
        }
    }

    /// <summary>Collects the segments of a prompt; empty text is dropped, so each segment holds something.</summary>
    private sealed class Writer
    {
        public List<PromptSegment> Segments { get; } = [];

        public Writer Control(string marker)
        {
            Segments.Add(new PromptSegment(marker, IsControl: true));
            return this;
        }

        public Writer Text(string? text)
        {
            if (!string.IsNullOrEmpty(text))
            {
                Segments.Add(new PromptSegment(text, IsControl: false));
            }

            return this;
        }
    }
}
