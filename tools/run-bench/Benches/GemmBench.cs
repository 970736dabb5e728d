using DeepSeekCuda.Bench.Harness;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Kernels;

namespace DeepSeekCuda.Bench.Benches;

/// <summary>
/// FP8 block-scaled GEMM (<see cref="Fp8GemmKernel"/>, automatic gemv/mma choice) on every DeepSeek-V3
/// linear shape at M = 1 … 4096 (DeepGEMM's published shapes are among them), inputs and weights rotated
/// over enough copies to exceed L2. Baseline measured in the same run: device-to-device copy bandwidth;
/// ratio = time the copy needs for the kernel's bytes / kernel time.
/// </summary>
internal static class GemmBench
{
    private static readonly int[] Ms = [1, 4, 16, 64, 128, 512, 4096];

    public static BenchReport Run(GpuBench gpu, bool quick)
    {
        var report = new BenchReport(gpu);
        using var gemm = new Fp8GemmKernel(gpu.Device, gpu.Compiler);
        foreach (var (n, k) in Fp8GemmKernel.DeepSeekV3Shapes)
        {
            foreach (var m in quick ? [1, 64, 4096] : Ms)
            {
                var us = Time(gpu, gemm, m, n, k);
                var bytes = (double)n * k + (double)m * k + m * Fp8GemmKernel.BlocksFor(k) * 4.0 + (double)m * n * 2 + Fp8GemmKernel.BlocksFor(n) * Fp8GemmKernel.BlocksFor(k) * 4.0;
                var shape = new Dictionary<string, object> { ["M"] = m, ["N"] = n, ["K"] = k };
                report.Add(new BenchResult("fp8_gemm", shape, us, 2.0 * m * n * k / (us * 1e-6) / 1e12, bytes / (us * 1e-6) / 1e9, "copy", gpu.CopyUs(bytes)));
            }
        }

        return report;
    }

    private static double Time(GpuBench gpu, Fp8GemmKernel gemm, int m, int n, int k)
    {
        var stream = gpu.Stream;
        var kb = Fp8GemmKernel.BlocksFor(k);
        var copies = gpu.Copies((long)n * k + (long)m * k);
        var buffers = new List<IDisposable>();
        try
        {
            var w = new ulong[copies];
            var x = new ulong[copies];
            for (var c = 0; c < copies; c++)
            {
                var wb = DeviceBuffer<byte>.Allocate(gpu.Device, (long)n * k);
                var xb = DeviceBuffer<byte>.Allocate(gpu.Device, (long)m * k);
                wb.Fill8(0x38, stream); // 1.0
                xb.Fill8(0x38, stream);
                buffers.Add(wb);
                buffers.Add(xb);
                w[c] = wb.Pointer;
                x[c] = xb.Pointer;
            }

            var sa = DeviceBuffer<float>.Allocate(gpu.Device, (long)m * kb);
            var sb = DeviceBuffer<float>.Allocate(gpu.Device, (long)Fp8GemmKernel.BlocksFor(n) * kb);
            var y = DeviceBuffer<ushort>.Allocate(gpu.Device, (long)m * n);
            buffers.Add(sa);
            buffers.Add(sb);
            buffers.Add(y);
            sa.Fill32(0x3c000000, stream); // 2^-7
            sb.Fill32(0x3c000000, stream);
            return gpu.Measure(i =>
                gemm.Launch(stream, x[i % copies], sa.Pointer, w[i % copies], sb.Pointer, y.Pointer, ElementType.BF16, m, n, k));
        }
        finally
        {
            foreach (var b in buffers)
            {
                b.Dispose();
            }
        }
    }
}
