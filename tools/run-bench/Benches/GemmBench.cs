using DeepSeekCuda.Backends.Cuda;
using DeepSeekCuda.Bench.Harness;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Cuda.Blas;
using DeepSeekCuda.Kernels;

namespace DeepSeekCuda.Bench.Benches;

/// <summary>
/// FP8 block-scaled GEMM (<see cref="Fp8GemmKernel"/>: <c>fp8_gemm</c>, the automatic gemv/mma choice, and on Hopper
/// <c>fp8_gemm_wgmma</c>, the wgmma kernels: decode variant up to 64 rows, prefill above) on every DeepSeek-V3 linear shape at
/// M = 1 … 4096 (DeepGEMM's published shapes are among them), inputs and weights rotated over enough copies to
/// exceed L2. Baselines measured in the same run, one row each:
/// <list type="bullet">
/// <item><c>copy</c>: device-to-device copy bandwidth; ratio = time the copy needs for the kernel's bytes / kernel time.</item>
/// <item><c>cublas_bf16</c>: cuBLAS BF16 GEMM (FP32 accumulation) on the same M, N, K with BF16 inputs
/// (twice the weight bytes); ratio = cuBLAS time / our time.</item>
/// <item><c>cublaslt_fp8_block</c> (cuBLASLt 12.9+: 1×128 activation and 128×128 weight scales, our
/// semantics) or <c>cublaslt_fp8_tensor</c> (older: one scale per tensor, less work than ours) on the same
/// FP8 buffers; ratio = cuBLASLt time / our time.</item>
/// </list>
/// Plus <c>cublas_bf16</c> on the lm_head shape (N = 129280, K = 7168, BF16 weights) against <c>copy</c>: how close the
/// library gets to the bandwidth bound (our BF16 kernels on that shape are timed by the <c>bf16</c> bench). Without
/// cuBLAS the bench prints one line and reports the copy rows only.
/// </summary>
internal static class GemmBench
{
    private static readonly int[] Ms = [1, 4, 16, 64, 128, 512, 4096];
    private static readonly int[] HeadMs = [1, 4, 16, 64, 128];
    private const int HeadN = 129280;
    private const int HeadK = 7168;

    public static void Run(GpuBench gpu, bool quick, BenchReport report)
    {
        using var gemm = new Fp8GemmKernel(gpu.Device, gpu.Compiler);
        using var blas = OpenCublas(gpu.Device);
        using var lt = OpenCublasLt(gpu.Device);
        var scaling = lt?.PreferredScaling ?? Fp8Scaling.Tensor;
        // The automatic choice over every shape first, then on Hopper the wgmma kernels while the choice does not take them
        // yet: a fault in the kernels no GPU has confirmed then cannot cost the default kernels' rows. Baselines are timed once per shape.
        var paths = new List<(string Name, Fp8GemmPath Path)> { ("fp8_gemm", Fp8GemmPath.Auto) };
        if (gemm.Wgmma && !gemm.PreferWgmma)
        {
            paths.Add(("fp8_gemm_wgmma", Fp8GemmPath.Wgmma));
        }

        var baselines = new Dictionary<(int M, int N, int K), List<(string Name, double Us)>>();
        foreach (var (name, path) in paths)
        {
            foreach (var (n, k) in Fp8GemmKernel.DeepSeekV3Shapes)
            {
                foreach (var m in quick ? [1, 64, 4096] : Ms)
                {
                    var shape = new Dictionary<string, object> { ["M"] = m, ["N"] = n, ["K"] = k };
                    var bytes = (double)n * k + (double)m * k + m * Fp8GemmKernel.BlocksFor(k) * 4.0 + (double)m * n * 2 + Fp8GemmKernel.BlocksFor(n) * Fp8GemmKernel.BlocksFor(k) * 4.0;
                    var flops = 2.0 * m * n * k;
                    using var inputs = new Fp8Inputs(gpu, m, n, k);
                    if (!baselines.TryGetValue((m, n, k), out var timed))
                    {
                        timed = [("copy", gpu.CopyUs(bytes))];
                        if (blas is not null && Baseline("cublas_bf16", m, n, k, () => TimeCublasBf16(gpu, blas, m, n, k)) is { } bf16Us)
                        {
                            timed.Add(("cublas_bf16", bf16Us));
                        }

                        if (lt is not null && Baseline(CublasLtHandle.BaselineName(scaling), m, n, k, () => TimeCublasLtFp8(gpu, lt, inputs, scaling)) is { } fp8Us)
                        {
                            timed.Add((CublasLtHandle.BaselineName(scaling), fp8Us));
                        }

                        baselines[(m, n, k)] = timed;
                    }

                    var us = gpu.Measure(i => gemm.Launch(gpu.Stream, new Fp8Rows(inputs.X(i), inputs.XScales, m, k), new Fp8Linear(inputs.W(i), inputs.WScales, n, k),
                        new DeviceRows(inputs.Y, ElementType.BF16, m, n), path: path));
                    foreach (var (baseline, baselineUs) in timed)
                    {
                        report.Add(new BenchResult(name, shape, us, flops / (us * 1e-6) / 1e12, bytes / (us * 1e-6) / 1e9, baseline, baselineUs));
                    }
                }
            }
        }

        if (blas is not null)
        {
            foreach (var m in quick ? [1, 64] : HeadMs)
            {
                if (Baseline("cublas_bf16", m, HeadN, HeadK, () => TimeCublasBf16(gpu, blas, m, HeadN, HeadK)) is { } us)
                {
                    var bytes = 2.0 * ((double)HeadN * HeadK + (double)m * HeadK + (double)m * HeadN);
                    var shape = new Dictionary<string, object> { ["M"] = m, ["N"] = HeadN, ["K"] = HeadK, ["op"] = "lm_head" };
                    report.Add(new BenchResult("cublas_bf16", shape, us, 2.0 * m * HeadN * HeadK / (us * 1e-6) / 1e12, bytes / (us * 1e-6) / 1e9, "copy", gpu.CopyUs(bytes)));
                }
            }
        }
    }

    /// <summary>A cuBLAS handle, or null (with one line naming <paramref name="baseline"/> and why) when cuBLAS cannot be loaded.</summary>
    internal static CublasHandle? OpenCublas(CudaDevice device, string bench = "gemm", string baseline = "cublas_bf16")
    {
        try
        {
            var h = new CublasHandle(device);
            Console.WriteLine($"cuBLAS {h.Version} ({CublasHandle.LibraryPath})");
            return h;
        }
        catch (CublasUnavailableException e)
        {
            Console.WriteLine($"run-bench {bench}: no {baseline} baseline: {e.Message}");
            return null;
        }
    }

    private static CublasLtHandle? OpenCublasLt(CudaDevice device)
    {
        try
        {
            var h = new CublasLtHandle(device);
            var scaling = h.PreferredScaling;
            Console.WriteLine($"cuBLASLt {h.Version} ({CublasLtHandle.LibraryPath}): FP8 baseline {CublasLtHandle.BaselineName(scaling)}"
                + (scaling == Fp8Scaling.Tensor ? $" (block scaling needs cuBLASLt >= {CublasLtHandle.BlockScalingVersion})" : ""));
            return h;
        }
        catch (CublasUnavailableException e)
        {
            Console.WriteLine($"run-bench gemm: no cublaslt_fp8 baseline: {e.Message}");
            return null;
        }
    }

    /// <summary>Times one baseline; a shape the library refuses is skipped with the reason printed, never fatal.</summary>
    internal static double? Baseline(string name, int m, int n, int k, Func<double> time)
    {
        try
        {
            return time();
        }
        catch (Exception e) when (e is CublasException or ArgumentException)
        {
            Console.WriteLine($"skip {name} M={m} N={n} K={k}: {e.Message}");
            return null;
        }
    }

    internal static double TimeCublasBf16(GpuBench gpu, CublasHandle blas, int m, int n, int k)
    {
        var copies = gpu.Copies(2L * ((long)n * k + (long)m * k));
        using var owned = new DeviceOwnership();
        var w = new ulong[copies];
        var x = new ulong[copies];
        for (var c = 0; c < copies; c++)
        {
            var wb = owned.Own(DeviceBuffer<ushort>.Allocate(gpu.Device, (long)n * k));
            var xb = owned.Own(DeviceBuffer<ushort>.Allocate(gpu.Device, (long)m * k));
            wb.Fill32(0x3C003C00u, gpu.Stream); // bf16 2^-7 pairs: sums stay far from overflow
            xb.Fill32(0x3C003C00u, gpu.Stream);
            w[c] = wb.Pointer;
            x[c] = xb.Pointer;
        }

        var y = owned.Own(DeviceBuffer<ushort>.Allocate(gpu.Device, (long)m * n));
        return gpu.Measure(i => blas.GemmBf16(gpu.Stream, x[i % copies], w[i % copies], y.Pointer, m, n, k));
    }

    private static double TimeCublasLtFp8(GpuBench gpu, CublasLtHandle lt, Fp8Inputs inputs, Fp8Scaling scaling)
    {
        // The scale buffers are filled with one value, so the [M, kb] buffer our kernel reads serves as
        // cuBLASLt's [kb, M] one, and its first float as a per-tensor scale.
        return gpu.Measure(i => lt.MatmulFp8(gpu.Stream, inputs.X(i), inputs.XScales, inputs.W(i), inputs.WScales, inputs.Y,
            inputs.M, inputs.N, inputs.K, scaling));
    }

    /// <summary>FP8 codes (all 1.0) rotated over enough copies to exceed L2, constant scales 2^-7, a BF16 output.</summary>
    private sealed class Fp8Inputs : IDisposable
    {
        private readonly DeviceOwnership _buffers = new();
        private readonly ulong[] _w;
        private readonly ulong[] _x;

        public Fp8Inputs(GpuBench gpu, int m, int n, int k)
        {
            (M, N, K) = (m, n, k);
            var stream = gpu.Stream;
            var kb = Fp8GemmKernel.BlocksFor(k);
            var copies = gpu.Copies((long)n * k + (long)m * k);
            _w = new ulong[copies];
            _x = new ulong[copies];
            try
            {
                for (var c = 0; c < copies; c++)
                {
                    var wb = Add(DeviceBuffer<byte>.Allocate(gpu.Device, (long)n * k));
                    var xb = Add(DeviceBuffer<byte>.Allocate(gpu.Device, (long)m * k));
                    wb.Fill8(0x38, stream); // 1.0
                    xb.Fill8(0x38, stream);
                    _w[c] = wb.Pointer;
                    _x[c] = xb.Pointer;
                }

                var sa = Add(DeviceBuffer<float>.Allocate(gpu.Device, (long)m * kb));
                var sb = Add(DeviceBuffer<float>.Allocate(gpu.Device, (long)Fp8GemmKernel.BlocksFor(n) * kb));
                var y = Add(DeviceBuffer<ushort>.Allocate(gpu.Device, (long)m * n));
                sa.Fill32(0x3c000000, stream); // 2^-7
                sb.Fill32(0x3c000000, stream);
                (XScales, WScales, Y) = (sa.Pointer, sb.Pointer, y.Pointer);
            }
            catch
            {
                Dispose();
                throw;
            }
        }

        public int M { get; }

        public int N { get; }

        public int K { get; }

        public ulong XScales { get; }

        public ulong WScales { get; }

        public ulong Y { get; }

        public ulong X(int run) => _x[run % _x.Length];

        public ulong W(int run) => _w[run % _w.Length];

        public void Dispose() => _buffers.Dispose();

        private T Add<T>(T buffer)
            where T : IDisposable => _buffers.Own(buffer);
    }
}
