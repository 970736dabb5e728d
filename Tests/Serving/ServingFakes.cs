using DeepSeekCuda.Inference;
using DeepSeekCuda.Model;
using DeepSeekCuda.Serving;
using DeepSeekCuda.Tests.Inference;

namespace DeepSeekCuda.Tests.Serving;

/// <summary>
/// An <see cref="IStepRunner"/> over a <see cref="FakeModel"/>'s logits function with an oracle draft: the
/// draft is the model's own greedy choice where <paramref name="draftRight"/> says so, else a different
/// token, so tests control acceptance exactly. Checks on every forward that the scheduler reserved cache
/// blocks for each position it writes and fed positions in order.
/// </summary>
internal sealed class OracleStepRunner(FakeModel model, KvBlockManager blocks, Func<int, bool> draftRight) : IStepRunner
{
    private readonly Dictionary<int, List<int>> _slots = [];

    public int VocabSize => model.VocabSize;

    public int MaxSequenceLength => model.MaxSequenceLength;

    public bool CanDraft => true;

    public int LargestBatch { get; private set; }

    public int Truncations { get; private set; }

    public List<int> StoppedDrafting { get; } = [];

    public void StopDrafting(int slot) => StoppedDrafting.Add(slot);

    /// <summary>The bound the scheduler promised at <see cref="Attach"/>; every forward is checked against it.</summary>
    public int MaxTokensPerStep { get; private set; }

    public void Attach(KvBlockManager attached, int maxTokensPerStep)
    {
        Assert.AreSame(blocks, attached);
        Assert.AreEqual(0, MaxTokensPerStep, "attached twice");
        MaxTokensPerStep = maxTokensPerStep;
    }

    public void Open(int slot, bool drafts) => _slots.Add(slot, []);

    public void Close(int slot) => Assert.IsTrue(_slots.Remove(slot), $"slot {slot} closed twice");

    public void Truncate(int slot, int length)
    {
        Truncations++;
        var h = _slots[slot];
        h.RemoveRange(length, h.Count - length);
    }

    public void Forward(ReadOnlySpan<StepSequence> batch, Span<float> logits)
    {
        LargestBatch = Math.Max(LargestBatch, batch.Length);
        var tokens = 0;
        foreach (var e in batch)
        {
            tokens += e.Tokens.Length;
        }

        Assert.IsLessThanOrEqualTo(MaxTokensPerStep, tokens, "a step feeds no more tokens than the scheduler promised at Attach");
        var v = VocabSize;
        var offset = 0;
        var row = new float[v];
        foreach (var e in batch)
        {
            var h = _slots[e.Slot];
            Assert.AreEqual(h.Count, e.Position, "positions are fed in order");
            Assert.IsGreaterThanOrEqualTo(e.Position + e.Tokens.Length, blocks.Capacity(e.Slot), "blocks reserved before the write");
            h.AddRange(e.Tokens.ToArray());
            for (var r = 0; r < e.LogitRows; r++)
            {
                model.LogitsOf(h[..(h.Count - e.LogitRows + r + 1)], row);
                row.CopyTo(logits.Slice(offset, v));
                offset += v;
            }
        }
    }

    public void Draft(ReadOnlySpan<DraftSequence> batch, Span<float> logits)
    {
        var v = VocabSize;
        var row = new float[v];
        for (var i = 0; i < batch.Length; i++)
        {
            List<int> h = [.. _slots[batch[i].Slot], batch[i].NextToken];
            model.LogitsOf(h, row);
            var best = Sampler.ArgMax(row);
            var draft = draftRight(h.Count) ? best : (best + 1) % v;
            var target = logits.Slice(i * v, v);
            target.Clear();
            target[draft] = 1;
        }
    }

    public void Dispose()
    {
    }
}

/// <summary>An <see cref="IStepRunner"/> that passes every call to <paramref name="inner"/> (owned); tests override what they watch or change.</summary>
internal abstract class DelegatingStepRunner(IStepRunner inner) : IStepRunner
{
    protected IStepRunner Inner => inner;

    public virtual int VocabSize => inner.VocabSize;

    public virtual int MaxSequenceLength => inner.MaxSequenceLength;

    public virtual bool CanDraft => inner.CanDraft;

    public virtual void Attach(KvBlockManager blocks, int maxTokensPerStep) => inner.Attach(blocks, maxTokensPerStep);

    public virtual void Open(int slot, bool drafts) => inner.Open(slot, drafts);

    public virtual void Close(int slot) => inner.Close(slot);

    public virtual void StopDrafting(int slot) => inner.StopDrafting(slot);

    public virtual void Truncate(int slot, int length) => inner.Truncate(slot, length);

    public virtual void Forward(ReadOnlySpan<StepSequence> batch, Span<float> logits) => inner.Forward(batch, logits);

    public virtual void Draft(ReadOnlySpan<DraftSequence> batch, Span<float> logits) => inner.Draft(batch, logits);

    public virtual void Dispose() => inner.Dispose();
}

/// <summary>Prompts of synthetic ids that differ by salt (no tokenizer needed).</summary>
internal static class SyntheticPrompts
{
    public static int[] Make(int vocab, int length, int salt) =>
        [.. Enumerable.Range(0, length).Select(i => (int)((i * 7919L + salt * 104729L + 13) % vocab))];

    /// <summary>
    /// <paramref name="count"/> prompts (salts 0..): 1, 2, 24, 25, 64, 65, 90 and 130 tokens in turn, each round one token
    /// longer than the last, so under a step budget some fit a step, some fill it, and some cross 64-position blocks.
    /// </summary>
    public static int[][] Staggered(int vocab, int count)
    {
        int[] lengths = [1, 2, 24, 25, 64, 65, 90, 130];
        return [.. Enumerable.Range(0, count).Select(i => Make(vocab, lengths[i % lengths.Length] + i / lengths.Length, i))];
    }

    /// <summary>
    /// Six requests drawn from <paramref name="seed"/>: prompts of 5..89 tokens (salts <paramref name="salt"/>..+5), 20..59 new
    /// tokens each; every third greedy, the others sampled at <paramref name="temperature"/> and <paramref name="topP"/> with
    /// seeds <paramref name="samplingSeed"/>..+5.
    /// </summary>
    public static (int[] Prompt, SamplingOptions Sampling)[] Mixed(int vocab, int seed, int salt, float temperature, float topP, int samplingSeed)
    {
        var rng = new Random(seed);
        return [.. Enumerable.Range(0, 6).Select(i =>
        {
            var prompt = Make(vocab, rng.Next(5, 90), salt + i);
            var sampling = i % 3 == 0
                ? SamplingOptions.Greedy with { MaxTokens = rng.Next(20, 60) }
                : new SamplingOptions { Temperature = temperature, TopP = topP, Seed = samplingSeed + i, MaxTokens = rng.Next(20, 60) };
            return (prompt, sampling);
        })];
    }
}

internal static class Alone
{
    /// <summary>
    /// A real model's reference, written without a runner or scheduler: one session, one prefill, then one token
    /// per forward, sampled as the scheduler samples; stops at the model's EOS, at <see cref="SamplingOptions.MaxTokens"/>,
    /// or when the next token would not fit.
    /// </summary>
    /// <remarks>With <paramref name="constraint"/>, each row is masked on the host by it.</remarks>
    public static List<int> Run(DeepSeekModel model, int[] prompt, SamplingOptions options, ITokenConstraint? constraint = null) =>
        Run(model, model.Config.EosTokenId, prompt, options, constraint);

    /// <summary>The same for any model (the multi-device one): <paramref name="eos"/> ends the request.</summary>
    public static List<int> Run(ILanguageModel model, int eos, int[] prompt, SamplingOptions options, ITokenConstraint? constraint = null)
    {
        using var session = model.CreateSession();
        var sampler = new Sampler(options, constraint);
        var logits = new float[model.VocabSize];
        session.Forward(prompt, logits);
        var output = new List<int>();
        while (true)
        {
            var y = sampler.SampleModelRow(logits, model.VocabSize);
            output.Add(y);
            if (y == eos || output.Count >= (options.MaxTokens ?? int.MaxValue) || prompt.Length + output.Count > model.MaxSequenceLength)
            {
                return output;
            }

            session.Forward([y], logits);
        }
    }

    /// <summary>
    /// Plain decoding of one request, written without the scheduler: sample from the logits of the whole
    /// history, stop at EOS, at <see cref="SamplingOptions.MaxTokens"/>, or when the next token would not fit.
    /// With <paramref name="allows"/>, the ids it refuses are set to -infinity before sampling, and
    /// <paramref name="emitted"/> hears each token (a constraint's reference, written without one).
    /// </summary>
    public static List<int> Run(FakeModel model, int[] prompt, SamplingOptions options, int eos, Func<int, bool>? allows = null, Action<int>? emitted = null)
    {
        var sampler = new Sampler(options);
        var history = new List<int>(prompt);
        var logits = new float[model.VocabSize];
        var output = new List<int>();
        while (true)
        {
            model.LogitsOf(history, logits);
            for (var id = 0; allows is not null && id < logits.Length; id++)
            {
                logits[id] = allows(id) ? logits[id] : float.NegativeInfinity;
            }

            var y = sampler.Sample(logits);
            emitted?.Invoke(y);
            output.Add(y);
            history.Add(y);
            if (y == eos || output.Count >= (options.MaxTokens ?? int.MaxValue) || history.Count > model.MaxSequenceLength)
            {
                return output;
            }
        }
    }
}
