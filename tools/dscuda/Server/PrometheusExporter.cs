using System.Diagnostics.Metrics;
using System.Globalization;
using System.Text;

namespace DeepSeekCuda.Cli.Server;

/// <summary>
/// Renders one meter's instruments in the Prometheus text format (version 0.0.4) for <c>GET /metrics</c>.
/// Counters become <c>name_total</c>, gauges their last value, histograms a summary of <c>_sum</c> and
/// <c>_count</c> (no buckets: the meter declares none, and guessed ones would mislead). Dots in instrument names
/// become underscores; tags become labels.
/// </summary>
/// <remarks>
/// Written here rather than with OpenTelemetry's Prometheus exporter: that exporter is a prerelease package and
/// pulls the OpenTelemetry SDK into the trimmed GPU bundle, for what is a page of text over one meter. Listening
/// to the meter object itself (not its name) keeps the clients of other servers or tests in the same process out.
/// </remarks>
internal sealed class PrometheusExporter : IDisposable
{
    private readonly Meter _meter;
    private readonly MeterListener _listener = new();
    private readonly Lock _lock = new();

    // instrument -> label set -> value (running sum for counters and histograms, last value for the rest)
    private readonly Dictionary<Instrument, Dictionary<string, (double Sum, long Count)>> _values = [];

    public PrometheusExporter(Meter meter)
    {
        _meter = meter;
        _listener.InstrumentPublished = (instrument, listener) =>
        {
            if (ReferenceEquals(instrument.Meter, _meter))
            {
                listener.EnableMeasurementEvents(instrument);
            }
        };
        _listener.SetMeasurementEventCallback<int>((i, v, tags, _) => Record(i, v, tags));
        _listener.SetMeasurementEventCallback<long>((i, v, tags, _) => Record(i, v, tags));
        _listener.SetMeasurementEventCallback<double>((i, v, tags, _) => Record(i, v, tags));
        _listener.Start();
    }

    /// <summary>The text of one scrape: observable instruments are read now.</summary>
    public string Scrape()
    {
        lock (_lock)
        {
            _listener.RecordObservableInstruments();
            var text = new StringBuilder();
            foreach (var (instrument, series) in _values.OrderBy(p => p.Key.Name, StringComparer.Ordinal))
            {
                var kind = KindOf(instrument);
                var name = instrument.Name.Replace('.', '_').Replace('-', '_');
                if (kind == "counter")
                {
                    name += "_total";
                }

                text.Append("# HELP ").Append(name).Append(' ').Append(Escape(instrument.Description ?? instrument.Name, label: false)).Append('\n');
                text.Append("# TYPE ").Append(name).Append(' ').Append(kind).Append('\n');
                foreach (var (labels, (sum, count)) in series)
                {
                    if (kind == "summary")
                    {
                        text.Append(name).Append("_sum").Append(labels).Append(' ').Append(Format(sum)).Append('\n');
                        text.Append(name).Append("_count").Append(labels).Append(' ').Append(count.ToString(CultureInfo.InvariantCulture)).Append('\n');
                    }
                    else
                    {
                        text.Append(name).Append(labels).Append(' ').Append(Format(sum)).Append('\n');
                    }
                }
            }

            return text.ToString();
        }
    }

    public void Dispose() => _listener.Dispose();

    private void Record<T>(Instrument instrument, T value, ReadOnlySpan<KeyValuePair<string, object?>> tags)
        where T : struct
    {
        var v = Convert.ToDouble(value, CultureInfo.InvariantCulture);
        var labels = Labels(tags);
        lock (_lock)
        {
            if (!_values.TryGetValue(instrument, out var series))
            {
                _values[instrument] = series = [];
            }

            series.TryGetValue(labels, out var old);
            // Synchronous counters and histograms report increments; observable instruments report the current value.
            series[labels] = instrument.IsObservable ? (v, 1) : (old.Sum + v, old.Count + 1);
        }
    }

    private static string KindOf(Instrument instrument) => instrument switch
    {
        Histogram<double> or Histogram<long> or Histogram<int> => "summary",
        Counter<long> or Counter<int> or Counter<double> or ObservableCounter<long> or ObservableCounter<int> or ObservableCounter<double> => "counter",
        _ => "gauge",
    };

    private static string Labels(ReadOnlySpan<KeyValuePair<string, object?>> tags)
    {
        if (tags.IsEmpty)
        {
            return string.Empty;
        }

        var text = new StringBuilder("{");
        foreach (var (key, value) in tags)
        {
            if (text.Length > 1)
            {
                text.Append(',');
            }

            text.Append(key.Replace('.', '_')).Append("=\"").Append(Escape(Convert.ToString(value, CultureInfo.InvariantCulture) ?? "", label: true)).Append('"');
        }

        return text.Append('}').ToString();
    }

    private static string Format(double v) =>
        double.IsPositiveInfinity(v) ? "+Inf" : double.IsNegativeInfinity(v) ? "-Inf" : double.IsNaN(v) ? "NaN" : v.ToString("R", CultureInfo.InvariantCulture);

    private static string Escape(string s, bool label)
    {
        var escaped = s.Replace("\\", "\\\\", StringComparison.Ordinal).Replace("\n", "\\n", StringComparison.Ordinal);
        return label ? escaped.Replace("\"", "\\\"", StringComparison.Ordinal) : escaped;
    }
}
