using DeepSeekCuda.Backends;
using DeepSeekCuda.Inference;
using DeepSeekCuda.Model;
using DeepSeekCuda.Serving;
using DeepSeekCuda.Tests.Serving;

namespace DeepSeekCuda.Tests.Distributed;

/// <summary>
/// One script of batched, paged steps that draft, for comparing two step runners of a model with an MTP layer
/// (<see cref="Run"/>, then <see cref="Compare"/>): prefill, drafts apart, verify steps that draft in the step with drafts
/// kept and rolled back, a decode step and drafts apart again; a run follows another's tokens and decisions when given one.
/// </summary>
internal static class DraftSideBySide
{
    public const int MaxLength = 64;
    public const int Requests = 3;
    public const int VerifySteps = 5;

    /// <summary>
    /// What one run of the script gave: logits by step, each verify step's ids and drafts, every token it decided to feed and
    /// each draft it kept or not, in order (what a run that follows it feeds), the main passes it ran and the drafts it kept.
    /// </summary>
    public sealed record Trace(List<(string Step, float[] Logits)> Logits, List<int[]> Ids, List<int[]> Drafts, List<int> Decisions)
    {
        public int Passes { get; set; }

        public int Accepted { get; set; }
    }

    /// <summary>
    /// Plays the script on <paramref name="runner"/> (attached here): <see cref="SideBySide.Open"/>'s three requests, drafting, prefilled
    /// together in chunks of up to 4 tokens (each chunk's last row's logits), a draft apart after each prompt's greedy
    /// token, <see cref="VerifySteps"/> verify steps of the token and its draft that draft in the step (a rejected draft
    /// rolled back), one decode step of the token kept and a draft apart after it. tiny-a's MTP layer seldom guesses right,
    /// so on even verify steps the draft fed is <paramref name="oracle"/>'s greedy token (a session of each request alone)
    /// when given, and is kept. Every token fed and every draft kept is <paramref name="follow"/>'s decision when given
    /// (teacher-forced), else the run's own.
    /// </summary>
    public static Trace Run(IStepRunner runner, Trace? follow = null, DeepSeekModel? oracle = null)
    {
        var v = runner.VocabSize;
        var (blocks, prompts, slots) = SideBySide.Open(runner, drafts: true);
        var trace = new Trace([], [], [], []);
        var fed = new int[Requests];
        var next = new int[Requests];
        var draft = new int[Requests];
        var logits = new float[8 * v];
        var alone = prompts.Select(_ => oracle?.CreateSession()).ToArray();
        try
        {
            while (SideBySide.NextChunks(blocks, prompts, slots, fed, _ => 1) is { Count: > 0 } batch)
            {
                runner.Forward([.. batch], logits);
                trace.Passes++;
                Record($"prefill step {trace.Logits.Count}", batch.Count);
                for (var k = 0; k < batch.Count; k++)
                {
                    next[Array.IndexOf(slots, batch[k].Slot)] = Decide(Sampler.ArgMax(logits.AsSpan(k * v, v)));
                }
            }

            DraftApart("draft after the prompts");
            for (var i = 0; i < Requests; i++)
            {
                alone[i]?.Forward(prompts[i], logits);
            }

            for (var j = 0; j < VerifySteps; j++)
            {
                var batch = new StepSequence[Requests];
                for (var i = 0; i < Requests; i++)
                {
                    if (j % 2 == 0)
                    {
                        draft[i] = Decide(alone[i] is { } session ? Peek(session, next[i]) : draft[i]);
                    }

                    blocks.Reserve(slots[i], fed[i] + 2);
                    batch[i] = new StepSequence(slots[i], fed[i], new[] { next[i], draft[i] }, 2);
                }

                var rows = 2 * Requests;
                var (ids, drafts) = (new int[rows], new int[rows]);
                runner.ForwardChooseAndDraft(batch, [.. Enumerable.Repeat(TokenChoice.Greedy(v), rows)], ids, logits,
                    [.. batch.Select(_ => true)], TokenChoice.Greedy(v), drafts);
                trace.Passes++;
                trace.Ids.Add(ids);
                trace.Drafts.Add(drafts);
                for (var i = 0; i < Requests; i++)
                {
                    // Row 2i chose the token after next; the draft fed at row 2i + 1 is kept when it is that token.
                    var kept = 2 * i + Decide(ids[2 * i] == draft[i] ? 1 : 0);
                    Assert.IsGreaterThanOrEqualTo(0, drafts[kept], $"verify step {j}, request {i}: drafted in the step");
                    if (kept == 2 * i)
                    {
                        runner.Truncate(slots[i], fed[i] + 1);
                    }
                    else
                    {
                        trace.Accepted++;
                    }

                    fed[i] += kept - 2 * i + 1;
                    alone[i]?.Forward(batch[i].Tokens.Span[..(kept - 2 * i + 1)], logits);
                    (next[i], draft[i]) = (Decide(ids[kept]), Decide(drafts[kept]));
                }
            }

            var decode = new StepSequence[Requests];
            for (var i = 0; i < Requests; i++)
            {
                blocks.Reserve(slots[i], fed[i] + 1);
                decode[i] = new StepSequence(slots[i], fed[i]++, new[] { next[i] }, 1);
            }

            runner.Forward(decode, logits);
            trace.Passes++;
            Record("decode step", Requests);
            for (var i = 0; i < Requests; i++)
            {
                next[i] = Decide(Sampler.ArgMax(logits.AsSpan(i * v, v)));
            }

            DraftApart("draft after the decode step");
            return trace;
        }
        finally
        {
            foreach (var session in alone)
            {
                session?.Dispose();
            }
        }

        int Decide(int own)
        {
            var value = follow?.Decisions[trace.Decisions.Count] ?? own;
            trace.Decisions.Add(value);
            return value;
        }

        // The greedy token after next on a request's session alone, which keeps only what the runner kept.
        int Peek(DeepSeekSession session, int token)
        {
            session.Forward([token], logits);
            session.Truncate(session.Length - 1);
            return Sampler.ArgMax(logits.AsSpan(0, v));
        }

        void Record(string step, int rows) => trace.Logits.Add((step, logits.AsSpan(0, rows * v).ToArray()));

        // A draft apart for every request after the token it is fed next; the draft is each row's greedy token.
        void DraftApart(string step)
        {
            runner.Draft([.. slots.Select((s, i) => new DraftSequence(s, next[i]))], logits);
            Record(step, Requests);
            for (var i = 0; i < Requests; i++)
            {
                draft[i] = Decide(Sampler.ArgMax(logits.AsSpan(i * v, v)));
            }
        }
    }

    /// <summary>
    /// Holds <paramref name="actual"/> to <paramref name="expected"/>: each step's logits through <paramref name="compareLogits"/>
    /// (expected, actual, step name), and each verify step's ids and drafts equal.
    /// </summary>
    public static void Compare(Trace expected, Trace actual, Action<float[], float[], string> compareLogits)
    {
        Assert.HasCount(expected.Logits.Count, actual.Logits);
        for (var s = 0; s < expected.Logits.Count; s++)
        {
            compareLogits(expected.Logits[s].Logits, actual.Logits[s].Logits, expected.Logits[s].Step);
        }

        Assert.HasCount(expected.Ids.Count, actual.Ids);
        for (var j = 0; j < expected.Ids.Count; j++)
        {
            CollectionAssert.AreEqual(expected.Ids[j], actual.Ids[j], $"verify step {j}: ids");
            CollectionAssert.AreEqual(expected.Drafts[j], actual.Drafts[j], $"verify step {j}: drafts");
        }
    }
}
