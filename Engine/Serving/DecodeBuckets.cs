using System.Numerics;

namespace DeepSeekCuda.Serving;

/// <summary>
/// The row counts a decode step is padded to, so that one captured graph serves every batch up to its size: 1, 2, 4, 8,
/// then every multiple of 8, and never more than a limit (the runner's step rows and slots), which is itself the last.
/// </summary>
internal static class DecodeBuckets
{
    /// <summary>The bucket of a decode step of <paramref name="rows"/> rows, or 0 when it has none (no rows, or more than <paramref name="limit"/>).</summary>
    public static int For(int rows, int limit)
    {
        if (rows < 1 || rows > limit)
        {
            return 0;
        }

        var bucket = rows <= 8 ? (int)BitOperations.RoundUpToPowerOf2((uint)rows) : (rows + 7) / 8 * 8;
        return Math.Min(bucket, limit);
    }
}
