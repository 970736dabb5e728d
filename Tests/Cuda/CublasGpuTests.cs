using DeepSeekCuda.Cuda;
using DeepSeekCuda.Cuda.Blas;
using DeepSeekCuda.Cuda.Native;
using DeepSeekCuda.Kernels;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>
/// The cuBLAS/cuBLASLt baselines compute what the bench says they compute: the BF16 GEMM against a CPU GEMM
/// of the BF16-rounded inputs, the FP8 matmul against the dequantized reference of our FP8 GEMM's tests, on
/// DeepSeek-V3 shapes at M = 1, 64, 129. Inconclusive without a device or without the libraries (never pass).
/// </summary>
[TestClass]
[TestCategory("Gpu")]
public sealed class CublasGpuTests : GpuTestBase
{
    // BF16 output against the exact (double) product of the values the GPU holds. Rounding to bf16 (8
    // significant bits, unit roundoff u = 2^-8) moves an element by at most u·|y|, so max|d| / max|y| <= 2^-8
    // and rms_rel <= u/sqrt(3) ~ 2.3e-3 for uniformly spread rounding errors; FP32 accumulation over K <= 7168
    // adds ~1e-5 (the handle disallows BF16 split-K reductions). 2^-7 and 4e-3 leave margin, and any wrong
    // layout, transpose or leading dimension gives errors of order 1.
    private const double Bf16MaxRel = 1.0 / 128;
    private const double Bf16RmsRel = 4e-3;

    public static IEnumerable<object[]> Cases =>
        from shape in new[] { (576, 7168), (2048, 7168), (7168, 2048) }
        from m in new[] { 1, 64, 129 }
        select new object[] { m, shape.Item1, shape.Item2 };

    [TestInitialize]
    public void RequireCublas()
    {
        if (!NativeLibraries.TryCublas(out _, out var reason) || !NativeLibraries.TryCublasLt(out _, out reason))
        {
            Assert.Inconclusive($"cuBLAS/cuBLASLt missing on this GPU machine: {reason}");
        }
    }

    [TestMethod]
    [DynamicData(nameof(Cases))]
    [DataRow(3, 300, 200)] // ragged: cuBLAS BF16 takes any shape
    public void GemmBf16MatchesCpu(int m, int n, int k)
    {
        using var blas = new CublasHandle(Device);
        var r = Rng(m * 7919 + n * 31 + k);
        var x = Normal(r, m * k);
        var w = Normal(r, n * k, 0.05f);
        if (m >= 3)
        {
            x[k + 5] = float.NaN; // row 1 becomes NaN everywhere
        }

        using var xd = Upload(x, ElementType.BF16); // rounds x and w in place to what the GPU holds
        using var wd = Upload(w, ElementType.BF16);
        var exact = new float[m * n];
        for (var t = 0; t < m; t++)
        {
            for (var o = 0; o < n; o++)
            {
                double sum = 0;
                for (var c = 0; c < k; c++)
                {
                    sum += (double)x[t * k + c] * w[o * k + c];
                }

                exact[t * n + o] = (float)sum;
            }
        }

        using var y = Poisoned((long)m * n, ElementType.BF16);
        blas.GemmBf16(Stream, xd.Pointer, wd.Pointer, y.Pointer, m, n, k);
        var got = Read(y, ElementType.BF16, Stream);
        var what = $"cublas_bf16 M={m} N={n} K={k} (cuBLAS {blas.Version})";
        Tolerance.AssertMaxRel(got, exact, Bf16MaxRel, what);
        Tolerance.AssertRmsRel(got, exact, Bf16RmsRel, what);
    }

    [TestMethod]
    [DynamicData(nameof(Cases))]
    public void MatmulFp8MatchesDequantizedReference(int m, int n, int k)
    {
        using var lt = new CublasLtHandle(Device);
        var scaling = lt.PreferredScaling;
        var r = Rng(m * 7919 + n * 31 + k + 1);
        int kb = CublasLtHandle.BlocksFor(k), nb = CublasLtHandle.BlocksFor(n);
        var xq = Fp8GemmReference.RandomCodes(r, (long)m * k);
        var codes = Fp8GemmReference.RandomCodes(r, (long)n * k);
        codes[(long)(n / 2) * k + k - 1] = 0x7F; // one NaN weight: column n/2 becomes NaN

        // Block scaling: a different scale per activation block and per weight block, so a misread layout
        // shows. Per tensor: one scale each, spread over the blocks for the shared reference.
        float[] sa = new float[m * kb], sb = new float[nb * kb];
        var sx = (float)(1e-3 * (0.5 + r.NextDouble()));
        var sw = (float)(1e-3 * (0.5 + r.NextDouble()));
        for (var i = 0; i < sa.Length; i++)
        {
            sa[i] = scaling == Fp8Scaling.Block ? (float)(1e-3 * (0.5 + r.NextDouble())) : sx;
        }

        for (var i = 0; i < sb.Length; i++)
        {
            sb[i] = scaling == Fp8Scaling.Block ? (float)(1e-3 * (0.5 + r.NextDouble())) : sw;
        }

        var exact = Fp8GemmReference.Exact(xq, sa, codes, sb, m, n, k);

        var saDevice = new float[sa.Length];
        if (scaling == Fp8Scaling.Block)
        {
            CublasLtHandle.ToTokenMajor(sa, m, kb, saDevice);
        }
        else
        {
            saDevice = [sx];
            sb = [sw];
        }

        using var xd = DeviceBuffer<byte>.From(Device, xq);
        using var wd = DeviceBuffer<byte>.From(Device, codes);
        using var sad = DeviceBuffer<float>.From(Device, saDevice);
        using var sbd = DeviceBuffer<float>.From(Device, sb);
        using var y = Poisoned((long)m * n, ElementType.BF16);
        var what = $"{CublasLtHandle.BaselineName(scaling)} M={m} N={n} K={k} (cuBLASLt {lt.Version})";
        try
        {
            lt.MatmulFp8(Stream, xd.Pointer, sad.Pointer, wd.Pointer, sbd.Pointer, y.Pointer, m, n, k, scaling);
        }
        catch (CublasException e) when (e.Status == CublasStatus.NotSupported)
        {
            // The bench skips such a shape too; say so rather than pass.
            Assert.Inconclusive($"{what}: cuBLASLt refuses this shape: {e.Message}");
        }

        // Same bound as BF16. e4m3 products are exact; Hopper's FP8 tensor cores accumulate with fewer bits
        // than FP32 (DeepSeek-V3 reports about 14), but cuBLASLt without FAST_ACCUM (and block scaling by
        // construction) promotes partial sums to FP32 at least every 128 channels, so the accumulation error
        // stays near 1e-4 relative, far below the bf16 rounding of the output.
        var got = Read(y, ElementType.BF16, Stream);
        Tolerance.AssertMaxRel(got, exact, Bf16MaxRel, what);
        Tolerance.AssertRmsRel(got, exact, Bf16RmsRel, what);
    }
}
