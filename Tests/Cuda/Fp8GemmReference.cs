using DeepSeekCuda.Loader.Numerics;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>
/// The double-precision reference of a block-scaled FP8 GEMM over given codes and scales, shared by the tests
/// of our FP8 GEMM and of the cuBLASLt baseline: <c>y[t,o] = Σ_b (Σ_{c in block b} x[t,c]·w[o,c]) · sa[t,b] · sb[o/128,b]</c>
/// with x, w the decoded e4m3 codes, sa [m, ceil(k/128)] and sb [ceil(n/128), ceil(k/128)] row-major.
/// </summary>
internal static class Fp8GemmReference
{
    private const int Block = 128;

    public static float[] Exact(byte[] xq, float[] sa, byte[] codes, float[] sb, int m, int n, int k)
    {
        var kb = (k + Block - 1) / Block;
        var x = new float[xq.Length];
        var w = new float[codes.Length];
        Fp8E4M3.Decode(xq, x);
        Fp8E4M3.Decode(codes, w);
        var y = new float[m * n];
        Parallel.For(0, m, t =>
        {
            for (var o = 0; o < n; o++)
            {
                double sum = 0;
                for (var b = 0; b < kb; b++)
                {
                    double part = 0;
                    for (var c = b * Block; c < Math.Min(k, (b + 1) * Block); c++)
                    {
                        part += (double)x[(long)t * k + c] * w[(long)o * k + c];
                    }

                    sum += part * sa[t * kb + b] * sb[o / Block * kb + b];
                }

                y[t * n + o] = (float)sum;
            }
        });

        return y;
    }

    /// <summary>Random e4m3 codes over the whole finite range (no NaN codes).</summary>
    public static byte[] RandomCodes(Random r, long count)
    {
        var codes = new byte[count];
        r.NextBytes(codes);
        for (var i = 0; i < codes.Length; i++)
        {
            if ((codes[i] & 0x7F) == 0x7F)
            {
                codes[i] ^= 1;
            }
        }

        return codes;
    }
}
