using DeepSeekCuda.Kernels;
using DeepSeekCuda.Loader.Numerics;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>
/// The BF16-weight GEMM (Kernels/bf16_gemm.cu) against a float64 reference over the same BF16 operands: both of its
/// load paths (16-byte pieces when K is a multiple of 8, single elements otherwise), 1- and 4-row tiles, ragged N,
/// both input and output types, a NaN in the activations.
/// </summary>
[TestClass]
[TestCategory("Gpu")]
public sealed class Bf16GemmGpuTests : GpuTestBase
{
    [TestMethod]
    [DataRow(300, 200)]
    [DataRow(129, 1000)]
    [DataRow(77, 129)]
    [DataRow(1024, 256)]
    public void MatchesTheFloat64Reference(int n, int k)
    {
        var rng = Rng(Environment.TickCount);
        using var gemm = new Bf16GemmKernel(Device, Compiler);
        foreach (var m in new[] { 1, 3, 4, 9 })
        {
            foreach (var inType in Enum.GetValues<ElementType>())
            {
                foreach (var outType in Enum.GetValues<ElementType>())
                {
                    var x = Normal(rng, m * k);
                    var w = Normal(rng, n * k, 0.05f);
                    x[(m - 1) * k + k / 2] = float.NaN; // the last row's outputs are all NaN
                    using var xd = Upload(x, inType);
                    using var wd = Upload(w, ElementType.BF16);
                    using var yd = Poisoned((long)m * n, outType);
                    gemm.Launch(Stream, Rows(xd, inType, m, k), Rows(wd, ElementType.BF16, n, k), Rows(yd, outType, m, n));
                    var y = Read(yd, outType, Stream);
                    for (var r = 0; r < m; r++)
                    {
                        for (var c = 0; c < n; c++)
                        {
                            double sum = 0, mag = 0;
                            for (var i = 0; i < k; i++)
                            {
                                sum += (double)x[r * k + i] * w[c * k + i];
                                mag += Math.Abs((double)x[r * k + i] * w[c * k + i]);
                            }

                            var got = y[r * n + c];
                            var what = $"m={m} n={n} k={k} {inType}->{outType} [{r}, {c}]";
                            if (double.IsNaN(sum))
                            {
                                Assert.IsTrue(float.IsNaN(got), $"{what}: expected NaN, got {got}");
                                continue;
                            }

                            // fp32 accumulation: at most ~k·2⁻²⁴ of Σ|terms| (bounded loosely by 1e-5·Σ|terms| for k ≤ 1000);
                            // a BF16 output adds half a BF16 step (2⁻⁹ relative).
                            var bound = 1e-5 * mag + 1e-7 + (outType == ElementType.BF16 ? Math.Abs(sum) / 256 : 0);
                            Assert.IsLessThanOrEqualTo(bound, Math.Abs(got - sum), $"{what}: got {got}, expected {sum}");
                        }
                    }
                }
            }
        }
    }

    [TestMethod]
    public void RoundsLikeTheCpuReferenceBf16()
    {
        // A BF16 output is the fp32 sum rounded to nearest even: an exact sum must come back exactly.
        using var gemm = new Bf16GemmKernel(Device, Compiler);
        var x = new float[] { 1f, 2f, 3f, 4f, 5f, 6f, 7f, 8f };
        var w = new float[] { 0.5f, 0.25f, 1f, -1f, 2f, 0f, 0f, 1f };
        using var xd = Upload(x, ElementType.F32);
        using var wd = Upload(w, ElementType.BF16);
        using var yd = Poisoned(1, ElementType.BF16);
        gemm.Launch(Stream, Rows(xd, ElementType.F32, 1, 8), Rows(wd, ElementType.BF16, 1, 8), Rows(yd, ElementType.BF16, 1, 1));
        var expected = BFloat16.ToFloat(BFloat16.FromFloat(0.5f + 0.5f + 3f - 4f + 10f + 8f));
        Assert.AreEqual(expected, Read(yd, ElementType.BF16, Stream)[0]);
    }
}
