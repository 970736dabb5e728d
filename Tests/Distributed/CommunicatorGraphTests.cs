using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Distributed;

namespace DeepSeekCuda.Tests.Distributed;

/// <summary>
/// A graph over several devices (<see cref="ICommunicator.CaptureGraph"/>) on the host communicator: the devices' operations
/// and the all-reduces between them recorded in the order they were called, run again in that order at each replay over
/// the values the tensors hold then; what cannot be recorded refused by name.
/// </summary>
[TestClass]
public sealed class CommunicatorGraphTests
{
    private const int Rows = 3, Cols = 5;

    /// <summary>
    /// Per device: its source copied into x, the all-reduce of every x, x copied into y, and device 1's x copied into z after
    /// it. Capturing runs nothing; each replay (three, over fresh sources) leaves in every y and z the sum of that replay's
    /// sources, in device order, as a float32 sum; the traffic is counted per replay.
    /// </summary>
    [TestMethod]
    [DataRow(2)]
    [DataRow(3)]
    public void AReplayRunsTheDevicesOperationsAndAllReducesInTheirOrder(int n)
    {
        var devices = Enumerable.Range(0, n).Select(_ => new CpuBackend()).ToArray();
        using var comm = new HostCommunicator(devices);
        Assert.IsTrue(comm.CanCaptureGraphs);
        var source = devices.Select(d => d.Allocate(Rows, Cols, TensorKind.Logits)).ToArray();
        var x = devices.Select(d => d.Allocate(Rows, Cols, TensorKind.Logits)).ToArray();
        var y = devices.Select(d => d.Allocate(Rows, Cols, TensorKind.Logits)).ToArray();
        using var z = devices[1].Allocate(Rows, Cols, TensorKind.Logits);
        try
        {
            using var graph = comm.CaptureGraph(() =>
            {
                for (var r = 0; r < n; r++)
                {
                    devices[r].CopyRows(source[r], 0, x[r], 0, Rows);
                }

                comm.AllReduceSum(x);
                for (var r = 0; r < n; r++)
                {
                    devices[r].CopyRows(x[r], 0, y[r], 0, Rows);
                }

                devices[1].CopyRows(x[1], 0, z, 0, Rows);
            });
            Assert.AreEqual(2 * n + 2, graph.Operations, "n copies in, the all-reduce, n copies out and one more");
            Assert.AreEqual(0L, comm.Stats.AllReduces, "capturing runs nothing");
            for (var r = 0; r < n; r++)
            {
                CollectionAssert.AreEqual(new float[Rows * Cols], Download(devices[r], y[r]), $"device {r}: capturing runs nothing");
            }

            var rng = new Random(5);
            for (var replay = 1; replay <= 3; replay++)
            {
                var values = new float[n][];
                var sum = new float[Rows * Cols];
                for (var r = 0; r < n; r++)
                {
                    values[r] = [.. Enumerable.Range(0, Rows * Cols).Select(_ => (float)(rng.NextDouble() * 2 - 1) / 3)];
                    using var staged = devices[r].Upload(values[r], Rows, Cols, TensorKind.Logits);
                    devices[r].CopyRows(staged, 0, source[r], 0, Rows);
                    for (var i = 0; i < sum.Length; i++)
                    {
                        sum[i] += values[r][i]; // device order, float32
                    }
                }

                comm.ReplayGraph(graph);
                for (var r = 0; r < n; r++)
                {
                    CollectionAssert.AreEqual(sum, Download(devices[r], y[r]), $"replay {replay}: device {r}'s sum");
                }

                CollectionAssert.AreEqual(sum, Download(devices[1], z), $"replay {replay}: the copy after the all-reduce");
                Assert.AreEqual(replay, comm.Stats.AllReduces, "one all-reduce per replay");
            }
        }
        finally
        {
            foreach (var t in source.Concat(x).Concat(y))
            {
                t.Dispose();
            }
        }
    }

    /// <summary>
    /// Copies, barriers, uploads and replays of a device's own graph are refused while capturing, by name, and leave the
    /// communicator able to capture; a graph belongs to the communicator that captured it; a communicator over devices that
    /// are not CPU backends cannot capture and says which device is not.
    /// </summary>
    [TestMethod]
    public void WhatCannotBeRecordedIsRefusedByName()
    {
        CpuBackend[] devices = [new(), new()];
        using var comm = new HostCommunicator(devices);
        using Tensor a = devices[0].Allocate(1, 4), b = devices[1].Allocate(1, 4);
        using var own = devices[0].CaptureGraph(() => devices[0].CopyRows(a, 0, a, 0, 1));
        (string Call, Action Act)[] refused =
        [
            ("Copy", () => comm.Copy(a, 0, b, 1)),
            ("Barrier", comm.Barrier),
            ("Upload", () => devices[1].Upload(new float[4], 1, 4).Dispose()),
            ("ReplayGraph", () => devices[0].ReplayGraph(own)),
            ("CaptureGraph", () => comm.CaptureGraph(() => { }).Dispose()),
        ];
        foreach (var (call, act) in refused)
        {
            var e = Assert.ThrowsExactly<InvalidOperationException>(() => comm.CaptureGraph(act), call);
            StringAssert.StartsWith(e.Message, $"{call} cannot be part of a graph", call);
        }

        using var graph = comm.CaptureGraph(() => comm.AllReduceSum([a, b]));
        Assert.AreEqual(1, graph.Operations, "the refusals left no recording behind");
        using var other = new HostCommunicator(devices);
        var foreign = Assert.ThrowsExactly<ArgumentException>(() => other.ReplayGraph(graph));
        StringAssert.Contains(foreign.Message, "does not belong to this communicator");
        Assert.ThrowsExactly<ArgumentException>(() => devices[0].ReplayGraph(graph));

        using var wrapped = new RecordingBackend(new CpuBackend());
        using var mixed = new HostCommunicator([devices[0], wrapped]);
        Assert.IsFalse(mixed.CanCaptureGraphs);
        var e2 = Assert.ThrowsExactly<NotSupportedException>(() => mixed.CaptureGraph(() => { }));
        Assert.AreEqual("device 1 is a RecordingBackend; a host communicator records graphs over CPU backends only", e2.Message);
    }

    private static float[] Download(IBackend backend, Tensor t)
    {
        var values = new float[t.Length];
        backend.Download(t, values);
        return values;
    }
}
