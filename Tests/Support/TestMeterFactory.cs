using System.Diagnostics.Metrics;

namespace DeepSeekCuda.Tests.Support;

/// <summary>An <see cref="IMeterFactory"/> that keeps the meters it creates (for listeners in metric tests) and disposes them with itself.</summary>
internal sealed class TestMeterFactory : IMeterFactory
{
    public List<Meter> Created { get; } = [];

    public Meter Create(MeterOptions options)
    {
        var m = new Meter(options.Name, options.Version, options.Tags, scope: this);
        Created.Add(m);
        return m;
    }

    public void Dispose()
    {
        foreach (var m in Created)
        {
            m.Dispose();
        }
    }
}
