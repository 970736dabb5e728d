using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Synthetic;
using DeepSeekCuda.Loading;
using DeepSeekCuda.Tests.Loader;
using DeepSeekCuda.Tests.Support;
using Microsoft.Extensions.Logging;

namespace DeepSeekCuda.Tests.Loading;

/// <summary>
/// The upload pipeline's host side on a real synthetic checkpoint, with a fake copy engine whose
/// "device" is a host array: copies run late (only when a slot is waited for or at the end, like a real
/// stream), so a pipeline that refilled a slot before waiting, or read the slot after queueing, would
/// deliver wrong bytes here.
/// </summary>
[TestClass]
public sealed class WeightUploaderTests
{
    private const int Seed = 77;
    private const ulong DeviceBase = 0x7000_0000;
    private const byte Poison = 0xCD;

    private static TempDir? _dir;

    [ClassInitialize]
    public static void WriteCheckpoint(TestContext context)
    {
        _dir = new TempDir();
        SyntheticCheckpoint.Write(_dir.Path, ModelPresets.Tiny, Seed, shards: 3);
    }

    [ClassCleanup]
    public static void DeleteCheckpoint() => _dir?.Dispose();

    /// <summary>A copy engine over host memory with a deferred, in-order copy queue and checks of the calling protocol.</summary>
    private sealed class FakeCopier(int slots, int slotBytes, long deviceBytes) : IStagingCopier
    {
        private readonly byte[][] _slots = [.. Enumerable.Range(0, slots).Select(_ => new byte[slotBytes])];
        private readonly Queue<(int Slot, int Offset, ulong Destination, int Bytes, bool Marker)> _queue = new();
        private readonly bool[] _free = [.. Enumerable.Repeat(true, slots)];

        public byte[] Device { get; } = Enumerable.Repeat(Poison, checked((int)deviceBytes)).ToArray();

        public int Copies { get; private set; }

        public int Finishes { get; private set; }

        /// <summary>Throws from the copy with this number (1-based), to test failure handling.</summary>
        public int FailAtCopy { get; init; } = int.MaxValue;

        public int Pending => _queue.Count;

        public int Slots => slots;

        public int SlotBytes => slotBytes;

        public Span<byte> Slot(int slot)
        {
            Assert.IsTrue(_free[slot], $"slot {slot} touched while its copies are queued");
            return _slots[slot];
        }

        public void WaitForSlot(int slot)
        {
            // Run the queue up to and including the last marker of this slot (a stream runs in order).
            var last = _queue.Select((e, i) => (e, i)).LastOrDefault(x => x.e.Marker && x.e.Slot == slot);
            if (last.e.Marker)
            {
                Drain(last.i + 1);
            }

            _free[slot] = true;
        }

        public void Copy(int slot, int offset, ulong destination, int bytes)
        {
            Assert.IsTrue(_free[slot], $"copy from slot {slot} after it was marked queued");
            if (++Copies == FailAtCopy)
            {
                throw new InvalidOperationException("injected copy failure");
            }

            Assert.IsTrue(offset >= 0 && bytes > 0 && offset + bytes <= slotBytes, $"staging range [{offset}, {offset + bytes})");
            _queue.Enqueue((slot, offset, destination, bytes, false));
        }

        public void Queued(int slot)
        {
            _queue.Enqueue((slot, 0, 0, 0, true));
            _free[slot] = false;
        }

        public void Finish()
        {
            Finishes++;
            Drain(_queue.Count);
            Array.Fill(_free, true);
        }

        private void Drain(int count)
        {
            for (var i = 0; i < count; i++)
            {
                var e = _queue.Dequeue();
                if (!e.Marker)
                {
                    var at = checked((int)(e.Destination - DeviceBase));
                    _slots[e.Slot].AsSpan(e.Offset, e.Bytes).CopyTo(Device.AsSpan(at, e.Bytes));
                }
            }
        }
    }

    private sealed class Recorder : IProgress<double>
    {
        public List<double> Values { get; } = [];

        public Action<double>? OnReport { get; init; }

        public void Report(double value)
        {
            Values.Add(value);
            OnReport?.Invoke(value);
        }
    }

    /// <summary>Every tensor, placed 256-aligned from <see cref="DeviceBase"/> in name order (not file order, on purpose).</summary>
    private static (List<WeightTarget> Targets, long DeviceBytes) PlaceAll(Checkpoint checkpoint)
    {
        var targets = new List<WeightTarget>();
        long at = 0;
        foreach (var t in checkpoint.Tensors.Values.OrderBy(t => t.Name, StringComparer.Ordinal))
        {
            targets.Add(new WeightTarget(t.Name, DeviceBase + (ulong)at));
            at += (t.ByteLength + 255) / 256 * 256;
        }

        return (targets, at);
    }

    private static void AssertDeviceHoldsCheckpoint(Checkpoint checkpoint, IEnumerable<WeightTarget> targets, byte[] device)
    {
        var written = new bool[device.Length];
        foreach (var target in targets)
        {
            var expected = checkpoint.GetBytes(target.Name);
            var at = (int)(target.Destination - DeviceBase);
            var actual = device.AsSpan(at, expected.Length);
            if (!actual.SequenceEqual(expected))
            {
                var i = 0;
                while (actual[i] == expected[i])
                {
                    i++;
                }

                Assert.Fail($"{target.Name} ({checkpoint.Get(target.Name).DType} {checkpoint.Get(target.Name).ShapeText}): byte {i} is 0x{actual[i]:x2}, checkpoint 0x{expected[i]:x2}");
            }

            written.AsSpan(at, expected.Length).Fill(true);
        }

        for (var i = 0; i < device.Length; i++)
        {
            Assert.IsTrue(written[i] || device[i] == Poison, $"device byte {i} written outside every tensor");
        }
    }

    [TestMethod]
    [DataRow(4096, 2, 1)]
    [DataRow(100_000, 2, 3)]
    [DataRow(1 << 20, 3, 2)]
    [DataRow(64 << 20, 2, 4)]
    public void DeviceBytesEqualCheckpointBytesAndProgressEndsAtOne(int chunkBytes, int slots, int readThreads)
    {
        using var checkpoint = Checkpoint.Open(_dir!.Path);
        var (targets, deviceBytes) = PlaceAll(checkpoint);
        var plan = UploadPlan.Create(checkpoint, targets, chunkBytes, slots);
        var copier = new FakeCopier(slots, chunkBytes, deviceBytes);
        var progress = new Recorder();
        var logger = new ListLogger();
        // Small read slices so the threaded fill runs on a tiny checkpoint too.
        var options = new WeightUploadOptions { ChunkBytes = chunkBytes, Slots = slots, ReadThreads = readThreads, ReadSliceBytes = 1000 };

        var report = WeightUploader.Upload(checkpoint, plan, copier, options, progress, logger);

        AssertDeviceHoldsCheckpoint(checkpoint, targets, copier.Device);
        Assert.AreEqual(0, copier.Pending);
        Assert.AreEqual(checkpoint.TotalTensorBytes, report.Bytes);
        Assert.AreEqual(checkpoint.Tensors.Count, report.Tensors);
        Assert.AreEqual(3, report.Shards);
        Assert.AreEqual(plan.Chunks.Length, report.Chunks);
        Assert.IsTrue(report.ReadSeconds > 0 && report.WaitSeconds >= 0 && report.ReadSeconds + report.WaitSeconds <= report.Seconds,
            $"read {report.ReadSeconds} s + wait {report.WaitSeconds} s inside {report.Seconds} s");
        Assert.IsNotEmpty(progress.Values);
        CollectionAssert.AreEqual(progress.Values.Order().ToList(), progress.Values, "progress not monotonic");
        Assert.IsTrue(progress.Values.All(v => v is >= 0 and <= 1), "progress outside [0, 1]");
        Assert.AreEqual(1.0, progress.Values[^1]);
        Assert.AreEqual(1, progress.Values.Count(v => v == 1.0), "1 reported once, at the end");
        var finished = logger.Entries.Single(e => e.Level == LogLevel.Information);
        StringAssert.Contains(finished.Message, "GB/s");
        StringAssert.Contains(finished.Message, $"{checkpoint.Tensors.Count} tensors");
    }

    [TestMethod]
    public void RawBytesTravelUnconverted()
    {
        // FP8 weights stay FP8 (1 byte per element), scales F32, norms BF16: the device holds the file's bytes.
        using var checkpoint = Checkpoint.Open(_dir!.Path);
        var names = new[] { "model.layers.1.self_attn.kv_b_proj.weight", "model.layers.1.self_attn.kv_b_proj.weight_scale_inv", "model.layers.1.input_layernorm.weight" };
        var infos = names.Select(checkpoint.Get).ToList();
        CollectionAssert.AreEqual(new[] { DType.F8_E4M3, DType.F32, DType.BF16 }, infos.Select(i => i.DType).ToArray());
        var targets = new List<WeightTarget>();
        long at = 0;
        foreach (var t in infos)
        {
            targets.Add(new WeightTarget(t.Name, DeviceBase + (ulong)at));
            at += t.ByteLength;
        }

        Assert.AreEqual(infos[0].ElementCount + infos[1].ElementCount * 4 + infos[2].ElementCount * 2, at);
        var copier = new FakeCopier(2, 512, at);
        WeightUploader.Upload(checkpoint, UploadPlan.Create(checkpoint, targets, 512, 2), copier);
        AssertDeviceHoldsCheckpoint(checkpoint, targets, copier.Device);
    }

    [TestMethod]
    public void CancellationStopsBetweenChunksWithNoCopyInFlight()
    {
        using var checkpoint = Checkpoint.Open(_dir!.Path);
        var (targets, deviceBytes) = PlaceAll(checkpoint);
        var plan = UploadPlan.Create(checkpoint, targets, 4096, 2);
        Assert.IsGreaterThan(10, plan.Chunks.Length);
        var copier = new FakeCopier(2, 4096, deviceBytes);
        using var cts = new CancellationTokenSource();
        var progress = new Recorder { OnReport = v => cts.Cancel() };
        var logger = new ListLogger();

        Assert.ThrowsExactly<OperationCanceledException>(() => WeightUploader.Upload(checkpoint, plan, copier, null, progress, logger, cts.Token));

        Assert.AreEqual(0, copier.Pending, "queued copies waited for before the exception");
        Assert.AreEqual(1, copier.Finishes);
        Assert.HasCount(1, progress.Values, "no chunk after the cancelling report");
        Assert.IsLessThan(1.0, progress.Values[0]);
        Assert.IsLessThan(plan.Chunks.Sum(c => c.Pieces.Length), copier.Copies);
        StringAssert.Contains(logger.Entries.Single(e => e.Level == LogLevel.Warning).Message, "cancelled");

        // Already cancelled: nothing is read or copied.
        var idle = new FakeCopier(2, 4096, deviceBytes);
        Assert.ThrowsExactly<OperationCanceledException>(() => WeightUploader.Upload(checkpoint, plan, idle, cancellationToken: cts.Token));
        Assert.AreEqual(0, idle.Copies);
        Assert.IsTrue(idle.Device.All(b => b == Poison));
    }

    [TestMethod]
    public void ACopyFailurePropagatesAfterTheQueueDrains()
    {
        using var checkpoint = Checkpoint.Open(_dir!.Path);
        var (targets, deviceBytes) = PlaceAll(checkpoint);
        var plan = UploadPlan.Create(checkpoint, targets, 4096, 2);
        var copier = new FakeCopier(2, 4096, deviceBytes) { FailAtCopy = 50 };
        var e = Assert.ThrowsExactly<InvalidOperationException>(() => WeightUploader.Upload(checkpoint, plan, copier));
        Assert.AreEqual("injected copy failure", e.Message);
        Assert.AreEqual(0, copier.Pending);
        Assert.AreEqual(1, copier.Finishes);
    }

    [TestMethod]
    public void RefusesACopierThatDoesNotFitThePlan()
    {
        using var checkpoint = Checkpoint.Open(_dir!.Path);
        var (targets, deviceBytes) = PlaceAll(checkpoint);
        var plan = UploadPlan.Create(checkpoint, targets, 4096, 2);
        Assert.ThrowsExactly<ArgumentException>(() => WeightUploader.Upload(checkpoint, plan, new FakeCopier(3, 4096, deviceBytes)));
        Assert.ThrowsExactly<ArgumentException>(() => WeightUploader.Upload(checkpoint, plan, new FakeCopier(2, 4095, deviceBytes)));
        var missing = Assert.ThrowsExactly<CheckpointException>(() => UploadPlan.Create(checkpoint, [new WeightTarget("no.such.weight", DeviceBase)], 4096, 2));
        StringAssert.Contains(missing.Message, "no.such.weight");
    }

    [TestMethod]
    public void ArenaBytesRoundEachTensorToTheArenaAlignment()
    {
        TensorInfo T(long bytes) => new("t", DType.U8, [bytes], 0, bytes, "/x");
        Assert.AreEqual(0, WeightUploader.ArenaBytes([T(0)]));
        Assert.AreEqual(256 + 512 + 256, WeightUploader.ArenaBytes([T(1), T(257), T(256)]));
    }

    [TestMethod]
    public void ReadsATensorInPieces()
    {
        using var checkpoint = Checkpoint.Open(_dir!.Path);
        var info = checkpoint.Get(CheckpointLayout.Embedding);
        var whole = checkpoint.GetBytes(info.Name).ToArray();
        CollectionAssert.AreEqual(whole[100..300], checkpoint.GetBytes(info, 100, 200).ToArray());
        Assert.AreEqual(0, checkpoint.GetBytes(info, info.ByteLength, 0).Length);
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => checkpoint.GetBytes(info, info.ByteLength - 1, 2).Length);
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => checkpoint.GetBytes(info, -1, 1).Length);
    }
}
