using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Kernels;
using DeepSeekCuda.Loader.Numerics;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>
/// What the FP8 GEMM GPU tests share: one check of any path against the CPU on fresh random data. act_quant on the GPU
/// (bit-exact to the CPU rule, KernelGpuTests) feeds the GEMM, so both sides see identical quantized inputs. Without a
/// device every test ends Inconclusive (GpuTestBase).
/// </summary>
public abstract class Fp8GemmGpuChecks : GpuTestBase
{
    // FP32 output vs a double-precision reference over the same codes and scales: only the fp32
    // accumulation order and the fp32 rounding of each partial dot and of sa·sb differ. The rounding error
    // of an fp32 sum of K terms with random signs grows like eps·sqrt(K) relative to the result
    // (eps = 6e-8; K ≤ 7168 gives ≤ 5e-6), so rms_rel ≤ 1e-5 holds with margin yet catches any wrong
    // element, scale or block (those give errors of order 1).
    private protected const double F32RmsRel = 1e-5;

    // BF16 output vs the CPU backend in GpuEmulation (which rounds its fp32 result to bf16 too): the two fp32
    // results differ by ~1e-6 relative, which can move a rounding tie by one bf16 step (2^-8 relative).
    private protected const double Bf16Rtol = 1.0 / 128;

    // The wgmma path: Hopper's FP8 tensor cores add the products of a K block with about 14 bits of mantissa
    // (DeepSeek-V3 report 3.3.2), not fp32; the kernel promotes every 128 of K, so each block's partial carries a
    // relative error of at most a few 2^-14 (4 accumulations per block) and the whole sum ~1e-4 rms. 2e-3 leaves
    // margin and still fails any wrong element, scale or block (errors of order 1: one wrong column of 128 alone
    // gives ~0.09). Its BF16 output adds bf16 rounding (~1e-3 rms) on top, against the same emulated reference.
    private protected const double WgmmaF32RmsRel = 2e-3;
    private protected const double WgmmaBf16RmsRel = 1e-2;

    private protected void Check(int m, int n, int k, IReadOnlyList<Fp8GemmPath> paths)
    {
        using var gemm = new Fp8GemmKernel(Device, Compiler);
        using var quant = new ActQuantKernel(Device, Compiler);
        var r = Rng(m * 7919 + n * 31 + k);
        int kb = Fp8GemmKernel.BlocksFor(k), nb = Fp8GemmKernel.BlocksFor(n);

        var x = Normal(r, m * k, 2f);
        if (m >= 3)
        {
            x[k + 5] = float.NaN;                 // row 1 becomes NaN everywhere
            x[2 * k + k / 2] = float.PositiveInfinity; // row 2 too (scale Inf)
        }

        var codes = Fp8GemmReference.RandomCodes(r, (long)n * k); // no NaN codes except the one below
        codes[(long)(n / 2) * k + k - 1] = 0x7F; // one NaN weight: column n/2 becomes NaN
        var sb = new float[nb * kb];
        for (var i = 0; i < sb.Length; i++)
        {
            sb[i] = (float)(1e-3 * (0.5 + r.NextDouble()));
        }

        // CPU side: the activations the GPU sees (bf16) quantized by the official rule, weights dequantized.
        using var xd = Upload(x, ElementType.BF16); // rounds x in place to bf16
        var xq = new byte[(long)m * k];
        var sa = new float[m * kb];
        for (var t = 0; t < m; t++)
        {
            ActivationQuant.Quantize(x.AsSpan(t * k, k), xq.AsSpan(t * k, k), sa.AsSpan(t * kb, kb));
        }

        var exact = Fp8GemmReference.Exact(xq, sa, codes, sb, m, n, k);

        var w = new float[(long)n * k];
        Dequantize.Fp8Blocks(codes, sb, n, k, 128, 128, w);
        var cpu = new CpuBackend(CpuNumerics.GpuEmulation);
        var yCpu = cpu.Allocate(m, n);
        cpu.Linear(cpu.Upload(x, m, k), new CpuLinearWeight(n, k, true, w), yCpu);
        var emulated = new float[m * n];
        cpu.Download(yCpu, emulated);

        var residual = Normal(r, m * n);
        using var wd = DeviceBuffer<byte>.From(Device, codes);
        using var sbd = DeviceBuffer<float>.From(Device, sb);
        using var xqd = DeviceBuffer<byte>.Allocate(Device, (long)m * k);
        using var sad = DeviceBuffer<float>.Allocate(Device, (long)m * kb);
        var quantized = new Fp8Rows(xqd.Pointer, sad.Pointer, m, k);
        quant.Launch(Stream, Rows(xd, ElementType.BF16, m, k), quantized);
        var weight = new Fp8Linear(wd.Pointer, sbd.Pointer, n, k);

        foreach (var path in paths)
        {
            var what = $"{path} M={m} N={n} K={k}";
            var f32 = path == Fp8GemmPath.Wgmma ? WgmmaF32RmsRel : F32RmsRel;
            using (var y = Poisoned((long)m * n, ElementType.F32))
            {
                gemm.Launch(Stream, quantized, weight, Rows(y, ElementType.F32, m, n), path: path);
                Tolerance.AssertRmsRel(Read(y, ElementType.F32, Stream), exact, f32, what + " f32");
            }

            using (var y = Poisoned((long)m * n, ElementType.BF16))
            {
                gemm.Launch(Stream, quantized, weight, Rows(y, ElementType.BF16, m, n), path: path);
                var bf16 = Read(y, ElementType.BF16, Stream);
                if (path == Fp8GemmPath.Wgmma)
                {
                    Tolerance.AssertRmsRel(bf16, emulated, WgmmaBf16RmsRel, what + " bf16 vs CpuBackend GpuEmulation");
                }
                else
                {
                    Tolerance.AssertClose(bf16, emulated, 1e-6, Bf16Rtol, what + " bf16 vs CpuBackend GpuEmulation");
                }
            }

            // In-place residual epilogue (y += X·Wᵀ), fp32.
            var res = (float[])residual.Clone();
            using (var y = Upload(res, ElementType.F32))
            {
                gemm.Launch(Stream, quantized, weight, Rows(y, ElementType.F32, m, n), residual: Rows(y, ElementType.F32, m, n), path: path);
                var expected = exact.Select((v, i) => v + res[i]).ToArray();
                Tolerance.AssertRmsRel(Read(y, ElementType.F32, Stream), expected, f32, what + " residual");
            }
        }
    }
}

/// <summary>The FP8 block-scaled GEMM's default paths, gemv and mma.</summary>
[TestClass]
[TestCategory("Gpu")]
public sealed class Fp8GemmGpuTests : Fp8GemmGpuChecks
{
    private static readonly Fp8GemmPath[] Paths = [Fp8GemmPath.Gemv, Fp8GemmPath.Mma];

    public static IEnumerable<object[]> Cases =>
        from shape in new[] { (300, 200), (129, 1000), (1000, 129), (72, 72), (200, 640), (129, 4100) }
        from m in new[] { 1, 3, 127, 129 }
        select new object[] { m, shape.Item1, shape.Item2 };

    [TestMethod]
    [DynamicData(nameof(Cases))]
    public void MatchesCpuOnRaggedShapes(int m, int n, int k) => Check(m, n, k, Paths);

    [TestMethod]
    [DataRow(1, 576, 7168)]  // kv_a, gemv with split-K
    [DataRow(3, 1536, 7168)] // q_a
    [DataRow(4, 32768, 512)] // kv_b
    [DataRow(129, 2048, 7168)] // expert gate/up, mma
    public void MatchesCpuOnDeepSeekShapes(int m, int n, int k) => Check(m, n, k, Paths);
}

/// <summary>
/// The Hopper kernels (Fp8GemmPath.Wgmma, sm_90a), in a class of their own so that a fault in them, not yet run on a
/// GPU, cannot fail the default paths' tests (each GPU test class runs in its own process on the device).
/// </summary>
[TestClass]
[TestCategory("Gpu")]
public sealed class Fp8WgmmaGpuTests : Fp8GemmGpuChecks
{
    /// <summary>
    /// The rows the issue names: the decode variant (weights as the wide side, with and without a K split) up to 64
    /// rows, the prefill variant above (one tile row, part of one, several, and 4095: 32 tile rows, the last one
    /// short), over DeepSeek-V3 shapes (N = 576 and 2112 end inside a tile) and ragged ones (K a multiple of 16, not
    /// of 128), then the ragged shapes of <see cref="Fp8GemmGpuTests"/> the Hopper kernels take.
    /// </summary>
    [TestMethod]
    [DataRow(1, 2112, 7168)]   // decode variant, K split 7 ways
    [DataRow(2, 7168, 18432)]  // decode, split 2 ways
    [DataRow(3, 576, 7168)]    // decode, split 19 ways
    [DataRow(5, 300, 208)]     // decode, ragged N and K
    [DataRow(17, 1536, 7168)]
    [DataRow(64, 7168, 2048)]  // decode, the most rows it takes
    [DataRow(65, 2048, 7168)]  // prefill, one tile row
    [DataRow(129, 4096, 7168)]
    [DataRow(129, 300, 208)]
    [DataRow(4095, 1000, 1040)]
    [DataRow(1, 200, 640)]
    [DataRow(127, 200, 640)]
    [DataRow(129, 1000, 1040)]
    [DataRow(3, 2048, 7168)]
    [DataRow(4, 32768, 512)]
    public void MatchesCpuOnEveryShape(int m, int n, int k)
    {
        RequireHopper();
        Check(m, n, k, [Fp8GemmPath.Wgmma]);
    }

    /// <summary>The launcher refuses a call the wgmma kernel cannot run, naming why, before anything is launched.</summary>
    [TestMethod]
    public void RefusesWhatItCannotRun()
    {
        using var gemm = new Fp8GemmKernel(Device, Compiler);
        var e = Assert.ThrowsExactly<ArgumentException>(() => gemm.Launch(Stream, new Fp8Rows(0, 0, 130, 200), new Fp8Linear(0, 0, 300, 200), new DeviceRows(0, ElementType.F32, 130, 300), path: Fp8GemmPath.Wgmma));
        StringAssert.Contains(e.Message, Fp8GemmKernel.HasWgmma(Device.Target) ? "K = 200 is not a multiple of 16" : "needs sm_90a");
    }

    private void RequireHopper()
    {
        if (!Fp8GemmKernel.HasWgmma(Device.Target))
        {
            Assert.Inconclusive($"the wgmma kernels need sm_90a; this device compiles for {Device.Target}");
        }
    }
}
