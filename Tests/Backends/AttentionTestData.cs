using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cpu;

namespace DeepSeekCuda.Tests.Backends;

/// <summary>Small MLA geometry, seeded inputs and weights, and bitwise comparison for the CPU backend's attention-path tests.</summary>
internal static class AttentionTestData
{
    // latent 128 (one FP8 activation group), rope 8, 3 heads of nope 16 / v 12.
    public static readonly MlaDims Dims = new(3, 16, 8, 12, 128);

    public static float[] Normal(Random r, int n, float scale = 1f) =>
        [.. Enumerable.Range(0, n).Select(_ => scale * (float)(Math.Sqrt(-2 * Math.Log(1 - r.NextDouble())) * Math.Cos(2 * Math.PI * r.NextDouble())))];

    public static float[] Read(IBackend b, Tensor t)
    {
        var a = new float[t.Length];
        b.Download(t, a);
        return a;
    }

    /// <summary>
    /// A layer's attention weights for <paramref name="positions"/> positions: a rotary table of distinct angles, a kv_a norm
    /// near 1, and kv_b flagged FP8 (GpuEmulation then quantizes the latents fed to it as the GPU's FP8 GEMM does).
    /// </summary>
    public static (RopeTable Rope, CpuNormWeight KvNorm, CpuLinearWeight KvB) AttentionWeights(CpuBackend b, Random r, int positions)
    {
        var pairs = Dims.QkRope / 2;
        var angles = Enumerable.Range(0, positions * pairs).Select(i => (i / pairs + 1) * 0.7 / (1 + i % pairs)).ToArray();
        var rope = b.UploadRope([.. angles.Select(a => (float)Math.Cos(a))], [.. angles.Select(a => (float)Math.Sin(a))], positions, pairs);
        var kvNorm = new CpuNormWeight(Dims.KvLora, 1e-6f, [.. Normal(r, Dims.KvLora, 0.1f).Select(v => 1 + v)]);
        var kvB = new CpuLinearWeight(Dims.Heads * Dims.KvBHead, Dims.KvLora, true, Normal(r, Dims.Heads * Dims.KvBHead * Dims.KvLora, 0.1f));
        return (rope, kvNorm, kvB);
    }

    public static void Bitwise(float[] got, float[] want, string what)
    {
        Assert.HasCount(want.Length, got, what);
        for (var i = 0; i < want.Length; i++)
        {
            if (BitConverter.SingleToInt32Bits(got[i]) != BitConverter.SingleToInt32Bits(want[i]))
            {
                Assert.Fail($"{what}: [{i}] {got[i]:g9} vs {want[i]:g9}");
            }
        }
    }
}
