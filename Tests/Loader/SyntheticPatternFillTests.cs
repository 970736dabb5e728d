using System.Security.Cryptography;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Numerics;
using DeepSeekCuda.Loader.Synthetic;

namespace DeepSeekCuda.Tests.Loader;

/// <summary><see cref="SyntheticFill.Pattern"/>: a valid checkpoint with the recipes' magnitudes, deterministic, no per-element draws.</summary>
[TestClass]
public sealed class SyntheticPatternFillTests
{
    [TestMethod]
    public void PatternFillOpensWithTheRecipesMagnitudesAndIsDeterministic()
    {
        using var a = new TempDir();
        using var b = new TempDir();
        SyntheticCheckpoint.Write(a.Path, ModelPresets.Tiny, seed: 5, shards: 2, fill: SyntheticFill.Pattern);
        SyntheticCheckpoint.Write(b.Path, ModelPresets.Tiny, seed: 5, shards: 2, fill: SyntheticFill.Pattern);
        foreach (var file in Directory.GetFiles(a.Path).Select(Path.GetFileName))
        {
            CollectionAssert.AreEqual(SHA256.HashData(File.ReadAllBytes(a.File(file!))), SHA256.HashData(File.ReadAllBytes(b.File(file!))), file);
        }

        using var checkpoint = Checkpoint.Open(a.Path);
        Assert.AreEqual(CheckpointLayout.Expected(ModelPresets.Tiny).Count, checkpoint.Tensors.Count);

        // q_b_proj [144, 96]: N(0, 1/96) clipped at 4.5 σ, one scale per block row: std · 4.5 / 448.
        var n = CheckpointLayout.Layer(ModelPresets.Tiny, 1);
        var std = 1 / Math.Sqrt(96);
        var scales = checkpoint.ReadFloat32(n.QB.Scale);
        Assert.IsTrue(scales.All(s => Math.Abs(s - std * 4.5 / Fp8E4M3.MaxValue) < 1e-9), "constant block scales");
        // 13824 values: the sample std is within 5% of std with overwhelming probability (relative s.e. ≈ 0.6%, plus FP8 rounding ≤ 3.2%).
        AssertStd(checkpoint.ReadFloat32(n.QB.Weight), 0, std, 0.05);
        // Routed expert down_proj: std 0.15 / √96. Norms: 1 + 0.1·N(0, 1), stored BF16.
        AssertStd(checkpoint.ReadFloat32(n.Expert(7)[2].Weight), 0, 0.15 / Math.Sqrt(96), 0.05);
        AssertStd(checkpoint.ReadFloat32(CheckpointLayout.Embedding), 0, 1, 0.02);
        var norm = checkpoint.ReadFloat32(n.InputNorm);
        Assert.IsTrue(norm.All(v => v > 0.4 && v < 1.6), "norm weights near 1");

        // Different pieces read different windows: two experts' codes differ.
        CollectionAssert.AreNotEqual(checkpoint.GetBytes(n.Expert(0)[0].Weight).ToArray(), checkpoint.GetBytes(n.Expert(1)[0].Weight).ToArray());
    }

    private static void AssertStd(float[] values, double mean, double std, double relative)
    {
        var m = values.Average(v => (double)v);
        var s = Math.Sqrt(values.Average(v => ((double)v - m) * ((double)v - m)));
        Assert.AreEqual(mean, m, 5 * std / Math.Sqrt(values.Length) + 1e-3 * std, "mean");
        Assert.AreEqual(std, s, relative * std, "std");
    }
}
