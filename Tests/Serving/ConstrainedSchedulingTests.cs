using DeepSeekCuda.Inference;
using DeepSeekCuda.Serving;
using DeepSeekCuda.Tests.Inference;

namespace DeepSeekCuda.Tests.Serving;

/// <summary>
/// An <see cref="ITokenConstraint"/> through the scheduler: only allowed ids are sampled, the constraint sees
/// exactly the emitted tokens in order (MTP drafts and preemption included), and a constrained request's output
/// equals plain masked decoding of it alone.
/// </summary>
[TestClass]
public sealed class ConstrainedSchedulingTests
{
    private const int Eos = FakeTokenizer.Eos;

    /// <summary>
    /// Digits after a letter, letters after a digit (the first token: a letter), EOS only once
    /// <paramref name="minLength"/> tokens are out: the allowed set depends on the state it is advanced through. With
    /// <paramref name="bits"/>, it also writes its allowed ids, so its tokens are chosen where the logits are.
    /// </summary>
    private sealed class AlternatingConstraint(int minLength, bool bits = false) : PredicateConstraint(hostOnly: !bits)
    {
        public List<int> Advanced { get; } = [];

        public override bool Allows(int id) =>
            id == Eos ? Advanced.Count >= minLength
            : Advanced.Count == 0 || char.IsAsciiDigit((char)Advanced[^1]) ? char.IsAsciiLetter((char)id)
            : char.IsAsciiDigit((char)id);

        protected override void Moved(int tokenId) => Advanced.Add(tokenId);
    }

    private sealed class NothingAllowed(bool bits) : ITokenConstraint
    {
        public void Mask(Span<float> logits) => logits.Fill(float.NegativeInfinity);

        public void Advance(int tokenId) => Assert.Fail("nothing was allowed");

        public bool TryWriteAllowed(Span<ulong> allowed)
        {
            allowed.Clear();
            return bits;
        }
    }

    /// <summary>Masked decoding of one request written without the scheduler or <c>SampleModelRow</c>: mask the row, sample, advance.</summary>
    private static List<int> AloneMasked(FakeModel model, int[] prompt, SamplingOptions options, int minLength)
    {
        var constraint = new AlternatingConstraint(minLength);
        return Alone.Run(model, prompt, options, Eos, constraint.Allows, constraint.Advanced.Add);
    }

    [TestMethod]
    [DataRow(false, false)]
    [DataRow(true, false)]
    [DataRow(false, true)]
    [DataRow(true, true)]
    public async Task ConstrainedRequestsBatchedWithFreeOnesEqualTheirAloneRuns(bool speculative, bool allowedIds)
    {
        var model = FakeModel.Bigram(11, maxSequenceLength: 300, eosLogit: -2f);
        var blocks = new KvBlockManager(14, 12, 5);
        IStepRunner runner = speculative ? new OracleStepRunner(model, blocks, length => length % 4 != 0) : new SessionStepRunner(model);
        using var scheduler = new BatchScheduler(runner, blocks, new SchedulerOptions { MaxBatch = 12, MaxTokensPerStep = 64, EosId = Eos, SpeculativeDecoding = speculative ? SpeculativeDecodingMode.On : SpeculativeDecodingMode.Off });
        using var stop = new CancellationTokenSource();
        var loop = scheduler.RunAsync(stop.Token);
        var cases = Enumerable.Range(0, 24).Select(i =>
        {
            var rng = new Random(500 + i);
            var prompt = Enumerable.Range(0, rng.Next(10, 60)).Select(_ => rng.Next(32, 127)).ToArray();
            var options = i % 3 == 0
                ? SamplingOptions.Greedy with { MaxTokens = rng.Next(40, 120) }
                : new SamplingOptions { Temperature = 0.8f, TopK = 30, Seed = i, MaxTokens = rng.Next(40, 120) };
            return (prompt, options, constrained: i % 4 != 3, minLength: rng.Next(3, 15));
        }).ToArray();

        var constraints = cases.Select(c => c.constrained ? new AlternatingConstraint(c.minLength, allowedIds) : null).ToArray();
        var results = await Task.WhenAll(cases.Select((c, i) => scheduler.Submit(c.prompt, c.options, constraints[i]).Completion));
        await stop.CancelAsync();
        await loop;

        for (var i = 0; i < cases.Length; i++)
        {
            var tokens = results[i].Tokens.ToArray();
            if (!cases[i].constrained)
            {
                CollectionAssert.AreEqual(Alone.Run(model, cases[i].prompt, cases[i].options, Eos), tokens, $"free request {i}");
                continue;
            }

            CollectionAssert.AreEqual(AloneMasked(model, cases[i].prompt, cases[i].options, cases[i].minLength), tokens, $"constrained request {i}");
            CollectionAssert.AreEqual(tokens, constraints[i]!.Advanced.ToArray(), $"request {i}: the constraint saw exactly the emitted tokens");
            Assert.IsTrue(tokens.Where(t => t != Eos).All(t => char.IsAsciiLetterOrDigit((char)t)), $"request {i}: only allowed ids");

            // Masked on the host: every token, or, with the allowed ids chosen where the logits are, only a verify step's second row.
            var masks = constraints[i]!.Masks;
            if (!allowedIds)
            {
                Assert.AreEqual(tokens.Length, masks, $"request {i}: every row masked on the host");
            }
            else if (!speculative)
            {
                Assert.AreEqual(0, masks, $"request {i}: no row masked on the host");
            }
            else
            {
                Assert.IsLessThan(tokens.Length, masks, $"request {i}: only rows after an accepted draft masked on the host");
            }
        }

        Assert.IsGreaterThan(0L, scheduler.Preemptions, "the pool is too small for every request at once");
        if (speculative)
        {
            Assert.IsGreaterThan(0L, scheduler.Counters.Accepted, "drafts were verified against the constrained sample");
        }

        Assert.AreEqual(blocks.TotalBlocks, blocks.FreeBlocks);
        runner.Dispose();
    }

    [TestMethod]
    [DataRow(false)]
    [DataRow(true)]
    public void AConstraintThatAllowsNothingFailsOnlyItsRequest(bool allowedIds)
    {
        var model = FakeModel.Bigram(3, eosLogit: 1f);
        var blocks = new KvBlockManager(16, 4, 8);
        using var runner = new SessionStepRunner(model);
        using var scheduler = new BatchScheduler(runner, blocks, new SchedulerOptions { EosId = Eos });
        var bad = scheduler.Submit([65, 66, 67], SamplingOptions.Greedy with { MaxTokens = 10 }, new NothingAllowed(allowedIds));
        var good = scheduler.Submit([65, 66, 67], SamplingOptions.Greedy with { MaxTokens = 10 });
        while (!bad.Completion.IsCompleted || !good.Completion.IsCompleted)
        {
            scheduler.Step();
        }

        var e = Assert.ThrowsExactly<AggregateException>(() => bad.Completion.Wait());
        Assert.IsInstanceOfType<InvalidOperationException>(e.InnerException);
        StringAssert.Contains(e.InnerException!.Message, nameof(NothingAllowed));
        CollectionAssert.AreEqual(Alone.Run(model, [65, 66, 67], SamplingOptions.Greedy with { MaxTokens = 10 }, Eos), good.Completion.Result.Tokens.ToArray());
        Assert.AreEqual(blocks.TotalBlocks, blocks.FreeBlocks);
    }

    /// <summary>Allows every id; writing its allowed ids fails from its fourth token on.</summary>
    private sealed class SpentAfterThree : ITokenConstraint
    {
        private int _advanced;

        public void Mask(Span<float> logits)
        {
        }

        public void Advance(int tokenId) => _advanced++;

        public bool TryWriteAllowed(Span<ulong> allowed)
        {
            if (_advanced == 3)
            {
                throw new InvalidOperationException("spent after three tokens");
            }

            allowed.Fill(ulong.MaxValue);
            return true;
        }
    }

    [TestMethod]
    public void AConstraintThatFailsToWriteItsAllowedIdsFailsOnlyItsRequest()
    {
        var model = FakeModel.Bigram(3, eosLogit: -5f);
        var blocks = new KvBlockManager(16, 4, 8);
        using var runner = new SessionStepRunner(model);
        using var scheduler = new BatchScheduler(runner, blocks, new SchedulerOptions { EosId = Eos });
        var options = SamplingOptions.Greedy with { MaxTokens = 10 };
        var bad = scheduler.Submit([65, 66, 67], options, new SpentAfterThree());
        var good = scheduler.Submit([65, 66, 68], options);
        while (!bad.Completion.IsCompleted || !good.Completion.IsCompleted)
        {
            scheduler.Step();
        }

        var e = Assert.ThrowsExactly<AggregateException>(() => bad.Completion.Wait());
        Assert.AreEqual("spent after three tokens", e.InnerException!.Message);
        var emitted = new List<int>();
        while (bad.Output.TryRead(out var token))
        {
            emitted.Add(token);
        }

        CollectionAssert.AreEqual(Alone.Run(model, [65, 66, 67], options with { MaxTokens = 3 }, Eos), emitted, "its three tokens came out first");
        CollectionAssert.AreEqual(Alone.Run(model, [65, 66, 68], options, Eos), good.Completion.Result.Tokens.ToArray());
        Assert.AreEqual(blocks.TotalBlocks, blocks.FreeBlocks);
    }

    [TestMethod]
    public void BrokenLogitsAreRefusedBeforeTheConstraintCouldHideThem()
    {
        var logits = new float[300];
        logits[70] = float.NaN;
        logits[66] = 2f;
        var sampler = new Sampler(SamplingOptions.Greedy, new AlternatingConstraint(0));
        var e = Assert.ThrowsExactly<NonFiniteLogitsException>(() => sampler.SampleModelRow(logits, 300));
        Assert.AreEqual(70, e.TokenId, "id 70 is masked by the constraint, and still reported");
    }

    [TestMethod]
    public async Task TheGeneratorWithoutASchedulerAppliesTheConstraintToo()
    {
        var model = FakeModel.Bigram(4, eosLogit: 1.5f);
        var prompt = new[] { 72, 105 };
        var options = new SamplingOptions { Temperature = 0.9f, Seed = 9, MaxTokens = 40 };
        var constraint = new AlternatingConstraint(6);
        var result = await new TextGenerator(model, new FakeTokenizer()).GenerateTextAsync(prompt, options, constraint: constraint);
        CollectionAssert.AreEqual(AloneMasked(model, prompt, options, 6), result.TokenIds.ToArray());
        CollectionAssert.AreEqual(result.TokenIds.ToArray(), constraint.Advanced.ToArray());
    }
}
