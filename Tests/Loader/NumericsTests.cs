using DeepSeekCuda.Loader.Numerics;

namespace DeepSeekCuda.Tests.Loader;

[TestClass]
public sealed class NumericsTests
{
    [TestMethod]
    public void E4M3DecodesTheSpecifiedValues()
    {
        Assert.AreEqual(448f, Fp8E4M3.ToFloat(0x7E));
        Assert.AreEqual(-448f, Fp8E4M3.ToFloat(0xFE));
        Assert.AreEqual(1f, Fp8E4M3.ToFloat(0x38)); // exponent 7 = bias
        Assert.AreEqual(1.125f, Fp8E4M3.ToFloat(0x39));
        Assert.AreEqual(0.015625f, Fp8E4M3.ToFloat(0x08)); // smallest normal 2^-6
        Assert.AreEqual(0.001953125f, Fp8E4M3.ToFloat(0x01)); // smallest subnormal 2^-9
        Assert.AreEqual(7 * 0.001953125f, Fp8E4M3.ToFloat(0x07)); // largest subnormal
        Assert.IsTrue(float.IsNaN(Fp8E4M3.ToFloat(0x7F)));
        Assert.IsTrue(float.IsNaN(Fp8E4M3.ToFloat(0xFF)));
        Assert.AreEqual(0, BitConverter.SingleToInt32Bits(Fp8E4M3.ToFloat(0x00)));
        Assert.IsTrue(float.IsNegative(Fp8E4M3.ToFloat(0x80)) && Fp8E4M3.ToFloat(0x80) == 0);
        Assert.AreEqual(254, Enumerable.Range(0, 256).Count(b => float.IsFinite(Fp8E4M3.ToFloat((byte)b))));
    }

    [TestMethod]
    public void E4M3EncodeInvertsDecodeForEveryFiniteCode()
    {
        for (var b = 0; b < 256; b++)
        {
            var v = Fp8E4M3.ToFloat((byte)b);
            if (float.IsFinite(v))
            {
                Assert.AreEqual((byte)b, Fp8E4M3.FromFloat(v), $"code 0x{b:X2} = {v}");
            }
        }

        Assert.AreEqual((byte)0x80, Fp8E4M3.FromFloat(-0f), "negative zero keeps its sign");
    }

    [TestMethod]
    public void E4M3RoundsTiesToEven()
    {
        // Between 1 (0x38, mantissa 0) and 1.125 (0x39, mantissa 1): the tie goes to 1.
        Assert.AreEqual((byte)0x38, Fp8E4M3.FromFloat(1.0625f));
        // Between 1.125 (0x39) and 1.25 (0x3A): the tie goes to the even mantissa, 1.25.
        Assert.AreEqual((byte)0x3A, Fp8E4M3.FromFloat(1.1875f));
        Assert.AreEqual((byte)0xBA, Fp8E4M3.FromFloat(-1.1875f));
        Assert.AreEqual((byte)0x39, Fp8E4M3.FromFloat(BitConverter.Int32BitsToSingle(BitConverter.SingleToInt32Bits(1.0625f) + 1)), "just above a tie rounds up");
        // Across a binade: 1.9375 lies between 1.875 (0x3F, odd) and 2 (0x40, even): goes to 2.
        Assert.AreEqual((byte)0x40, Fp8E4M3.FromFloat(1.9375f));
        // Between 384 (0x7C) and 416 (0x7D): 400 is a tie, even is 384.
        Assert.AreEqual((byte)0x7C, Fp8E4M3.FromFloat(400f));
        Assert.AreEqual((byte)0x7E, Fp8E4M3.FromFloat(432f), "tie between 416 (odd) and 448 (even)");
    }

    [TestMethod]
    public void E4M3SaturatesAndEncodesNaN()
    {
        foreach (var v in new[] { 448f, 449f, 464f, 480f, 1e6f, float.MaxValue, float.PositiveInfinity })
        {
            Assert.AreEqual((byte)0x7E, Fp8E4M3.FromFloat(v), v.ToString("R", System.Globalization.CultureInfo.InvariantCulture));
            Assert.AreEqual((byte)0xFE, Fp8E4M3.FromFloat(-v));
        }

        Assert.AreEqual((byte)0x7F, Fp8E4M3.FromFloat(float.NaN));
    }

    [TestMethod]
    public void E4M3Subnormals()
    {
        const float step = 0.001953125f; // 2^-9
        Assert.AreEqual((byte)0x01, Fp8E4M3.FromFloat(step));
        Assert.AreEqual((byte)0x00, Fp8E4M3.FromFloat(step / 2), "half the smallest subnormal ties to zero (even)");
        Assert.AreEqual((byte)0x01, Fp8E4M3.FromFloat(step * 0.51f));
        Assert.AreEqual((byte)0x02, Fp8E4M3.FromFloat(step * 1.5f), "1.5 steps: tie between 1 and 2 goes to 2");
        Assert.AreEqual((byte)0x04, Fp8E4M3.FromFloat(step * 3.5f), "3.5 steps: tie goes to 4");
        Assert.AreEqual((byte)0x08, Fp8E4M3.FromFloat(step * 7.5f), "7.5 steps: tie between the largest subnormal and the smallest normal goes to 8 (even)");
        Assert.AreEqual((byte)0x83, Fp8E4M3.FromFloat(-3 * step));
        Assert.AreEqual((byte)0x80, Fp8E4M3.FromFloat(-1e-10f));
        Assert.AreEqual((byte)0x00, Fp8E4M3.FromFloat(float.Epsilon));
    }

    [TestMethod]
    public void E4M3EncodeIsTheNearestCodeOverRandomValues()
    {
        // Independent reference: scan every finite code for the nearest, ties to the even code.
        var rng = new Random(5);
        var codes = Enumerable.Range(0, 256).Where(b => float.IsFinite(Fp8E4M3.ToFloat((byte)b)) && b != 0x80).ToArray();
        for (var n = 0; n < 20000; n++)
        {
            var v = (float)((rng.NextDouble() * 2 - 1) * Math.Pow(2, rng.Next(-12, 10)));
            if (Math.Abs(v) >= 448)
            {
                continue;
            }

            var best = codes.OrderBy(b => Math.Abs((double)Fp8E4M3.ToFloat((byte)b) - v)).ThenBy(b => b & 1).First();
            var expected = best == 0 && v < 0 ? 0x80 : best;
            Assert.AreEqual((byte)expected, Fp8E4M3.FromFloat(v), $"{v:R}");
        }
    }

    [TestMethod]
    public void Bf16RoundsToNearestEvenLikeDoubleArithmetic()
    {
        var rng = new Random(11);
        Span<byte> bytes = stackalloc byte[4];
        for (var n = 0; n < 200_000; n++)
        {
            rng.NextBytes(bytes);
            var v = BitConverter.ToSingle(bytes);
            if (n % 4 == 0)
            {
                // Exact ties: the low 16 bits 0x8000.
                v = BitConverter.Int32BitsToSingle((BitConverter.SingleToInt32Bits(v) & ~0xFFFF) | 0x8000);
            }

            if (!float.IsFinite(v))
            {
                continue;
            }

            Assert.AreEqual(ReferenceBf16(v), BFloat16.FromFloat(v), $"{v:R}");
        }

        Assert.AreEqual((ushort)0x7F80, BFloat16.FromFloat(float.PositiveInfinity));
        Assert.AreEqual((ushort)0x7F80, BFloat16.FromFloat(float.MaxValue), "rounds up to infinity, as IEEE does");
        Assert.IsTrue(float.IsNaN(BFloat16.ToFloat(BFloat16.FromFloat(float.NaN))));
    }

    [TestMethod]
    public void Bf16EncodeRoundsEveryElementAndDecodeWidensIt()
    {
        float[] values = [1f, 1f + 1f / 256, 1f + 3f / 256, 1f / 3, -2.5e-40f, float.NegativeInfinity, 3.4e38f];
        var bits = new ushort[values.Length];
        BFloat16.Encode(values, bits);
        CollectionAssert.AreEqual(values.Select(ReferenceBf16).ToArray(), bits);
        var widened = new float[values.Length];
        BFloat16.Decode(bits, widened);
        CollectionAssert.AreEqual(values.Select(BFloat16.Round).ToArray(), widened);
        Assert.ThrowsExactly<ArgumentException>(() => BFloat16.Encode(values, new ushort[values.Length - 1]));
    }

    /// <summary>Round to nearest even by value: the two neighbouring bf16 values and their exact distances in double.</summary>
    private static ushort ReferenceBf16(float v)
    {
        var bits = BitConverter.SingleToUInt32Bits(v);
        var down = (ushort)(bits >> 16);
        var up = (ushort)(down + 1);
        double lo = BFloat16.ToFloat(down), hi = BFloat16.ToFloat(up);
        if (float.IsInfinity(BFloat16.ToFloat(up)))
        {
            // The next value up is infinity; IEEE rounds as if the exponent range continued: halfway is 2^128 - 2^119.
            hi = Math.Sign(v) * Math.Pow(2, 128);
        }

        double dLo = Math.Abs(v - lo), dHi = Math.Abs(hi - v);
        return dLo < dHi ? down : dHi < dLo ? up : (down & 1) == 0 ? down : up;
    }
}
