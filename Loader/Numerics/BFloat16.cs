using System.Runtime.CompilerServices;

namespace DeepSeekCuda.Loader.Numerics;

/// <summary>bfloat16 as raw bits: the upper half of a float32.</summary>
internal static class BFloat16
{
    /// <summary>Widens exactly.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float ToFloat(ushort bits) => BitConverter.Int32BitsToSingle(bits << 16);

    /// <summary>Rounds to nearest even (NaN stays a quiet NaN), as PyTorch's <c>to(bfloat16)</c>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static ushort FromFloat(float value)
    {
        var bits = BitConverter.SingleToUInt32Bits(value);
        if (float.IsNaN(value))
        {
            return (ushort)((bits >> 16) | 0x40);
        }

        var rounding = 0x7FFFu + ((bits >> 16) & 1);
        return (ushort)((bits + rounding) >> 16);
    }

    /// <summary>Rounds a float32 through bfloat16 and back (the GPU path's storage rounding).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Round(float value) => ToFloat(FromFloat(value));

    /// <summary>Rounds every element through bfloat16 in place.</summary>
    public static void Round(Span<float> values)
    {
        for (var i = 0; i < values.Length; i++)
        {
            values[i] = Round(values[i]);
        }
    }

    /// <summary>Rounds <paramref name="source"/> to bfloat16 bits in <paramref name="destination"/> (<see cref="FromFloat"/> each).</summary>
    public static void Encode(ReadOnlySpan<float> source, Span<ushort> destination)
    {
        if (destination.Length < source.Length)
        {
            throw new ArgumentException("destination is shorter than the source", nameof(destination));
        }

        for (var i = 0; i < source.Length; i++)
        {
            destination[i] = FromFloat(source[i]);
        }
    }

    /// <summary>Widens <paramref name="source"/> into <paramref name="destination"/>.</summary>
    public static void Decode(ReadOnlySpan<ushort> source, Span<float> destination)
    {
        if (destination.Length < source.Length)
        {
            throw new ArgumentException("destination is shorter than the source", nameof(destination));
        }

        for (var i = 0; i < source.Length; i++)
        {
            destination[i] = BitConverter.Int32BitsToSingle(source[i] << 16);
        }
    }
}
