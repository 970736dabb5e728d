using DeepSeekCuda.Loader;

namespace DeepSeekCuda.Backends;

/// <summary>
/// The DeepSeek-V3 forward pass's operations at fused-kernel granularity. <c>Engine/Model</c> drives any
/// implementation through this interface only; <see cref="Cpu.CpuBackend"/> is the executable
/// specification that GPU kernels are tested against. All activations live in backend-owned
/// <see cref="Tensor"/> handles; shapes are [rows, cols] with rows = tokens unless stated.
/// Calls are asynchronous on a GPU backend: only <see cref="Download"/> and the routing download wait.
/// </summary>
public interface IBackend : IDisposable
{
    /// <summary>Human-readable name (and numerics mode).</summary>
    string Name { get; }

    // ---- memory ----

    /// <summary>A new zero-filled tensor of <paramref name="kind"/> (an activation unless said).</summary>
    Tensor Allocate(int rows, int cols, TensorKind kind = TensorKind.Activation);

    /// <summary>
    /// A new tensor of <paramref name="kind"/> holding <paramref name="values"/> (row-major, rows × cols): an activation's
    /// values as the backend stores them (BF16, rounded to nearest even, on every backend but the CPU backend's float32
    /// reference), logits as given.
    /// </summary>
    Tensor Upload(ReadOnlySpan<float> values, int rows, int cols, TensorKind kind = TensorKind.Activation);

    /// <summary>Copies a tensor's values to the host as f32 (row-major).</summary>
    void Download(Tensor tensor, Span<float> destination);

    /// <summary>
    /// Rows <paramref name="firstRow"/> .. <paramref name="firstRow"/> + <paramref name="rows"/> − 1 of <paramref name="tensor"/>
    /// as a tensor of their own that shares its storage: no allocation, disposing the view frees nothing, and it is
    /// valid while <paramref name="tensor"/> is. A step runner carves each step's activations out of tensors sized once.
    /// </summary>
    Tensor View(Tensor tensor, int firstRow, int rows);

    /// <summary>Copies <paramref name="count"/> rows of <paramref name="source"/> from <paramref name="sourceRow"/> into <paramref name="destination"/> at <paramref name="destinationRow"/>.</summary>
    void CopyRows(Tensor source, int sourceRow, Tensor destination, int destinationRow, int count);

    /// <summary>Sets every value of <paramref name="tensor"/> (a whole tensor or a view of its rows) to 0.</summary>
    void Zero(Tensor tensor);

    /// <summary>
    /// The device's memory now, for sizing an allocation from what is left (a step runner's cache pool); null where the
    /// backend's memory is not a device's to measure (the CPU backend: host memory, sized otherwise).
    /// </summary>
    DeviceMemory? Memory();

    /// <summary>
    /// Row r of <paramref name="output"/> ← the row of <paramref name="ring"/> that holds slot s = <paramref name="rows"/>.Slots[r]
    /// at position p = <paramref name="rows"/>.Positions[r] (the first output.Rows rows of the last upload): row
    /// s·<paramref name="ringRows"/> + p mod <paramref name="ringRows"/>. A ring keeps each slot's last
    /// <paramref name="ringRows"/> positions (a step runner's pending MTP inputs), read and written by the step rows alone.
    /// </summary>
    void GatherRows(Tensor ring, int ringRows, StepRows rows, Tensor output);

    /// <summary>
    /// The inverse of <see cref="GatherRows"/>: row r of <paramref name="source"/> → the row of <paramref name="ring"/> for
    /// slot <paramref name="rows"/>.Slots[r] at position <paramref name="rows"/>.Positions[r], for r &lt; source.Rows. Rows
    /// that address one ring row must hold equal values (which of them lands is not specified).
    /// </summary>
    void ScatterRows(Tensor source, StepRows rows, int ringRows, Tensor ring);

    // ---- weights ----

    /// <summary>
    /// Uploads a linear weight. FP8 weights keep their e4m3 codes and block scales on a GPU backend; the
    /// CPU backend dequantizes them to float32 (e4m3 × block scale).
    /// </summary>
    LinearWeight UploadLinear(Checkpoint checkpoint, LinearSpec spec);

    /// <summary>Uploads an RMSNorm weight.</summary>
    NormWeight UploadNorm(Checkpoint checkpoint, string name, int width, float epsilon);

    /// <summary>Uploads an embedding table [rows, width] (also usable as a tied output head through <see cref="UploadHead"/>).</summary>
    EmbeddingWeight UploadEmbedding(Checkpoint checkpoint, string name, int rows, int width);

    /// <summary>Uploads an unquantized output head [vocab, width] (lm_head, BF16 in the checkpoint).</summary>
    LinearWeight UploadHead(Checkpoint checkpoint, string name, int vocab, int width);

    /// <summary>Uploads a MoE router (weight [E, D], BF16; correction bias [E], F32).</summary>
    GateWeight UploadGate(Checkpoint checkpoint, string weight, string bias, int width, GateOptions options);

    /// <summary>
    /// Uploads a layer's routed experts (each [gate, up, down]) and its shared experts (or null). An empty
    /// entry is an expert this device does not hold (expert parallelism): tokens routed to it get no
    /// contribution here. A spec may be a slice (<see cref="LinearSpec.Slice"/>: tensor-parallel shared MLP).
    /// </summary>
    ExpertWeights UploadExperts(Checkpoint checkpoint, IReadOnlyList<LinearSpec[]> experts, LinearSpec[]? shared);

    /// <summary>Uploads a rotary table: <paramref name="cos"/> and <paramref name="sin"/> [positions, pairs].</summary>
    RopeTable UploadRope(ReadOnlySpan<float> cos, ReadOnlySpan<float> sin, int positions, int pairs);

    /// <summary>An empty latent cache for one layer of one sequence, holding positions 0 .. <paramref name="capacity"/> − 1.</summary>
    LatentCache AllocateLatentCache(int capacity, int latentDim, int ropeDim);

    /// <summary>
    /// Copies positions 0 .. <paramref name="positions"/> − 1 of <paramref name="source"/> into the same positions of
    /// <paramref name="destination"/> (a sequence moving to a longer cache); operations queued later see them. Both are caches of
    /// their own (<see cref="AllocateLatentCache"/>, not <see cref="PagedCache"/> views) with the same widths, and each holds
    /// <paramref name="positions"/>; every position copied was written.
    /// </summary>
    void CopyLatentCache(LatentCache source, LatentCache destination, int positions);

    /// <summary>One layer's shared paged latent pool of <paramref name="blocks"/> blocks of 64 positions.</summary>
    LatentPool AllocateLatentPool(int blocks, int latentDim, int ropeDim);

    /// <summary>A block table [<paramref name="requests"/>, <paramref name="maxBlocksPerRequest"/>], every entry −1.</summary>
    BlockTable AllocateBlockTable(int requests, int maxBlocksPerRequest);

    /// <summary>Copies <paramref name="entries"/> (row-major, the whole table) into <paramref name="table"/>; operations queued later see it.</summary>
    void UploadBlockTable(ReadOnlySpan<int> entries, BlockTable table);

    /// <summary>
    /// Request <paramref name="request"/>'s cache: its rows of <paramref name="pool"/> through row <paramref name="request"/>
    /// of <paramref name="table"/>, usable wherever a <see cref="LatentCache"/> is (capacity
    /// MaxBlocksPerRequest · 64). A view: no allocation, disposing it frees nothing. Positions read or written
    /// must lie in blocks the table assigns when the operation runs.
    /// </summary>
    LatentCache PagedCache(LatentPool pool, BlockTable table, int request);

    /// <summary>Room for the token, slot and position of up to <paramref name="capacity"/> rows of a step's token stream (<see cref="StepRows"/>).</summary>
    StepRows AllocateStepRows(int capacity);

    /// <summary>
    /// Copies row t's token <paramref name="tokens"/>[t], slot <paramref name="slots"/>[t] and position
    /// <paramref name="positions"/>[t] into <paramref name="rows"/>; operations queued later see them. Refuses spans of
    /// different lengths, a negative value, or more rows than it holds (and then keeps the previous upload).
    /// </summary>
    void UploadStepRows(ReadOnlySpan<int> tokens, ReadOnlySpan<int> slots, ReadOnlySpan<int> positions, StepRows rows);

    /// <summary>A routing buffer for up to <paramref name="tokens"/> tokens (<see cref="MoeGate"/> and <see cref="MoeExperts"/> use its first T).</summary>
    Routing AllocateRouting(int tokens, int experts, int topK);

    /// <summary>Copies routing decisions to the host; any destination may be empty to skip it.</summary>
    /// <param name="routing">The routing.</param>
    /// <param name="scores">[T, E] sigmoid scores before the bias.</param>
    /// <param name="indices">[T, k] experts in descending biased score (ties: lower index first).</param>
    /// <param name="weights">[T, k] their combine weights.</param>
    void DownloadRouting(Routing routing, Span<float> scores, Span<int> indices, Span<float> weights);

    /// <summary>
    /// Room to choose tokens from up to <paramref name="rows"/> logit rows at once: the rows' settings and allowed ids
    /// (<see cref="TokenChoice.Allowed"/>) in, their ids out. <paramref name="vocab"/> is the widest vocabulary limit a row may
    /// have (<see cref="TokenChoice.VocabLimit"/>), so the logits it chooses from are at least that wide.
    /// </summary>
    TokenChoiceBuffer AllocateTokenChoices(int rows, int vocab);

    /// <summary>
    /// Copies <paramref name="choices"/> (row r's settings, and its allowed ids when it has them) into
    /// <paramref name="buffer"/>; every row past them is not chosen (as a <c>default</c> choice). <see cref="ChooseTokenRows"/>
    /// queued later reads them: a captured choice is given its settings before each replay. Refuses more rows than the buffer
    /// holds, a vocabulary limit past its <see cref="TokenChoiceBuffer.Vocab"/>, NaN settings and a mask too short for its
    /// limit, and then keeps what it held.
    /// </summary>
    void SetTokenChoices(ReadOnlySpan<TokenChoice> choices, TokenChoiceBuffer buffer);

    /// <summary>
    /// Chooses, where the logits are, one token per row of <paramref name="logits"/> (a <see cref="TensorKind.Logits"/> tensor
    /// of at most the buffer's rows, at least its <see cref="TokenChoiceBuffer.Vocab"/> wide) under the settings the buffer
    /// holds (<see cref="TokenSampling"/>'s rule, among a row's allowed ids when it has them), into the buffer; on a GPU the
    /// ids are then copied to the buffer's pinned host end. A recordable operation (<see cref="CaptureGraph"/>).
    /// <see cref="ReadTokenChoices"/> brings the ids back.
    /// </summary>
    void ChooseTokenRows(Tensor logits, TokenChoiceBuffer buffer);

    /// <summary>
    /// Waits for the queued work and copies the first <paramref name="tokens"/>.Length ids the last
    /// <see cref="ChooseTokenRows"/> wrote: row r's token, or <see cref="TokenSampling.NotChosen"/> (−1) for a row not chosen
    /// there (a <c>default</c> choice) or one that cannot be sampled (a NaN or +infinite logit below the limit, or nothing it
    /// allows above −infinity): the caller reads that row's logits.
    /// </summary>
    void ReadTokenChoices(TokenChoiceBuffer buffer, Span<int> tokens);

    // ---- graphs ----

    /// <summary>
    /// Records, without running them, the operations <paramref name="record"/> calls on this backend from this thread, as a
    /// <see cref="StepGraph"/> that <see cref="ReplayGraph"/> runs (a CUDA graph on the GPU). A replay reads and writes the
    /// memory the operations name as it is then (upload a step's rows, then replay), while their host values (shapes, row
    /// offsets, weights) are the capture's. Only operations over backend memory are recorded: <see cref="CopyRows"/>,
    /// <see cref="EmbeddingRows"/>, <see cref="EmbeddingChosenRows"/>, the norms, <see cref="Linear"/>, <see cref="Logits"/>, <see cref="SiluMul"/>,
    /// <see cref="ConcatColumns"/>, the row operations, MoE and <see cref="ChooseTokenRows"/>; <see cref="View"/> and
    /// <see cref="PagedCache"/> make views as usual. Anything else (allocation, uploads and downloads, the block table and step
    /// rows, routing downloads, setting and reading token choices, <see cref="Embedding"/> of host ids, the per-sequence cache
    /// operations, a capture or replay) is refused while capturing, with an <see cref="InvalidOperationException"/> naming the
    /// call, and the capture is abandoned. Run the
    /// recorded work once before capturing it: the first run of a shape may compile kernels or size scratch memory.
    /// </summary>
    StepGraph CaptureGraph(Action record);

    /// <summary>Runs <paramref name="graph"/>'s operations in their order, after the work queued before (asynchronously on a GPU).</summary>
    void ReplayGraph(StepGraph graph);

    // ---- operations ----

    /// <summary>output[t] = table[ids[t]]. output [T, width].</summary>
    void Embedding(EmbeddingWeight table, ReadOnlySpan<int> ids, Tensor output);

    /// <summary><see cref="Embedding"/> of the tokens of <paramref name="rows"/>: output[t] = table[Tokens[t]] for the output's rows, read where it runs.</summary>
    void EmbeddingRows(EmbeddingWeight table, StepRows rows, Tensor output);

    /// <summary>
    /// <see cref="EmbeddingRows"/> of tokens chosen where they were chosen: row t's token is the id the last
    /// <see cref="ChooseTokenRows"/> into <paramref name="chosen"/> wrote for its row Tokens[t] (the step rows' tokens name
    /// rows of the buffer), or token 0 where that row was not chosen (−1). So a pass after a choice (an MTP draft after the
    /// step that chose its tokens) embeds them with no trip to the host; a row of token 0 stands in for one the host must
    /// choose, and what it yields is for the caller to discard. Refuses a token past the buffer's rows and a buffer whose
    /// <see cref="TokenChoiceBuffer.Vocab"/> is wider than the table.
    /// </summary>
    void EmbeddingChosenRows(EmbeddingWeight table, StepRows rows, TokenChoiceBuffer chosen, Tensor output);

    /// <summary>output = x · rsqrt(mean(x²) + eps) ⊙ w, per row (fp32).</summary>
    void RmsNorm(Tensor x, NormWeight weight, Tensor output);

    /// <summary>Fused residual step: residual += delta, then normed = RmsNorm(residual).</summary>
    void AddRmsNorm(Tensor residual, Tensor delta, NormWeight weight, Tensor normed);

    /// <summary>y = x·Wᵀ. x [T, In], y [T, Out].</summary>
    void Linear(Tensor x, LinearWeight weight, Tensor y);

    /// <summary>logits = x·Headᵀ in fp32, never rounded. x [T, D], logits [T, V] of <see cref="TensorKind.Logits"/>.</summary>
    void Logits(Tensor x, LinearWeight head, Tensor logits);

    /// <summary>output = silu(gate) ⊙ up, elementwise.</summary>
    void SiluMul(Tensor gate, Tensor up, Tensor output);

    /// <summary>output = [a | b] along columns (MTP's [embedding ; hidden]).</summary>
    void ConcatColumns(Tensor a, Tensor b, Tensor output);

    /// <summary>
    /// Rotates, in every row t (position <paramref name="startPosition"/> + t), the interleaved pairs
    /// (x[2i], x[2i+1]) of each head's rotary slice: columns h·<paramref name="headStride"/> +
    /// <paramref name="ropeOffset"/> + [0, 2·Pairs) for h in 0 .. Cols/headStride.
    /// </summary>
    void ApplyRope(Tensor x, RopeTable rope, int startPosition, int headStride, int ropeOffset);

    /// <summary>
    /// <see cref="ApplyRope"/> with row t of <paramref name="x"/> at position <paramref name="rows"/>.Positions[t] (the first
    /// x.Rows rows of the last upload).
    /// </summary>
    void ApplyRopeRows(Tensor x, RopeTable rope, StepRows rows, int headStride, int ropeOffset);

    /// <summary>
    /// Writes tokens at positions start .. start+T−1 into the latent cache: the latent part of
    /// <paramref name="kv"/> [T, latent + rope] normalized with <paramref name="latentNorm"/>, and its
    /// rope part rotated (one shared key for all heads).
    /// </summary>
    void AppendLatent(Tensor kv, NormWeight latentNorm, RopeTable rope, LatentCache cache, int startPosition);

    /// <summary>
    /// <see cref="AppendLatent"/> of every row: row t of <paramref name="kv"/> goes to position <paramref name="rows"/>.Positions[t]
    /// of slot Slots[t]'s cache, the rows of <paramref name="pool"/> that <paramref name="table"/> gives it (positions must lie
    /// in assigned blocks).
    /// </summary>
    void AppendLatentRows(Tensor kv, NormWeight latentNorm, RopeTable rope, LatentPool pool, BlockTable table, StepRows rows);

    /// <summary>
    /// MLA in the naive form: decompress per-head k_nope and v for cache positions 0 .. start+T−1 through
    /// kv_b, causal softmax (query at position p sees keys ≤ p). q [T, H·qk_head] already rotated;
    /// output [T, H·v].
    /// </summary>
    void MlaAttentionNaive(Tensor q, LatentCache cache, LinearWeight kvB, MlaDims dims, int startPosition, float scale, Tensor output);

    /// <summary>
    /// MLA in the absorbed form: q_nope folded through W_UK, scored against cached latents and rotated keys,
    /// latents summed with the probabilities, unfolded through W_UV. Same inputs and result as the naive form.
    /// </summary>
    void MlaAttentionAbsorbed(Tensor q, LatentCache cache, LinearWeight kvB, MlaDims dims, int startPosition, float scale, Tensor output);

    /// <summary>
    /// MLA in the absorbed form for rows that are each a query of their own: row t of <paramref name="q"/> attends over positions
    /// 0 .. <paramref name="rows"/>.Positions[t] of slot Slots[t]'s cache (its own key appended before). Row t's output equals
    /// <see cref="MlaAttentionAbsorbed"/> of row t alone at start position Positions[t] over
    /// <see cref="PagedCache"/>(pool, table, Slots[t]): one call attends a whole decode batch, a verify step's rows included.
    /// </summary>
    void MlaAttentionRows(Tensor q, LatentPool pool, BlockTable table, StepRows rows, LinearWeight kvB, MlaDims dims, float scale, Tensor output);

    /// <summary>MoE routing of x [T, D] into the first T tokens of <paramref name="routing"/> (fp32 sigmoid, bias for selection only, group limit, top-k; MODEL.md §5).</summary>
    void MoeGate(Tensor x, GateWeight gate, Routing routing);

    /// <summary>y = Σ_j w_j·Expert_j(x) + Shared(x), accumulated in fp32, with the first T tokens of <paramref name="routing"/>. x, y [T, D].</summary>
    void MoeExperts(Tensor x, Routing routing, ExpertWeights experts, Tensor y);
}

/// <summary>A device's memory at one moment (<see cref="IBackend.Memory"/>).</summary>
/// <param name="FreeBytes">Bytes free on the device.</param>
/// <param name="TotalBytes">The device's memory.</param>
/// <param name="Device">Which memory: backends that report the same name share it (logical ranks on one GPU: <c>cuda:0</c>).</param>
public readonly record struct DeviceMemory(long FreeBytes, long TotalBytes, string Device);
