using DeepSeekCuda.Inference;
using DeepSeekCuda.Serving;
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

    /// <summary>
    /// Most requests decoding together (continuous batching: the rest wait for a slot). Default 16. The running
    /// requests share the cache pool (<see cref="KvCacheBlocks"/>).
    /// </summary>
    public int MaxBatch { get; set; } = 16;

    /// <summary>
    /// Token budget of one scheduler step: every running request's decode token first, then prompt chunks
    /// (long prompts are prefilled over several steps, interleaved with the others' decoding). Default 512.
    /// </summary>
    public int MaxTokensPerStep { get; set; } = 512;

    /// <summary>
    /// MTP speculative decoding (the MTP module drafts a token, the next step verifies it). Auto (default):
    /// drafts when the model has an MTP module and stops for good after a window of
    /// <see cref="SpeculativeAutoWindow"/> drafts accepted less often than
    /// <see cref="SpeculativeAutoMinAcceptanceRate"/>; On: required (an error without the module); Off: never.
    /// Output does not change in any mode (the main model's own samples, drawn in the same order); only the speed does.
    /// </summary>
    public SpeculativeDecodingMode SpeculativeDecoding { get; set; } = SpeculativeDecodingMode.Auto;

    /// <summary>Auto mode: drafts per judgement window. Default 64.</summary>
    public int SpeculativeAutoWindow { get; set; } = 64;

    /// <summary>Auto mode: the acceptance rate a window must reach to keep drafting. Default 0.3.</summary>
    public double SpeculativeAutoMinAcceptanceRate { get; set; } = 0.3;

    /// <summary>
    /// Cache blocks (64 tokens each) shared by all requests. Null (default): on CUDA, what the devices' memory holds when the
    /// client is created, beside the weights, the step buffers and a reserve (measured: <see cref="Serving.PagedStepRunner.Attach"/>),
    /// at most enough for <see cref="MaxBatch"/> requests of the model's full context; on the CPU backend exactly that many.
    /// With fewer blocks than <see cref="MaxBatch"/> full-length requests need, a request that cannot grow preempts the newest
    /// one, which is re-prefilled later (its output does not change). A pool set here that the devices cannot hold, or a
    /// default one shorter than one full-length request, is refused when the client is created
    /// (<see cref="Serving.InsufficientDeviceMemoryException"/>, naming the device and its bytes).
    /// </summary>
    public int? KvCacheBlocks { get; set; }

    internal void Validate()
    {
        DefaultSampling.Validate();
        ArgumentOutOfRangeException.ThrowIfLessThan(MaxBatch, 1, nameof(MaxBatch));
        ArgumentOutOfRangeException.ThrowIfLessThan(MaxTokensPerStep, 1, nameof(MaxTokensPerStep));
        ArgumentOutOfRangeException.ThrowIfLessThan(SpeculativeAutoWindow, 1, nameof(SpeculativeAutoWindow));
        if (!(SpeculativeAutoMinAcceptanceRate is >= 0 and <= 1))
        {
            throw new ArgumentOutOfRangeException(nameof(SpeculativeAutoMinAcceptanceRate), SpeculativeAutoMinAcceptanceRate, "must be within 0..1");
        }

        if (!Enum.IsDefined(SpeculativeDecoding))
        {
            throw new ArgumentOutOfRangeException(nameof(SpeculativeDecoding), SpeculativeDecoding, "not a SpeculativeDecodingMode");
        }
        if (KvCacheBlocks is < 1)
        {
            throw new ArgumentOutOfRangeException(nameof(KvCacheBlocks), KvCacheBlocks, "must be >= 1");
        }
    }
}
