namespace DeepSeekCuda.Loader;

/// <summary>Element types of the safetensors format.</summary>
public enum DType
{
    /// <summary>8-bit float e4m3fn: 4 exponent bits (bias 7), 3 mantissa bits, no infinities, max 448.</summary>
    F8_E4M3,
    /// <summary>8-bit float e5m2.</summary>
    F8_E5M2,
    /// <summary>bfloat16.</summary>
    BF16,
    /// <summary>IEEE half.</summary>
    F16,
    /// <summary>IEEE single.</summary>
    F32,
    /// <summary>IEEE double.</summary>
    F64,
    /// <summary>Signed 8-bit integer.</summary>
    I8,
    /// <summary>Signed 16-bit integer.</summary>
    I16,
    /// <summary>Signed 32-bit integer.</summary>
    I32,
    /// <summary>Signed 64-bit integer.</summary>
    I64,
    /// <summary>Unsigned 8-bit integer.</summary>
    U8,
    /// <summary>Unsigned 16-bit integer.</summary>
    U16,
    /// <summary>Unsigned 32-bit integer.</summary>
    U32,
    /// <summary>Unsigned 64-bit integer.</summary>
    U64,
    /// <summary>Boolean, one byte.</summary>
    BOOL,
}

/// <summary>Names and sizes of <see cref="DType"/> values as the safetensors header writes them.</summary>
internal static class DTypes
{
    /// <summary>Bytes per element.</summary>
    public static int SizeOf(DType dtype) => dtype switch
    {
        DType.F8_E4M3 or DType.F8_E5M2 or DType.I8 or DType.U8 or DType.BOOL => 1,
        DType.BF16 or DType.F16 or DType.I16 or DType.U16 => 2,
        DType.F32 or DType.I32 or DType.U32 => 4,
        DType.F64 or DType.I64 or DType.U64 => 8,
        _ => throw new ArgumentOutOfRangeException(nameof(dtype), dtype, "unknown dtype"),
    };

    /// <summary>Parses a header dtype string exactly (case-sensitive, as the format defines it).</summary>
    public static bool TryParse(string text, out DType dtype)
    {
        // Enum.TryParse would accept numbers and other casings; the format does not.
        foreach (var candidate in Enum.GetValues<DType>())
        {
            if (string.Equals(candidate.ToString(), text, StringComparison.Ordinal))
            {
                dtype = candidate;
                return true;
            }
        }

        dtype = default;
        return false;
    }

    /// <summary>The header string of <paramref name="dtype"/>.</summary>
    public static string Name(DType dtype) => dtype.ToString();
}
