using DeepSeekCuda.Serving;

namespace DeepSeekCuda.Tests.Serving;

/// <summary>The row counts decode steps are padded to for their graphs (<see cref="DecodeBuckets"/>).</summary>
[TestClass]
public sealed class DecodeBucketsTests
{
    [TestMethod]
    public void PowersOfTwoToEightThenMultiplesOfEightCappedByTheLimit()
    {
        int[] expected = [0, 1, 2, 4, 4, 8, 8, 8, 8, 16, 16, 16, 16, 16, 16, 16, 16, 24, 24];
        for (var rows = 0; rows < expected.Length; rows++)
        {
            Assert.AreEqual(expected[rows], DecodeBuckets.For(rows, 64), $"{rows} rows");
        }

        Assert.AreEqual(64, DecodeBuckets.For(57, 64), "57 rows: the bucket of 64");
        Assert.AreEqual(64, DecodeBuckets.For(64, 64));
        Assert.AreEqual(0, DecodeBuckets.For(65, 64), "more rows than the limit: no bucket");
        Assert.AreEqual(6, DecodeBuckets.For(5, 6), "a bucket beyond the limit is the limit");
        Assert.AreEqual(6, DecodeBuckets.For(6, 6));
        Assert.AreEqual(12, DecodeBuckets.For(11, 12));
    }
}
