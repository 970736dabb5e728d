using DeepSeekCuda.Inference;
using DeepSeekCuda.Text;

namespace DeepSeekCuda.Hosting;

/// <summary>Settings of a <see cref="DeepSeekChatClient"/>.</summary>
public sealed class DeepSeekChatClientOptions
{
    /// <summary>Prompt format; R1 also means the output starts inside the think block. Default R1.</summary>
    public ChatTemplateKind TemplateKind { get; set; } = ChatTemplateKind.R1;

    /// <summary>Sampling used where a request's <c>ChatOptions</c> leaves a value unset. Default: R1's recommendations.</summary>
    public SamplingOptions DefaultSampling { get; set; } = new();

    /// <summary>Reported as the model id in metadata, responses and metrics.</summary>
    public string ModelId { get; set; } = "deepseek-r1";

    /// <summary>
    /// Split <c>&lt;think&gt;</c> blocks into <c>TextReasoningContent</c>. Default true. With V3 a block is
    /// recognized only if the model writes one at the start of its answer.
    /// </summary>
    public bool ParseReasoning { get; set; } = true;
}
