using DeepSeekCuda.Backends;
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
        float[] logits = [0.5f, 2f, 1.95f, 1.9f, -1f];
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
    public void Ties_GreedyTakesTheLowestId_ThresholdsKeepEveryTie()
    {
        // Greedy (and top-k 1, which is greedy) takes the lowest of equal maxima; a top-k or top-p threshold that falls on
        // a tie keeps all of it (the GPU kernel's rule: a threshold is a logit value), and the draw weighs them equally.
        float[] logits = [0.5f, 2f, 2f, 1.9f, -1f];
        Assert.AreEqual(1, new Sampler(SamplingOptions.Greedy).Sample(logits));
        Assert.AreEqual(1, new Sampler(new SamplingOptions { Temperature = 1, TopK = 1, Seed = 1 }).Sample(logits));
        foreach (var o in new[] { new SamplingOptions { Temperature = 1, TopP = 1e-6f, Seed = 2 }, new SamplingOptions { Temperature = 1, TopK = 2, TopP = 1, Seed = 3 } })
        {
            var sampler = new Sampler(o);
            var counts = new int[logits.Length];
            for (var i = 0; i < 4000; i++)
            {
                counts[sampler.Sample(logits)]++;
            }

            Assert.AreEqual(4000, counts[1] + counts[2], $"{o}: only the tied maxima");
            Assert.IsLessThan(5 * Math.Sqrt(1000) + 1, Math.Abs(counts[1] - 2000), $"{o}: the ties weigh equally ({counts[1]} of 4000)");
        }

        // Top-k 3 over [.., 2, 2, 1.9, ..] keeps exactly {1, 2, 3}; top-k 2 would keep the two tied 2s only (above).
        var three = new Sampler(new SamplingOptions { Temperature = 1, TopK = 3, TopP = 1, Seed = 4 });
        var seen = new HashSet<int>();
        for (var i = 0; i < 2000; i++)
        {
            seen.Add(three.Sample(logits));
        }

        CollectionAssert.AreEquivalent(new[] { 1, 2, 3 }, seen.ToArray());
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

    [TestMethod]
    [DataRow(1e-39f, 0.95f)]
    [DataRow(1e-39f, 1f)]
    [DataRow(float.Epsilon, 0.5f)]
    [DataRow(1e-30f, 1f)]
    [DataRow(9.9e-6f, 0.95f)]
    public void TemperatureBelowTheGreedyThreshold_IsArgmax_NeverAnError(float temperature, float topP)
    {
        // The largest logit is not at id 0, so "token 0 by accident" cannot pass.
        float[] logits = [0.5f, -1f, 3.25f, 3.2f, 2f];
        var options = new SamplingOptions { Temperature = temperature, TopP = topP, Seed = 5 };
        Assert.IsTrue(options.IsGreedy);
        var sampler = new Sampler(options);
        for (var i = 0; i < 100; i++)
        {
            Assert.AreEqual(2, sampler.Sample(logits));
        }
    }

    [TestMethod]
    public void TemperatureJustAboveTheGreedyThreshold_StillSamples_WithFiniteWeights()
    {
        // At T = 1e-5 a logit gap of 1e-6 still weighs e^-0.1: both ids must come up.
        float[] logits = [0f, 1f, 1f - 1e-6f, -5f];
        var sampler = new Sampler(new SamplingOptions { Temperature = 1e-5f, TopP = 1f, Seed = 9 });
        var counts = new int[logits.Length];
        for (var i = 0; i < 4000; i++)
        {
            counts[sampler.Sample(logits)]++;
        }

        Assert.AreEqual(0, counts[0] + counts[3]);
        Assert.IsGreaterThan(1000, counts[1]);
        Assert.IsGreaterThan(1000, counts[2]);
    }

    [TestMethod]
    [DataRow(float.PositiveInfinity)]
    [DataRow(float.NaN)]
    [DataRow(-0.1f)]
    public void NonFiniteOrNegativeTemperature_IsRefusedByName(float temperature)
    {
        var e = Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => new Sampler(new SamplingOptions { Temperature = temperature }));
        Assert.AreEqual("Temperature", e.ParamName);
    }

    [TestMethod]
    [DataRow(float.NaN)]
    [DataRow(float.PositiveInfinity)]
    public void ModelRow_WithANaNOrInfiniteLogit_IsAnError_NeverAToken(float bad)
    {
        var logits = new float[10];
        logits[3] = 2f;
        logits[6] = bad;
        logits[7] = bad;
        foreach (var options in new[] { SamplingOptions.Greedy, new SamplingOptions { Seed = 1 }, new SamplingOptions { Seed = 1, TopP = 1f } })
        {
            var e = Assert.ThrowsExactly<NonFiniteLogitsException>(() => new Sampler(options).SampleModelRow(logits.ToArray(), 10));
            Assert.AreEqual(6, e.TokenId);
            Assert.AreEqual(2, e.Count);
        }
    }

    [TestMethod]
    public void ModelRow_MinusInfinityIsAMask_ButAllMinusInfinityIsAnError()
    {
        float[] masked = [float.NegativeInfinity, -3f, float.NegativeInfinity, -4f];
        var sampler = new Sampler(new SamplingOptions { Temperature = 2f, Seed = 4 });
        for (var i = 0; i < 100; i++)
        {
            Assert.IsTrue(sampler.SampleModelRow(masked.ToArray(), 4) is 1 or 3);
        }

        // Past the limit stays masked whatever it holds; below it nothing is possible.
        float[] impossible = [float.NegativeInfinity, float.NegativeInfinity, 5f];
        var e = Assert.ThrowsExactly<NonFiniteLogitsException>(() => sampler.SampleModelRow(impossible, 2));
        Assert.AreEqual(-1, e.TokenId);
        StringAssert.Contains(e.Message, "all -infinity");
    }

    [TestMethod]
    public void ModelRow_MasksThePaddedVocabulary_AndIgnoresWhatIsThere()
    {
        // Padding past the tokenizer holds garbage (here NaN and the largest value): never drawn, never an error.
        float[] logits = [0f, 1f, 0.5f, float.NaN, 100f];
        var sampler = new Sampler(new SamplingOptions { Temperature = 1f, TopP = 1f, Seed = 3 });
        for (var i = 0; i < 200; i++)
        {
            var row = logits.ToArray();
            Assert.IsLessThan(3, sampler.SampleModelRow(row, 3));
            Assert.IsTrue(float.IsNegativeInfinity(row[3]) && float.IsNegativeInfinity(row[4]), "masked in place");
        }
    }

    /// <summary>Allows, after n tokens, the ids i with (i · 7 + n) mod 5 &lt; 2, and only id 12 after token 11 (a state with one id).</summary>
    private sealed class StepConstraint(bool bits) : PredicateConstraint(hostOnly: !bits)
    {
        private int _last = -1;

        public int Steps { get; private set; }

        public override bool Allows(int id) => _last == 11 ? id == 12 : (id * 7 + Steps) % 5 < 2;

        protected override void Moved(int tokenId)
        {
            _last = tokenId;
            Steps++;
        }
    }

    [TestMethod]
    [DataRow(0f, 0, 1f)]
    [DataRow(0.9f, 40, 0.95f)]
    [DataRow(1.4f, 0, 0.6f)]
    public void AConstrainedTokenChosenWhereTheLogitsAreIsTheOneTheHostWouldSample(float temperature, int topK, float topP)
    {
        // Two samplers of one request: one masks each row on the host, the other hands the backend its allowed ids and
        // accepts what it chooses (here the rule itself, as the CPU backend runs it). Rows are wider than the limit, with
        // garbage in the padding.
        const int limit = 300, width = 320;
        var options = new SamplingOptions { Temperature = temperature, TopK = topK > 0 ? topK : null, TopP = topP, Seed = 21 };
        var (hostRule, deviceRule) = (new StepConstraint(bits: false), new StepConstraint(bits: true));
        var (host, device) = (new Sampler(options, hostRule), new Sampler(options, deviceRule));
        var rng = new Random(8);
        for (var step = 0; step < 150; step++)
        {
            var row = Enumerable.Range(0, width).Select(_ => (float)(rng.NextDouble() * 6 - 3)).ToArray();
            row[limit + 3] = float.NaN;
            if (step == 43)
            {
                row[11] = 9f; // allowed, and the argmax: the state after it allows only 12
            }

            var choice = device.Choice(limit);
            Assert.IsNotNull(choice.Allowed, "a constraint that writes its allowed ids is chosen where the logits are");
            Assert.AreEqual(TokenChoice.MaskWords(limit), choice.Allowed.Length);
            Assert.AreEqual(default, device.Choice(limit, ahead: 1), "the token after it waits for the constraint to see this one");
            var id = TokenSampling.Choose(row, choice);
            Assert.AreNotEqual(TokenSampling.NotChosen, id);
            Assert.AreEqual(host.SampleModelRow(row.ToArray(), limit), device.Accept(id), $"step {step}");
        }

        Assert.AreEqual(150, hostRule.Masks);
        Assert.AreEqual(0, deviceRule.Masks, "the backend's sampler never masked a row");
        Assert.AreEqual(hostRule.Steps, deviceRule.Steps);
    }

    [TestMethod]
    public void AConstraintThatOnlyMasksRowsIsSampledOnTheHost()
    {
        var sampler = new Sampler(new SamplingOptions { Seed = 2 }, new StepConstraint(bits: false));
        Assert.AreEqual(default, sampler.Choice(100));
        var e = Assert.ThrowsExactly<InvalidOperationException>(() => sampler.Accept(3));
        StringAssert.Contains(e.Message, "sampled on the host");

        // A backend choice that cannot be made (nothing allowed above -infinity: the first state allows 0, 3, 5 and 8) comes
        // back as the row: the host's sampler names the constraint, and an Accept without a new choice is refused.
        var masked = new Sampler(new SamplingOptions { Seed = 2 }, new StepConstraint(bits: true));
        var choice = masked.Choice(10);
        var row = new float[10];
        foreach (var id in new[] { 0, 3, 5, 8 })
        {
            row[id] = float.NegativeInfinity;
        }

        CollectionAssert.AreEqual(new[] { 0, 3, 5, 8 }, Enumerable.Range(0, 10).Where(id => TokenChoice.IsAllowed(choice.Allowed, id)).ToArray());
        Assert.AreEqual(TokenSampling.NotChosen, TokenSampling.Choose(row, choice));
        var none = Assert.ThrowsExactly<InvalidOperationException>(() => masked.SampleModelRow(row, 10));
        StringAssert.Contains(none.Message, nameof(StepConstraint));
        Assert.ThrowsExactly<InvalidOperationException>(() => masked.Accept(1));
    }
}
