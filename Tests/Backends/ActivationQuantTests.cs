using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Numerics;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Backends;

/// <summary>FP8 activation quantization against the fixture's <c>actq.*</c> and <c>actq_ue8m0.*</c> (exact codes and scales).</summary>
[TestClass]
public sealed class ActivationQuantTests
{
    [TestMethod]
    [DataRow("actq", nameof(ScaleFormat.Float32))]
    [DataRow("actq_ue8m0", nameof(ScaleFormat.Ue8m0))]
    public void CodesScalesAndValuesAreExact(string prefix, string formatName)
    {
        var format = Enum.Parse<ScaleFormat>(formatName);
        using var file = SafetensorsFile.Open(Path.Combine(SharedData.TinyA, "reference.safetensors"));
        var xInfo = file.Get("actq.x"); // the ue8m0 variant quantizes the same matrix
        int rows = (int)xInfo.Shape[0], cols = (int)xInfo.Shape[1];
        var x = file.GetSpan<float>(xInfo);
        var codes = file.GetSpan<long>(file.Get(prefix + ".codes"));
        var values = file.GetSpan<float>(file.Get(prefix + ".values"));
        var scales = file.GetSpan<float>(file.Get(prefix + ".scale"));
        var groups = scales.Length / rows;

        var gotCodes = new byte[cols];
        var gotScales = new float[groups];
        for (var r = 0; r < rows; r++)
        {
            ActivationQuant.Quantize(x.Slice(r * cols, cols), gotCodes, gotScales, ActivationQuant.DefaultGroupSize, format);
            for (var g = 0; g < groups; g++)
            {
                Assert.AreEqual(BitConverter.SingleToInt32Bits(scales[r * groups + g]), BitConverter.SingleToInt32Bits(gotScales[g]),
                    $"{prefix}.scale[{r}, {g}]: {gotScales[g]:R} vs reference {scales[r * groups + g]:R}");
            }

            for (var c = 0; c < cols; c++)
            {
                Assert.AreEqual(codes[r * cols + c], (long)gotCodes[c], $"{prefix}.codes[{r}, {c}] (x = {x[r * cols + c]:R})");
                Assert.AreEqual(values[r * cols + c], Fp8E4M3.ToFloat(gotCodes[c]), $"{prefix}.values[{r}, {c}]");
            }

            // The in-place form feeds the GEMM exactly code × scale.
            var row = x.Slice(r * cols, cols).ToArray();
            ActivationQuant.QuantizeDequantize(row, ActivationQuant.DefaultGroupSize, format);
            for (var c = 0; c < cols; c++)
            {
                Assert.AreEqual(values[r * cols + c] * scales[r * groups + c / ActivationQuant.DefaultGroupSize], row[c], $"{prefix} dequantized [{r}, {c}]");
            }
        }
    }

    [TestMethod]
    public void NarrowLastGroupUsesItsOwnAmax()
    {
        // K = 130: groups of 128 and 2; the second group's scale comes from its two values only.
        var row = new float[130];
        row[0] = 448f;
        row[128] = 0.5f;
        row[129] = -0.25f;
        var codes = new byte[130];
        var scales = new float[2];
        ActivationQuant.Quantize(row, codes, scales);
        Assert.AreEqual(1f, scales[0]);
        Assert.AreEqual(0.5f / 448f, scales[1]);
        Assert.AreEqual(448f, Fp8E4M3.ToFloat(codes[128]));
        Assert.AreEqual(-224f, Fp8E4M3.ToFloat(codes[129]));
    }

    [TestMethod]
    public void ZeroGroupGetsTheFloorScale()
    {
        var codes = new byte[4];
        var scales = new float[1];
        ActivationQuant.Quantize(new float[4], codes, scales);
        Assert.AreEqual(1e-4f / 448f, scales[0]);
        CollectionAssert.AreEqual(new byte[4], codes);
    }
}
