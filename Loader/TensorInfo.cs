using System.Collections.Immutable;

namespace DeepSeekCuda.Loader;

/// <summary>One tensor's entry in a safetensors header.</summary>
/// <param name="Name">The tensor name.</param>
/// <param name="DType">Element type.</param>
/// <param name="Shape">Dimensions, outermost first.</param>
/// <param name="Begin">Start of the bytes, relative to the data section.</param>
/// <param name="End">End (exclusive) of the bytes, relative to the data section.</param>
/// <param name="FilePath">The file holding the tensor.</param>
public sealed record TensorInfo(string Name, DType DType, ImmutableArray<long> Shape, long Begin, long End, string FilePath)
{
    /// <summary>Product of the dimensions (1 for a scalar).</summary>
    public long ElementCount
    {
        get
        {
            long n = 1;
            foreach (var d in Shape)
            {
                n *= d;
            }

            return n;
        }
    }

    /// <summary>Bytes of data.</summary>
    public long ByteLength => End - Begin;

    /// <summary>The shape as <c>[a, b]</c>.</summary>
    public string ShapeText => FormatShape(Shape);

    /// <summary>Formats a shape as <c>[a, b]</c>.</summary>
    public static string FormatShape(IEnumerable<long> shape) => "[" + string.Join(", ", shape) + "]";
}
