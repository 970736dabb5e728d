using System.Numerics;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;

namespace DeepSeekCuda.Loader.Numerics;

/// <summary>
/// Finds NaN and infinity in stored tensor bytes without decoding them: a value is non-finite exactly when
/// its exponent bits are all ones (e4m3fn has no infinity; its only NaN is S.1111.111, so there all seven
/// magnitude bits are ones). One vectorized AND and compare per element, done as the bytes are read.
/// </summary>
internal static class NonFinite
{
    /// <summary>
    /// The index of the first element of <paramref name="bytes"/> (as <paramref name="dtype"/>) that is NaN
    /// or infinite, or -1. Integer and boolean types have none; a trailing partial element is not looked at.
    /// </summary>
    public static long IndexOf(ReadOnlySpan<byte> bytes, DType dtype) => dtype switch
    {
        DType.F8_E4M3 => IndexOfAllOnes(bytes, (byte)0x7F),
        DType.F8_E5M2 => IndexOfAllOnes(bytes, (byte)0x7C),
        DType.BF16 => IndexOfAllOnes(Whole<ushort>(bytes), (ushort)0x7F80),
        DType.F16 => IndexOfAllOnes(Whole<ushort>(bytes), (ushort)0x7C00),
        DType.F32 => IndexOfAllOnes(Whole<uint>(bytes), 0x7F80_0000u),
        DType.F64 => IndexOfAllOnes(Whole<ulong>(bytes), 0x7FF0_0000_0000_0000ul),
        _ => -1,
    };

    private static ReadOnlySpan<T> Whole<T>(ReadOnlySpan<byte> bytes) where T : unmanaged =>
        MemoryMarshal.Cast<byte, T>(bytes[..(bytes.Length - bytes.Length % Marshal.SizeOf<T>())]);

    private static long IndexOfAllOnes<T>(ReadOnlySpan<T> values, T mask) where T : unmanaged, IBinaryInteger<T>
    {
        var i = 0;
        if (Vector256.IsHardwareAccelerated && Vector256<T>.IsSupported)
        {
            var m = Vector256.Create(mask);
            ref var start = ref MemoryMarshal.GetReference(values);
            for (; i <= values.Length - Vector256<T>.Count; i += Vector256<T>.Count)
            {
                if (Vector256.EqualsAny(Vector256.LoadUnsafe(ref start, (nuint)i) & m, m))
                {
                    break; // the scalar loop below finds which
                }
            }
        }

        for (; i < values.Length; i++)
        {
            if ((values[i] & mask) == mask)
            {
                return i;
            }
        }

        return -1;
    }
}
