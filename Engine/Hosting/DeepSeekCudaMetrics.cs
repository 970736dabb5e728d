using System.Diagnostics.Metrics;

namespace DeepSeekCuda.Hosting;

/// <summary>
/// The "DeepSeekCuda" meter: time to first token, decode throughput, tokens in and out. One instance per
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

    /// <summary>Time to first token, seconds.</summary>
    public Histogram<double> TimeToFirstToken { get; }

    /// <summary>Decode throughput, tokens per second.</summary>
    public Histogram<double> TokensPerSecond { get; }

    /// <summary>Prompt tokens.</summary>
    public Counter<long> TokensIn { get; }

    /// <summary>Generated tokens.</summary>
    public Counter<long> TokensOut { get; }

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
