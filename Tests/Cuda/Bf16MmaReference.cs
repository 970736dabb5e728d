using DeepSeekCuda.Kernels;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>
/// The meaning of a <see cref="Bf16MmaProblem"/> in float64, independent of the kernel: every element is addressed
/// through the problem's own pointers and strides in host arrays standing for device memory (byte address / element
/// size = index). Used on the CPU to check what a launcher's problem computes (fold, unfold, router layouts), and on
/// the GPU as the reference of the kernel.
/// </summary>
internal static class Bf16MmaReference
{
    /// <summary>
    /// Per batch, split and output element: the float64 sum over the split's K and the sum of |terms| (a bound on fp32
    /// rounding). <paramref name="a"/> holds the activations as the kernel reads them (f32 values, or bf16 values widened),
    /// <paramref name="b"/> the bf16 weight values widened; indices are (address / element size).
    /// </summary>
    public static (double[] Sum, double[] Magnitude) Run(in Bf16MmaProblem p, float[] a, float[] b)
    {
        var aSize = p.AType == ElementType.BF16 ? 2UL : 4UL;
        long a0 = (long)(p.A / aSize), b0 = (long)(p.B / 2);
        var chunk = Bf16MmaKernel.ChunkFor(p.K, p.Splits);
        var count = (long)p.Batch * p.Splits * p.M * p.N;
        double[] sum = new double[count], mag = new double[count];
        var i = 0L;
        for (var batch = 0; batch < p.Batch; batch++)
        {
            for (var s = 0; s < p.Splits; s++)
            {
                int kb = s * chunk, ke = Math.Min(p.K, kb + chunk);
                for (var m = 0; m < p.M; m++)
                {
                    for (var n = 0; n < p.N; n++, i++)
                    {
                        double acc = 0, abs = 0;
                        for (var k = kb; k < ke; k++)
                        {
                            var x = (double)a[a0 + batch * p.ABatch + m * p.Lda + k];
                            var w = (double)b[b0 + batch * p.BBatch + (p.BKMajor ? k * p.Ldb + n : n * p.Ldb + k)];
                            acc += x * w;
                            abs += Math.Abs(x * w);
                        }

                        sum[i] = acc;
                        mag[i] = abs;
                    }
                }
            }
        }

        return (sum, mag);
    }

    /// <summary>The index in the output array (address / element size) of output (batch, split, m, n).</summary>
    public static long OutputIndex(in Bf16MmaProblem p, int batch, int split, int m, int n) =>
        (long)(p.Y / (p.YType == ElementType.BF16 ? 2UL : 4UL)) + batch * p.YBatch + split * p.YSplit + m * p.Ldy + n;
}
