using DeepSeekCuda.Model;

namespace DeepSeekCuda.Tests.Model;

/// <summary>How far a session's caches grow (<see cref="SessionCaches.Grown"/>): whole blocks, at least double, at most the model's length.</summary>
[TestClass]
public sealed class SessionCachesTests
{
    [TestMethod]
    [DataRow(0, 1, 4096, 64, DisplayName = "the first token: one block")]
    [DataRow(0, 64, 4096, 64, DisplayName = "a first call of one full block")]
    [DataRow(0, 65, 4096, 128, DisplayName = "a first call past one block: whole blocks")]
    [DataRow(0, 300, 4096, 320, DisplayName = "a long first call: its blocks, no more")]
    [DataRow(64, 65, 4096, 128, DisplayName = "one position past: double")]
    [DataRow(128, 129, 4096, 256, DisplayName = "double again")]
    [DataRow(64, 300, 4096, 320, DisplayName = "a call past double: its blocks")]
    [DataRow(2048, 2049, 3000, 3000, DisplayName = "double capped at the model's length")]
    [DataRow(0, 3, 4, 4, DisplayName = "a model shorter than a block")]
    public void GrowthIsWholeBlocksAtLeastDoubleAtMostTheModelsLength(int capacity, int positions, int maxPositions, int expected) =>
        Assert.AreEqual(expected, SessionCaches.Grown(capacity, positions, maxPositions));
}
