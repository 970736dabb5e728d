namespace DeepSeekCuda.Loader.Numerics;

/// <summary>
/// The e4m3fn 8-bit float of DeepSeek-V3's weights: sign, 4 exponent bits with bias 7, 3 mantissa bits;
/// subnormals m·2^-9; no infinities; 0x7F and 0xFF are NaN; largest finite 448.
/// </summary>
internal static class Fp8E4M3
{
    /// <summary>Largest finite magnitude.</summary>
    public const float MaxValue = 448f;

    private static readonly float[] Table = BuildTable();

    /// <summary>Decoded value of every byte.</summary>
    public static ReadOnlySpan<float> DecodeTable => Table;

    /// <summary>Decodes one byte.</summary>
    public static float ToFloat(byte code) => Table[code];

    /// <summary>Decodes <paramref name="codes"/> into <paramref name="destination"/>.</summary>
    public static void Decode(ReadOnlySpan<byte> codes, Span<float> destination)
    {
        if (destination.Length < codes.Length)
        {
            throw new ArgumentException("destination is shorter than the codes", nameof(destination));
        }

        var table = Table;
        for (var i = 0; i < codes.Length; i++)
        {
            destination[i] = table[codes[i]];
        }
    }

    /// <summary>
    /// Encodes with round-to-nearest-even and saturation to ±448 (the rule of the release's quantizer and
    /// of PyTorch's <c>to(float8_e4m3fn)</c> after clamping); NaN encodes as 0x7F.
    /// </summary>
    public static byte FromFloat(float value)
    {
        if (float.IsNaN(value))
        {
            return 0x7F;
        }

        var sign = value < 0 || (value == 0 && float.IsNegative(value)) ? (byte)0x80 : (byte)0;
        var a = Math.Abs(value);
        if (a >= MaxValue)
        {
            return (byte)(sign | 0x7E);
        }

        // Below the smallest normal (2^-6) the spacing is 2^-9; above it 2^(e-3) in binade e.
        int e = a < 0.015625f ? -6 : Math.ILogB(a);
        var step = MathF.ScaleB(1f, e - 3);
        // a/step is exact (power-of-two scaling); RoundToEven on it is exact round-to-nearest-even.
        var q = MathF.Round(a / step, MidpointRounding.ToEven) * step;
        if (q == 0)
        {
            return sign;
        }

        if (q >= MaxValue)
        {
            return (byte)(sign | 0x7E);
        }

        int qe = Math.ILogB(q);
        if (qe < -6)
        {
            // Subnormal: exponent field 0, mantissa = q / 2^-9.
            return (byte)(sign | (int)(q * 512f));
        }

        var mantissa = (int)(MathF.ScaleB(q, -qe) * 8f) - 8;
        return (byte)(sign | ((qe + 7) << 3) | mantissa);
    }

    private static float[] BuildTable()
    {
        var table = new float[256];
        for (var b = 0; b < 256; b++)
        {
            var exponent = (b >> 3) & 0xF;
            var mantissa = b & 0x7;
            float magnitude;
            if (exponent == 0xF && mantissa == 0x7)
            {
                magnitude = float.NaN;
            }
            else if (exponent == 0)
            {
                magnitude = MathF.ScaleB(mantissa, -9);
            }
            else
            {
                magnitude = MathF.ScaleB(1f + mantissa / 8f, exponent - 7);
            }

            table[b] = (b & 0x80) != 0 ? -magnitude : magnitude;
        }

        return table;
    }
}
