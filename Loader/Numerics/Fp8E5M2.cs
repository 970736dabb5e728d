namespace DeepSeekCuda.Loader.Numerics;

/// <summary>The e5m2 8-bit float (IEEE-like: bias 15, 2 mantissa bits, infinities and NaNs).</summary>
internal static class Fp8E5M2
{
    /// <summary>Decodes one byte: it is the upper byte of an IEEE half.</summary>
    public static float ToFloat(byte code) => (float)BitConverter.UInt16BitsToHalf((ushort)(code << 8));
}
