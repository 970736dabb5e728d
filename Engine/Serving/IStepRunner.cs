using DeepSeekCuda.Backends;

namespace DeepSeekCuda.Serving;

/// <summary>One request's part of a step: feed <paramref name="Tokens"/> at positions <paramref name="Position"/>.. of slot <paramref name="Slot"/>.</summary>
/// <param name="Slot">The request's row of the block table (<see cref="KvBlockManager"/>).</param>
/// <param name="Position">Tokens already in the slot's cache; the first token goes here.</param>
/// <param name="Tokens">A prefill chunk, one decode token, or a decode token and its draft.</param>
/// <param name="LogitRows">Logits wanted for the last this many tokens (0 for a prefill chunk that does not finish the prompt).</param>
/// <param name="PromptLength">
/// The request's prompt length, when the caller knows it (≥ 0): positions below it are the prompt's, and each row attends
/// as its kind does (<see cref="Model.AttentionForm.Auto"/>), however the prompt and the tokens after it are cut into steps,
/// so a request's numbers do not depend on the batch it ran in. −1: the entry's rows attend as one forward call over them.
/// </param>
public readonly record struct StepSequence(int Slot, int Position, ReadOnlyMemory<int> Tokens, int LogitRows, int PromptLength = -1);

/// <summary>One request to draft for: the token sampled last, not yet in the cache.</summary>
/// <param name="Slot">The request's slot.</param>
/// <param name="NextToken">The token that follows the slot's last cached position.</param>
public readonly record struct DraftSequence(int Slot, int NextToken);

/// <summary>
/// What <see cref="BatchScheduler"/> needs from a model: a batched forward over request slots, and the
/// MTP draft. The scheduler owns admission, the block table and sampling; a runner only computes.
/// </summary>
/// <remarks>
/// <para><see cref="SessionStepRunner"/> keeps one model session per slot and runs the batch's requests one after
/// another (any <see cref="Inference.ILanguageModel"/>). <see cref="PagedStepRunner"/> implements the contract over
/// the scheduler's <see cref="KvBlockManager"/>, on any backend:</para>
/// <list type="bullet">
/// <item><see cref="Open"/>/<see cref="Close"/>/<see cref="Truncate"/> touch no device memory: the cache
/// lives in the pool's blocks, addressed by <see cref="KvBlockManager.Table"/> (int32 [slots, blocks per
/// request], position p of slot s in block table[s, p/64], row p%64), which the runner copies to the device
/// before a step when <see cref="KvBlockManager.Version"/> moved. The scheduler has already reserved blocks for every position a step writes.</item>
/// <item><see cref="ForwardAndChoose"/> flattens the batch into one token stream [Σ tokens] with per-token
/// (slot, position) metadata, runs every layer once over it, computes logits only for the requested
/// rows, and chooses their tokens on the device (only ids come back). With <see cref="PagedStepRunner.DecodeGraphs"/>, a decode
/// or verify batch of a row bucket seen before replays that bucket's captured graph, the choice inside (not yet run on a GPU).</item>
/// <item>A runner that drafts keeps the final hidden state of each position whose MTP input is not yet
/// certain on the device until <see cref="Draft"/>, or a step's own drafts (<see cref="ForwardChooseAndDraft"/>), has
/// consumed it; <see cref="Truncate"/> discards those of dropped positions.</item>
/// </list>
/// Calls come from one thread at a time.
/// </remarks>
public interface IStepRunner : IDisposable
{
    /// <summary>Rows of the logits.</summary>
    int VocabSize { get; }

    /// <summary>Most tokens one slot can hold.</summary>
    int MaxSequenceLength { get; }

    /// <summary>Whether <see cref="Draft"/> works (the model has an MTP module).</summary>
    bool CanDraft { get; }

    /// <summary>
    /// Called once by the scheduler before any other call: the block manager whose table addresses the cache
    /// (the scheduler changes it between steps; a paged runner uploads it before each step and sizes its pools
    /// to <see cref="KvBlockManager.TotalBlocks"/>), and the most tokens one <see cref="Forward"/> will feed,
    /// all entries together (a runner sizes its step buffers to it).
    /// </summary>
    void Attach(KvBlockManager blocks, int maxTokensPerStep);

    /// <summary>A new request takes <paramref name="slot"/> with an empty cache; <paramref name="drafts"/>: it will call <see cref="Draft"/>.</summary>
    void Open(int slot, bool drafts);

    /// <summary>
    /// The request in <paramref name="slot"/>, opened to draft, will not call <see cref="Draft"/> again (the
    /// scheduler stopped drafting): drop what was kept for drafting. No default body: a runner that wraps
    /// another must pass it on, or the inner one keeps what it holds for drafts for the rest of the request.
    /// </summary>
    void StopDrafting(int slot);

    /// <summary>The request in <paramref name="slot"/> is gone (finished, cancelled or preempted).</summary>
    void Close(int slot);

    /// <summary>Forgets positions ≥ <paramref name="length"/> of <paramref name="slot"/> (a rejected draft).</summary>
    void Truncate(int slot, int length);

    /// <summary>
    /// Runs one step. <paramref name="logits"/> receives, in batch order, each entry's
    /// <see cref="StepSequence.LogitRows"/> rows of [VocabSize] float32 logits.
    /// </summary>
    void Forward(ReadOnlySpan<StepSequence> batch, Span<float> logits);

    /// <summary>
    /// Runs one step and chooses its tokens where the logits are: <paramref name="choices"/> has one entry per logit row
    /// (batch order). <paramref name="tokens"/>[r] receives row r's token, or <see cref="TokenSampling.NotChosen"/> (−1) when
    /// the row was not chosen there (a <c>default</c> choice) or cannot be sampled; the logits of exactly those rows are in
    /// <paramref name="logits"/> at r·VocabSize (other rows of it may hold anything).
    /// </summary>
    /// <remarks>
    /// This body is for a runner whose logits are on the host anyway: it runs <see cref="Forward"/>
    /// and chooses with the same rule. A runner on a device chooses there, so only ids come back for the rows it chose.
    /// </remarks>
    void ForwardAndChoose(ReadOnlySpan<StepSequence> batch, ReadOnlySpan<TokenChoice> choices, Span<int> tokens, Span<float> logits)
    {
        var rows = 0;
        foreach (var e in batch)
        {
            rows += e.LogitRows;
        }

        CheckChoices(choices, tokens, rows, "logit rows");
        Forward(batch, logits);
        ChooseOnHost(choices, tokens, logits);
    }

    private void ChooseOnHost(ReadOnlySpan<TokenChoice> choices, Span<int> tokens, ReadOnlySpan<float> logits)
    {
        var v = VocabSize;
        for (var r = 0; r < choices.Length; r++)
        {
            tokens[r] = TokenSampling.Choose(logits.Slice(r * v, v), choices[r]);
        }
    }

    /// <summary>
    /// <see cref="ForwardAndChoose"/>, and in the same step the MTP drafts after the logit rows of the entries
    /// <paramref name="drafting"/> marks (one flag per entry; a marked entry's slot drafts, and the entry asks for logits):
    /// <paramref name="drafts"/>[r] receives the token drafted under <paramref name="draftChoice"/> for the position after logit
    /// row r, fed there with tokens[r]. That is the draft to verify next when tokens[r] is the last token the request keeps
    /// from this step: the last row of its entry, or the first row of a verify entry whose draft was rejected (then
    /// <see cref="Truncate"/> drops the position after it, the MTP state with it). An entry's drafts are made when each of its
    /// rows and each of its drafts was chosen where the logits are; then the slot has drafted (<see cref="Draft"/> has nothing
    /// new to draft from). Otherwise each of its drafts is −1 and the slot drafts with <see cref="Draft"/> as after
    /// <see cref="ForwardAndChoose"/>; so is each draft of an entry not marked.
    /// </summary>
    /// <remarks>This body drafts nothing in the step: it runs <see cref="ForwardAndChoose"/>, and every draft is −1.</remarks>
    void ForwardChooseAndDraft(ReadOnlySpan<StepSequence> batch, ReadOnlySpan<TokenChoice> choices, Span<int> tokens, Span<float> logits,
        ReadOnlySpan<bool> drafting, TokenChoice draftChoice, Span<int> drafts)
    {
        var rows = CheckDrafting(batch, drafting, drafts);
        ForwardAndChoose(batch, choices, tokens, logits);
        drafts[..rows].Fill(TokenSampling.NotChosen);
    }

    /// <summary>The contract of <see cref="ForwardChooseAndDraft"/>'s drafts: a flag per entry, a marked entry asks for logits, a draft slot per logit row; returns the logit rows.</summary>
    internal static int CheckDrafting(ReadOnlySpan<StepSequence> batch, ReadOnlySpan<bool> drafting, Span<int> drafts)
    {
        if (drafting.Length != batch.Length)
        {
            throw new ArgumentException($"{drafting.Length} drafting flags for {batch.Length} entries", nameof(drafting));
        }

        var rows = 0;
        for (var i = 0; i < batch.Length; i++)
        {
            if (drafting[i] && batch[i].LogitRows == 0)
            {
                throw new ArgumentException($"slot {batch[i].Slot}: nothing to draft after (the entry asks for no logit rows)", nameof(drafting));
            }

            rows += batch[i].LogitRows;
        }

        if (drafts.Length < rows)
        {
            throw new ArgumentException($"{drafts.Length} draft slots for {rows} logit rows", nameof(drafts));
        }

        return rows;
    }

    /// <summary>
    /// Runs the MTP module over every position of each slot it has not yet seen (the last one followed by
    /// <see cref="DraftSequence.NextToken"/>) and writes, per entry, the draft logits [VocabSize] for the
    /// token after NextToken.
    /// </summary>
    void Draft(ReadOnlySpan<DraftSequence> batch, Span<float> logits);

    /// <summary>
    /// <see cref="Draft"/> with each entry's draft token chosen where the logits
    /// are, as <see cref="ForwardAndChoose"/> chooses:
    /// one choice per entry; <paramref name="tokens"/>[i] or −1 with the entry's logits at i·VocabSize.
    /// </summary>
    /// <remarks>This body drafts on the host logits and chooses there with the same rule.</remarks>
    void DraftAndChoose(ReadOnlySpan<DraftSequence> batch, ReadOnlySpan<TokenChoice> choices, Span<int> tokens, Span<float> logits)
    {
        CheckChoices(choices, tokens, batch.Length, "drafts");
        Draft(batch, logits);
        ChooseOnHost(choices, tokens, logits);
    }

    /// <summary>The contract of <see cref="ForwardAndChoose"/> and <see cref="DraftAndChoose"/>: one choice per row, a token slot for each.</summary>
    internal static void CheckChoices(ReadOnlySpan<TokenChoice> choices, Span<int> tokens, int rows, string what)
    {
        if (choices.Length != rows || tokens.Length < rows)
        {
            throw new ArgumentException($"{choices.Length} choices and {tokens.Length} token slots for {rows} {what}", nameof(choices));
        }
    }
}
