using System.Diagnostics;
using DeepSeekCuda.Bench.Harness;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Distributed;
using DeepSeekCuda.Kernels;

namespace DeepSeekCuda.Bench.Benches;

/// <summary>
/// P2P all-reduce (<see cref="DeviceMesh"/>, BF16 payload) over 2, 4 and 8 logical ranks on one GPU, at
/// decode message sizes (7168 × batch × 2 bytes) and prefill sizes (several MB), both algorithms. The
/// ranks run on separate streams, so a call is timed on the host from the first launch to the last
/// stream's completion (median of the runs; launches of all N kernels included, as in the decode loop).
/// Bytes = what all ranks read and write together; baseline = the same run's device copy of those bytes.
/// On one GPU every rank shares its HBM, so the ratio says how close the kernels come to memory speed;
/// NVLink numbers need a multi-GPU server.
/// </summary>
internal static class AllReduceBench
{
    private static readonly long[] DecodeBatches = [1, 8, 32, 128];
    private static readonly long[] PrefillBytes = [4L << 20, 16L << 20, 64L << 20];

    public static BenchReport Run(GpuBench gpu, bool quick)
    {
        var report = new BenchReport(gpu);
        var sizes = DecodeBatches.Select(b => 7168 * b * 2).Concat(PrefillBytes).ToArray();
        foreach (var ranks in quick ? [2, 8] : new[] { 2, 4, 8 })
        {
            using var mesh = DeviceMesh.Logical(gpu.Device, ranks, gpu.Compiler);
            foreach (var bytes in quick ? [sizes[0], sizes[^2]] : sizes)
            {
                foreach (var algorithm in new[] { AllReduceAlgorithm.OneShot, AllReduceAlgorithm.TwoStep })
                {
                    var us = Time(gpu, mesh, bytes / 2, algorithm);
                    // One-shot: every rank reads N messages and writes one; two-step: reads N chunks + N−1 gathered chunks, writes N chunks.
                    var moved = algorithm == AllReduceAlgorithm.OneShot
                        ? (double)ranks * (ranks + 1) * bytes
                        : (double)ranks * bytes * (2.0 + (ranks - 1.0) / ranks) + (double)bytes * (ranks - 1);
                    var shape = new Dictionary<string, object> { ["devices"] = ranks, ["bytes"] = bytes, ["algorithm"] = algorithm.ToString() };
                    report.Add(new BenchResult("allreduce", shape, us, 0, moved / (us * 1e-6) / 1e9, "copy", gpu.CopyUs(moved)));
                }
            }
        }

        return report;
    }

    private static double Time(GpuBench gpu, DeviceMesh mesh, long count, AllReduceAlgorithm algorithm)
    {
        var n = mesh.Ranks;
        var inputs = new DeviceBuffer<ushort>[n];
        var outputs = new DeviceBuffer<ushort>[n];
        try
        {
            for (var r = 0; r < n; r++)
            {
                inputs[r] = DeviceBuffer<ushort>.Allocate(gpu.Device, count);
                outputs[r] = DeviceBuffer<ushort>.Allocate(gpu.Device, count);
                inputs[r].Fill8(0x3c, mesh.Stream(r)); // bf16 0x3c3c ≈ 0.0115
            }

            ulong[] inPtr = [.. inputs.Select(b => b.Pointer)], outPtr = [.. outputs.Select(b => b.Pointer)];
            void Call()
            {
                mesh.AllReduce(inPtr, outPtr, count, ElementType.BF16, algorithm);
                for (var r = 0; r < n; r++)
                {
                    mesh.Stream(r).Synchronize();
                }
            }

            for (var i = 0; i < 3; i++)
            {
                Call();
            }

            var us = new double[gpu.Runs];
            for (var i = 0; i < us.Length; i++)
            {
                var sw = Stopwatch.StartNew();
                Call();
                us[i] = sw.Elapsed.TotalMicroseconds;
            }

            mesh.Synchronize(); // fails the bench if a barrier timed out
            Array.Sort(us);
            return us[us.Length / 2];
        }
        finally
        {
            foreach (var b in inputs.Concat(outputs))
            {
                b?.Dispose();
            }
        }
    }
}
