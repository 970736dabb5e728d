using System.Globalization;

namespace DeepSeekCuda.Tests.Support;

/// <summary>
/// The one tolerance policy of the test suite. Metrics follow the fixtures' README:
/// max_rel = max|t - r| / max|r|, rms_rel = ||t - r|| / ||r||. NaN/Inf positions must agree, and every
/// failure names the worst element and its index.
/// </summary>
internal static class Tolerance
{
    public readonly record struct Comparison(double MaxAbs, double MaxRel, double RmsRel, long WorstIndex, float WorstTest, float WorstRef);

    public static Comparison Compare(ReadOnlySpan<float> test, ReadOnlySpan<float> reference, string what)
    {
        if (test.Length != reference.Length)
        {
            throw new AssertFailedException($"{what}: length {test.Length} != reference length {reference.Length}");
        }

        double maxAbs = 0, maxRef = 0, diff2 = 0, ref2 = 0;
        long worst = -1;
        for (var i = 0; i < test.Length; i++)
        {
            float t = test[i], r = reference[i];
            if (!float.IsFinite(r) || !float.IsFinite(t))
            {
                var same = (float.IsNaN(t) && float.IsNaN(r)) || t.Equals(r);
                if (!same)
                {
                    throw new AssertFailedException($"{what}: non-finite mismatch at [{i}]: test {t}, reference {r}");
                }

                continue;
            }

            var d = Math.Abs((double)t - r);
            if (d > maxAbs || worst < 0)
            {
                maxAbs = Math.Max(maxAbs, d);
                if (d >= maxAbs)
                {
                    worst = i;
                }
            }

            maxRef = Math.Max(maxRef, Math.Abs((double)r));
            diff2 += d * d;
            ref2 += (double)r * r;
        }

        var maxRel = maxRef > 0 ? maxAbs / maxRef : maxAbs;
        var rmsRel = ref2 > 0 ? Math.Sqrt(diff2 / ref2) : Math.Sqrt(diff2);
        return worst < 0
            ? new Comparison(0, 0, 0, -1, 0, 0)
            : new Comparison(maxAbs, maxRel, rmsRel, worst, test[(int)worst], reference[(int)worst]);
    }

    /// <summary>Asserts max_rel (tolerance (i) of the fixtures: 1e-4 for float32 paths).</summary>
    public static Comparison AssertMaxRel(ReadOnlySpan<float> test, ReadOnlySpan<float> reference, double maxRel, string what)
    {
        var c = Compare(test, reference, what);
        if (c.MaxRel > maxRel)
        {
            throw new AssertFailedException(Describe(what, c) + $" exceeds max_rel {maxRel:g3}");
        }

        return c;
    }

    /// <summary>Asserts rms_rel, the criterion for bf16/fp8 paths.</summary>
    public static Comparison AssertRmsRel(ReadOnlySpan<float> test, ReadOnlySpan<float> reference, double rmsRel, string what)
    {
        var c = Compare(test, reference, what);
        if (c.RmsRel > rmsRel)
        {
            throw new AssertFailedException(Describe(what, c) + $" exceeds rms_rel {rmsRel:g3}");
        }

        return c;
    }

    /// <summary>Asserts |t - r| &lt;= atol + rtol*|r| element-wise.</summary>
    public static void AssertClose(ReadOnlySpan<float> test, ReadOnlySpan<float> reference, double atol, double rtol, string what)
    {
        if (test.Length != reference.Length)
        {
            throw new AssertFailedException($"{what}: length {test.Length} != reference length {reference.Length}");
        }

        var worst = -1;
        double worstExcess = 0;
        for (var i = 0; i < test.Length; i++)
        {
            float t = test[i], r = reference[i];
            if (!float.IsFinite(r) || !float.IsFinite(t))
            {
                if (!((float.IsNaN(t) && float.IsNaN(r)) || t.Equals(r)))
                {
                    throw new AssertFailedException($"{what}: non-finite mismatch at [{i}]: test {t}, reference {r}");
                }

                continue;
            }

            var excess = Math.Abs((double)t - r) - (atol + rtol * Math.Abs((double)r));
            if (excess > worstExcess)
            {
                worstExcess = excess;
                worst = i;
            }
        }

        if (worst >= 0)
        {
            throw new AssertFailedException(string.Create(CultureInfo.InvariantCulture,
                $"{what}: worst element [{worst}] test {test[worst]:g9} vs reference {reference[worst]:g9} exceeds atol {atol:g3} + rtol {rtol:g3}"));
        }
    }

    public static string Describe(string what, Comparison c) => string.Create(CultureInfo.InvariantCulture,
        $"{what}: max_abs {c.MaxAbs:g3}, max_rel {c.MaxRel:g3}, rms_rel {c.RmsRel:g3}, worst [{c.WorstIndex}] test {c.WorstTest:g9} vs reference {c.WorstRef:g9}");
}
