using DeepSeekCuda.Loader;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Loader;

[TestClass]
public sealed class TinyACheckpointTests
{
    [TestMethod]
    public void OpensAndValidatesAgainstItsConfig()
    {
        using var checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        Assert.AreEqual(256, checkpoint.Config.HiddenSize);
        Assert.AreEqual(383, checkpoint.Tensors.Count, "reference.json checkpoint.tensor_count");
        Assert.AreEqual(CheckpointLayout.Expected(checkpoint.Config).Count, checkpoint.Tensors.Count);
        Assert.AreEqual(0.16562687709876717, checkpoint.Config.SoftmaxScale, 1e-12, "reference.json derived.softmax_scale");
    }

    [TestMethod]
    public void ScaleInAnotherShardIsFoundThroughTheIndex()
    {
        using var checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        const string weight = "model.layers.1.mlp.experts.8.down_proj.weight";
        Assert.AreNotEqual(Path.GetFileName(checkpoint.Get(weight).FilePath), Path.GetFileName(checkpoint.Get(weight + "_scale_inv").FilePath));
        var values = checkpoint.ReadFloat32(weight);
        Assert.IsTrue(values.Any(v => v != 0));
    }

    [TestMethod]
    public void DequantizationIsBitExact()
    {
        using var checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        using var reference = SafetensorsFile.Open(Path.Combine(SharedData.TinyA, "reference.safetensors"));
        const string name = "model.layers.0.self_attn.q_a_proj.weight";
        var expected = reference.GetSpan<float>(reference.Get("dequant." + name));
        var actual = checkpoint.ReadFloat32(name);
        Assert.AreEqual(expected.Length, actual.Length);
        for (var i = 0; i < actual.Length; i++)
        {
            if (BitConverter.SingleToInt32Bits(actual[i]) != BitConverter.SingleToInt32Bits(expected[i]))
            {
                Assert.Fail($"element {i}: {actual[i]:R} != reference {expected[i]:R}");
            }
        }
    }
}
