using System.Runtime.InteropServices;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Numerics;
using DeepSeekCuda.Loader.Synthetic;

namespace DeepSeekCuda.Tests.Loader;

/// <summary>
/// <see cref="WeightReader"/> and its <see cref="HostView"/>s on checkpoints written here: what a view holds is checked
/// element by element against the stored tensor indexed by hand, an FP8 slice's views dequantize to exactly the values
/// the CPU backend reads for the same slice, and every refusal names the tensor.
/// </summary>
[TestClass]
public sealed class WeightReaderTests
{
    private const int Block = 128;

    /// <summary>A checkpoint of the tiny preset's config (128x128 FP8 blocks) holding exactly <paramref name="tensors"/>, unvalidated.</summary>
    private static Checkpoint Write(TempDir dir, params (string Name, DType DType, long[] Shape, byte[] Data)[] tensors)
    {
        File.WriteAllText(dir.File("config.json"), SyntheticCheckpoint.ConfigJson(ModelPresets.Tiny));
        SafetensorsWriter.WriteFile(dir.File("model.safetensors"), tensors);
        return Checkpoint.Open(dir.Path, validateAgainstConfig: false);
    }

    /// <summary>Finite e4m3 codes (0x7F and 0xFF are NaN), a pattern no two neighbours share.</summary>
    private static byte[] Codes(int rows, int cols, int seed)
    {
        var rng = new Random(seed);
        return [.. Enumerable.Range(0, rows * cols).Select(_ => (byte)(rng.Next(0x7F) | (rng.Next(2) << 7)))];
    }

    private static float[] Scales(int rows, int cols, int seed)
    {
        var rng = new Random(seed);
        return [.. Enumerable.Range(0, Blocks(rows) * Blocks(cols)).Select(_ => (float)rng.NextDouble() + 0.5f)];
    }

    private static int Blocks(int n) => (n + Block - 1) / Block;

    private static byte[] Bytes<T>(T[] values)
        where T : unmanaged => MemoryMarshal.AsBytes(values.AsSpan()).ToArray();

    private static Checkpoint WriteFp8(TempDir dir, int rows, int cols, out byte[] codes, out float[] scales)
    {
        codes = Codes(rows, cols, rows * 7 + cols);
        scales = Scales(rows, cols, rows + cols * 3);
        return Write(dir, ("w", DType.F8_E4M3, [rows, cols], codes), ("w_scale_inv", DType.F32, [Blocks(rows), Blocks(cols)], Bytes(scales)));
    }

    [TestMethod]
    [DataRow(256, 512, 0, 128, 128, 256)] // block-aligned starts (tiny-a q_b/kv_b by head, N = 2)
    [DataRow(256, 256, 0, 256, 64, 64)] // columns inside one block (tiny-a o_proj, N = 4)
    [DataRow(128, 256, 32, 32, 0, 256)] // rows inside one block (tiny-a shared expert gate/up, N = 4): one run
    [DataRow(300, 200, 128, 172, 0, 200)] // ragged stored edge
    [DataRow(512, 320, 384, 100, 128, 64)]
    [DataRow(200, 136, 0, 200, 0, 136)] // the whole tensor, as a slice
    public void Fp8SliceViewsHoldTheRectangleAndEachElementsStoredBlockScale(int storedRows, int storedCols, int rowStart, int rows, int colStart, int cols)
    {
        using var dir = new TempDir();
        using var checkpoint = WriteFp8(dir, storedRows, storedCols, out var codes, out var scales);
        var spec = new LinearSpec("w", storedRows, storedCols, Quantized: true).Sliced(rowStart, rows, colStart, cols);

        var view = WeightReader.Fp8(checkpoint, spec, "the test kernels");

        Assert.AreEqual((rows, cols, Block, Block), (view.Rows, view.Cols, view.BlockRows, view.BlockCols));
        var gotCodes = view.Codes.ToArray(checkpoint);
        Assert.HasCount(rows * cols, gotCodes);
        var gotScales = MemoryMarshal.Cast<byte, float>(view.Scales.ToArray(checkpoint)).ToArray();
        var cb = Blocks(cols);
        Assert.HasCount(Blocks(rows) * cb, gotScales);
        for (var r = 0; r < rows; r++)
        {
            for (var c = 0; c < cols; c++)
            {
                Assert.AreEqual(codes[((rowStart + r) * storedCols) + colStart + c], gotCodes[(r * cols) + c], $"code [{r}, {c}]");
                var stored = scales[((rowStart + r) / Block * Blocks(storedCols)) + ((colStart + c) / Block)];
                Assert.AreEqual(stored, gotScales[(r / Block * cb) + (c / Block)], 0f, $"scale of element [{r}, {c}]");
            }
        }

        // What the GPU receives dequantizes to exactly what the CPU backend computes with.
        var dequantized = new float[rows * cols];
        Dequantize.Fp8Blocks(gotCodes, gotScales, rows, cols, Block, Block, dequantized);
        CollectionAssert.AreEqual(WeightReader.Float32(checkpoint, spec), dequantized);
    }

    [TestMethod]
    public void AWholeWeightIsOneRunOfTheStoredBytes()
    {
        using var dir = new TempDir();
        using var checkpoint = WriteFp8(dir, 200, 136, out var codes, out var scales);
        var view = WeightReader.Fp8(checkpoint, new LinearSpec("w", 200, 136, Quantized: true), "the test kernels");
        Assert.AreEqual((1, 1), (view.Codes.Rows, view.Scales.Rows));
        CollectionAssert.AreEqual(codes, view.Codes.ToArray(checkpoint));
        CollectionAssert.AreEqual(Bytes(scales), view.Scales.ToArray(checkpoint));
        CollectionAssert.AreEqual(checkpoint.ReadFloat32("w"), WeightReader.Float32(checkpoint, new LinearSpec("w", 200, 136, Quantized: true)));
    }

    [TestMethod]
    [DataRow(384, 192, 192, 192, 0, 192, "rows start at 192")] // wide8-like q_b heads: 192..384 crosses 256
    [DataRow(256, 320, 0, 256, 40, 120, "columns start at 40")] // 40..160 crosses 128
    public void SlicesTheScaleGridCannotExpressAreRefusedByNameButTheCpuValuesAreTheRectangle(
        int storedRows, int storedCols, int rowStart, int rows, int colStart, int cols, string what)
    {
        using var dir = new TempDir();
        using var checkpoint = WriteFp8(dir, storedRows, storedCols, out _, out _);
        var spec = new LinearSpec("w", storedRows, storedCols, Quantized: true).Sliced(rowStart, rows, colStart, cols);

        var e = Assert.ThrowsExactly<NotSupportedException>(() => WeightReader.Fp8(checkpoint, spec, "the test kernels"));
        StringAssert.Contains(e.Message, "'w' slice");
        StringAssert.Contains(e.Message, what);

        var whole = checkpoint.ReadFloat32("w");
        var values = WeightReader.Float32(checkpoint, spec);
        Assert.HasCount(rows * cols, values);
        for (var r = 0; r < rows; r += 7)
        {
            for (var c = 0; c < cols; c++)
            {
                Assert.AreEqual(whole[((rowStart + r) * storedCols) + colStart + c], values[(r * cols) + c], 0f, $"[{r}, {c}]");
            }
        }
    }

    [TestMethod]
    public void WrongTypesAndShapesAreRefusedNamingTheTensor()
    {
        using var dir = new TempDir();
        var bf16 = Bytes(Enumerable.Range(0, 64 * 32).Select(i => BFloat16.FromFloat(i * 0.25f)).ToArray());
        using var checkpoint = Write(dir,
            ("b", DType.BF16, [64, 32], bf16),
            ("f", DType.F8_E4M3, [64, 32], Codes(64, 32, 1)), ("f_scale_inv", DType.F32, [1, 2], Bytes(new float[2])),
            ("g", DType.F8_E4M3, [64, 32], Codes(64, 32, 2)), ("g_scale_inv", DType.BF16, [1, 1], Bytes(new ushort[1])),
            ("h", DType.F8_E4M3, [64, 32], Codes(64, 32, 3)));

        var notFp8 = Assert.ThrowsExactly<NotSupportedException>(() => WeightReader.Fp8(checkpoint, new LinearSpec("b", 64, 32, true), "the test kernels"));
        StringAssert.Contains(notFp8.Message, "'b' is BF16: the test kernels take FP8 e4m3 weights only");
        var shape = Assert.ThrowsExactly<CheckpointException>(() => WeightReader.Fp8(checkpoint, new LinearSpec("b", 32, 64, true), "k"));
        StringAssert.Contains(shape.Message, "tensor 'b' has shape [64, 32], the model needs [32, 64]");
        var grid = Assert.ThrowsExactly<CheckpointException>(() => WeightReader.Fp8(checkpoint, new LinearSpec("f", 64, 32, true), "k"));
        StringAssert.Contains(grid.Message, "tensor 'f_scale_inv' has shape [1, 2], the model needs [1, 1]");
        var scaleType = Assert.ThrowsExactly<NotSupportedException>(() => WeightReader.Fp8(checkpoint, new LinearSpec("g", 64, 32, true), "the test kernels"));
        StringAssert.Contains(scaleType.Message, "'g_scale_inv' is BF16; the test kernels take F32 block scales");
        var missing = Assert.ThrowsExactly<CheckpointException>(() => WeightReader.Fp8(checkpoint, new LinearSpec("h", 64, 32, true), "k"));
        StringAssert.Contains(missing.Message, "'h_scale_inv' not found");
        Assert.AreEqual("h_scale_inv", missing.TensorName);
        Assert.AreEqual("nope", Assert.ThrowsExactly<CheckpointException>(() => WeightReader.Bf16(checkpoint, "nope", null, "k", 1)).TensorName);
        StringAssert.Contains(Assert.ThrowsExactly<CheckpointException>(() => WeightReader.Float32(checkpoint, "b", 64)).Message, "tensor 'b' has shape [64, 32], the model needs [64]");
    }

    [TestMethod]
    public void Bf16ViewsAreTheStoredBitsOrAnExactConversion()
    {
        using var dir = new TempDir();
        var rng = new Random(5);
        var bits = Enumerable.Range(0, 6 * 10).Select(_ => BFloat16.FromFloat((float)(rng.NextDouble() * 8 - 4))).ToArray();
        var exact = bits.Select(BFloat16.ToFloat).ToArray();
        using var checkpoint = Write(dir,
            ("b", DType.BF16, [6, 10], Bytes(bits)),
            ("x", DType.F32, [6, 10], Bytes(exact)),
            ("y", DType.F32, [4], Bytes(new[] { 1f, 2f, 1.1f, 3f })),
            ("z", DType.F32, [4], Bytes(new[] { 1f, -2f, 0.5f, 3f })));
        var slice = new TensorSlice(6, 10, 2, 3, 4, 5);
        var expected = slice.Extract<ushort>(bits);

        var stored = WeightReader.Bf16(checkpoint, "b", slice, "k", 6, 10);
        Assert.AreSame(checkpoint.Get("b"), stored.Tensor);
        Assert.AreEqual(3, stored.Rows, "three runs of five columns");
        CollectionAssert.AreEqual(Bytes(expected), stored.ToArray(checkpoint));
        CollectionAssert.AreEqual(Bytes(bits), WeightReader.Bf16(checkpoint, "b", null, "k", 6, 10).ToArray(checkpoint));

        var converted = WeightReader.Bf16(checkpoint, "x", slice, "k", 6, 10);
        Assert.IsNull(converted.Tensor);
        CollectionAssert.AreEqual(Bytes(expected), converted.ToArray(checkpoint));

        var inexact = Assert.ThrowsExactly<NotSupportedException>(() => WeightReader.Bf16(checkpoint, "y", null, "the test kernels", 4));
        StringAssert.Contains(inexact.Message, "'y' is F32 with values that are not BF16 (element 2: 1.1); the test kernels take this weight as BF16");

        // F32: the stored bytes when F32, widened otherwise.
        Assert.AreSame(checkpoint.Get("z"), WeightReader.F32(checkpoint, "z", 4).Tensor);
        CollectionAssert.AreEqual(Bytes(new[] { 1f, -2f, 0.5f, 3f }), WeightReader.F32(checkpoint, "z", 4).ToArray(checkpoint));
        CollectionAssert.AreEqual(Bytes(exact), WeightReader.F32(checkpoint, "b", 6, 10).ToArray(checkpoint));
    }

    [TestMethod]
    public void AViewCopiesAnyRangeAcrossItsRuns()
    {
        using var dir = new TempDir();
        using var checkpoint = WriteFp8(dir, 40, 30, out var codes, out _);
        var slice = new TensorSlice(40, 30, 3, 20, 7, 11);
        var view = HostView.Rectangle(checkpoint.Get("w"), slice);
        var expected = slice.Extract<byte>(codes);
        Assert.AreEqual(expected.Length, view.Length);
        CollectionAssert.AreEqual(expected, view.ToArray(checkpoint));
        foreach (var (offset, length) in new[] { (0, 1), (5, 6), (10, 1), (10, 12), (3, 150), (expected.Length - 4, 4), (expected.Length, 0) })
        {
            var part = new byte[length];
            view.CopyTo(checkpoint, offset, part);
            CollectionAssert.AreEqual(expected[offset..(offset + length)], part, $"[{offset}, +{length})");
        }

        // Where each byte lies in the file orders an upload's reads.
        var info = checkpoint.Get("w");
        Assert.AreEqual(info.Begin + (3 * 30) + 7, view.FileOffset(0));
        Assert.AreEqual(info.Begin + (4 * 30) + 7 + 2, view.FileOffset(13));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => view.CopyTo(checkpoint, expected.Length - 1, new byte[2]));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => view.CopyTo(checkpoint, -1, new byte[1]));
        Assert.ThrowsExactly<ArgumentException>(() => HostView.Rectangle(info, new TensorSlice(30, 40, 0, 1, 0, 1)));
    }
}
