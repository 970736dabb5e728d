using DeepSeekCuda.Backends.Cuda;
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
/// NVLink numbers need a multi-GPU server. Rows with algorithm "communicator-f32" time the path a DeepSeekModel spread over GPUs takes
/// (<see cref="CudaCommunicator.AllReduceSum"/> over <see cref="CudaParallel.Logical"/>: f32 tensors reduced in place
/// after a copy into the input buffer, algorithm by size) at decode sizes; their bytes add that copy.
/// </summary>
internal static class AllReduceBench
{
    private static readonly long[] DecodeBatches = [1, 8, 32, 128];
    private static readonly long[] PrefillBytes = [4L << 20, 16L << 20, 64L << 20];

    public static void Run(GpuBench gpu, bool quick, BenchReport report)
    {
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

        // The path a DeepSeekModel spread over GPUs takes on CUDA (CudaCommunicator.AllReduceSum): f32 activations reduced in place, so each
        // rank first copies its tensor into the communicator's input buffer; the algorithm is chosen by size. Decode sizes.
        foreach (var ranks in quick ? [2] : new[] { 2, 4, 8 })
        {
            using var gpus = CudaParallel.Logical(ranks, new CudaBackendOptions { Device = gpu.Device.Ordinal });
            foreach (var batch in quick ? [1L] : DecodeBatches)
            {
                var count = 7168 * batch;
                var bytes = count * 4;
                var us = TimeCommunicator(gpu, gpus, (int)batch);
                var moved = (AllReduceKernel.Choose(bytes) == AllReduceAlgorithm.OneShot
                    ? (double)ranks * (ranks + 1) * bytes
                    : (double)ranks * bytes * (2.0 + (ranks - 1.0) / ranks) + (double)bytes * (ranks - 1)) + 2.0 * ranks * bytes;
                var shape = new Dictionary<string, object> { ["devices"] = ranks, ["bytes"] = bytes, ["algorithm"] = "communicator-f32" };
                report.Add(new BenchResult("allreduce", shape, us, 0, moved / (us * 1e-6) / 1e9, "copy", gpu.CopyUs(moved)));
            }
        }
    }

    private static double TimeCommunicator(GpuBench gpu, CudaParallel gpus, int rows)
    {
        var comm = gpus.Communicator;
        var tensors = Enumerable.Range(0, comm.DeviceCount).Select(r => comm.Backend(r).Upload(new float[rows * 7168], rows, 7168)).ToArray();
        try
        {
            void Call()
            {
                comm.AllReduceSum(tensors);
                foreach (var b in gpus.Backends)
                {
                    b.Synchronize();
                }
            }

            var us = gpu.MeasureHost(Call);

            comm.Barrier(); // fails the bench if a barrier timed out
            return us;
        }
        finally
        {
            foreach (var t in tensors)
            {
                t.Dispose();
            }
        }
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

            var us = gpu.MeasureHost(Call);

            mesh.Synchronize(); // fails the bench if a barrier timed out
            return us;
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
