namespace DeepSeekCuda.Tests.Support;

/// <summary>An <see cref="IProgress{T}"/> that reports on the caller's thread: <c>Progress&lt;T&gt;</c> posts to the thread pool, and tests need the calls in order and complete.</summary>
internal sealed class SyncProgress(Action<double> report) : IProgress<double>
{
    public void Report(double value) => report(value);
}
