namespace DeepSeekCuda.Loader.Numerics;

/// <summary>FP8 block dequantization: W[r,c] = e4m3(q[r,c]) × scale_inv[r/bR, c/bC], in float32.</summary>
internal static class Dequantize
{
    /// <summary>Dequantizes a [rows, cols] e4m3 matrix with its [⌈rows/bR⌉, ⌈cols/bC⌉] scale grid; edge blocks may be partial.</summary>
    public static void Fp8Blocks(ReadOnlySpan<byte> codes, ReadOnlySpan<float> scaleInv, int rows, int cols,
        int blockRows, int blockCols, Span<float> destination)
    {
        var gridCols = (cols + blockCols - 1) / blockCols;
        var gridRows = (rows + blockRows - 1) / blockRows;
        if (codes.Length != (long)rows * cols || destination.Length < (long)rows * cols)
        {
            throw new ArgumentException($"codes/destination do not hold [{rows}, {cols}]");
        }

        if (scaleInv.Length != (long)gridRows * gridCols)
        {
            throw new ArgumentException($"scale grid has {scaleInv.Length} entries, [{rows}, {cols}] in {blockRows}x{blockCols} blocks needs [{gridRows}, {gridCols}]");
        }

        var table = Fp8E4M3.DecodeTable;
        for (var r = 0; r < rows; r++)
        {
            var scaleRow = scaleInv.Slice(r / blockRows * gridCols, gridCols);
            var src = codes.Slice(r * cols, cols);
            var dst = destination.Slice(r * cols, cols);
            for (var c = 0; c < cols; c++)
            {
                dst[c] = table[src[c]] * scaleRow[c / blockCols];
            }
        }
    }
}
