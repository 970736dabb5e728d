using DeepSeekCuda.Backends.Cuda;
using DeepSeekCuda.Kernels;
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

    /// <summary>
    /// The CUDA backend's expert load without the driver: held experts' FP8 views placed by
    /// <see cref="CudaBackendLayout.ExpertStackWrites"/> and uploaded in one pass (small chunks, threaded reads) fill a
    /// compact stack that, read with the indexing <see cref="MoeExpertStack"/> documents, holds each held expert's
    /// stored codes and scales in its slot, and nothing else is written.
    /// </summary>
    [TestMethod]
    public void ExpertStackWritesFillTheCompactStackTheGroupedGemmReads()
    {
        using var checkpoint = Checkpoint.Open(_dir!.Path);
        var config = checkpoint.Config;
        var names = CheckpointLayout.Layer(config, 1);
        int[] held = [1, 4, 5, 11];
        int h = config.HiddenSize, inter = config.MoeIntermediateSize, ib = Fp8GemmKernel.BlocksFor(inter), hb = Fp8GemmKernel.BlocksFor(h);
        var parts = held.Select(e => names.Expert(e)).Select(m => new ExpertParts(Fp8(m[0]), Fp8(m[1]), Fp8(m[2]))).ToArray();
        var layout = new ExpertStackLayout(held.Length, h, inter);
        ulong w13 = DeviceBase, w13s = w13 + (ulong)layout.W13Length, w2 = w13s + (ulong)layout.W13ScaleLength * 4, w2s = w2 + (ulong)layout.W2Length;
        var deviceBytes = (long)(w2s - DeviceBase) + layout.W2ScaleLength * 4;
        var writes = CudaBackendLayout.ExpertStackWrites(layout, parts, w13, w13s, w2, w2s).ToList();
        Assert.HasCount(6 * held.Length, writes);
        Assert.AreEqual(deviceBytes, writes.Sum(w => w.Source.Length), "the writes tile the four arrays (the plan refuses overlaps)");

        var plan = UploadPlan.Create([.. checkpoint.ShardFiles], writes, 3000, 2);
        var copier = new FakeCopier(2, 3000, deviceBytes);
        WeightUploader.Upload(checkpoint, plan, copier, new WeightUploadOptions { ChunkBytes = 3000, Slots = 2, ReadThreads = 2, ReadSliceBytes = 700 });

        var device = copier.Device;
        var stack = new MoeExpertStack(w13, w13s, w2, w2s, held.Length, h, inter);
        for (var slot = 0; slot < held.Length; slot++)
        {
            var mlp = names.Expert(held[slot]);
            byte[] gate = checkpoint.GetBytes(mlp[0].Weight).ToArray(), up = checkpoint.GetBytes(mlp[1].Weight).ToArray(), down = checkpoint.GetBytes(mlp[2].Weight).ToArray();
            float[] gs = checkpoint.ReadFloat32(mlp[0].Scale), us = checkpoint.ReadFloat32(mlp[1].Scale), ds = checkpoint.ReadFloat32(mlp[2].Scale);
            for (var r = 0; r < 2 * inter; r++)
            {
                for (var c = 0; c < h; c++)
                {
                    var expected = r < inter ? gate[(r * h) + c] : up[((r - inter) * h) + c];
                    Assert.AreEqual(expected, device[(int)(stack.W13 - DeviceBase) + (((slot * 2 * inter) + r) * h) + c], $"W13[{slot}, {r}, {c}]");
                }
            }

            for (var rb = 0; rb < 2 * ib; rb++)
            {
                for (var cb = 0; cb < hb; cb++)
                {
                    var expected = rb < ib ? gs[(rb * hb) + cb] : us[((rb - ib) * hb) + cb];
                    Assert.AreEqual(expected, Float(stack.W13Scales, (((slot * 2 * ib) + rb) * hb) + cb), $"W13 scales[{slot}, {rb}, {cb}]");
                }
            }

            for (var r = 0; r < h; r++)
            {
                for (var c = 0; c < inter; c++)
                {
                    Assert.AreEqual(down[(r * inter) + c], device[(int)(stack.W2 - DeviceBase) + (((slot * h) + r) * inter) + c], $"W2[{slot}, {r}, {c}]");
                }
            }

            for (var k = 0; k < hb * ib; k++)
            {
                Assert.AreEqual(ds[k], Float(stack.W2Scales, (slot * hb * ib) + k), $"W2 scales[{slot}, {k}]");
            }
        }

        // A part of another shape is refused before anything is written.
        var wrong = parts.ToArray();
        wrong[2] = wrong[2] with { Down = parts[2].Gate };
        var e = Assert.ThrowsExactly<ArgumentException>(() => CudaBackendLayout.ExpertStackWrites(layout, wrong, w13, w13s, w2, w2s));
        StringAssert.Contains(e.Message, "slot 2");
        Assert.ThrowsExactly<ArgumentException>(() => CudaBackendLayout.ExpertStackWrites(layout, parts[..3], w13, w13s, w2, w2s));

        Fp8View Fp8(LinearSpec spec) => WeightReader.Fp8(checkpoint, spec, "the test");
        float Float(ulong array, int index) => BitConverter.ToSingle(device, (int)(array - DeviceBase) + (4 * index));
    }

    /// <summary>
    /// Tensor-parallel slices travel as rectangles: an FP8 weight cut by columns (strided runs) and by rows, with its
    /// re-gridded scales, and a BF16 norm, uploaded together in small chunks, land on the device as the slice of the
    /// stored bytes, indexed here by hand.
    /// </summary>
    [TestMethod]
    public void SlicedWeightsLandAsTheirRectangle()
    {
        using var checkpoint = Checkpoint.Open(_dir!.Path);
        var names = CheckpointLayout.Layer(checkpoint.Config, 0);
        var o = names.O; // [D, H·V] = [192, 120]
        var (rows, cols) = (o.Out, o.In);
        var byColumns = WeightReader.Fp8(checkpoint, o.Sliced(0, rows, 64, 56), "the test");
        var byRows = WeightReader.Fp8(checkpoint, o.Sliced(128, 64, 0, cols), "the test");
        var norm = WeightReader.Bf16(checkpoint, names.InputNorm, null, "the test", checkpoint.Config.HiddenSize);
        var views = new[] { byColumns.Codes, byColumns.Scales, byRows.Codes, byRows.Scales, norm };
        var addresses = new ulong[views.Length];
        long at = 0;
        for (var i = 0; i < views.Length; i++)
        {
            addresses[i] = DeviceBase + (ulong)at;
            at += (views[i].Length + 255) / 256 * 256;
        }

        var copier = new FakeCopier(2, 1000, at);
        var plan = UploadPlan.Create([.. checkpoint.ShardFiles], views.Zip(addresses), 1000, 2);
        WeightUploader.Upload(checkpoint, plan, copier, new WeightUploadOptions { ChunkBytes = 1000, Slots = 2, ReadThreads = 2, ReadSliceBytes = 300 });

        var codes = checkpoint.GetBytes(o.Weight).ToArray();
        var scales = checkpoint.ReadFloat32(o.Scale);
        var device = copier.Device;
        Check(0, 0, rows, 64, 56);
        Check(2, 128, 64, 0, cols);
        CollectionAssert.AreEqual(checkpoint.GetBytes(names.InputNorm).ToArray(), device.AsSpan((int)(addresses[4] - DeviceBase), (int)norm.Length).ToArray());

        void Check(int view, int rowStart, int r, int colStart, int c)
        {
            var codesAt = (int)(addresses[view] - DeviceBase);
            var scalesAt = (int)(addresses[view + 1] - DeviceBase);
            var cb = Fp8GemmKernel.BlocksFor(c);
            for (var i = 0; i < r; i++)
            {
                for (var j = 0; j < c; j++)
                {
                    Assert.AreEqual(codes[((rowStart + i) * cols) + colStart + j], device[codesAt + (i * c) + j], $"view {view} code [{i}, {j}]");
                    var stored = scales[((rowStart + i) / 128 * Fp8GemmKernel.BlocksFor(cols)) + ((colStart + j) / 128)];
                    Assert.AreEqual(stored, BitConverter.ToSingle(device, scalesAt + (4 * ((i / 128 * cb) + (j / 128)))), $"view {view} scale of [{i}, {j}]");
                }
            }
        }
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
