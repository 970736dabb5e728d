using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cpu;

namespace DeepSeekCuda.Tests.Backends;

/// <summary>The rule of token choice (<see cref="TokenSampling"/>) and the CPU backend's token choice (<see cref="TokenChoices.ChooseTokens"/>), on values worked out by hand.</summary>
[TestClass]
public sealed class TokenSamplingTests
{
    [TestMethod]
    public void UniformIsSplitMix64OfTheSeedAndTheDrawCounter()
    {
        // Vigna's splitmix64.c from state 0 returns 0xE220A8397B1DCDAF, then 0x6E789E6AA1B965F4 (state 0x9E3779B97F4A7C15).
        // Uniform(seed, draw) = top 24 bits of SplitMix64(seed ^ SplitMix64(draw)) / 2^24, so seed = SplitMix64(draw) gives SplitMix64(0).
        Assert.AreEqual(0xE220A8 / 16777216f, TokenSampling.Uniform(0xE220A8397B1DCDAFUL, 0));
        Assert.AreEqual(0x6E789E / 16777216f, TokenSampling.Uniform(0xE220A8397B1DCDAFUL ^ 0x9E3779B97F4A7C15UL, 0));
        Assert.AreNotEqual(TokenSampling.Uniform(1, 0), TokenSampling.Uniform(1, 1), "each draw of a seed is its own");
    }

    [TestMethod]
    public void ADrawIsTheFirstIdWhoseRunningWeightPassesU()
    {
        // Weights relative to the max: 1, 0.6, 0.4 (total 2): u < 0.5 -> 0, u < 0.8 -> 1, else 2, whatever the id order of the logits.
        float[] logits = [MathF.Log(0.3f), MathF.Log(0.5f), MathF.Log(0.2f)];
        Assert.AreEqual(0, TokenSampling.Draw(logits, 1, 0, 1, 0.01f));
        Assert.AreEqual(0, TokenSampling.Draw(logits, 1, 0, 1, 0.29f));
        Assert.AreEqual(1, TokenSampling.Draw(logits, 1, 0, 1, 0.31f));
        Assert.AreEqual(1, TokenSampling.Draw(logits, 1, 0, 1, 0.79f));
        Assert.AreEqual(2, TokenSampling.Draw(logits, 1, 0, 1, 0.81f));

        // Top-k 2 keeps 0.3 and 0.5 (total 0.8 of the weight): u·0.8 < 0.3 -> 0, else 1; top-p 0.6 keeps only 0.5 (0.5 / 1 < 0.6 <= 0.8 / 1 ... of
        // the top-k mass 0.8: 0.5 < 0.48? no: 0.5 >= 0.6 · 0.8 = 0.48, so the largest alone suffices).
        Assert.AreEqual(0, TokenSampling.Draw(logits, 1, 2, 1, 0.37f));
        Assert.AreEqual(1, TokenSampling.Draw(logits, 1, 2, 1, 0.38f));
        Assert.AreEqual(1, TokenSampling.Draw(logits, 1, 2, 0.6f, 0.01f));
        Assert.AreEqual(1, TokenSampling.Draw(logits, 1, 2, 0.6f, 0.99f));
        Assert.AreEqual(1, TokenSampling.Draw(logits, 0, 0, 1, 0.99f), "temperature 0 is the argmax");
    }

    [TestMethod]
    public void ARowNotAskedForOrNotSampleableIsNotChosen()
    {
        var greedy = TokenChoice.Greedy(4);
        Assert.AreEqual(2, TokenSampling.Choose([0f, 1f, 3f, -1f], greedy));
        Assert.AreEqual(TokenSampling.NotChosen, TokenSampling.Choose([0f, 1f, 3f, -1f], default), "default: chosen on the host");
        Assert.AreEqual(TokenSampling.NotChosen, TokenSampling.Choose([0f, float.NaN, 3f, -1f], greedy));
        Assert.AreEqual(TokenSampling.NotChosen, TokenSampling.Choose([0f, 1f, float.PositiveInfinity, -1f], greedy));
        Assert.AreEqual(TokenSampling.NotChosen, TokenSampling.Choose([float.NegativeInfinity, float.NegativeInfinity], greedy with { VocabLimit = 2 }));
        Assert.AreEqual(1, TokenSampling.Choose([0f, 1f, float.NaN, 9f], greedy with { VocabLimit = 2 }), "past the limit: neither a token nor an error");
        Assert.AreEqual(3, TokenSampling.Choose([float.NegativeInfinity, float.NegativeInfinity, float.NegativeInfinity, -7f], greedy with { Temperature = 1.5f, Seed = 3 }), "-infinity is a mask");
    }

    [TestMethod]
    public void TheCpuBackendChoosesEachRowByTheRule()
    {
        const int v = 300;
        var rng = new Random(3);
        var values = Enumerable.Range(0, 4 * v).Select(_ => (float)(rng.NextDouble() * 8 - 4)).ToArray();
        values[2 * v + 17] = float.NaN;
        var cpu = new CpuBackend();
        using var logits = cpu.Upload(values, 4, v, TensorKind.Logits);
        using var buffer = cpu.AllocateTokenChoices(4, v);
        TokenChoice[] choices = [TokenChoice.Greedy(v), new(200, 0.7f, 30, 0.9f, 11, 4), new(v, 1, 0, 1, 11, 5), default];
        var tokens = new int[4];
        cpu.ChooseTokens(logits, choices, buffer, tokens);
        Assert.AreEqual(Array.IndexOf(values, values.AsSpan(0, v).ToArray().Max()), tokens[0]);
        Assert.AreEqual(TokenSampling.Choose(values.AsSpan(v, v), choices[1]), tokens[1]);
        Assert.IsLessThan(200, tokens[1]);
        CollectionAssert.AreEqual(new[] { TokenSampling.NotChosen, TokenSampling.NotChosen }, tokens[2..]);

        using var small = cpu.AllocateTokenChoices(2, v);
        var tooMany = Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => cpu.ChooseTokens(logits, choices, small, tokens));
        StringAssert.Contains(tooMany.Message, "holds 2 rows");
        var wide = Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => cpu.ChooseTokens(logits, [new(v + 1, 0, 0, 1, 0, 0)], buffer, tokens));
        StringAssert.Contains(wide.Message, "row 0");
    }

    [TestMethod]
    public void AMaskedRowIsChosenAmongItsAllowedIds()
    {
        // 70 ids (two words, the second partial); the mask allows 2, 5, 64 and 69: the largest logit (id 0) is not among them.
        const int v = 70;
        var allowed = new ulong[TokenChoice.MaskWords(v)];
        foreach (var id in new[] { 2, 5, 64, 69 })
        {
            allowed[id >> 6] |= 1UL << (id & 63);
        }

        var row = new float[v];
        row[0] = 10f;
        row[2] = 1f;
        row[5] = 3f;
        row[64] = 2f;
        row[69] = float.NegativeInfinity;
        var greedy = TokenChoice.Greedy(v) with { Allowed = allowed };
        Assert.AreEqual(5, TokenSampling.Choose(row, greedy), "the largest allowed logit");
        Assert.AreEqual(0, TokenSampling.Choose(row, TokenChoice.Greedy(v)), "without the mask");
        Assert.AreEqual(2, TokenSampling.Choose(row, greedy with { VocabLimit = 3, Allowed = [1UL << 2] }), "one word covers a limit of 3");

        // A draw keeps only allowed ids with weight: 2, 5 and 64 (69 is -infinity), each seed and draw.
        var drawn = new HashSet<int>();
        for (var d = 0UL; d < 300; d++)
        {
            drawn.Add(TokenSampling.Choose(row, new TokenChoice(v, 2f, 0, 1, 9, d, allowed)));
        }

        CollectionAssert.AreEquivalent(new[] { 2, 5, 64 }, drawn.ToArray());

        // Nothing allowed above -infinity, or a NaN or +infinity anywhere below the limit (allowed or not): not chosen there.
        var none = row.ToArray();
        none[2] = none[5] = none[64] = float.NegativeInfinity;
        Assert.AreEqual(TokenSampling.NotChosen, TokenSampling.Choose(none, greedy));
        var broken = row.ToArray();
        broken[1] = float.NaN;
        Assert.AreEqual(TokenSampling.NotChosen, TokenSampling.Choose(broken, greedy), "a mask never hides broken numerics");
        broken[1] = float.PositiveInfinity;
        Assert.AreEqual(TokenSampling.NotChosen, TokenSampling.Choose(broken, greedy));
        var shortMask = Assert.ThrowsExactly<ArgumentException>(() => TokenSampling.Choose(broken, greedy with { Allowed = [ulong.MaxValue] }));
        StringAssert.Contains(shortMask.Message, "1 words (64 ids), fewer than the vocabulary limit 70 needs (2)", "refused before the row is read");
    }

    [TestMethod]
    public void TheCpuBackendChoosesMaskedRowsAndRefusesMasksThatDoNotFit()
    {
        const int v = 300;
        var rng = new Random(5);
        var values = Enumerable.Range(0, 2 * v).Select(_ => (float)(rng.NextDouble() * 8 - 4)).ToArray();
        var cpu = new CpuBackend();
        using var logits = cpu.Upload(values, 2, v, TensorKind.Logits);
        using var buffer = cpu.AllocateTokenChoices(2, v);
        var odd = new ulong[TokenChoice.MaskWords(v)];
        Array.Fill(odd, 0xAAAAAAAAAAAAAAAAUL);
        TokenChoice[] choices = [TokenChoice.Greedy(v) with { Allowed = odd }, new(v, 0.8f, 20, 0.9f, 3, 1, odd)];
        var tokens = new int[2];
        cpu.ChooseTokens(logits, choices, buffer, tokens);
        var oddIds = Enumerable.Range(0, v).Where(i => i % 2 == 1).ToArray();
        Assert.AreEqual(oddIds.MaxBy(i => values[i]), tokens[0], "the largest odd id's logit");
        Assert.AreEqual(1, tokens[1] % 2, "a draw among odd ids");

        var shortMask = Assert.ThrowsExactly<ArgumentException>(() => cpu.ChooseTokens(logits, [TokenChoice.Greedy(v) with { Allowed = new ulong[4] }], buffer, tokens));
        StringAssert.Contains(shortMask.Message, "row 0: the allowed ids hold 4 words (256 ids), fewer than the vocabulary limit 300 needs (5)");
        using var narrow = cpu.AllocateTokenChoices(2, 100);
        var wide = Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => cpu.ChooseTokens(logits, [TokenChoice.Greedy(100), choices[1]], narrow, tokens));
        StringAssert.Contains(wide.Message, "row 1: the vocabulary limit must be 0..100 (the token choice buffer's)");
        using var narrowLogits = cpu.Upload(values[..200], 2, 100, TensorKind.Logits);
        var narrower = Assert.ThrowsExactly<ArgumentException>(() => cpu.ChooseTokenRows(narrowLogits, buffer));
        StringAssert.Contains(narrower.Message, "narrower than the token choice buffer's vocabulary limit 300");
        cpu.ChooseTokens(logits, [TokenChoice.Greedy(100) with { Allowed = odd }], narrow, tokens);
        Assert.AreEqual(1, tokens[0] % 2, "a mask within the buffer's width");
    }
}
