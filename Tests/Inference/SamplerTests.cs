using DeepSeekCuda.Loader.Numerics;
using DeepSeekCuda.Inference;

namespace DeepSeekCuda.Tests.Inference;

[TestClass]
public sealed class SamplerTests
{
    private const int Draws = 200_000;

    private static double[] Softmax(float[] logits, double t)
    {
        var e = logits.Select(l => Math.Exp(l / t)).ToArray();
        var s = e.Sum();
        return e.Select(x => x / s).ToArray();
    }

    private static int[] Counts(SamplingOptions options, float[] logits)
    {
        var sampler = new Sampler(options);
        var counts = new int[logits.Length];
        for (var i = 0; i < Draws; i++)
        {
            counts[sampler.Sample(logits)]++;
        }

        return counts;
    }

    /// <summary>Pearson chi-square of counts against expected probabilities (zero-probability cells must be empty).</summary>
    private static double ChiSquare(int[] counts, double[] p)
    {
        double chi = 0;
        for (var i = 0; i < counts.Length; i++)
        {
            if (p[i] == 0)
            {
                Assert.AreEqual(0, counts[i], $"token {i} has probability 0 but was drawn");
                continue;
            }

            var e = p[i] * Draws;
            chi += (counts[i] - e) * (counts[i] - e) / e;
        }

        return chi;
    }

    [TestMethod]
    public void Xoshiro_MatchesReferenceSequence()
    {
        // xoshiro256** seeded by SplitMix64(42), computed by a separate Python transcription of the authors' C code.
        var rng = new Xoshiro256(42);
        ulong[] expected = [0x15780b2e0c2ec716, 0x6104d9866d113a7e, 0xae17533239e499a1, 0xecb8ad4703b360a1];
        foreach (var e in expected)
        {
            Assert.AreEqual(e, rng.NextUInt64());
        }
    }

    [TestMethod]
    public void ArgMax_LowestIdOnTies()
    {
        Assert.AreEqual(1, Sampler.ArgMax([0f, 3f, 1f, 3f]));
        Assert.AreEqual(0, Sampler.ArgMax([float.NegativeInfinity, float.NegativeInfinity]));
    }

    [TestMethod]
    public void Greedy_TopK1_TinyTopP_AllPickArgmax()
    {
        float[] logits = [0.5f, 2f, 2f, 1.9f, -1f];
        foreach (var o in new[] { SamplingOptions.Greedy, new SamplingOptions { Temperature = 1, TopK = 1, Seed = 1 }, new SamplingOptions { Temperature = 1, TopP = 1e-6f, Seed = 2 } })
        {
            var sampler = new Sampler(o);
            for (var i = 0; i < 1000; i++)
            {
                Assert.AreEqual(1, sampler.Sample(logits));
            }
        }
    }

    [TestMethod]
    [DataRow(1.0)]
    [DataRow(0.6)]
    [DataRow(2.0)]
    public void Temperature_MatchesSoftmax(double t)
    {
        float[] logits = [1f, 2f, 3f, 0.5f, -1f, 2.5f];
        var counts = Counts(new SamplingOptions { Temperature = (float)t, TopP = 1, Seed = 7 }, logits);

        // 5 degrees of freedom; 20.5 is the 0.999 quantile.
        Assert.IsLessThan(20.5, ChiSquare(counts, Softmax(logits, t)));
    }

    [TestMethod]
    public void TopK_NeverDrawsOutside_AndRenormalizes()
    {
        float[] logits = [1f, 3f, 0f, 2f, 2.5f];
        var counts = Counts(new SamplingOptions { Temperature = 1, TopK = 3, TopP = 1, Seed = 11 }, logits);
        var p = Softmax(logits, 1);
        var keep = new[] { 1, 4, 3 };
        var mass = keep.Sum(i => p[i]);
        var expected = p.Select((x, i) => keep.Contains(i) ? x / mass : 0).ToArray();
        Assert.IsLessThan(13.8, ChiSquare(counts, expected)); // 2 dof, 0.999 quantile
    }

    [TestMethod]
    public void TopP_KeepsSmallestNucleus()
    {
        // Probabilities 0.5, 0.3, 0.15, 0.05: top-p 0.7 keeps {0, 1} (0.5 < 0.7 <= 0.8), renormalized to 0.625/0.375.
        float[] logits = [MathF.Log(0.5f), MathF.Log(0.3f), MathF.Log(0.15f), MathF.Log(0.05f)];
        var counts = Counts(new SamplingOptions { Temperature = 1, TopP = 0.7f, Seed = 3 }, logits);
        Assert.IsLessThan(10.9, ChiSquare(counts, [0.625, 0.375, 0, 0])); // 1 dof, 0.999 quantile
    }

    [TestMethod]
    public void SameSeed_SameDraws_DifferentSeed_DifferentDraws()
    {
        var logits = Enumerable.Range(0, 50).Select(i => (float)Math.Sin(i)).ToArray();
        int[] Draw(long seed)
        {
            var s = new Sampler(new SamplingOptions { Temperature = 1, Seed = seed });
            return Enumerable.Range(0, 100).Select(_ => s.Sample(logits)).ToArray();
        }

        CollectionAssert.AreEqual(Draw(5), Draw(5));
        CollectionAssert.AreNotEqual(Draw(5), Draw(6));
    }

    [TestMethod]
    public void Defaults_AreR1Recommendations()
    {
        var o = new SamplingOptions();
        Assert.AreEqual(0.6f, o.EffectiveTemperature);
        Assert.AreEqual(0.95f, o.EffectiveTopP);
        Assert.IsFalse(o.IsGreedy);
        Assert.IsTrue(new SamplingOptions { Temperature = 0 }.IsGreedy);
    }
}
