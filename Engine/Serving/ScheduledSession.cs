using DeepSeekCuda.Inference;
using DeepSeekCuda.Model;

namespace DeepSeekCuda.Serving;

/// <summary>
/// A session of a <see cref="BatchScheduler"/> (<see cref="BatchScheduler.CreateSession"/>): a sequence its caller feeds, whose
/// calls run as entries of the scheduler's steps, in its block pool, beside its requests. A call waits for the steps that feed
/// it, so the scheduler must be running (<see cref="BatchScheduler.RunAsync"/>). One call at a time.
/// </summary>
/// <remarks>
/// The scheduler feeds the session's tokens through its participant, a request it keeps in a slot while the session is open
/// and never samples for. The scheduler's side (<see cref="Answer"/>, <see cref="Refuse"/>, <see cref="End"/>) runs on its
/// step thread; a call's completion orders what the scheduler wrote before what the caller reads.
/// </remarks>
public sealed class ScheduledSession : IModelSession
{
    private readonly BatchScheduler _scheduler;
    private readonly float[] _logits;   // the running call's last logits, written by the scheduler
    private int _busy;                  // 1 while a call runs
    private volatile Exception? _lost;  // why the cache is gone (a failed step, a disposed scheduler)
    private bool _disposed;

    internal ScheduledSession(BatchScheduler scheduler, long id)
    {
        _scheduler = scheduler;
        _logits = new float[scheduler.VocabSize];
        Participant = new ScheduledRequest(scheduler, id, [], new SamplingOptions(), constraint: null, speculative: false) { Session = this };
    }

    /// <summary>Creation order, shared with the scheduler's requests (the logs' id).</summary>
    public long Id => Participant.Id;

    /// <inheritdoc />
    public int Length { get; private set; }

    /// <summary>What the scheduler feeds: Tokens holds every token of the session, those of the running call last.</summary>
    internal ScheduledRequest Participant { get; }

    /// <summary>Whether a call is running (its caller waits for the scheduler).</summary>
    internal bool IsRunningCall => Volatile.Read(ref _busy) != 0;

    /// <summary>The running call, while the scheduler holds it (scheduler thread).</summary>
    internal SessionCall? Call { get; set; }

    /// <inheritdoc />
    /// <remarks>Blocks until the scheduler has run the call; <see cref="ForwardAsync"/> waits without a thread.</remarks>
    /// <exception cref="KvCacheFullException">The pool cannot hold the session's tokens beside what open sessions hold; the session is unchanged.</exception>
    /// <exception cref="InvalidOperationException">Another call of this session is running, or a failed step lost the session's cache.</exception>
    /// <exception cref="ObjectDisposedException">The session or its scheduler was disposed.</exception>
    public void Forward(ReadOnlySpan<int> tokens, Span<float> lastLogits)
    {
        var call = Begin(tokens, lastLogits.Length, CancellationToken.None);
        try
        {
            call.Done.Task.GetAwaiter().GetResult(); // rethrows the call's own exception
            Finish(call, lastLogits);
        }
        finally
        {
            call.Dispose();
            Volatile.Write(ref _busy, 0);
        }
    }

    /// <summary>
    /// <see cref="Forward"/> without holding a thread while the scheduler runs the call. Cancelling it removes the call: what the
    /// steps had fed of it is dropped from the cache and its blocks go back (before the scheduler's next step), the session
    /// stays as it was, and the task ends with an <see cref="OperationCanceledException"/>, unless the call had already run.
    /// </summary>
    /// <inheritdoc cref="Forward" path="/exception"/>
    /// <exception cref="OperationCanceledException"><paramref name="cancellationToken"/> fired first; the session is unchanged.</exception>
    public async Task ForwardAsync(ReadOnlyMemory<int> tokens, Memory<float> lastLogits, CancellationToken cancellationToken = default)
    {
        var call = Begin(tokens.Span, lastLogits.Length, cancellationToken);
        try
        {
            await call.Done.Task.ConfigureAwait(false);
            Finish(call, lastLogits.Span);
        }
        finally
        {
            call.Dispose();
            Volatile.Write(ref _busy, 0);
        }
    }

    /// <summary>Checks a call and queues it; from here on the session is busy until the caller's finally.</summary>
    private SessionCall Begin(ReadOnlySpan<int> tokens, int logitsLength, CancellationToken cancellationToken)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ThrowIfLost();
        if (logitsLength < _logits.Length)
        {
            throw new ArgumentException($"lastLogits holds {logitsLength} values; the vocabulary has {_logits.Length}", "lastLogits");
        }

        LayerSteps.CheckStep(tokens, Length, _scheduler.ContextLimit, _logits.Length);
        cancellationToken.ThrowIfCancellationRequested();
        if (Interlocked.Exchange(ref _busy, 1) != 0)
        {
            throw new InvalidOperationException($"session {Id} is already running a call; a session runs one call at a time");
        }

        var call = new SessionCall([.. tokens], _scheduler, cancellationToken);
        _scheduler.Feed(this, call);
        return call;
    }

    private void Finish(SessionCall call, Span<float> lastLogits)
    {
        _logits.CopyTo(lastLogits);
        Length += call.Tokens.Length;
    }

    /// <summary>The running call's last row: its logits, and the call returns (scheduler thread).</summary>
    internal void Answer(ReadOnlySpan<float> logits)
    {
        logits.CopyTo(_logits);
        var call = Call!;
        Call = null;
        call.Done.TrySetResult();
    }

    /// <summary>
    /// The running call goes without feeding anything (refused, or cancelled; the scheduler has dropped what was fed of it): its
    /// tokens are dropped and it fails with <paramref name="error"/>; the session is as before it (scheduler thread).
    /// </summary>
    internal void Refuse(Exception error)
    {
        var call = Call!;
        Call = null;
        Participant.Tokens.RemoveRange(Participant.Tokens.Count - call.Tokens.Length, call.Tokens.Length);
        call.Fail(error);
    }

    /// <summary>
    /// The scheduler let the participant go (<see cref="ScheduledRequest.Abort"/>, scheduler thread): disposed, its scheduler
    /// disposed, or a failed step (<paramref name="error"/>). Its running call fails; unless disposed, the session can run no more calls.
    /// </summary>
    internal void End(Exception? error)
    {
        if (!Participant.CancelRequested)
        {
            _lost = error ?? new ObjectDisposedException(nameof(BatchScheduler), $"the scheduler of session {Id} was disposed");
        }

        var call = Call;
        Call = null;
        call?.Fail(_lost ?? new ObjectDisposedException(nameof(ScheduledSession), $"session {Id} was disposed"));
    }

    private void ThrowIfLost()
    {
        switch (_lost)
        {
            case null:
                return;
            case ObjectDisposedException:
                throw new ObjectDisposedException(nameof(BatchScheduler), $"the scheduler of session {Id} was disposed");
            case var lost:
                throw new InvalidOperationException($"session {Id} lost its cache when a step failed ({lost.Message}); open a new session", lost);
        }
    }

    /// <summary>Returns the session's slot and blocks to the pool before the scheduler's next step.</summary>
    public void Dispose()
    {
        if (_disposed)
        {
            return;
        }

        _disposed = true;
        Participant.Cancel();
    }
}

/// <summary>One call of a <see cref="ScheduledSession"/> as the scheduler holds it: its tokens, its completion, and its cancellation.</summary>
internal sealed class SessionCall : IDisposable
{
    private readonly CancellationTokenRegistration _cancellation;
    private volatile bool _cancelRequested;

    public SessionCall(int[] tokens, BatchScheduler scheduler, CancellationToken cancellationToken)
    {
        Tokens = tokens;
        CancellationToken = cancellationToken;
        _cancellation = cancellationToken.Register(() =>
        {
            _cancelRequested = true;
            scheduler.Wake();
        });
    }

    public int[] Tokens { get; }

    public TaskCompletionSource Done { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);

    /// <summary>The caller's token: a call it cancels is removed at the scheduler's next step.</summary>
    public CancellationToken CancellationToken { get; }

    public bool CancelRequested => _cancelRequested;

    public void Fail(Exception error) => Done.TrySetException(error);

    public void Dispose() => _cancellation.Dispose();
}
