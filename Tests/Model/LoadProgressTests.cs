using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Model;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Model;

[TestClass]
public sealed class LoadProgressTests
{
    /// <summary>
    /// Each report is the share of the weight bytes loaded so far: measured here as the stored bytes of the checkpoint tensors
    /// read up to the report (<see cref="Checkpoint.ReadObserver"/>; tiny-a has an untied head, and the MTP layer's copies of
    /// the embedding and head are never read) over all those read by the load, so progress follows the bytes, not a count of
    /// layers, and ends at exactly 1.
    /// </summary>
    [TestMethod]
    public void ReportsTheShareOfWeightBytesLoadedAndEndsAtOne()
    {
        using var checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        using var backend = new CpuBackend();
        var read = new HashSet<string>();
        var readBytes = 0L;
        checkpoint.ReadObserver = (t, _, _) =>
        {
            // The CPU backend dequantizes a layer's experts on several threads.
            lock (read)
            {
                if (read.Add(t.Name))
                {
                    readBytes += t.ByteLength;
                }
            }
        };
        var reports = new List<(double Value, long Read)>();
        using var model = DeepSeekModel.Load(checkpoint, backend, progress: new SyncProgress(v => reports.Add((v, readBytes))));
        Assert.IsTrue(model.HasMtp);
        var total = (double)readBytes;
        Assert.IsGreaterThan(checkpoint.Config.NumHiddenLayers, reports.Count, "a report after each upload");
        foreach (var (value, bytes) in reports)
        {
            Assert.AreEqual(bytes / total, value, 1e-12, $"report {value} after {bytes} of {total} bytes");
        }

        Assert.AreEqual(1.0, reports[^1].Value);
        Assert.IsLessThan(1.0, reports[0].Value);
    }
}
