using DeepSeekCuda.Inference;
using DeepSeekCuda.Model;

namespace DeepSeekCuda.Serving;

/// <summary>
/// A session of a <see cref="BatchScheduler"/> (<see cref="BatchScheduler.CreateSession"/>): each call's tokens are fed by the
/// scheduler's steps through its participant, a request the scheduler keeps in a slot of its pool while the session is open and
/// never samples for. Calls come from one thread at a time; the scheduler's side (<see cref="Answer"/>, <see cref="Refuse"/>,
/// <see cref="End"/>) runs on its step thread, and a call's completion orders what it wrote before what the caller reads.
/// </summary>
internal sealed class SchedulerSession : IModelSession
{
    private readonly BatchScheduler _scheduler;
    private readonly float[] _logits;   // the running call's last logits, written by the scheduler
    private int _busy;                  // 1 while a call runs
    private volatile Exception? _lost;  // why the cache is gone (a failed step, a disposed scheduler)
    private bool _disposed;

    public SchedulerSession(BatchScheduler scheduler, long id)
    {
        _scheduler = scheduler;
        _logits = new float[scheduler.VocabSize];
        Participant = new ScheduledRequest(scheduler, id, [], new SamplingOptions(), constraint: null, speculative: false) { Session = this };
    }

    /// <summary>What the scheduler feeds: Tokens holds every token of the session, those of the running call last.</summary>
    internal ScheduledRequest Participant { get; }

    /// <summary>Whether a call is running (its caller waits for the scheduler).</summary>
    internal bool IsRunningCall => Volatile.Read(ref _busy) != 0;

    /// <summary>The running call, while the scheduler holds it (scheduler thread).</summary>
    internal SessionCall? Call { get; set; }

    /// <inheritdoc />
    public int Length { get; private set; }

    /// <inheritdoc />
    /// <remarks>
    /// Waits until the scheduler has run the call (see <see cref="BatchScheduler.CreateSession"/>).
    /// </remarks>
    /// <exception cref="KvCacheFullException">The pool cannot hold the session's tokens beside what open sessions hold; the session is unchanged.</exception>
    /// <exception cref="InvalidOperationException">Another call of this session is running, or a failed step lost the session's cache.</exception>
    /// <exception cref="ObjectDisposedException">The session or its scheduler was disposed.</exception>
    public void Forward(ReadOnlySpan<int> tokens, Span<float> lastLogits)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ThrowIfLost();
        if (lastLogits.Length < _logits.Length)
        {
            throw new ArgumentException($"lastLogits holds {lastLogits.Length} values; the vocabulary has {_logits.Length}", nameof(lastLogits));
        }

        LayerSteps.CheckStep(tokens, Length, _scheduler.ContextLimit, _logits.Length);
        if (Interlocked.Exchange(ref _busy, 1) != 0)
        {
            throw new InvalidOperationException($"session {Participant.Id} is already running a call; a session runs one call at a time");
        }

        try
        {
            var call = new SessionCall([.. tokens]);
            _scheduler.Feed(this, call);
            call.Done.Task.GetAwaiter().GetResult(); // rethrows the call's own exception
            _logits.CopyTo(lastLogits);
            Length += tokens.Length;
        }
        finally
        {
            Volatile.Write(ref _busy, 0);
        }
    }

    /// <summary>The running call's last row: its logits, and the call returns (scheduler thread).</summary>
    internal void Answer(ReadOnlySpan<float> logits)
    {
        logits.CopyTo(_logits);
        var call = Call!;
        Call = null;
        call.Done.TrySetResult();
    }

    /// <summary>The running call could not be admitted: its tokens are dropped and it fails with <paramref name="error"/>; the session is as before it (scheduler thread).</summary>
    internal void Refuse(Exception error)
    {
        var call = Call!;
        Call = null;
        Participant.Tokens.RemoveRange(Participant.Tokens.Count - call.Tokens.Length, call.Tokens.Length);
        Participant.PromptEnd = 0;
        call.Fail(error);
    }

    /// <summary>
    /// The scheduler let the participant go (<see cref="ScheduledRequest.Abort"/>, scheduler thread): disposed, its scheduler disposed, or a failed step
    /// (<paramref name="error"/>). Its running call fails; unless disposed, the session can run no more calls.
    /// </summary>
    internal void End(Exception? error)
    {
        if (!Participant.CancelRequested)
        {
            _lost = error ?? new ObjectDisposedException(nameof(BatchScheduler), $"the scheduler of session {Participant.Id} was disposed");
        }

        var call = Call;
        Call = null;
        call?.Fail(_lost ?? new ObjectDisposedException(nameof(IModelSession), $"session {Participant.Id} was disposed"));
    }

    private void ThrowIfLost()
    {
        switch (_lost)
        {
            case null:
                return;
            case ObjectDisposedException:
                throw new ObjectDisposedException(nameof(BatchScheduler), $"the scheduler of session {Participant.Id} was disposed");
            case var lost:
                throw new InvalidOperationException($"session {Participant.Id} lost its cache when a step failed ({lost.Message}); open a new session", lost);
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

/// <summary>One <see cref="SchedulerSession.Forward"/> call as the scheduler holds it: its tokens, and its completion.</summary>
internal sealed class SessionCall(int[] tokens)
{
    public int[] Tokens { get; } = tokens;

    public TaskCompletionSource Done { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);

    public void Fail(Exception error) => Done.TrySetException(error);
}
