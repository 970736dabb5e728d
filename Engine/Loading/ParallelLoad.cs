using System.Runtime.ExceptionServices;

namespace DeepSeekCuda.Loading;

/// <summary>
/// <see cref="Parallel.For(int, int, ParallelOptions, Action{int})"/> for loading weights, rethrowing the
/// first failure as itself: a corrupt tensor is a <see cref="DeepSeekCuda.Loader.CheckpointException"/>
/// naming it, not an <see cref="AggregateException"/> around one.
/// </summary>
internal static class ParallelLoad
{
    public static void For(int fromInclusive, int toExclusive, ParallelOptions options, Action<int> body)
    {
        try
        {
            Parallel.For(fromInclusive, toExclusive, options, body);
        }
        catch (AggregateException e)
        {
            ExceptionDispatchInfo.Throw(e.Flatten().InnerExceptions[0]);
        }
    }
}
