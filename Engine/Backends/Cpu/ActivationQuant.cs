using DeepSeekCuda.Loader.Numerics;

namespace DeepSeekCuda.Backends.Cpu;

/// <summary>How an activation-quantization scale is stored.</summary>
internal enum ScaleFormat
{
    /// <summary>s = max(amax, 1e-4) / 448 as float32 (DeepSeek-V3/R1).</summary>
    Float32,

    /// <summary>s rounded up to a power of two, 2^⌈log2 s⌉ (DeepSeek-V3.1 <c>scale_fmt = "ue8m0"</c>).</summary>
    Ue8m0,
}

/// <summary>
/// FP8 e4m3 activation quantization per row and per contiguous group of channels, the official
/// <c>act_quant</c> rule (MODEL.md §7): amax over the group (the last group may be narrower), raised to at
/// least 1e-4; s = amax / 448; q = e4m3(x / s) with round-to-nearest-even and saturation. The division
/// is deliberate: multiplying by 1/s moves rare ties by one code.
/// </summary>
internal static class ActivationQuant
{
    /// <summary>The official group width along K.</summary>
    public const int DefaultGroupSize = 128;

    /// <summary>The floor of amax, so all-zero groups get a finite scale.</summary>
    public const float MinAmax = 1e-4f;

    /// <summary>Scale of one group.</summary>
    public static float Scale(ReadOnlySpan<float> group, ScaleFormat format)
    {
        var amax = 0f;
        foreach (var v in group)
        {
            amax = MathF.Max(amax, MathF.Abs(v));
        }

        var s = MathF.Max(amax, MinAmax) / Fp8E4M3.MaxValue;
        return format == ScaleFormat.Ue8m0 ? CeilPowerOfTwo(s) : s;
    }

    /// <summary>
    /// Quantizes one row: <paramref name="codes"/> [K] receives e4m3 bytes and <paramref name="scales"/>
    /// [⌈K/groupSize⌉] the per-group scales.
    /// </summary>
    public static void Quantize(ReadOnlySpan<float> row, Span<byte> codes, Span<float> scales, int groupSize = DefaultGroupSize,
        ScaleFormat format = ScaleFormat.Float32)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(groupSize, 1);
        var groups = (row.Length + groupSize - 1) / groupSize;
        if (codes.Length < row.Length || scales.Length < groups)
        {
            throw new ArgumentException($"a row of {row.Length} needs {row.Length} codes and {groups} scales");
        }

        for (var g = 0; g < groups; g++)
        {
            var begin = g * groupSize;
            var group = row.Slice(begin, Math.Min(groupSize, row.Length - begin));
            var s = Scale(group, format);
            scales[g] = s;
            for (var i = 0; i < group.Length; i++)
            {
                codes[begin + i] = Fp8E4M3.FromFloat(group[i] / s);
            }
        }
    }

    /// <summary>
    /// Replaces each value of <paramref name="row"/> by its quantized value e4m3(x/s)·s (the fp32 input an
    /// FP8 GEMM effectively sees).
    /// </summary>
    public static void QuantizeDequantize(Span<float> row, int groupSize = DefaultGroupSize, ScaleFormat format = ScaleFormat.Float32)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(groupSize, 1);
        for (var begin = 0; begin < row.Length; begin += groupSize)
        {
            var group = row.Slice(begin, Math.Min(groupSize, row.Length - begin));
            var s = Scale(group, format);
            for (var i = 0; i < group.Length; i++)
            {
                group[i] = Fp8E4M3.ToFloat(Fp8E4M3.FromFloat(group[i] / s)) * s;
            }
        }
    }

    /// <summary>The smallest power of two ≥ a positive normal float, computed exactly from its bits.</summary>
    private static float CeilPowerOfTwo(float s)
    {
        var bits = BitConverter.SingleToInt32Bits(s);
        const int mantissaMask = 0x7FFFFF;
        if ((bits & mantissaMask) == 0)
        {
            return s;
        }

        return BitConverter.Int32BitsToSingle((bits & ~mantissaMask) + (1 << 23));
    }
}
