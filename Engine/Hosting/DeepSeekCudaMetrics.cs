using System.Diagnostics.Metrics;

namespace DeepSeekCuda.Hosting;

/// <summary>
/// The "DeepSeekCuda" meter: time to first token, decode throughput, tokens in and out, and the scheduler's
/// batch size and MTP acceptance (observed when collected). One instance per
/// chat client (no static meter), created through <see cref="IMeterFactory"/> when the host has one so
/// the host owns its lifetime and scope.
/// </summary>
public sealed class DeepSeekCudaMetrics : IDisposable
{
    /// <summary>The meter name to listen to.</summary>
    public const string MeterName = "DeepSeekCuda";

    /// <summary>Histogram: seconds from request to the first generated token (prompt encoding and prefill).</summary>
    public const string TimeToFirstTokenName = "deepseekcuda.time_to_first_token";

    /// <summary>Histogram: generated tokens per second after the first one (decode throughput).</summary>
    public const string TokensPerSecondName = "deepseekcuda.tokens_per_second";

    /// <summary>Counter: prompt tokens processed.</summary>
    public const string TokensInName = "deepseekcuda.tokens.input";

    /// <summary>Counter: tokens generated.</summary>
    public const string TokensOutName = "deepseekcuda.tokens.output";

    /// <summary>Gauge: requests holding a batch slot of the scheduler (the running batch size).</summary>
    public const string RunningRequestsName = "deepseekcuda.batch.running";

    /// <summary>Counter: scheduler steps that sampled (a request's share of a forward pass counts once per request).</summary>
    public const string DecodeStepsName = "deepseekcuda.decode.steps";

    /// <summary>Counter: MTP drafts verified by the main model.</summary>
    public const string DraftedName = "deepseekcuda.mtp.drafted";

    /// <summary>Counter: MTP drafts accepted (each one a token gained without its own step).</summary>
    public const string AcceptedName = "deepseekcuda.mtp.accepted";

    /// <summary>Gauge: accepted / drafted MTP drafts since the client started (0 before any draft).</summary>
    public const string AcceptanceRateName = "deepseekcuda.mtp.acceptance_rate";

    /// <summary>Gauge: KV cache blocks free in the scheduler's pool.</summary>
    public const string KvBlocksFreeName = "deepseekcuda.kv.blocks_free";

    /// <summary>Gauge: KV cache blocks held by requests.</summary>
    public const string KvBlocksUsedName = "deepseekcuda.kv.blocks_used";

    private readonly Meter _meter;
    private readonly bool _ownsMeter;
    private readonly KeyValuePair<string, object?> _modelTag;

    /// <summary>Creates the instruments.</summary>
    /// <param name="modelId">Recorded as the <c>model</c> tag on every measurement.</param>
    /// <param name="meterFactory">The host's factory, or null for a meter this object owns.</param>
    public DeepSeekCudaMetrics(string modelId, IMeterFactory? meterFactory = null)
    {
        _meter = meterFactory?.Create(MeterName) ?? new Meter(MeterName);
        _ownsMeter = meterFactory is null;
        _modelTag = new("model", modelId);
        TimeToFirstToken = _meter.CreateHistogram<double>(TimeToFirstTokenName, "s", "Time from request to the first generated token");
        TokensPerSecond = _meter.CreateHistogram<double>(TokensPerSecondName, "{token}/s", "Generated tokens per second after the first token");
        TokensIn = _meter.CreateCounter<long>(TokensInName, "{token}", "Prompt tokens processed");
        TokensOut = _meter.CreateCounter<long>(TokensOutName, "{token}", "Tokens generated");
    }

    /// <summary>
    /// The meter these instruments belong to, so that an exporter (the server's <c>/metrics</c>) can listen to this
    /// client's instruments only, where several clients share the meter name in one process.
    /// </summary>
    public Meter Meter => _meter;

    /// <summary>Time to first token, seconds.</summary>
    public Histogram<double> TimeToFirstToken { get; }

    /// <summary>Decode throughput, tokens per second.</summary>
    public Histogram<double> TokensPerSecond { get; }

    /// <summary>Prompt tokens.</summary>
    public Counter<long> TokensIn { get; }

    /// <summary>Generated tokens.</summary>
    public Counter<long> TokensOut { get; }

    /// <summary>
    /// Adds the scheduler's instruments, read at collection time from its counters: running requests,
    /// steps, KV cache blocks free and used, MTP drafts, acceptances and their rate. Tokens per step = output tokens / steps.
    /// </summary>
    internal void ObserveScheduler(Serving.BatchScheduler scheduler)
    {
        _meter.CreateObservableGauge(RunningRequestsName, () => new Measurement<int>(scheduler.RunningCount, _modelTag), "{request}", "Requests holding a batch slot");
        _meter.CreateObservableCounter(DecodeStepsName, () => new Measurement<long>(scheduler.Counters.Steps, _modelTag), "{step}", "Per-request decode steps that sampled");
        _meter.CreateObservableCounter(DraftedName, () => new Measurement<long>(scheduler.Counters.Drafted, _modelTag), "{token}", "MTP drafts verified");
        _meter.CreateObservableCounter(AcceptedName, () => new Measurement<long>(scheduler.Counters.Accepted, _modelTag), "{token}", "MTP drafts accepted");
        var blocks = scheduler.Blocks;
        _meter.CreateObservableGauge(KvBlocksFreeName, () => new Measurement<int>(blocks.FreeBlocks, _modelTag), "{block}", "KV cache blocks free");
        _meter.CreateObservableGauge(KvBlocksUsedName, () => new Measurement<int>(blocks.TotalBlocks - blocks.FreeBlocks, _modelTag), "{block}", "KV cache blocks held by requests");
        _meter.CreateObservableGauge(AcceptanceRateName, () => new Measurement<double>(scheduler.Counters.AcceptanceRate, _modelTag), null, "Accepted / drafted MTP drafts");
    }

    internal void RecordFirstToken(double seconds) => TimeToFirstToken.Record(seconds, _modelTag);

    internal void RecordCompleted(int promptTokens, int generatedTokens, double tokensPerSecond)
    {
        TokensIn.Add(promptTokens, _modelTag);
        TokensOut.Add(generatedTokens, _modelTag);
        if (tokensPerSecond > 0)
        {
            TokensPerSecond.Record(tokensPerSecond, _modelTag);
        }
    }

    /// <inheritdoc/>
    public void Dispose()
    {
        if (_ownsMeter)
        {
            _meter.Dispose();
        }
    }
}
