using System.Globalization;
using DeepSeekCuda.Backends;
using DeepSeekCuda.Inference;
using DeepSeekCuda.Model;

namespace DeepSeekCuda.Serving;

/// <summary>
/// The batched, paged <see cref="IStepRunner"/> of a DeepSeek model: a <see cref="DeepSeekModel"/> on one backend, or a
/// multi-device model (<see cref="StepRunners.For"/>) whose layers run on pipeline stages or, sharded, on every device with
/// all-reduces between the halves of each layer. A step flattens its entries into one token stream, decode entries (at most
/// <see cref="LayerSteps.AbsorbedRows"/> tokens, all attending absorbed) first: embedding, every projection, norm, MoE and
/// the head run once over all rows; so do RoPE and the append to one shared latent pool per layer (on every device that runs the layer), each row at
/// the slot and position the step copies to the device (<see cref="IBackend.UploadStepRows"/>), addressed through the
/// scheduler's <see cref="KvBlockManager"/> table (copied to each device before a step when it changed). The decode rows
/// attend in one call per layer (<see cref="IBackend.MlaAttentionRows"/>), each prefill chunk in one of its own (one per form:
/// each row's form follows from its position and the request's prompt length, <see cref="LayerSteps.NaiveRows"/>, so a
/// request's numbers do not depend on how its prompt was cut into steps). Intermediates are views of
/// buffers planned from the model's config (per device: its layers, its shard) and allocated at <see cref="Attach"/> for
/// the most tokens a step feeds: a step allocates nothing on a backend. Logits are computed only for the rows asked for.
/// </summary>
/// <remarks>
/// <para>MTP (on the devices that run the last layer, <see cref="DeviceLayout.MtpRunners"/>: the head device alone, or sharded over
/// every device of a tensor/expert-parallel model, whose MTP passes then broadcast the layer's input from the head device and
/// all-reduce as a main layer does; the ring, the input side and the choices stay on the head device): a position's draft
/// input is its final hidden state and the token after it. Where that token is already
/// fed and certain (a prompt token, or a sampled one), the MTP layer runs over the position in the same step, which
/// fills its cache; the last position of an entry, and both positions of a verify entry (its second token is a draft
/// that may be rejected), wait on the device for <see cref="Draft"/> or the next step, in a ring of rows per slot
/// addressed by position (<see cref="IBackend.ScatterRows"/> writes a step's decode rows there in one call,
/// <see cref="IBackend.GatherRows"/> reads a draft's inputs). A draft's rows put each slot's last row first, so the head
/// reads them in place. A step drafts itself (<see cref="ForwardChooseAndDraft"/>): after its choice, the MTP layer runs over
/// each marked entry's logit rows, each fed the token chosen at it without a trip to the host
/// (<see cref="IBackend.EmbeddingChosenRows"/>), and the head and the drafts' choice over every one of them (their logits and
/// ids apart from the step's, which the host may still read); the host keeps the draft after the token a request keeps. Its
/// MTP positions are made with tokens the step chose, so a rejected draft's rollback drops the position after the one kept
/// from the MTP cache too, and the slot's next step must feed the token assumed there.</para>
/// <para>Tokens are chosen on the head's device: a step sets each logit row's settings before it runs
/// (<see cref="IBackend.SetTokenChoices"/>), chooses after the head (<see cref="IBackend.ChooseTokenRows"/>) and brings back
/// the ids (<see cref="IBackend.ReadTokenChoices"/>, the step's one wait), and the logits of only the rows the host must see
/// (a constrained request's, or a broken row).</para>
/// <para>Decode graphs (<see cref="DecodeGraphs"/>, off until a GPU has run them): a decode or verify step (entries
/// of one token, or of a token and the draft it verifies, with logits for each) is padded to its row bucket
/// (<see cref="DecodeBuckets"/>) with rows of a padding slot whose one block no sequence reads, and replays the bucket's
/// graph of the main pass (and the ring's writes), the head and the token choice after the upload of the rows and
/// their settings: a replayed step queues one operation. Where every layer runs on several devices (tensor/expert
/// parallel) the graph spans them all (<see cref="ICommunicator.CaptureGraph"/>: a graph per device whose all-reduces meet
/// on the devices); a pipeline has a graph per stage (<see cref="DeviceLayout.Stages"/>), each on its device, replayed in
/// stage order with the hand-overs' copies between them (<see cref="ModelPass.HandOver"/>, eager): a replayed step queues
/// one operation on each device and two copies per hand-over. A draft likewise
/// replays the graph of its bucket of MTP rows (the gather, the MTP layer, the head and the choice; over every device where the
/// layer is sharded), and a step's drafts
/// the graph of theirs: a replayed step that drafts queues two operations. Still eager: the MTP
/// layer's catch-up over positions left pending by a step without a draft, and prompt chunks.</para>
/// </remarks>
public sealed class PagedStepRunner : IStepRunner
{
    /// <summary>Pending MTP rows a slot can hold: the two positions of a verify step.</summary>
    private const int PendingRows = 2;

    /// <summary>
    /// Rows per slot of the ring of final hiddens (<see cref="_pending"/>; position p at row slot·4 + p mod 4): a slot's
    /// pending positions (at most two, the last ones fed) and the rows a decode or verify step writes (at most two, the
    /// next ones) are four consecutive positions, so a step never writes over a pending row it may still read.
    /// </summary>
    private const int RingRows = 2 * PendingRows;

    private readonly DeviceLayout _layout;
    private readonly Device[] _devices;
    private readonly Device _head;          // lm_head, the token choices, the MTP module's input side and the ring
    private readonly Device[] _mtpDevices;  // those that run the MTP layer (the head alone, or all under tensor/expert parallelism)
    private readonly int _mtpHead;          // the head device's index in _mtpDevices
    private readonly MtpPart[] _mtpParts;   // [_mtpDevices] an MTP pass's parts
    private readonly LayerRowsOf _rowsOf;
    private readonly List<IDisposable> _owned = [];
    private KvBlockManager? _blocks;
    private ActivationArena _headArena = null!;
    private TokenChoiceBuffer? _choices;    // the head device's: settings in, ids out
    private TokenChoiceBuffer? _draftChoices; // the drafts' (a step's drafts leave its ids for the host to read)
    private TokenChoice[] _draftSettings = []; // [row] a step's drafts' settings
    private int[] _draftIds = [];            // [row] a step's drafts' ids
    private Tensor? _pending;               // [(slots + 1) · RingRows, D] the ring, the padding slot's rows last
    private SlotState?[] _slots = [];
    private int[] _stream = [];
    private int[] _rowSlots = [];           // [row] the slot and position of each row of the pass being set up
    private int[] _rowPositions = [];
    private int[] _mtpTokens = [];
    private Activations[] _arenas = [];     // [device]: the main stream's step buffers
    private (int Slot, int Position, int FirstRow, int Rows, int Naive)[] _entries = []; // the running step's entries (Naive: leading rows that attend naive)
    private (int From, int Rows)[] _headRows = []; // [entry] the rows the head reads, merged into runs in place
    private int _batch;                     // how many
    private int _decodeRows;                // the running step's leading rows of decode entries
    private int _maxTokens;
    private int _stamp;                     // batch checks so far (duplicate slots)
    private long _tableVersion = -1;        // the block manager's Version last uploaded
    private int[] _tableEntries = [];       // the block manager's table, then the padding slot's row
    private int _padSlot;                   // the block-table row of a graph step's padding rows (one block of its own)
    private int _bucketLimit;               // the largest decode bucket
    private readonly Dictionary<int, DecodeGraph> _graphs = []; // [bucket]
    private readonly Dictionary<(int Bucket, bool Chosen), DecodeGraph> _draftGraphs = []; // [bucket, tokens chosen in the step]
    private readonly PassStage[] _draftStages;  // a draft pass's one stage: the MTP layer where it runs, and the head
    private readonly bool _canCapture;          // each stage of the main pass on one device, or its devices' collectives recordable

    /// <summary>Creates a runner over <paramref name="model"/> (not owned: the caller disposes it). Nothing is allocated before <see cref="Attach"/>.</summary>
    public PagedStepRunner(DeepSeekModel model)
        : this((model ?? throw new ArgumentNullException(nameof(model))).Layout)
    {
    }

    internal PagedStepRunner(DeviceLayout layout)
    {
        _layout = layout;
        _devices = [.. layout.Devices.Select(w => new Device(w))];
        _head = _devices[layout.HeadDevice];
        _mtpDevices = [.. layout.MtpRunners.Select(r => _devices[r])];
        _mtpHead = Array.IndexOf(_mtpDevices, _head);
        _mtpParts = new MtpPart[_mtpDevices.Length];
        _draftStages = [new PassStage(0, 0, layout.MtpRunners)];
        _canCapture = layout.Stages.All(s => s.Devices.Length == 1 || layout.Communicator?.CanCaptureGraphs == true);
        _rowsOf = RowsOf;
    }

    /// <inheritdoc />
    public int VocabSize => _layout.Config.VocabSize;

    /// <inheritdoc />
    public int MaxSequenceLength => _layout.MaxSequenceLength;

    /// <inheritdoc />
    public bool CanDraft => _layout.Mtp is not null;

    /// <summary>
    /// Whether a decode or verify step (every entry at most <see cref="LayerSteps.AbsorbedRows"/> absorbed tokens,
    /// the logits of each asked for), and a draft, runs as a graph: its rows padded to their bucket (<see cref="DecodeBuckets"/>),
    /// the bucket's first step run eagerly and then captured (<see cref="IBackend.CaptureGraph"/>, over several devices
    /// <see cref="ICommunicator.CaptureGraph"/> where every layer runs on all of them, a graph per stage of a pipeline), later
    /// steps replaying it after the rows' upload. Off until a GPU has run it. May change between steps (a bench times both): graphs already
    /// captured are kept.
    /// </summary>
    internal bool DecodeGraphs { get; set; }

    /// <summary>Graphs of the main pass captured so far (one per decode bucket used).</summary>
    internal int CapturedGraphs => _graphs.Count;

    /// <summary>Graphs of the draft pass captured so far (one per bucket of MTP rows used, apart for a step's drafts and for <see cref="Draft"/>'s).</summary>
    internal int CapturedDraftGraphs => _draftGraphs.Count;

    /// <summary>The most tokens one step may feed (0 before <see cref="Attach"/>).</summary>
    public int MaxTokensPerStep => _blocks is null ? 0 : _maxTokens;

    /// <summary>Step buffers no step has used yet (tests: the plan holds nothing that steps do not use).</summary>
    internal IEnumerable<string> UnusedStepBuffers =>
        _blocks is null ? [] : _devices.SelectMany((d, r) => d.Arena.Unused.Concat(d.MtpArena?.Unused ?? []).Select(u => $"device {r}: {u}")).Concat(_headArena.Unused);

    /// <inheritdoc />
    /// <remarks>
    /// Allocates everything the runner will use: first the step buffers for <paramref name="maxTokensPerStep"/> rows, the
    /// ring of pending MTP inputs and the block table (with a row more for the padding slot); then, from what the devices
    /// have left (<see cref="IBackend.Memory"/>, measured then), one latent pool per layer (and one for the MTP layer) of
    /// <see cref="KvBlockManager.TotalBlocks"/> blocks and one more for the padding rows of graph steps. A pool made to shrink to
    /// fit (<see cref="KvBlockManager.ShrinkToFit"/>) is first lowered to the blocks every device holds on each of its pools
    /// beside a reserve (<see cref="MemoryPlanOptions.ReserveFraction"/> of its memory, at least
    /// <see cref="MemoryPlanOptions.MinReserveBytes"/>, for the workspaces and graphs that come later); devices that report
    /// no memory (the CPU backend) bound nothing.
    /// </remarks>
    /// <exception cref="InsufficientDeviceMemoryException">
    /// A device holds fewer blocks than one request of <see cref="KvBlockManager.MaxTokensPerRequest"/> (a pool that shrinks to
    /// fit) or than <see cref="KvBlockManager.TotalBlocks"/> (one of a set size); nothing stays allocated.
    /// </exception>
    public void Attach(KvBlockManager blocks, int maxTokensPerStep)
    {
        ArgumentNullException.ThrowIfNull(blocks);
        ArgumentOutOfRangeException.ThrowIfLessThan(maxTokensPerStep, 1);
        if (_blocks is not null)
        {
            throw new InvalidOperationException("the runner is already attached to a block manager");
        }

        var c = _layout.Config;
        var slots = blocks.MaxRequests;
        var drafts = CanDraft;
        try
        {
            foreach (var d in _devices)
            {
                var b = d.W.Backend;
                d.Table = Own(b.AllocateBlockTable(slots + 1, blocks.MaxBlocksPerRequest));
                d.Rows = Own(b.AllocateStepRows(maxTokensPerStep));
                d.Arena = Own(new ActivationArena(b, maxTokensPerStep, ArenaPlan.Main(c, d.Held, d.W.Shard)));
                d.Segments = new Segment[2 * slots]; // an entry's naive rows and its absorbed rows
            }

            var hb = _head.W.Backend;
            var mtpRows = maxTokensPerStep + slots * PendingRows;
            foreach (var d in _mtpDevices)
            {
                var b = d.W.Backend;
                d.MtpRows = Own(b.AllocateStepRows(mtpRows));
                d.MtpArena = Own(new ActivationArena(b, mtpRows, ArenaPlan.Mtp(c, d.W.Shard, input: d == _head)));
                d.MtpSegments = new Segment[slots];
            }

            if (drafts)
            {
                _pending = Own(hb.Allocate((slots + 1) * RingRows, c.HiddenSize));
            }

            _headArena = Own(new ActivationArena(hb, slots * PendingRows, ArenaPlan.Head(c, drafts)));
            _choices = Own(hb.AllocateTokenChoices(slots * PendingRows, VocabSize));
            _draftChoices = drafts ? Own(hb.AllocateTokenChoices(slots * PendingRows, VocabSize)) : null;

            FitPool(blocks);
            LatentPool Pool(Device d) => Own(d.W.Backend.AllocateLatentPool(blocks.TotalBlocks + 1, c.KvLoraRank, c.QkRopeHeadDim)); // + the padding block
            foreach (var d in _devices)
            {
                d.Caches = new LatentCache[]?[c.NumHiddenLayers];
                d.Pools = new LatentPool?[c.NumHiddenLayers];
                foreach (var i in d.Held)
                {
                    d.Pools[i] = Pool(d);
                    d.Caches[i] = Views(d, d.Pools[i]!, slots);
                }
            }

            foreach (var d in _mtpDevices)
            {
                d.MtpPool = Pool(d);
                d.MtpCaches = Views(d, d.MtpPool, slots);
            }
        }
        catch
        {
            DisposeOwned();
            throw;
        }

        _slots = new SlotState?[slots];
        _stream = new int[maxTokensPerStep];
        _mtpTokens = new int[maxTokensPerStep + slots * PendingRows];
        _rowSlots = new int[_mtpTokens.Length];
        _rowPositions = new int[_mtpTokens.Length];
        _draftSettings = new TokenChoice[slots * PendingRows];
        _draftIds = new int[slots * PendingRows];
        _arenas = [.. _devices.Select(d => d.Arena)];
        _entries = new (int, int, int, int, int)[slots];
        _headRows = new (int, int)[slots];
        _padSlot = slots;
        _tableEntries = Enumerable.Repeat(-1, (slots + 1) * blocks.MaxBlocksPerRequest).ToArray();
        _tableEntries[slots * blocks.MaxBlocksPerRequest] = blocks.TotalBlocks;
        _bucketLimit = Math.Min(maxTokensPerStep, _headArena.MaxRows);
        _maxTokens = maxTokensPerStep;
        _blocks = blocks;
    }

    /// <summary>
    /// Sizes the pool to the devices' memory, measured with everything but the pools allocated (see <see cref="Attach"/>): each
    /// memory that its devices report (one GPU, shared by the logical ranks on it) holds (free − reserve) / (block bytes × the
    /// pools of its devices) blocks, less the padding block.
    /// </summary>
    private void FitPool(KvBlockManager blocks)
    {
        var c = _layout.Config;
        var blockBytes = Kernels.PagedLatentCache.Bytes(1, new Kernels.LatentShape(c.KvLoraRank, c.QkRopeHeadDim));
        var rule = new MemoryPlanOptions();
        var measured = new List<(int Rank, int Pools, DeviceMemory Memory)>();
        for (var r = 0; r < _devices.Length; r++)
        {
            var d = _devices[r];
            var pools = d.Held.Length + (_mtpDevices.Contains(d) ? 1 : 0);
            if (pools > 0 && d.W.Backend.Memory() is { } memory)
            {
                measured.Add((r, pools, memory));
            }
        }

        (int Blocks, string Why)? tightest = null;
        foreach (var shared in measured.GroupBy(m => m.Memory.Device))
        {
            var memory = shared.First().Memory;
            var pools = shared.Sum(m => m.Pools);
            var reserve = rule.ReserveOf(memory.TotalBytes);
            var perBlock = blockBytes * pools;
            var holds = (int)Math.Clamp((memory.FreeBytes - reserve) / perBlock - 1, 0, int.MaxValue);
            if (tightest is null || holds < tightest.Value.Blocks)
            {
                var who = shared.Count() == 1
                    ? $"device {shared.First().Rank} ({memory.Device}) holds"
                    : $"devices {string.Join(", ", shared.Select(m => m.Rank))} (sharing {memory.Device}) hold";
                var free = MemoryPlanner.Format(memory.FreeBytes);
                var total = MemoryPlanner.Format(memory.TotalBytes);
                tightest = (holds, string.Create(CultureInfo.InvariantCulture,
                    $"{who} {holds} cache blocks beside the weights and the step buffers: {free} free of {total}, less a reserve of {MemoryPlanner.Format(reserve)}, at {perBlock} bytes a block over {pools} layers' pools, one block kept for padding"));
            }
        }

        if (tightest is not { } t)
        {
            return;
        }

        var need = blocks.ShrinkToFit ? blocks.MaxBlocksPerRequest : blocks.TotalBlocks;
        if (t.Blocks < need)
        {
            var what = blocks.ShrinkToFit
                ? $"one request of {blocks.MaxTokensPerRequest} tokens needs {need} (a shorter context, or fewer requests at once, needs less)"
                : $"the pool asked for is {need} blocks";
            throw new InsufficientDeviceMemoryException($"not enough device memory for the cache pool: {t.Why}; {what}");
        }

        if (blocks.ShrinkToFit && t.Blocks < blocks.TotalBlocks)
        {
            blocks.ShrinkTo(t.Blocks);
        }
    }

    private static LatentCache[] Views(Device d, LatentPool pool, int slots)
    {
        var views = new LatentCache[slots];
        for (var s = 0; s < slots; s++)
        {
            views[s] = d.W.Backend.PagedCache(pool, d.Table, s);
        }

        return views;
    }

    private T Own<T>(T resource)
        where T : IDisposable
    {
        _owned.Add(resource);
        return resource;
    }

    /// <inheritdoc />
    public void Open(int slot, bool drafts)
    {
        Attached();
        if ((uint)slot >= (uint)_slots.Length)
        {
            throw new ArgumentOutOfRangeException(nameof(slot), slot, $"slots are 0..{_slots.Length - 1}");
        }

        if (_slots[slot] is not null)
        {
            throw new InvalidOperationException($"slot {slot} is already open");
        }

        if (drafts && !CanDraft)
        {
            throw new InvalidOperationException("the model has no MTP module to draft with");
        }

        _slots[slot] = new SlotState { Drafts = drafts };
    }

    /// <inheritdoc />
    public void Close(int slot)
    {
        if ((uint)slot < (uint)_slots.Length)
        {
            _slots[slot] = null;
        }
    }

    /// <inheritdoc />
    public void StopDrafting(int slot)
    {
        var state = Get(slot);
        state.Drafts = false;
        state.PendingCount = 0;
    }

    /// <inheritdoc />
    public void Truncate(int slot, int length)
    {
        var state = Get(slot);
        if (length < 0 || length > state.Length)
        {
            throw new ArgumentOutOfRangeException(nameof(length), length, $"slot {slot} holds {state.Length} tokens");
        }

        if (state.Drafts)
        {
            if (length < state.MtpLength)
            {
                // The MTP cache drops the positions too: its last one kept must have been made with a token it assumed
                // after it (a step's draft after the row a rejected draft leaves last), fed next. Earlier inputs are consumed.
                if (state.AssumedAt(length) < 0)
                {
                    throw new InvalidOperationException($"cannot truncate slot {slot} to {length}: the MTP cache already holds {state.MtpLength} positions");
                }

                state.MtpLength = length;
            }

            state.PendingCount = Math.Min(state.PendingCount, length - state.MtpLength);
        }

        state.Length = length;
    }

    /// <inheritdoc />
    public void Forward(ReadOnlySpan<StepSequence> batch, Span<float> logits) => Run(batch, false, default, default, logits);

    /// <inheritdoc />
    /// <remarks>The head's device chooses (<see cref="IBackend.ChooseTokenRows"/>): the ids come back, and the logits of only the rows it did not choose.</remarks>
    public void ForwardAndChoose(ReadOnlySpan<StepSequence> batch, ReadOnlySpan<TokenChoice> choices, Span<int> tokens, Span<float> logits) =>
        Run(batch, true, choices, tokens, logits);

    /// <inheritdoc />
    /// <remarks>
    /// The drafts run after the step's choice, in the same step (where the MTP layer runs; the head and the choice on the head device): the MTP layer over each marked entry's
    /// logit rows (a position's final hidden from the ring, its next token the id chosen there, <see cref="IBackend.EmbeddingChosenRows"/>),
    /// the head over each of them and the drafts' choice; the step's one wait brings back the ids of both. With
    /// <see cref="DecodeGraphs"/>, the drafts of a bucket of rows seen before replay its graph.
    /// </remarks>
    public void ForwardChooseAndDraft(ReadOnlySpan<StepSequence> batch, ReadOnlySpan<TokenChoice> choices, Span<int> tokens, Span<float> logits,
        ReadOnlySpan<bool> drafting, TokenChoice draftChoice, Span<int> drafts)
    {
        IStepRunner.CheckDrafting(batch, drafting, drafts);
        Run(batch, true, choices, tokens, logits, drafting, draftChoice, drafts);
    }

    /// <summary>
    /// One step; <paramref name="choose"/>: the rows are chosen on the head device, else every logit row is downloaded; and the
    /// drafts after the logit rows of the entries <paramref name="drafting"/> marks (checked by <see cref="IStepRunner.CheckDrafting"/>).
    /// </summary>
    private void Run(ReadOnlySpan<StepSequence> batch, bool choose, ReadOnlySpan<TokenChoice> choices, Span<int> chosen, Span<float> logits,
        ReadOnlySpan<bool> drafting = default, TokenChoice draftChoice = default, Span<int> drafts = default)
    {
        var blocks = Attached();
        var (tokens, logitRows) = CheckBatch(batch, blocks);
        var draftRows = 0;
        for (var i = 0; i < drafting.Length; i++)
        {
            if (drafting[i])
            {
                if (!_slots[batch[i].Slot]!.Drafts)
                {
                    throw new InvalidOperationException($"slot {batch[i].Slot} was opened without drafting");
                }

                draftRows += batch[i].LogitRows;
            }
        }

        var v = VocabSize;
        if (logits.Length < (long)logitRows * v)
        {
            throw new ArgumentException($"logits holds {logits.Length} values; {logitRows} rows need {(long)logitRows * v}", nameof(logits));
        }

        if (choose)
        {
            IStepRunner.CheckChoices(choices, chosen, logitRows, "logit rows");
        }

        if (tokens == 0)
        {
            return;
        }

        // The rows' settings before anything runs (it refuses bad ones): a graph chooses inside, a row past them not chosen.
        // A step that reads no ids sets none (a graph's choice then writes ids nobody reads).
        if (choose && logitRows > 0)
        {
            _head.W.Backend.SetTokenChoices(choices, _choices!);
        }

        if (draftRows > 0)
        {
            _draftSettings.AsSpan(0, draftRows).Fill(draftChoice);
            _head.W.Backend.SetTokenChoices(_draftSettings.AsSpan(0, draftRows), _draftChoices!);
        }

        // The token stream, decode entries first (absorbed rows, at most two per entry: they attend in one call), and each
        // entry's rows of it.
        var stream = _stream.AsSpan(0, tokens);
        var row = 0;
        foreach (var decode in (ReadOnlySpan<bool>)[true, false])
        {
            for (var i = 0; i < batch.Length; i++)
            {
                var e = batch[i];
                var n = e.Tokens.Length;
                var naive = LayerSteps.NaiveRows(e.Position, n, e.PromptLength);
                if ((naive == 0 && n <= LayerSteps.AbsorbedRows) == decode)
                {
                    e.Tokens.Span.CopyTo(stream[row..]);
                    _entries[i] = (e.Slot, e.Position, row, n, naive);
                    SetRows(row, e.Slot, e.Position, n);
                    row += n;
                }
            }

            if (decode)
            {
                _decodeRows = row;
            }
        }

        // A graph step's padding rows: token 0 at position 0 of the padding slot, whose block no sequence reads.
        var bucket = BucketOf(batch, tokens);
        var rows = Math.Max(tokens, bucket);
        Pad(_stream, tokens, rows);
        _decodeRows += rows - tokens;
        _batch = batch.Length;
        UploadTable(blocks);
        UploadRows(_devices, _stream, rows, d => d.Rows);

        // Every row's hidden after the final norm, on the head device.
        var graph = bucket > 0 ? Graph(bucket) : null;
        var normed = graph?.Output ?? ModelPass.Run(_layout, stream, _arenas, _rowsOf, null);
        try
        {
            if (CanDraft)
            {
                AdvanceMtp(batch, normed, scattered: graph is not null);
            }

            if (graph is not null)
            {
                using var result = _head.W.Backend.View(graph.Logits, 0, logitRows);
                QueueDrafts(batch, drafting, draftRows);
                Deliver(result, choose, chosen, logits);
            }
            else if (logitRows > 0)
            {
                for (var i = 0; i < batch.Length; i++)
                {
                    var (_, _, firstRow, n, _) = _entries[i];
                    _headRows[i] = (firstRow + n - batch[i].LogitRows, batch[i].LogitRows);
                }

                using var headIn = HeadInput(normed, batch.Length, logitRows);
                using var result = Logits(headIn, choose);
                QueueDrafts(batch, drafting, draftRows);
                Deliver(result, choose, chosen, logits);
            }
        }
        finally
        {
            if (graph is null)
            {
                normed.Dispose();
            }
        }

        foreach (var e in batch)
        {
            var state = _slots[e.Slot]!;
            state.Length += e.Tokens.Length;
            state.AssumedCount = 0; // fed: what a draft assumed is known now
        }

        if (!drafting.IsEmpty)
        {
            drafts[..logitRows].Fill(TokenSampling.NotChosen);
            TakeDrafts(batch, drafting, chosen, drafts, draftRows);
        }
    }

    /// <summary>
    /// Queues the drafts after the logit rows of the entries <paramref name="drafting"/> marks (<paramref name="rows"/> in all,
    /// their settings set): the MTP rows in logit-row order, each a pending position of its slot (exactly the entry's logit
    /// rows, after <see cref="AdvanceMtp"/>) whose token is the one chosen at its logit row, then the MTP pass, the head over
    /// every row and the drafts' choice; eagerly, or as the graph of the rows' bucket.
    /// </summary>
    private void QueueDrafts(ReadOnlySpan<StepSequence> batch, ReadOnlySpan<bool> drafting, int rows)
    {
        if (rows == 0)
        {
            return;
        }

        var byStepRows = _head.W.Context.Attention != AttentionForm.Naive; // else each slot's rows attend as a segment of its cache
        int row = 0, logitRow = 0, segments = 0;
        for (var i = 0; i < batch.Length; i++)
        {
            var e = batch[i];
            if (drafting[i])
            {
                var state = _slots[e.Slot]!;
                for (var j = 0; j < e.LogitRows; j++)
                {
                    _mtpTokens[row + j] = logitRow + j; // the choice row whose id is the token
                }

                SetRows(row, e.Slot, state.MtpLength, e.LogitRows);
                if (!byStepRows)
                {
                    SetMtpSegment(segments++, e.Slot, state.MtpLength, row, e.LogitRows);
                }

                row += e.LogitRows;
            }

            logitRow += e.LogitRows;
        }

        var bucket = byStepRows ? GraphBucket(rows) : 0;
        Pad(_mtpTokens, rows, Math.Max(rows, bucket));
        UploadMtpRows(Math.Max(rows, bucket));
        if (bucket > 0)
        {
            DraftGraph(bucket, chosen: true);
        }
        else
        {
            using var output = DraftPass(rows, segments, chosen: true);
            using var result = Logits(output, choose: true, draft: true);
        }
    }

    /// <summary>
    /// After the step's wait: the drafts' ids into <paramref name="drafts"/> (by logit row, −1 there before) for each marked
    /// entry whose rows and drafts were all chosen, its slot's pending positions then in the MTP cache (made with the tokens
    /// chosen after them); any other marked entry's slot keeps its pending positions for <see cref="Draft"/>.
    /// </summary>
    private void TakeDrafts(ReadOnlySpan<StepSequence> batch, ReadOnlySpan<bool> drafting, ReadOnlySpan<int> chosen, Span<int> drafts, int rows)
    {
        if (rows == 0)
        {
            return;
        }

        var ids = _draftIds.AsSpan(0, rows);
        _head.W.Backend.ReadTokenChoices(_draftChoices!, ids);
        int row = 0, logitRow = 0;
        for (var i = 0; i < batch.Length; i++)
        {
            var n = batch[i].LogitRows;
            var made = drafting[i] && !chosen.Slice(logitRow, n).Contains(TokenSampling.NotChosen) && !ids.Slice(row, n).Contains(TokenSampling.NotChosen);
            if (made)
            {
                ids.Slice(row, n).CopyTo(drafts[logitRow..]);
                _slots[batch[i].Slot]!.Drafted(chosen.Slice(logitRow, n));
            }

            row += drafting[i] ? n : 0;
            logitRow += n;
        }
    }

    /// <summary>Rows <paramref name="from"/> .. <paramref name="to"/> − 1 of the pass being set up as padding: token 0 at position 0 of the padding slot.</summary>
    private void Pad(int[] tokens, int from, int to)
    {
        tokens.AsSpan(from, to - from).Clear();
        _rowSlots.AsSpan(from, to - from).Fill(_padSlot);
        _rowPositions.AsSpan(from, to - from).Clear();
    }

    /// <summary>Rows <paramref name="first"/>.. of the pass being set up: <paramref name="count"/> positions of <paramref name="slot"/> from <paramref name="position"/>.</summary>
    private void SetRows(int first, int slot, int position, int count)
    {
        _rowSlots.AsSpan(first, count).Fill(slot);
        for (var r = 0; r < count; r++)
        {
            _rowPositions[first + r] = position + r;
        }
    }

    /// <summary>
    /// The bucket of <paramref name="tokens"/> rows a step runs as a graph in, or 0 when it runs eagerly
    /// (<see cref="DecodeGraphs"/>): a decode or verify step, every row a decode row (the stream just laid out) and every
    /// entry asking for the logits of each of its tokens, so that its logit rows are all its rows in batch order.
    /// </summary>
    private int BucketOf(ReadOnlySpan<StepSequence> batch, int tokens)
    {
        if (_decodeRows < tokens)
        {
            return 0;
        }

        foreach (var e in batch)
        {
            if (e.LogitRows != e.Tokens.Length)
            {
                return 0;
            }
        }

        return GraphBucket(tokens);
    }

    /// <summary>The bucket a pass of <paramref name="rows"/> rows that all attend by their step rows runs as a graph in, or 0 when it runs eagerly.</summary>
    private int GraphBucket(int rows) =>
        DecodeGraphs && _canCapture && _head.W.Context.Attention != AttentionForm.Naive ? DecodeBuckets.For(rows, _bucketLimit) : 0;

    /// <summary>
    /// Replays the bucket's graph over the rows just uploaded; on the bucket's first step, runs the step eagerly (its first
    /// run compiles kernels and sizes scratch memory) and then captures it. The graph is the main pass, with a drafting
    /// model every row's final hidden into the ring, and the head's logits of every row (padding too) and their choice: one
    /// graph per stage of the pass, the last stage's ending with the head.
    /// </summary>
    private DecodeGraph Graph(int bucket)
    {
        var b = _head.W.Backend;
        return Replay(_graphs, bucket, _layout.Stages, bucket, stage =>
        {
            if (ModelPass.RunStage(_layout, stage, _stream.AsSpan(0, bucket), _arenas, _rowsOf) is not { } normed)
            {
                return default;
            }

            if (CanDraft)
            {
                b.ScatterRows(normed, _head.Rows, RingRows, _pending!);
            }

            return (normed, Logits(normed, choose: true));
        });
    }

    /// <summary>
    /// The draft graph of a bucket of MTP rows (see <see cref="Graph"/>): the MTP pass over the rows just uploaded, its inputs
    /// gathered from the ring (with <paramref name="chosen"/>, their tokens the ids the step chose), and the head's logits of
    /// every row and the drafts' choice.
    /// </summary>
    private DecodeGraph DraftGraph(int bucket, bool chosen) => Replay(_draftGraphs, (bucket, chosen), _draftStages, bucket, _ =>
    {
        var output = DraftPass(bucket, 0, chosen);
        return (output, Logits(output, choose: true, draft: true));
    });

    /// <summary>
    /// The head's logits of every row of <paramref name="normed"/>, in the head's buffer (the caller disposes the view), and with
    /// <paramref name="choose"/> their tokens chosen under the settings set (<see cref="IBackend.ChooseTokenRows"/>); a
    /// <paramref name="draft"/>'s apart from the step's, so that a step's drafts leave its logits and ids.
    /// </summary>
    private Tensor Logits(Tensor normed, bool choose, bool draft = false)
    {
        var b = _head.W.Backend;
        var logits = _headArena.Take(draft ? Activation.DraftLogits : Activation.Logits, normed.Rows, VocabSize);
        b.Logits(normed, _head.W.Head!, logits);
        if (choose)
        {
            b.ChooseTokenRows(logits, draft ? _draftChoices! : _choices!);
        }

        return logits;
    }

    /// <summary>
    /// Replays <paramref name="graphs"/>' graphs of <paramref name="bucket"/>, one per stage of <paramref name="stages"/> with
    /// the pipeline's hand-overs of the <paramref name="rows"/> rows between them (eager), or runs each stage eagerly
    /// (<paramref name="stage"/>, the last returning where it leaves its output and logits) and captures it as that stage's
    /// graph: on the stage's device, or over every device (<see cref="ICommunicator.CaptureGraph"/>) when the stage runs on several.
    /// </summary>
    private DecodeGraph Replay<TKey>(Dictionary<TKey, DecodeGraph> graphs, TKey bucket, IReadOnlyList<PassStage> stages, int rows,
        Func<PassStage, (Tensor? Output, Tensor? Logits)> stage)
        where TKey : notnull
    {
        if (graphs.TryGetValue(bucket, out var known))
        {
            for (var s = 0; s < stages.Count; s++)
            {
                HandOverTo(stages[s], rows);
                if (stages[s].Devices is [var r])
                {
                    _devices[r].W.Backend.ReplayGraph(known.Graphs[s]);
                }
                else
                {
                    _layout.Communicator!.ReplayGraph(known.Graphs[s]);
                }
            }

            return known;
        }

        (Tensor? Output, Tensor? Logits) last = default;
        foreach (var s in stages)
        {
            HandOverTo(s, rows);
            last = stage(s);
        }

        var captured = new StepGraph[stages.Count];
        for (var s = 0; s < stages.Count; s++)
        {
            var part = stages[s];
            void Record() => last = stage(part);
            captured[s] = Own(part.Devices is [var r] ? _devices[r].W.Backend.CaptureGraph(Record) : _layout.Communicator!.CaptureGraph(Record));
        }

        return graphs[bucket] = new DecodeGraph(captured, last.Output!, last.Logits!);
    }

    /// <summary>Before a pipeline stage past the first: the stream of <paramref name="rows"/> rows handed to its device (<see cref="ModelPass.HandOver"/>).</summary>
    private void HandOverTo(PassStage stage, int rows)
    {
        if (stage.First > 0)
        {
            ModelPass.HandOver(_layout, stage.First, rows, _arenas);
        }
    }

    /// <inheritdoc />
    public void Draft(ReadOnlySpan<DraftSequence> batch, Span<float> logits) => RunDraft(batch, false, default, default, logits);

    /// <inheritdoc />
    /// <remarks>The head's device chooses each draft (<see cref="IBackend.ChooseTokenRows"/>): only ids come back, and the logits of a row it did not choose.</remarks>
    public void DraftAndChoose(ReadOnlySpan<DraftSequence> batch, ReadOnlySpan<TokenChoice> choices, Span<int> tokens, Span<float> logits) =>
        RunDraft(batch, true, choices, tokens, logits);

    private void RunDraft(ReadOnlySpan<DraftSequence> batch, bool choose, ReadOnlySpan<TokenChoice> choices, Span<int> chosen, Span<float> logits)
    {
        var blocks = Attached();
        var v = VocabSize;
        if (logits.Length < (long)batch.Length * v)
        {
            throw new ArgumentException($"logits holds {logits.Length} values; {batch.Length} drafts need {(long)batch.Length * v}", nameof(logits));
        }

        if (choose)
        {
            IStepRunner.CheckChoices(choices, chosen, batch.Length, "drafts");
        }

        var rows = 0;
        var stamp = ++_stamp;
        for (var i = 0; i < batch.Length; i++)
        {
            var (slot, next) = batch[i];
            var state = Get(slot);
            if (!state.Drafts)
            {
                throw new InvalidOperationException($"slot {slot} was opened without drafting");
            }

            if (state.PendingCount == 0)
            {
                throw new InvalidOperationException($"slot {slot}: no new position to draft from");
            }

            if (state.Stamp == stamp)
            {
                throw new ArgumentException($"slot {slot} appears twice in the draft batch", nameof(batch));
            }

            state.Stamp = stamp;
            LayerSteps.CheckIds([next], VocabSize);
            rows += state.PendingCount;
        }

        if (batch.Length == 0)
        {
            return;
        }

        var b = _head.W.Backend;
        if (choose)
        {
            b.SetTokenChoices(choices, _draftChoices!);
        }

        UploadTable(blocks);

        // Pending position MtpLength + p is fed with the token after it: the next pending one's, or next. Where the rows attend
        // by their step rows (not the naive form), each slot's last row comes first (rows 0 .. B − 1, what the head reads, in
        // place) and an earlier one after them all; else a slot's rows stay together (its segment of the MTP cache).
        var headFirst = _head.W.Context.Attention != AttentionForm.Naive;
        var bucket = headFirst ? GraphBucket(rows) : 0;
        var total = Math.Max(rows, bucket);
        int row = 0, earlier = batch.Length;
        for (var i = 0; i < batch.Length; i++)
        {
            var (slot, next) = batch[i];
            var state = _slots[slot]!;
            var c = state.PendingCount;
            for (var p = 0; p < c; p++)
            {
                var r = !headFirst ? row + p : p == c - 1 ? i : earlier++;
                _mtpTokens[r] = p + 1 < c ? state.PendingTokens[p + 1] : next;
                _rowSlots[r] = slot;
                _rowPositions[r] = state.MtpLength + p;
            }

            if (!headFirst)
            {
                SetMtpSegment(i, slot, state.MtpLength, row, c);
                _headRows[i] = (row + c - 1, 1);
            }

            row += c;
        }

        Pad(_mtpTokens, rows, total);
        UploadMtpRows(total);
        if (bucket > 0)
        {
            using var result = b.View(DraftGraph(bucket, chosen: false).Logits, 0, batch.Length);
            Deliver(result, choose, chosen, logits, _draftChoices);
        }
        else
        {
            using var output = DraftPass(rows, headFirst ? 0 : batch.Length, chosen: false);
            using var headIn = headFirst ? b.View(output, 0, batch.Length) : HeadInput(output, batch.Length, batch.Length);
            using var result = Logits(headIn, choose, draft: true);
            Deliver(result, choose, chosen, logits, _draftChoices);
        }

        // Each pending position was made with the token after it: the next pending one's, or next.
        Span<int> after = stackalloc int[PendingRows];
        foreach (var (slot, next) in batch)
        {
            var state = _slots[slot]!;
            var c = state.PendingCount;
            state.PendingTokens.AsSpan(1, c - 1).CopyTo(after);
            after[c - 1] = next;
            state.Drafted(after[..c]);
        }
    }

    /// <summary>
    /// The MTP layer over the first <paramref name="rows"/> uploaded MTP rows, its inputs gathered from the ring; returns its
    /// output [rows, D] on the head device (the caller disposes it). <paramref name="segments"/>: entries of each device's
    /// MTP segments (<see cref="SetMtpSegment"/>; 0 where
    /// every row attends by its step row).
    /// </summary>
    private Tensor DraftPass(int rows, int segments, bool chosen)
    {
        var b = _head.W.Backend;
        var d = _layout.Config.HiddenSize;
        using var input = _head.MtpArena.Take(Activation.MtpInput, rows, d);
        b.GatherRows(_pending!, RingRows, _head.MtpRows, input);
        var parts = MtpParts(segments, rows, chosen, outputRows: rows);
        try
        {
            LayerSteps.Mtp(parts, _head.W.Embed!, input, _mtpTokens.AsSpan(0, rows), _layout.AllReduce, null);
        }
        finally
        {
            for (var k = 0; k < parts.Length; k++)
            {
                if (k != _mtpHead)
                {
                    parts[k].Normed!.Dispose();
                }
            }
        }

        return parts[_mtpHead].Normed!;
    }

    /// <summary>Copies the block table to the backend when it changed since the last copy.</summary>
    private void UploadTable(KvBlockManager blocks)
    {
        if (_tableVersion != blocks.Version)
        {
            blocks.Table.CopyTo(_tableEntries);
            foreach (var d in _devices)
            {
                d.W.Backend.UploadBlockTable(_tableEntries, d.Table);
            }

            _tableVersion = blocks.Version;
        }
    }

    /// <summary>Checks every entry before anything runs; returns the stream's tokens and the logit rows asked for.</summary>
    private (int Tokens, int LogitRows) CheckBatch(ReadOnlySpan<StepSequence> batch, KvBlockManager blocks)
    {
        long tokens = 0, logitRows = 0;
        var stamp = ++_stamp;
        foreach (var e in batch)
        {
            var state = Get(e.Slot);
            var n = e.Tokens.Length;
            if (state.Stamp == stamp)
            {
                throw new ArgumentException($"slot {e.Slot} appears twice in the batch", nameof(batch));
            }

            state.Stamp = stamp;
            if (state.Length != e.Position)
            {
                throw new InvalidOperationException($"slot {e.Slot} holds {state.Length} tokens, the step feeds position {e.Position}");
            }

            if (e.LogitRows < 0 || e.LogitRows > n)
            {
                throw new ArgumentException($"slot {e.Slot}: {e.LogitRows} logit rows for {n} tokens", nameof(batch));
            }

            if (e.PromptLength < -1)
            {
                throw new ArgumentException($"slot {e.Slot}: prompt length {e.PromptLength} (−1 when not known)", nameof(batch));
            }

            if (state.Drafts && e.LogitRows > PendingRows)
            {
                throw new ArgumentException($"slot {e.Slot}: {e.LogitRows} logit rows; a drafting slot verifies at most one draft", nameof(batch));
            }

            LayerSteps.CheckStep(e.Tokens.Span, e.Position, MaxSequenceLength, VocabSize);
            if (state.Drafts && n > 0 && e.Position == state.MtpLength && state.AssumedAt(e.Position) is var assumed and >= 0 && e.Tokens.Span[0] != assumed)
            {
                throw new InvalidOperationException($"slot {e.Slot}: the MTP cache was made with token {assumed} at position {e.Position}; the step feeds {e.Tokens.Span[0]}");
            }

            if (blocks.Capacity(e.Slot) < e.Position + n)
            {
                throw new InvalidOperationException($"slot {e.Slot} has cache blocks for {blocks.Capacity(e.Slot)} tokens; the step writes up to position {e.Position + n - 1}");
            }

            tokens += n;
            logitRows += e.LogitRows;
        }

        if (tokens > _maxTokens)
        {
            throw new ArgumentException($"the step feeds {tokens} tokens; the runner was attached for at most {_maxTokens}", nameof(batch));
        }

        if (logitRows > _headArena.MaxRows)
        {
            throw new ArgumentException($"the step asks for {logitRows} logit rows; the runner computes at most {_headArena.MaxRows} (two per slot)", nameof(batch));
        }

        return ((int)tokens, (int)logitRows);
    }

    /// <summary>
    /// The step's rows over the caches of layer <paramref name="layer"/> on device <paramref name="device"/>: each entry's
    /// segments (batch order; its naive rows, then its absorbed rows, each with its form), and every row's address in the
    /// layer's pool.
    /// </summary>
    private LayerRows RowsOf(int device, int layer)
    {
        var d = _devices[device];
        var caches = d.Caches[layer]!;
        var segments = 0;
        for (var i = 0; i < _batch; i++)
        {
            var (slot, position, firstRow, rows, naive) = _entries[i];
            if (naive > 0)
            {
                d.Segments[segments++] = new Segment(caches[slot], position, firstRow, naive, AttentionForm.Naive);
            }

            if (naive < rows)
            {
                d.Segments[segments++] = new Segment(caches[slot], position + naive, firstRow + naive, rows - naive, AttentionForm.Absorbed);
            }
        }

        return new LayerRows(d.Segments.AsMemory(0, segments), new PagedRows(d.Pools[layer]!, d.Table, d.Rows, _decodeRows));
    }

    /// <summary>Copies <paramref name="rows"/> rows of <see cref="_mtpTokens"/>/<see cref="_rowSlots"/>/<see cref="_rowPositions"/> to the MTP rows of each device that runs the layer.</summary>
    private void UploadMtpRows(int rows) =>
        UploadRows(_mtpDevices, _mtpTokens, rows, d => d.MtpRows);

    /// <summary>Copies <paramref name="rows"/> rows of <paramref name="tokens"/>/<see cref="_rowSlots"/>/<see cref="_rowPositions"/> to each device's <paramref name="target"/> rows.</summary>
    private void UploadRows(Device[] devices, int[] tokens, int rows, Func<Device, StepRows> target)
    {
        foreach (var d in devices)
        {
            d.W.Backend.UploadStepRows(tokens.AsSpan(0, rows), _rowSlots.AsSpan(0, rows), _rowPositions.AsSpan(0, rows), target(d));
        }
    }

    /// <summary>Entry <paramref name="index"/> of each MTP device's segments: <paramref name="count"/> rows from <paramref name="row"/> at <paramref name="slot"/>'s MTP cache from <paramref name="position"/>.</summary>
    private void SetMtpSegment(int index, int slot, int position, int row, int count)
    {
        foreach (var d in _mtpDevices)
        {
            d.MtpSegments[index] = new Segment(d.MtpCaches[slot], position, row, count);
        }
    }

    /// <summary>
    /// An MTP pass's parts over the uploaded MTP rows, one per device that runs the layer: <paramref name="segments"/> entries
    /// of its MTP segments, the first <paramref name="decodeRows"/> rows decode rows (on the head device, with
    /// <paramref name="chosen"/>, their tokens the ids the step chose), and with <paramref name="outputRows"/> &gt; 0 each
    /// device's output buffer (the caller disposes the views).
    /// </summary>
    private MtpPart[] MtpParts(int segments, int decodeRows, bool chosen, int outputRows)
    {
        var d = _layout.Config.HiddenSize;
        for (var k = 0; k < _mtpDevices.Length; k++)
        {
            var m = _mtpDevices[k];
            var rows = new LayerRows(m.MtpSegments.AsMemory(0, segments),
                new PagedRows(m.MtpPool, m.Table, m.MtpRows, decodeRows, chosen && m == _head ? _choices : null));
            _mtpParts[k] = new MtpPart(m.W.Context, m.W.Mtp!, rows, m.MtpArena, outputRows > 0 ? m.MtpArena.Take(Activation.MtpOutput, outputRows, d) : null);
        }

        return _mtpParts;
    }

    /// <summary>
    /// Runs the MTP layer over every drafting slot's positions whose next token this step made certain (the rows
    /// pending from before, then this entry's rows but its uncertain tail), and keeps that tail pending in the ring:
    /// the decode rows' final hiddens go there in one call (a graph step's went there inside its graph,
    /// <paramref name="scattered"/>), a prompt chunk's tail row by row.
    /// </summary>
    private void AdvanceMtp(ReadOnlySpan<StepSequence> batch, Tensor hiddens, bool scattered)
    {
        var b = _head.W.Backend;
        if (!scattered && _decodeRows > 0)
        {
            using var decoded = b.View(hiddens, 0, _decodeRows);
            b.ScatterRows(decoded, _head.Rows, RingRows, _pending!);
        }

        var rows = 0;
        foreach (var e in batch)
        {
            if (_slots[e.Slot]!.Drafts)
            {
                rows += _slots[e.Slot]!.PendingCount + e.Tokens.Length - Tail(e);
            }
        }

        var d = _layout.Config.HiddenSize;
        using var input = _head.MtpArena.Take(Activation.MtpInput, rows, d);
        var row = 0;
        var segments = 0;
        for (var i = 0; i < batch.Length; i++)
        {
            var e = batch[i];
            var streamRow = _entries[i].FirstRow;
            var state = _slots[e.Slot]!;
            var n = e.Tokens.Length;
            if (state.Drafts)
            {
                var c = state.PendingCount;
                var keep = Tail(e);
                var tokens = e.Tokens.Span;
                var count = c + n - keep;
                if (count > 0)
                {
                    // Fed at positions MtpLength..: the pending tokens, then this entry's; row r's next token is fed at r + 1.
                    for (var p = 0; p < c; p++)
                    {
                        b.CopyRows(_pending!, RingRow(e.Slot, state.MtpLength + p), input, row + p, 1);
                    }

                    b.CopyRows(hiddens, streamRow, input, row + c, n - keep);
                    for (var r = 0; r < count; r++)
                    {
                        var fed = r + 1;
                        _mtpTokens[row + r] = fed < c ? state.PendingTokens[fed] : tokens[fed - c];
                    }

                    SetMtpSegment(segments++, e.Slot, state.MtpLength, row, count);
                    SetRows(row, e.Slot, state.MtpLength, count);
                    row += count;
                    state.MtpLength += count;
                }

                if (streamRow >= _decodeRows)
                {
                    // Not a decode entry, so not scattered above: the pending tail row by row.
                    for (var p = n - keep; p < n; p++)
                    {
                        b.CopyRows(hiddens, streamRow + p, _pending!, RingRow(e.Slot, e.Position + p), 1);
                    }
                }

                tokens[(n - keep)..].CopyTo(state.PendingTokens);
                state.PendingCount = keep;
            }
        }

        if (rows > 0)
        {
            // These positions' drafts are never asked for: only their rows of the MTP layer's cache are needed.
            UploadMtpRows(rows);
            LayerSteps.MtpAppend(MtpParts(segments, 0, chosen: false, outputRows: 0), _head.W.Embed!, input, _mtpTokens.AsSpan(0, rows), _layout.AllReduce);
        }
    }

    /// <summary>The ring row that holds <paramref name="slot"/>'s final hidden at <paramref name="position"/>.</summary>
    private static int RingRow(int slot, int position) => slot * RingRows + position % RingRows;

    /// <summary>Positions of an entry whose next token is not yet certain: the last one, or every verified one.</summary>
    private static int Tail(StepSequence e) => Math.Max(1, e.LogitRows);

    /// <summary>
    /// The rows of <paramref name="source"/> the head reads, <see cref="_headRows"/>[0 .. <paramref name="entries"/>) in batch
    /// order (<paramref name="rows"/> in all): a view where they are one run of it (a decode step's, a draft step's of one
    /// row per slot), else copied into the head's buffer a run at a time.
    /// </summary>
    private Tensor HeadInput(Tensor source, int entries, int rows)
    {
        var runs = 0;
        foreach (var (from, count) in _headRows.AsSpan(0, entries))
        {
            if (count == 0)
            {
                continue;
            }

            ref var last = ref _headRows[Math.Max(0, runs - 1)];
            if (runs > 0 && last.From + last.Rows == from)
            {
                last.Rows += count;
            }
            else
            {
                _headRows[runs++] = (from, count);
            }
        }

        var b = _head.W.Backend;
        if (runs == 1)
        {
            return b.View(source, _headRows[0].From, rows);
        }

        var headIn = _headArena.Take(Activation.HeadInput, rows, _layout.Config.HiddenSize);
        var r = 0;
        foreach (var (from, count) in _headRows.AsSpan(0, runs))
        {
            b.CopyRows(source, from, headIn, r, count);
            r += count;
        }

        return headIn;
    }

    /// <summary>
    /// The logit rows <paramref name="result"/> to the host: downloaded into <paramref name="logits"/>, or, with
    /// <paramref name="choose"/>, the ids chosen on the head device read into <paramref name="chosen"/> with only the rows not
    /// chosen there downloaded (a run of such rows in one copy). Then, over several devices, the collectives' barrier (the
    /// host waits for the step anyway), so a collective that failed on a device surfaces in this step.
    /// </summary>
    private void Deliver(Tensor result, bool choose, Span<int> chosen, Span<float> logits, TokenChoiceBuffer? buffer = null)
    {
        var b = _head.W.Backend;
        var v = VocabSize;
        var n = result.Rows;
        if (!choose)
        {
            b.Download(result, logits[..(int)result.Length]);
        }
        else
        {
            b.ReadTokenChoices(buffer ?? _choices!, chosen[..n]);
            for (var r = 0; r < n;)
            {
                var end = r;
                while (end < n && chosen[end] == TokenSampling.NotChosen)
                {
                    end++;
                }

                if (end > r)
                {
                    using var rows = b.View(result, r, end - r);
                    b.Download(rows, logits.Slice(r * v, (end - r) * v));
                }

                r = end + 1;
            }
        }

        _layout.Communicator?.Barrier();
    }

    private KvBlockManager Attached() =>
        _blocks ?? throw new InvalidOperationException("the runner is not attached to a block manager yet (the scheduler attaches it)");

    private SlotState Get(int slot) =>
        (uint)slot < (uint)_slots.Length && _slots[slot] is { } state ? state : throw new InvalidOperationException($"slot {slot} is not open");

    /// <summary>Frees the pools, the block table and the step buffers.</summary>
    public void Dispose()
    {
        DisposeOwned();
        _blocks = null;
        _slots = [];
    }

    private void DisposeOwned()
    {
        for (var i = _owned.Count - 1; i >= 0; i--)
        {
            _owned[i].Dispose();
        }

        _owned.Clear();
    }

    /// <summary>A bucket's captured pass (a graph per stage), and where its replays leave the final-normed rows (main or MTP) and their logits.</summary>
    private sealed record DecodeGraph(StepGraph[] Graphs, Tensor Output, Tensor Logits);

    private sealed class SlotState
    {
        public bool Drafts { get; set; }

        /// <summary>Positions in the cache.</summary>
        public int Length { get; set; }

        /// <summary>Positions in the MTP layer's cache.</summary>
        public int MtpLength { get; set; }

        /// <summary>Positions MtpLength .. + PendingCount − 1 (the last ones fed) wait with their hidden in the pending rows.</summary>
        public int PendingCount { get; set; }

        /// <summary>The tokens fed at the pending positions.</summary>
        public int[] PendingTokens { get; } = new int[PendingRows];

        /// <summary>
        /// The tokens the last draft's MTP positions were made with, until the slot's next step: the token after each
        /// (<see cref="AssumedCount"/> of them, from position <see cref="AssumedFrom"/>), which the slot must be fed there.
        /// </summary>
        public int[] Assumed { get; } = new int[PendingRows];

        public int AssumedFrom { get; set; }

        public int AssumedCount { get; set; }

        /// <summary>The token the last draft assumed at <paramref name="position"/>, or −1.</summary>
        public int AssumedAt(int position) =>
            position >= AssumedFrom && position < AssumedFrom + AssumedCount ? Assumed[position - AssumedFrom] : -1;

        /// <summary>
        /// The pending positions went into the MTP cache, each made with the token in <paramref name="after"/> after it (one
        /// per pending position): a draft.
        /// </summary>
        public void Drafted(ReadOnlySpan<int> after)
        {
            after.CopyTo(Assumed);
            AssumedFrom = MtpLength + 1;
            AssumedCount = after.Length;
            MtpLength += PendingCount;
            PendingCount = 0;
        }

        /// <summary>The last batch check that saw the slot (duplicate entries).</summary>
        public int Stamp { get; set; }
    }

    /// <summary>What the runner keeps on one device: its block table, the pools of the layers it runs and its views of them, its step rows and buffers.</summary>
    private sealed class Device(DeviceWeights weights)
    {
        public DeviceWeights W { get; } = weights;

        /// <summary>The main layers the device runs (a pool each).</summary>
        public int[] Held { get; } = [.. Enumerable.Range(0, weights.Layers.Length).Where(i => weights.Layers[i] is not null)];

        public BlockTable Table { get; set; } = null!;

        /// <summary>[layer][slot]; null for a layer the device does not run.</summary>
        public LatentCache[]?[] Caches { get; set; } = [];

        /// <summary>[layer] the shared pools behind <see cref="Caches"/>.</summary>
        public LatentPool?[] Pools { get; set; } = [];

        /// <summary>The main stream's rows of the running step.</summary>
        public StepRows Rows { get; set; } = null!;

        public ActivationArena Arena { get; set; } = null!;
        public Segment[] Segments { get; set; } = [];

        /// <summary>Where the device runs the MTP layer: its pool, the slots' views of it, the rows of an MTP pass, its buffers and segments.</summary>
        public LatentPool MtpPool { get; set; } = null!;

        public LatentCache[] MtpCaches { get; set; } = [];
        public StepRows MtpRows { get; set; } = null!;
        public ActivationArena MtpArena { get; set; } = null!;
        public Segment[] MtpSegments { get; set; } = [];
    }
}
