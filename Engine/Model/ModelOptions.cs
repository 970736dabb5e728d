namespace DeepSeekCuda.Model;

/// <summary>Which MLA formulation a forward uses (both give the same result in exact arithmetic).</summary>
public enum AttentionForm
{
    /// <summary>
    /// Naive for the rows of a prompt of more than two tokens, absorbed for the tokens decoded after it (one at a time, or one
    /// with its MTP draft), however a scheduler cuts them into steps; where a forward call does not say which rows are the
    /// prompt's (a session's), naive when it feeds more than two tokens at once.
    /// </summary>
    Auto,

    /// <summary>Decompress per-head K/V through kv_b (compute-bound; good for long prefill).</summary>
    Naive,

    /// <summary>Fold kv_b into the query and output (MQA over the latent cache; good for decode).</summary>
    Absorbed,
}

/// <summary>Options of a <see cref="DeepSeekModel"/>'s load.</summary>
public sealed record ModelOptions
{
    /// <summary>Default cap of <see cref="MaxSequenceLength"/> (<c>LocalModel</c> chooses the length from the memory instead).</summary>
    public const int DefaultMaxSequenceLength = 4096;

    /// <summary>MLA formulation.</summary>
    public AttentionForm Attention { get; init; } = AttentionForm.Auto;

    /// <summary>
    /// Longest session (prompt plus generated); null for min(max_position_embeddings,
    /// <see cref="DefaultMaxSequenceLength"/>). Sizes the rotary table; a session's caches grow up to it as the session does.
    /// </summary>
    public int? MaxSequenceLength { get; init; }

    /// <summary>Load the MTP layer when the checkpoint has one (needs its weights' memory); a model spread over devices loads it where its plan places it, if it does.</summary>
    public bool LoadMtp { get; init; } = true;
}

/// <summary>A named intermediate of a forward, named as in the fixtures (<c>layer1.gate_scores</c>).</summary>
/// <param name="Name">Stage name: embed, layer{i}.attn_out, layer{i}.ffn_out, layer{i}.out, layer{i}.gate_in,
/// layer{i}.gate_scores, layer{i}.topk_idx, layer{i}.topk_weight, final_norm (MTP stages are prefixed mtp.).</param>
/// <param name="Rows">Tokens.</param>
/// <param name="Cols">Values per token.</param>
/// <param name="Values">Row-major values, or null for index tensors.</param>
/// <param name="Indices">Row-major indices (topk_idx), or null.</param>
public sealed record Intermediate(string Name, int Rows, int Cols, float[]? Values, int[]? Indices);
