using System.Collections.Concurrent;
using System.Threading.Channels;
using DeepSeekCuda.Backends;
using DeepSeekCuda.Inference;
using DeepSeekCuda.Model;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace DeepSeekCuda.Serving;

/// <summary>Options of <see cref="BatchScheduler"/>.</summary>
public sealed record SchedulerOptions
{
    /// <summary>
    /// Token budget of one step: the decode tokens of every running request come first (always), prompt
    /// chunks fill what is left, so a prompt longer than that is prefilled over several steps.
    /// </summary>
    public int MaxTokensPerStep { get; init; } = 512;

    /// <summary>Most requests holding a slot (running) at once.</summary>
    public int MaxBatch { get; init; } = 64;

    /// <summary>The end-of-sequence token, which ends a request; null: none.</summary>
    public int? EosId { get; init; }

    /// <summary>Logits at and past this id are never sampled (a tokenizer smaller than the model's padded vocabulary); null: none masked.</summary>
    public int? SamplingVocabSize { get; init; }

    /// <summary>
    /// MTP speculative decoding: the MTP module drafts one token, the next step verifies it with the main
    /// model. Default <see cref="SpeculativeDecodingMode.Auto"/>. Output is the main model's own sample in
    /// every mode; under greedy sampling it equals plain decoding. Only the speed changes.
    /// </summary>
    public SpeculativeDecodingMode SpeculativeDecoding { get; init; } = SpeculativeDecodingMode.Auto;

    /// <summary>
    /// <see cref="SpeculativeDecodingMode.Auto"/>: drafts verified per judgement window (over all requests).
    /// After each full window whose acceptance rate is below <see cref="AutoMinAcceptanceRate"/>, drafting stops
    /// for good. Default 64.
    /// </summary>
    public int AutoWindow { get; init; } = 64;

    /// <summary>
    /// <see cref="SpeculativeDecodingMode.Auto"/>: the acceptance rate a window must reach to keep drafting.
    /// Default 0.3: a verify step feeds two tokens and the MTP layer runs once more per step, so below
    /// about a third accepted the drafts cost more than the steps they save (on the CPU backend the random
    /// demo model's 0% made decoding 3-7 times slower).
    /// </summary>
    public double AutoMinAcceptanceRate { get; init; } = 0.3;

    internal void Validate()
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(MaxTokensPerStep, 1, nameof(MaxTokensPerStep));
        ArgumentOutOfRangeException.ThrowIfLessThan(MaxBatch, 1, nameof(MaxBatch));
        ArgumentOutOfRangeException.ThrowIfLessThan(AutoWindow, 1, nameof(AutoWindow));
        if (!(AutoMinAcceptanceRate is >= 0 and <= 1))
        {
            throw new ArgumentOutOfRangeException(nameof(AutoMinAcceptanceRate), AutoMinAcceptanceRate, "must be within 0..1");
        }

        if (!Enum.IsDefined(SpeculativeDecoding))
        {
            throw new ArgumentOutOfRangeException(nameof(SpeculativeDecoding), SpeculativeDecoding, "not a SpeculativeDecodingMode");
        }

        if (SamplingVocabSize is < 1)
        {
            throw new ArgumentOutOfRangeException(nameof(SamplingVocabSize), SamplingVocabSize, "must be >= 1");
        }
    }
}

/// <summary>Whether a <see cref="BatchScheduler"/> drafts with the model's MTP module.</summary>
public enum SpeculativeDecodingMode
{
    /// <summary>
    /// Draft when the runner can (the model has an MTP module), and stop drafting for good once a window of
    /// drafts (<see cref="SchedulerOptions.AutoWindow"/>) is accepted less often than
    /// <see cref="SchedulerOptions.AutoMinAcceptanceRate"/>. Without an MTP module: plain decoding.
    /// </summary>
    Auto,

    /// <summary>Always draft; the scheduler refuses a runner that cannot.</summary>
    On,

    /// <summary>Never draft.</summary>
    Off,
}

/// <summary>Counters of a scheduler or of one request.</summary>
/// <param name="Steps">Forward passes that ended with sampling (for a request: one per step it produced tokens in).</param>
/// <param name="GeneratedTokens">Tokens produced (EOS included).</param>
/// <param name="Drafted">Drafts verified. A draft whose request ended at the token before it is not counted.</param>
/// <param name="Accepted">Drafts equal to the main model's choice; each adds one token to its step. GeneratedTokens = Steps + Accepted.</param>
public readonly record struct DecodeCounters(long Steps, long GeneratedTokens, long Drafted, long Accepted)
{
    /// <summary>Accepted / Drafted (0 when nothing was drafted).</summary>
    public double AcceptanceRate => Drafted == 0 ? 0 : (double)Accepted / Drafted;
}

/// <summary>A finished request.</summary>
/// <param name="Tokens">The generated tokens (EOS included when it ended the request).</param>
/// <param name="FinishReason">Why it ended.</param>
/// <param name="Counters">Its steps, drafts and acceptances.</param>
public sealed record ScheduledResult(IReadOnlyList<int> Tokens, FinishReason FinishReason, DecodeCounters Counters);

/// <summary>A request submitted to a <see cref="BatchScheduler"/>: its token stream and its completion.</summary>
public sealed class ScheduledRequest
{
    private readonly Channel<int> _output = Channel.CreateUnbounded<int>(new UnboundedChannelOptions { SingleWriter = true });
    private readonly TaskCompletionSource<ScheduledResult> _done = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly BatchScheduler _owner;
    private volatile bool _cancelRequested;

    internal ScheduledRequest(BatchScheduler owner, long id, int[] prompt, SamplingOptions sampling, ITokenConstraint? constraint, bool speculative)
    {
        _owner = owner;
        Id = id;
        PromptLength = prompt.Length;
        PromptEnd = prompt.Length;
        Tokens = [.. prompt];
        Sampler = new Sampler(sampling, constraint);
        MaxTokens = sampling.MaxTokens ?? int.MaxValue;
        Speculative = speculative;
    }

    /// <summary>Submission order.</summary>
    public long Id { get; }

    /// <summary>Tokens of the prompt.</summary>
    public int PromptLength { get; }

    /// <summary>Whether this request decodes speculatively (false from its next admission or step on, once Auto stopped drafting).</summary>
    public bool Speculative { get; internal set; }

    /// <summary>Generated tokens as they are sampled; completes when the request ends (with its exception when it fails, an <see cref="OperationCanceledException"/> when cancelled).</summary>
    public ChannelReader<int> Output => _output.Reader;

    /// <summary>The result; cancelled when <see cref="Cancel"/> removed the request.</summary>
    public Task<ScheduledResult> Completion => _done.Task;

    /// <summary>
    /// Removes the request: its blocks and slot return to the pool before the next step starts (at once when
    /// the scheduler is idle), and <see cref="Completion"/> is cancelled.
    /// </summary>
    public void Cancel()
    {
        _cancelRequested = true;
        _owner.Wake();
    }

    internal bool CancelRequested => _cancelRequested;

    /// <summary>The session this participant runs the calls of (<see cref="BatchScheduler.CreateSession"/>); null for a generation request.</summary>
    internal ScheduledSession? Session { get; init; }

    /// <summary>
    /// Positions below it attend as a prompt's (<see cref="StepSequence.PromptLength"/>): a request's prompt length; a
    /// session's running call's end when the call feeds more than <see cref="Model.LayerSteps.AbsorbedRows"/> tokens, else 0,
    /// so the call's rows attend as one forward call over them would, however the steps cut it.
    /// </summary>
    internal int PromptEnd { get; set; }

    internal List<int> Tokens { get; }

    internal Sampler Sampler { get; }

    internal int MaxTokens { get; }

    internal int Generated => Tokens.Count - PromptLength;

    /// <summary>Tokens in the cache; Tokens[Fed..] are still to be fed.</summary>
    internal int Fed { get; set; }

    internal int Slot { get; set; } = -1;

    internal int? Draft { get; set; }

    /// <summary>The draft the step just run made after the last token it chose for the request, or −1 (see <see cref="IStepRunner.ForwardChooseAndDraft"/>).</summary>
    internal int NextDraft { get; set; } = -1;

    internal long Steps { get; set; }

    internal long Drafted { get; set; }

    internal long Accepted { get; set; }

    internal DecodeCounters Counters => new(Steps, Generated, Drafted, Accepted);

    internal void Emit(int token)
    {
        Tokens.Add(token);
        _output.Writer.TryWrite(token);
    }

    internal void Finish(FinishReason reason)
    {
        _output.Writer.TryComplete();
        _done.TrySetResult(new ScheduledResult(Tokens[PromptLength..], reason, Counters));
    }

    /// <summary>Ends the request: its stream completes with <paramref name="error"/> (null: cancelled); a session's participant ends its session (<see cref="ScheduledSession.End"/>).</summary>
    internal void Abort(Exception? error)
    {
        if (Session is { } session)
        {
            session.End(error);
            return;
        }

        _output.Writer.TryComplete(error ?? new OperationCanceledException($"request {Id} was cancelled"));
        if (error is null)
        {
            _done.TrySetCanceled();
        }
        else
        {
            _done.TrySetException(error);
        }
    }
}

/// <summary>
/// Continuous batching over an <see cref="IStepRunner"/>: requests join and leave between steps; a step
/// advances every running request in decode by one token (two with an accepted MTP draft) and spends
/// what is left of the token budget on prompt chunks, oldest request first. Admission takes a slot and
/// the prompt's cache blocks from the <see cref="KvBlockManager"/>; decode growth takes one more block at
/// each 64-token boundary; when the pool runs dry the newest running request is preempted (its blocks
/// freed, its tokens so far re-prefilled later, so its output does not change). Sampling is per request.
/// Sessions (<see cref="CreateSession"/>) run their calls in the same steps, on the same pool.
/// </summary>
/// <remarks>
/// <see cref="Step"/> runs one step on the caller's thread (tests drive it directly); <see cref="RunAsync"/>
/// loops on a worker thread, sleeping while idle. <see cref="Submit"/>, <see cref="ScheduledRequest.Cancel"/> and
/// <see cref="CreateSession"/> may be called from any thread.
/// </remarks>
public sealed class BatchScheduler : IDisposable
{
    private readonly IStepRunner _runner;
    private readonly KvBlockManager _blocks;
    private readonly SchedulerOptions _options;
    private readonly ILogger _logger;
    private volatile bool _drafting;
    private bool _stopDraftingSlots;
    private long _windowDrafted, _windowAccepted;
    private readonly ConcurrentQueue<ScheduledRequest> _submitted = new();
    private readonly ConcurrentQueue<(ScheduledSession Session, SessionCall Call)> _sessionCalls = new();
    private readonly LinkedList<ScheduledRequest> _waiting = new();
    private readonly List<ScheduledRequest> _running = [];
    private readonly Lock _stepLock = new();
    private readonly SemaphoreSlim _wake = new(0);
    private float[] _logits = [];
    private TokenChoice[] _choices = [];
    private int[] _chosen = [];
    private int[] _draftsAfter = [];  // [logit row] the step's drafts
    private bool[] _draftMarks = [];  // [entry] whether the step drafts after its rows
    private long _nextId;
    private long _steps, _generated, _drafted, _accepted, _preemptions;
    private bool _disposed;
    private int _runningCount;

    /// <summary>Creates a scheduler. The runner and the block manager are not owned.</summary>
    /// <param name="runner">Does the model work.</param>
    /// <param name="blocks">The cache block pool and block table.</param>
    /// <param name="options">Batch and step limits, EOS, speculative decoding.</param>
    /// <param name="logger">Receives failed steps and speculative-decoding totals (an <see cref="ILogger{BatchScheduler}"/> or a host component's logger).</param>
    public BatchScheduler(IStepRunner runner, KvBlockManager blocks, SchedulerOptions? options = null, ILogger? logger = null)
    {
        _runner = runner ?? throw new ArgumentNullException(nameof(runner));
        _blocks = blocks ?? throw new ArgumentNullException(nameof(blocks));
        _options = options ?? new SchedulerOptions();
        _options.Validate();
        _logger = (ILogger?)logger ?? NullLogger.Instance;
        if (_options.SpeculativeDecoding == SpeculativeDecodingMode.On && !runner.CanDraft)
        {
            throw new ArgumentException("SpeculativeDecoding is On but the runner cannot draft (no MTP module)", nameof(options));
        }

        _drafting = _options.SpeculativeDecoding switch
        {
            SpeculativeDecodingMode.On => true,
            SpeculativeDecodingMode.Auto => runner.CanDraft,
            _ => false,
        };

        runner.Attach(blocks, MaxTokensPerStep(_options, blocks, _drafting));
    }

    /// <summary>
    /// The most tokens one step feeds: decode rows come first (every running request, one token, two with a
    /// draft) even past the budget, and prompt chunks only fill what the budget leaves.
    /// </summary>
    internal static int MaxTokensPerStep(SchedulerOptions options, KvBlockManager blocks, bool drafting) =>
        Math.Max(options.MaxTokensPerStep, Math.Min(options.MaxBatch, blocks.MaxRequests) * (drafting ? 2 : 1));

    /// <summary>
    /// Whether requests draft with the MTP module now: the mode's choice at creation, false from the moment
    /// <see cref="SpeculativeDecodingMode.Auto"/> judged the drafts not worth their cost.
    /// </summary>
    public bool SpeculativeDecoding => _drafting;

    /// <summary>The block pool.</summary>
    public KvBlockManager Blocks => _blocks;

    /// <summary>The most tokens a request holds, prompt and output: the runner's context or a block-table row, whichever is less.</summary>
    public int ContextLimit => Math.Min(_runner.MaxSequenceLength, _blocks.MaxTokensPerRequest);

    /// <summary>The options it was created with.</summary>
    public SchedulerOptions Options => _options;

    /// <summary>Totals over every request so far (finished or not).</summary>
    public DecodeCounters Counters => new(Interlocked.Read(ref _steps), Interlocked.Read(ref _generated), Interlocked.Read(ref _drafted), Interlocked.Read(ref _accepted));

    /// <summary>Requests preempted so far (blocks taken back for another request's growth; they resume by prefilling again).</summary>
    public long Preemptions => Interlocked.Read(ref _preemptions);

    /// <summary>Requests holding a slot (read without waiting for a step in flight: as of the last change).</summary>
    public int RunningCount => Volatile.Read(ref _runningCount);

    /// <summary>
    /// Queues a request; it is admitted at a step boundary when a slot and its prompt's blocks are free. With
    /// <paramref name="constraint"/> (this request's own instance), only the ids it allows are sampled; an MTP
    /// draft is still proposed unconstrained, and verification keeps only what the constrained sample agrees with.
    /// </summary>
    /// <exception cref="ArgumentException">Empty prompt, or one that no request slot can ever hold.</exception>
    public ScheduledRequest Submit(IReadOnlyList<int> prompt, SamplingOptions? sampling = null, ITokenConstraint? constraint = null)
    {
        ArgumentNullException.ThrowIfNull(prompt);
        ObjectDisposedException.ThrowIf(_disposed, this);
        sampling ??= new SamplingOptions();
        sampling.Validate();
        var limit = ContextLimit;
        if (prompt.Count == 0 || prompt.Count > limit)
        {
            throw new ArgumentException($"the prompt has {prompt.Count} tokens; a request holds 1..{limit}", nameof(prompt));
        }

        // Checked here, not in the forward: a bad id there would fail every request batched with this one.
        for (var i = 0; i < prompt.Count; i++)
        {
            if ((uint)prompt[i] >= (uint)_runner.VocabSize)
            {
                throw new ArgumentOutOfRangeException(nameof(prompt), prompt[i], $"prompt token {i} is not an id of the model's vocabulary (0..{_runner.VocabSize - 1})");
            }
        }

        var request = new ScheduledRequest(this, Interlocked.Increment(ref _nextId), [.. prompt], sampling, constraint, _drafting);
        if (request.MaxTokens == 0)
        {
            request.Finish(FinishReason.Length); // nothing to generate: it never takes a slot
            return request;
        }
        _submitted.Enqueue(request);
        if (Volatile.Read(ref _disposed))
        {
            request.Abort(new ObjectDisposedException(nameof(BatchScheduler))); // raced with Dispose, which may have drained the queue already
        }

        Wake();
        return request;
    }

    /// <summary>
    /// Opens a session on this scheduler: a sequence fed by its caller (<see cref="ScheduledSession.Forward"/>,
    /// <see cref="ScheduledSession.ForwardAsync"/>) whose calls run as entries of this scheduler's steps, beside its requests,
    /// in the shared block pool, so a model served here needs no cache of its own for it. A call's tokens are fed in the next
    /// steps (a prompt chunk, or a decode row when it is one token; cut by <see cref="SchedulerOptions.MaxTokensPerStep"/> like
    /// a prompt) and attend as one forward call over them would; the last one's logits come back to the host. The call waits
    /// for that, so the scheduler must be running (<see cref="RunAsync"/>, or another thread calling <see cref="Step"/>).
    /// </summary>
    /// <remarks>
    /// The session takes a slot and the blocks of its first call when that call is admitted (in turn with the requests), and
    /// more blocks as later calls need them, preempting running requests for them (newest first) as a request's growth does.
    /// It keeps them until it is disposed: a session is never preempted (its numbers would change if re-fed), and counts among
    /// <see cref="RunningCount"/>. A call that cannot get its blocks because open sessions hold the rest fails with
    /// <see cref="KvCacheFullException"/> and leaves the session as it was; so does a request (new, or preempted) that no
    /// running request will make room for. A step that fails ends the sessions in it (their caches are unknown), as it ends
    /// its requests: their next call throws <see cref="InvalidOperationException"/>.
    /// </remarks>
    /// <exception cref="ObjectDisposedException">The scheduler was disposed.</exception>
    public ScheduledSession CreateSession()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        return new ScheduledSession(this, Interlocked.Increment(ref _nextId));
    }

    /// <summary>The runner's vocabulary (a session's logits).</summary>
    internal int VocabSize => _runner.VocabSize;

    /// <summary>Queues <paramref name="call"/> of <paramref name="session"/> for the next step; a disposed scheduler fails it at once.</summary>
    internal void Feed(ScheduledSession session, SessionCall call)
    {
        _sessionCalls.Enqueue((session, call));
        if (Volatile.Read(ref _disposed))
        {
            call.Fail(new ObjectDisposedException(nameof(BatchScheduler))); // raced with Dispose, which may have drained the queue already
        }

        Wake();
    }

    /// <summary>Runs <see cref="Step"/> until <paramref name="cancellationToken"/> fires, waiting while there is nothing to do.</summary>
    public Task RunAsync(CancellationToken cancellationToken) => Task.Factory.StartNew(() =>
    {
        while (!cancellationToken.IsCancellationRequested)
        {
            bool worked;
            try
            {
                worked = Step();
            }
            catch (ObjectDisposedException)
            {
                return;
            }
            catch (Exception e)
            {
                // Step already failed the requests of the batch; the others go on.
                Log.StepFailed(_logger, e);
                continue;
            }

            if (!worked)
            {
                try
                {
                    _wake.Wait(cancellationToken);
                }
                catch (OperationCanceledException)
                {
                    return;
                }
            }
        }
    }, cancellationToken, TaskCreationOptions.LongRunning, TaskScheduler.Default);

    /// <summary>
    /// One scheduling step: drop cancelled requests, admit waiting ones, run one forward over every
    /// running request, sample, verify drafts, draft again, and retire finished requests.
    /// </summary>
    /// <returns>Whether there may be more to do at once (a forward ran, or requests wait to be admitted); false: idle.</returns>
    public bool Step()
    {
        lock (_stepLock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            DropCancelled();
            Admit();
            if (_running.Count == 0)
            {
                return false;
            }

            var batch = BuildBatch(out var owners);
            if (batch.Count == 0)
            {
                // Growth failures retired or preempted everyone: come back to admit the waiting.
                return _waiting.Count > 0;
            }

            var rows = batch.Sum(e => e.LogitRows);
            var v = _runner.VocabSize;
            Room(rows, v);

            // Each logit row is chosen where the logits are, under its request's rule, seed and draw counter, and a constrained
            // request's first row among the ids its constraint allows; the rows a constraint must see first (a verify step's
            // second row, a constraint that only masks rows) and any row that cannot be sampled come back as logits for the
            // sampler here.
            var row = 0;
            var limit = _options.SamplingVocabSize ?? v;
            Exception?[]? refused = null;
            for (var i = 0; i < batch.Count; i++)
            {
                for (var k = 0; k < batch[i].LogitRows; k++, row++)
                {
                    try
                    {
                        // A session's row comes back as logits: default chooses nothing where they are.
                        _choices[row] = owners[i].Session is null ? owners[i].Sampler.Choice(limit, k) : default;
                    }
                    catch (Exception e)
                    {
                        // Its constraint failed to say what it allows: the request ends with that error after the step.
                        _choices[row] = default;
                        (refused ??= new Exception?[batch.Count])[i] ??= e;
                    }
                }
            }

            // The drafts for the next step are made in this one, after each row, where every row of a request that may draft next
            // is chosen on the device (DraftNext keeps the draft after the token the request keeps, and drafts the others apart).
            var marks = Marks(batch, owners, refused);
            try
            {
                _runner.ForwardChooseAndDraft(System.Runtime.InteropServices.CollectionsMarshal.AsSpan(batch), _choices.AsSpan(0, rows), _chosen.AsSpan(0, rows), _logits,
                    marks, TokenChoice.Greedy(limit), _draftsAfter);
            }
            catch (Exception e)
            {
                // A failed forward leaves the caches of this batch unknown: fail its requests, keep the others.
                foreach (var r in owners)
                {
                    Retire(r, null, e);
                }

                throw;
            }

            var finished = new List<(ScheduledRequest Request, FinishReason? Reason, Exception? Error)>();
            row = 0;
            for (var i = 0; i < batch.Count; i++)
            {
                var r = owners[i];
                var entry = batch[i];
                r.Fed += entry.Tokens.Length;
                if (refused?[i] is { } error)
                {
                    Log.RequestFailed(_logger, r.Id, error);
                    finished.Add((r, null, error));
                }
                else if (r.Session is { } session)
                {
                    if (entry.LogitRows > 0)
                    {
                        session.Answer(_logits.AsSpan(row * v, v)); // the call's last token: it returns, the session keeps its slot
                    }
                }
                else if (entry.LogitRows > 0)
                {
                    try
                    {
                        if (Sample(r, entry, row, v) is { } reason)
                        {
                            finished.Add((r, reason, null));
                        }
                    }
                    catch (Exception e)
                    {
                        // Its own logits or sampler failed (non-finite logits): it ends alone, with its error;
                        // the step, the other requests and their positions go on as if it had not come.
                        Log.RequestFailed(_logger, r.Id, e);
                        finished.Add((r, null, e));
                    }
                }

                row += entry.LogitRows;
            }

            foreach (var (r, reason, error) in finished)
            {
                Retire(r, reason, error);
            }

            DraftNext();
            foreach (var r in owners)
            {
                r.NextDraft = -1;
            }

            return true;
        }
    }

    /// <summary>
    /// Which entries of the step draft after their rows: a drafting request's entry with logit rows, each chosen on the device,
    /// that may still draft after the step (<see cref="DraftNext"/>'s bounds with one token more: a step yields at least one).
    /// </summary>
    private ReadOnlySpan<bool> Marks(List<StepSequence> batch, List<ScheduledRequest> owners, Exception?[]? refused)
    {
        if (_draftMarks.Length < batch.Count)
        {
            _draftMarks = new bool[batch.Count];
        }

        var row = 0;
        for (var i = 0; i < batch.Count; i++)
        {
            var r = owners[i];
            var n = batch[i].LogitRows;
            var onDevice = true;
            foreach (var c in _choices.AsSpan(row, n))
            {
                onDevice &= c.OnDevice;
            }

            _draftMarks[i] = _drafting && n > 0 && onDevice && refused?[i] is null && MayDraft(r, ahead: 1);
            row += n;
        }

        return _draftMarks.AsSpan(0, batch.Count);
    }

    internal void Wake()
    {
        // Bounded wake-ups: one pending release is enough to end a wait.
        if (_wake.CurrentCount == 0)
        {
            _wake.Release();
        }
    }

    private void DropCancelled()
    {
        for (var node = _waiting.First; node is not null;)
        {
            var next = node.Next;
            if (node.Value.CancelRequested)
            {
                node.Value.Abort(null);
                _waiting.Remove(node);
            }
            else if (node.Value.Session is { Call.CancelRequested: true } session)
            {
                _waiting.Remove(node); // a session's first call, not admitted yet: nothing was fed
                session.Refuse(new OperationCanceledException($"session {session.Id}'s call was cancelled", session.Call.CancellationToken));
            }

            node = next;
        }

        foreach (var r in _running.Where(r => r.CancelRequested || r.Session?.Call?.CancelRequested == true).ToList())
        {
            if (r.CancelRequested)
            {
                Retire(r, null, null);
            }
            else
            {
                DropCall(r, r.Session!);
            }
        }
    }

    /// <summary>
    /// Removes the cancelled call of <paramref name="session"/> (running as <paramref name="r"/>): what the steps fed of it leaves
    /// the cache (<see cref="IStepRunner.Truncate"/>) and the blocks reserved for it go back; the session is as before the call.
    /// A runner that cannot drop positions (<see cref="SessionStepRunner"/>) loses the session when part of the call was fed.
    /// </summary>
    private void DropCall(ScheduledRequest r, ScheduledSession session)
    {
        var call = session.Call!;
        var kept = r.Tokens.Count - call.Tokens.Length;
        if (r.Fed > kept)
        {
            try
            {
                _runner.Truncate(r.Slot, kept);
            }
            catch (NotSupportedException e)
            {
                Retire(r, null, new InvalidOperationException($"session {r.Id}'s call was cancelled after part of it was fed, and the runner cannot drop positions", e));
                return;
            }

            r.Fed = kept;
        }

        _blocks.Truncate(r.Slot, kept);
        session.Refuse(new OperationCanceledException($"session {r.Id}'s call was cancelled", call.CancellationToken));
    }

    private void Admit()
    {
        while (_sessionCalls.TryDequeue(out var call))
        {
            TakeCall(call.Session, call.Call);
        }

        while (_submitted.TryDequeue(out var r))
        {
            if (r.CancelRequested)
            {
                r.Abort(null);
                continue;
            }

            _waiting.AddLast(r);
        }

        // First come, first served: a request that does not fit blocks the ones behind it (no starvation).
        while (_waiting.First is { } node)
        {
            var r = node.Value;
            var slot = -1;
            if (_running.Count >= _options.MaxBatch || !_blocks.TryAdmit(r.Tokens.Count, out slot))
            {
                var sessions = _running.Count(o => o.Session is not null);
                if (sessions == _running.Count)
                {
                    // Nothing will ever free blocks or a slot for it: no request runs, and sessions keep theirs until disposed.
                    _waiting.RemoveFirst();
                    var held = sessions == 0 ? "" : $"; {sessions} open sessions hold the rest until disposed";
                    var full = new KvCacheFullException(
                        $"{(r.Session is null ? "request" : "session")} {r.Id} needs {KvBlockManager.BlocksFor(r.Tokens.Count)} blocks and a slot; the pool has {_blocks.FreeBlocks} blocks and {Math.Min(_blocks.FreeSlots, _options.MaxBatch - _running.Count)} slots free{held}");
                    if (r.Session is { } s)
                    {
                        s.Refuse(full);
                    }
                    else
                    {
                        r.Abort(full);
                    }

                    continue;
                }

                break;
            }

            _waiting.RemoveFirst();
            r.Slot = slot;
            r.Fed = 0;
            r.Speculative &= _drafting; // submitted (or preempted) before Auto stopped drafting
            _runner.Open(slot, r.Speculative);
            _running.Add(r);
            Volatile.Write(ref _runningCount, _running.Count);
        }
    }

    private List<StepSequence> BuildBatch(out List<ScheduledRequest> owners)
    {
        var batch = new List<StepSequence>();
        var inStep = new List<ScheduledRequest>();
        owners = inStep;
        var budget = _options.MaxTokensPerStep;

        // Decode first: every request with one token left to feed advances (with its draft, if any).
        foreach (var r in _running.ToList())
        {
            if (r.Slot < 0 || r.Tokens.Count - r.Fed != 1)
            {
                continue;
            }

            var count = r.Draft is null ? 1 : 2;
            while (r.Slot >= 0 && !_blocks.TryReserve(r.Slot, r.Fed + count))
            {
                if (count == 2)
                {
                    r.Draft = null; // verify nothing rather than preempt someone for a draft
                    count = 1;
                }
                else if (Victim(except: r, inStep) is { } victim)
                {
                    Preempt(victim);
                }
                else if (inStep.Count > 0)
                {
                    Preempt(r); // the requests already in this step will free blocks as they finish
                }
                else
                {
                    Retire(r, null, new KvCacheFullException(
                        $"request {r.Id} cannot grow to {r.Fed + count} tokens: the pool has {_blocks.TotalBlocks} blocks"));
                }
            }

            if (r.Slot < 0)
            {
                continue;
            }

            int[] tokens = r.Draft is { } d ? [r.Tokens[^1], d] : [r.Tokens[^1]];
            batch.Add(new StepSequence(r.Slot, r.Fed, tokens, count, r.PromptEnd));
            owners.Add(r);
            budget -= count;
        }

        // Then prompt chunks (admission reserved their blocks), oldest first, within the budget left.
        foreach (var r in _running)
        {
            var left = r.Tokens.Count - r.Fed;
            if (budget <= 0)
            {
                break;
            }

            if (r.Slot < 0 || left <= 1)
            {
                continue;
            }

            var chunk = Math.Min(left, budget);
            batch.Add(new StepSequence(r.Slot, r.Fed, r.Tokens.GetRange(r.Fed, chunk).ToArray(), chunk == left ? 1 : 0, r.PromptEnd));
            owners.Add(r);
            budget -= chunk;
        }

        return batch;
    }

    /// <summary>The newest running request (never a session) other than <paramref name="except"/> and those in <paramref name="inStep"/>: whom growth preempts.</summary>
    private ScheduledRequest? Victim(ScheduledRequest except, List<ScheduledRequest>? inStep) =>
        _running.LastOrDefault(o => o != except && o.Session is null && inStep?.Contains(o) != true);

    /// <summary>
    /// Takes <paramref name="call"/> of <paramref name="session"/>: its tokens to feed, and the blocks they need (a session
    /// holding a slot grows now, preempting requests as growth does; a new one waits for admission in turn). A call that
    /// cannot get its blocks fails and leaves the session as it was.
    /// </summary>
    private void TakeCall(ScheduledSession session, SessionCall call)
    {
        var r = session.Participant;
        if (r.CancelRequested)
        {
            call.Fail(new ObjectDisposedException(nameof(ScheduledSession), $"session {r.Id} was disposed"));
            return;
        }

        var end = r.Tokens.Count + call.Tokens.Length;
        if (r.Slot >= 0)
        {
            // Preempt only when the requests' blocks are enough: else the call fails and they go on.
            var need = KvBlockManager.BlocksFor(end) - _blocks.Blocks(r.Slot).Length;
            var requests = _running.Where(o => o.Session is null).Sum(o => _blocks.Blocks(o.Slot).Length);
            if (need > _blocks.FreeBlocks + requests)
            {
                call.Fail(new KvCacheFullException(
                    $"session {r.Id} cannot grow to {end} tokens: it needs {need} more blocks; {_blocks.FreeBlocks} of {_blocks.TotalBlocks} are free, {requests} held by running requests and the rest by open sessions"));
                return;
            }

            while (!_blocks.TryReserve(r.Slot, end))
            {
                Preempt(Victim(except: r, inStep: null)!);
            }
        }
        else
        {
            _waiting.AddLast(r);
        }

        r.PromptEnd = call.Tokens.Length > LayerSteps.AbsorbedRows ? end : 0;
        r.Tokens.AddRange(call.Tokens);
        session.Call = call;
    }

    /// <summary>Frees <paramref name="victim"/>'s slot and blocks and queues it first, to be prefilled again with its tokens so far.</summary>
    private void Preempt(ScheduledRequest victim)
    {
        _runner.Close(victim.Slot);
        _blocks.Free(victim.Slot);
        victim.Slot = -1;
        victim.Fed = 0;
        victim.Draft = null;
        _running.Remove(victim);
        Volatile.Write(ref _runningCount, _running.Count);
        _waiting.AddFirst(victim);
        Interlocked.Increment(ref _preemptions);
    }

    /// <summary>Takes the step's tokens for <paramref name="r"/>, whose logit rows start at <paramref name="row"/>; returns the finish reason when it ended.</summary>
    private FinishReason? Sample(ScheduledRequest r, StepSequence entry, int row, int v)
    {
        r.Steps++;
        Interlocked.Increment(ref _steps);
        var draft = entry.LogitRows == 2 ? r.Draft : null;
        r.Draft = null;
        var first = Choose(r, row, v);
        if (draft is { } d)
        {
            if (first == d)
            {
                if (Emit(r, first) is { } early)
                {
                    return early; // ended at the draft itself: the verification was moot, counted as neither
                }

                r.Drafted++;
                r.Accepted++;
                Interlocked.Increment(ref _drafted);
                Interlocked.Increment(ref _accepted);
                Judge(accepted: true);
                return Emit(r, Choose(r, row + 1, v));
            }

            r.Drafted++;
            Interlocked.Increment(ref _drafted);
            Judge(accepted: false);
            r.Fed--;
            _runner.Truncate(r.Slot, r.Fed);
            _blocks.Truncate(r.Slot, r.Fed);
        }

        return Emit(r, first);
    }

    /// <summary>Row <paramref name="row"/>'s token: the one chosen where the logits are, or one sampled here from the row.</summary>
    private int Choose(ScheduledRequest r, int row, int v)
    {
        var id = _chosen[row];
        r.NextDraft = _draftsAfter[row];
        return id != TokenSampling.NotChosen ? r.Sampler.Accept(id) : r.Sampler.SampleModelRow(_logits.AsSpan(row * v, v), _options.SamplingVocabSize ?? v);
    }

    private FinishReason? Emit(ScheduledRequest r, int token)
    {
        r.Emit(token);
        Interlocked.Increment(ref _generated);
        if (token == _options.EosId)
        {
            return FinishReason.EndOfSequence;
        }

        // The next step would feed the token just sampled at position Count - 1.
        if (r.Generated >= r.MaxTokens || r.Tokens.Count > ContextLimit)
        {
            return FinishReason.Length;
        }

        return null;
    }

    /// <summary>Auto: counts a verified draft into the window and stops drafting after a poor window.</summary>
    private void Judge(bool accepted)
    {
        if (_options.SpeculativeDecoding != SpeculativeDecodingMode.Auto || !_drafting)
        {
            return;
        }

        _windowDrafted++;
        _windowAccepted += accepted ? 1 : 0;
        if (_windowDrafted < _options.AutoWindow)
        {
            return;
        }

        var rate = (double)_windowAccepted / _windowDrafted;
        if (rate < _options.AutoMinAcceptanceRate)
        {
            // Other requests of this step still verify the drafts they carry (their fed tokens depend on
            // it); DraftNext makes no new ones, and tells the runner at the end of the step.
            _drafting = false;
            _stopDraftingSlots = true;
            Log.SpeculativeDecodingStopped(_logger, _windowAccepted, _windowDrafted, rate, _options.AutoMinAcceptanceRate);
        }

        _windowDrafted = 0;
        _windowAccepted = 0;
    }

    /// <summary>
    /// Whether <paramref name="r"/> drafts once it holds <paramref name="ahead"/> more tokens: a drafting request with room
    /// for a verify step (it feeds two tokens and yields up to two: pointless when one more is all that is allowed).
    /// </summary>
    private bool MayDraft(ScheduledRequest r, int ahead) =>
        r.Speculative && r.Generated + ahead + 2 <= r.MaxTokens && r.Tokens.Count + ahead + 1 <= ContextLimit;

    private void DraftNext()
    {
        if (_stopDraftingSlots)
        {
            _stopDraftingSlots = false;
            foreach (var r in _running.Where(r => r.Speculative))
            {
                r.Speculative = false;
                if (r.Slot >= 0)
                {
                    _runner.StopDrafting(r.Slot);
                }
            }
        }

        if (!_drafting)
        {
            return;
        }

        var drafting = _running.Where(r => r.Slot >= 0 && r.Tokens.Count - r.Fed == 1 && MayDraft(r, ahead: 0)).ToList();
        // Those the step drafted for take that draft; the others draft apart.
        foreach (var r in drafting.Where(r => r.NextDraft >= 0))
        {
            r.Draft = r.NextDraft;
        }

        drafting.RemoveAll(r => r.NextDraft >= 0);
        if (drafting.Count == 0)
        {
            return;
        }

        var v = _runner.VocabSize;
        var limit = _options.SamplingVocabSize ?? v;
        Room(drafting.Count, v);
        var choices = _choices.AsSpan(0, drafting.Count);
        choices.Fill(TokenChoice.Greedy(limit)); // a draft is the MTP head's greedy token
        try
        {
            _runner.DraftAndChoose([.. drafting.Select(r => new DraftSequence(r.Slot, r.Tokens[^1]))], choices, _chosen.AsSpan(0, drafting.Count), _logits);
        }
        catch (Exception e)
        {
            // Their MTP state is unknown now: end them, keep the others.
            foreach (var r in drafting)
            {
                Retire(r, null, e);
            }

            throw;
        }

        for (var i = 0; i < drafting.Count; i++)
        {
            // A draft is only a guess the next step verifies: a row that cannot be sampled still gives its argmax.
            if (_chosen[i] == TokenSampling.NotChosen)
            {
                var row = _logits.AsSpan(i * v, v);
                Sampler.MaskPadding(row, limit);
                _chosen[i] = Sampler.ArgMax(row);
            }

            drafting[i].Draft = _chosen[i];
        }
    }

    /// <summary>Makes the step's host buffers hold <paramref name="rows"/> rows (choices, chosen ids, logits of the rows the host reads).</summary>
    private void Room(int rows, int v)
    {
        if (_choices.Length < rows)
        {
            _logits = new float[rows * v];
            _choices = new TokenChoice[rows];
            _chosen = new int[rows];
            _draftsAfter = new int[rows];
        }
    }

    private void Retire(ScheduledRequest r, FinishReason? reason, Exception? error)
    {
        if (r.Slot >= 0)
        {
            _runner.Close(r.Slot);
            _blocks.Free(r.Slot);
            r.Slot = -1;
        }

        _running.Remove(r);
        Volatile.Write(ref _runningCount, _running.Count);
        if (reason is { } finish)
        {
            if (r.Speculative)
            {
                Log.SpeculativeRequestFinished(_logger, r.Id, r.Generated, r.Steps, r.Drafted, r.Accepted, r.Counters.AcceptanceRate);
            }

            r.Finish(finish);
        }
        else
        {
            r.Abort(error);
        }
    }

    /// <summary>Cancels every queued and running request and returns their blocks.</summary>
    public void Dispose()
    {
        lock (_stepLock)
        {
            if (_disposed)
            {
                return;
            }

            _disposed = true;
            foreach (var r in _running.ToList())
            {
                Retire(r, null, null);
            }

            foreach (var r in _waiting.Concat(_submitted))
            {
                r.Abort(null);
            }

            while (_sessionCalls.TryDequeue(out var call))
            {
                call.Call.Fail(new ObjectDisposedException(nameof(BatchScheduler)));
            }

            _waiting.Clear();
            _submitted.Clear();
            var c = Counters;
            if (c.Drafted > 0)
            {
                Log.SpeculativeTotals(_logger, c.GeneratedTokens, c.Steps, c.Drafted, c.Accepted, c.AcceptanceRate);
            }
        }

        Wake();
    }
}

internal static partial class Log
{
    [LoggerMessage(EventId = 100, Level = LogLevel.Error, Message = "A scheduler step failed; its requests were ended")]
    public static partial void StepFailed(ILogger logger, Exception exception);

    [LoggerMessage(EventId = 103, Level = LogLevel.Warning, Message = "Request {Id} failed and was ended alone; the rest of its step went on")]
    public static partial void RequestFailed(ILogger logger, long id, Exception exception);

    [LoggerMessage(EventId = 101, Level = LogLevel.Debug, Message = "Request {Id} finished: {Tokens} tokens in {Steps} steps, MTP drafts {Drafted}, accepted {Accepted} ({AcceptanceRate:P1})")]
    public static partial void SpeculativeRequestFinished(ILogger logger, long id, int tokens, long steps, long drafted, long accepted, double acceptanceRate);

    [LoggerMessage(EventId = 104, Level = LogLevel.Information, Message = "MTP drafting switched off (speculative decoding auto): {Accepted} of the last {Drafted} drafts accepted ({AcceptanceRate:P1}), below {Threshold:P0}")]
    public static partial void SpeculativeDecodingStopped(ILogger logger, long accepted, long drafted, double acceptanceRate, double threshold);

    [LoggerMessage(EventId = 102, Level = LogLevel.Information, Message = "Speculative decoding: {Tokens} tokens in {Steps} steps, MTP drafts {Drafted}, accepted {Accepted} ({AcceptanceRate:P1})")]
    public static partial void SpeculativeTotals(ILogger logger, long tokens, long steps, long drafted, long accepted, double acceptanceRate);
}
