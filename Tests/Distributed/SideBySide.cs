using DeepSeekCuda.Inference;
using DeepSeekCuda.Serving;
using DeepSeekCuda.Tests.Serving;

namespace DeepSeekCuda.Tests.Distributed;

/// <summary>
/// One script of batched, paged steps for comparing two step runners of a model: three requests (slots 1..3 of 4, so their
/// blocks interleave) prefilled together in chunks of up to 4 tokens with the logits of each chunk's last two, then decoded
/// together for six steps. <see cref="Run"/> plays it on one runner, decoding its own greedy tokens or, given another
/// run's trace, that run's (teacher-forced); <see cref="Compare"/> holds two traces step by step.
/// </summary>
internal static class SideBySide
{
    private const int DecodeSteps = 6;

    /// <summary>What one run gave: each step's name and logits, and the tokens fed at each decode step.</summary>
    public sealed record Trace(List<(string Step, float[] Logits)> Steps, List<int[]> Decoded, int Vocab);

    /// <summary>
    /// Plays the script on <paramref name="runner"/> (attached here), feeding <paramref name="follow"/>'s decode tokens when
    /// given; <paramref name="stepped"/>, when given, hears each step's name after it ran.
    /// </summary>
    public static Trace Run(IStepRunner runner, Trace? follow = null, Action<string>? stepped = null)
    {
        var v = runner.VocabSize;
        var (blocks, prompts, slots) = Open(runner, drafts: false);
        var trace = new Trace([], [], v);
        var fed = new int[prompts.Length];
        var logits = new float[8 * v];
        var last = new int[prompts.Length];
        while (NextChunks(blocks, prompts, slots, fed, count => Math.Min(2, count)) is { Count: > 0 } batch)
        {
            Step(batch, $"prefill step {trace.Steps.Count}");
        }

        for (var j = 0; j < DecodeSteps; j++)
        {
            var tokens = follow?.Decoded[j] ?? last.ToArray();
            trace.Decoded.Add(tokens);
            for (var i = 0; i < prompts.Length; i++)
            {
                blocks.Reserve(slots[i], fed[i] + 1);
            }

            Step([.. Enumerable.Range(0, prompts.Length).Select(i => new StepSequence(slots[i], fed[i]++, new[] { tokens[i] }, 1))], $"decode step {j}");
        }

        return trace;

        void Step(List<StepSequence> batch, string name)
        {
            var rows = batch.Sum(e => e.LogitRows);
            runner.Forward(batch.ToArray(), logits);
            trace.Steps.Add((name, logits.AsSpan(0, rows * v).ToArray()));
            stepped?.Invoke(name);

            // Each entry's last row gives its request's next greedy token (the last prefill step's rows end every prompt).
            var row = 0;
            foreach (var e in batch)
            {
                row += e.LogitRows;
                last[Array.IndexOf(slots, e.Slot)] = Sampler.ArgMax(logits.AsSpan((row - 1) * v, v));
            }
        }
    }

    /// <summary>
    /// The requests of a script: attaches <paramref name="runner"/> to a block manager of 12 blocks for 4 requests of up to 64
    /// tokens (16 per step), and opens three requests on slots 1..3 (slot 0 stays empty, so their blocks interleave) whose
    /// prompts of 13, 5 and 9 tokens are returned.
    /// </summary>
    public static (KvBlockManager Blocks, int[][] Prompts, int[] Slots) Open(IStepRunner runner, bool drafts)
    {
        var v = runner.VocabSize;
        var blocks = new KvBlockManager(12, 4, KvBlockManager.BlocksFor(64));
        runner.Attach(blocks, 16);
        blocks.Admit(1);
        int[][] prompts = [SyntheticPrompts.Make(v, 13, 1), SyntheticPrompts.Make(v, 5, 2), SyntheticPrompts.Make(v, 9, 3)];
        var slots = prompts.Select(_ => blocks.Admit(1)).ToArray();
        foreach (var s in slots)
        {
            runner.Open(s, drafts);
        }

        return (blocks, prompts, slots);
    }

    /// <summary>
    /// A script's next prefill step: up to 4 more tokens of each prompt not yet fed (<paramref name="fed"/> advanced, their
    /// blocks reserved), each entry asking for the logits of its last <paramref name="logitRows"/>(tokens) rows; empty once
    /// every prompt is fed.
    /// </summary>
    public static List<StepSequence> NextChunks(KvBlockManager blocks, int[][] prompts, int[] slots, int[] fed, Func<int, int> logitRows)
    {
        var batch = new List<StepSequence>();
        for (var i = 0; i < prompts.Length; i++)
        {
            var count = Math.Min(4, prompts[i].Length - fed[i]);
            if (count > 0)
            {
                blocks.Reserve(slots[i], fed[i] + count);
                batch.Add(new StepSequence(slots[i], fed[i], prompts[i][fed[i]..(fed[i] + count)], logitRows(count)));
                fed[i] += count;
            }
        }

        return batch;
    }

    /// <summary>
    /// Holds <paramref name="actual"/> to <paramref name="expected"/> step by step through <paramref name="compare"/> (expected, actual, step name),
    /// and each request's greedy token at every decode step to be the same.
    /// </summary>
    public static void Compare(Trace expected, Trace actual, Action<float[], float[], string> compare)
    {
        Assert.HasCount(expected.Steps.Count, actual.Steps);
        for (var s = 0; s < expected.Steps.Count; s++)
        {
            compare(expected.Steps[s].Logits, actual.Steps[s].Logits, expected.Steps[s].Step);
        }

        var v = expected.Vocab;
        var decodeStart = expected.Steps.Count - DecodeSteps;
        for (var j = 0; j < DecodeSteps; j++)
        {
            var (want, got) = (expected.Steps[decodeStart + j].Logits, actual.Steps[decodeStart + j].Logits);
            for (var i = 0; i < want.Length / v; i++)
            {
                Assert.AreEqual(Sampler.ArgMax(want.AsSpan(i * v, v)), Sampler.ArgMax(got.AsSpan(i * v, v)), $"decode step {j}: greedy token of request {i}");
            }
        }
    }
}
