using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Model;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Model;

[TestClass]
public sealed class LoadProgressTests
{
    private sealed class Recorder : IProgress<double>
    {
        public List<double> Values { get; } = [];

        public void Report(double value) => Values.Add(value);
    }

    [TestMethod]
    public void ReportsEveryLayerInOrderAndEndsAtOne()
    {
        using var checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        using var backend = new CpuBackend();
        var progress = new Recorder();
        using var model = DeepSeekModel.Load(checkpoint, backend, progress: progress);
        // One report per main layer, then completion (the MTP layer is the last step).
        Assert.HasCount(checkpoint.Config.NumHiddenLayers + 1, progress.Values);
        CollectionAssert.AreEqual(progress.Values.Order().ToList(), progress.Values, "not monotonic");
        Assert.AreEqual(1.0, progress.Values[^1]);
        Assert.IsLessThan(1.0, progress.Values[0]);
    }
}
