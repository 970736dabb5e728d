using DeepSeekCuda.Cuda;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Synthetic;
using DeepSeekCuda.Loading;
using DeepSeekCuda.Tests.Loader;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>
/// The real upload path (pinned slots, cuMemcpyHtoDAsync, events) on a small synthetic checkpoint:
/// every tensor downloaded back must equal the file's bytes exactly (raw bytes, so no tolerance), and
/// the arena's padding between tensors must keep its poison.
/// </summary>
[TestClass]
[TestCategory("Gpu")]
public sealed class WeightUploadGpuTests : GpuTestBase
{
    private const byte Poison = 0xCD;

    [TestMethod]
    [DataRow(64 << 10, 2)] // many chunks: tensors span chunks, slots are reused many times
    [DataRow(1 << 20, 3)]
    [DataRow(64 << 20, 2)] // the default: the whole tiny checkpoint in one chunk
    public void UploadedTensorsEqualTheCheckpointBytes(int chunkBytes, int slots)
    {
        using var dir = new TempDir();
        SyntheticCheckpoint.Write(dir.Path, ModelPresets.Tiny, 123, shards: 3);
        using var checkpoint = Checkpoint.Open(dir.Path);
        var tensors = checkpoint.Tensors.Values.OrderBy(t => t.Name, StringComparer.Ordinal).ToList();
        using var arena = new DeviceArena(Device, WeightUploader.ArenaBytes(tensors));
        var (views, targets) = WeightUploader.PlaceInArena(arena, tensors);
        using var whole = DeviceBuffer<byte>.View(Device, views[tensors[0].Name].Pointer, arena.Used);
        whole.Fill8(Poison, Stream);
        Stream.Synchronize();
        var progress = new List<double>();

        var report = WeightUploader.Upload(Device, checkpoint, targets,
            new WeightUploadOptions { ChunkBytes = chunkBytes, Slots = slots }, new SyncProgress(progress.Add));

        Assert.AreEqual(checkpoint.TotalTensorBytes, report.Bytes);
        Assert.AreEqual(1.0, progress[^1]);
        var device = whole.ToArray(Stream);
        var written = new bool[device.Length];
        foreach (var t in tensors)
        {
            var at = (long)(views[t.Name].Pointer - views[tensors[0].Name].Pointer);
            var actual = device.AsSpan((int)at, (int)t.ByteLength);
            var expected = checkpoint.GetBytes(t.Name);
            if (!actual.SequenceEqual(expected))
            {
                var i = 0;
                while (actual[i] == expected[i])
                {
                    i++;
                }

                Assert.Fail($"{t.Name} ({t.DType} {t.ShapeText}): byte {i} is 0x{actual[i]:x2} on the device, 0x{expected[i]:x2} in the file");
            }

            written.AsSpan((int)at, (int)t.ByteLength).Fill(true);
        }

        for (var i = 0; i < device.Length; i++)
        {
            Assert.IsTrue(written[i] || device[i] == Poison, $"arena byte {i} (padding) overwritten");
        }
    }

    [TestMethod]
    public void CancelledUploadReleasesCleanlyAndTheDeviceStaysUsable()
    {
        using var dir = new TempDir();
        SyntheticCheckpoint.Write(dir.Path, ModelPresets.Tiny, 124, shards: 2);
        using var checkpoint = Checkpoint.Open(dir.Path);
        var tensors = checkpoint.Tensors.Values.ToList();
        using var arena = new DeviceArena(Device, WeightUploader.ArenaBytes(tensors));
        var (_, targets) = WeightUploader.PlaceInArena(arena, tensors);
        using var cts = new CancellationTokenSource();

        Assert.ThrowsExactly<OperationCanceledException>(() => WeightUploader.Upload(Device, checkpoint, targets,
            new WeightUploadOptions { ChunkBytes = 16 << 10 }, new SyncProgress(_ => cts.Cancel()), cancellationToken: cts.Token));

        // The copier waited for its queued copies and freed its stream, events and pinned slots without
        // an error; the device is still usable and a fresh upload completes.
        var report = WeightUploader.Upload(Device, checkpoint, targets);
        Assert.AreEqual(checkpoint.TotalTensorBytes, report.Bytes);
    }
}
