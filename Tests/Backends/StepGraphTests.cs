using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Loader.Numerics;
using DeepSeekCuda.Tests.Support;
using static DeepSeekCuda.Tests.Backends.AttentionTestData;

namespace DeepSeekCuda.Tests.Backends;

/// <summary>
/// Graphs on the CPU backend, the specification of the CUDA graphs a step runner replays: a capture runs nothing and keeps
/// the operations over backend memory; each replay runs them over that memory as it is then (new step rows: other tokens,
/// slots, positions and order), bitwise as the same calls made eagerly; what a graph cannot hold is refused by name, and
/// the backend then runs as before.
/// </summary>
[TestClass]
public sealed class StepGraphTests
{
    private const int Vocab = 23, Width = 32, Slots = 3, MaxBlocks = 2, Positions = MaxBlocks * 64;

    /// <summary>The weights of a decode-shaped step (embedding, norm, q and kv_a projections, attention), shared by every backend.</summary>
    private sealed record Weights(CpuEmbeddingWeight Embed, CpuNormWeight Norm, CpuLinearWeight Q, CpuLinearWeight KvA, RopeTable Rope,
        CpuNormWeight KvNorm, CpuLinearWeight KvB);

    /// <summary>One backend's memory for a step of <see cref="Slots"/> rows over a permuted block table.</summary>
    private sealed class Step : IDisposable
    {
        private readonly List<IDisposable> _owned = [];

        public Step(CpuBackend b, int[] entries)
        {
            B = b;
            Rows = Own(b.AllocateStepRows(Slots));
            Pool = Own(b.AllocateLatentPool(Slots * MaxBlocks, Dims.KvLora, Dims.QkRope));
            Table = Own(b.AllocateBlockTable(Slots, MaxBlocks));
            b.UploadBlockTable(entries, Table);
            H = Own(b.Allocate(Slots, Width));
            Normed = Own(b.Allocate(Slots, Width));
            Q = Own(b.Allocate(Slots, Dims.Heads * Dims.QkHead));
            Kv = Own(b.Allocate(Slots, Dims.KvLora + Dims.QkRope));
            Attention = Own(b.Allocate(Slots, Dims.Heads * Dims.V));
            Output = Own(b.Upload(Enumerable.Repeat(float.NaN, (Slots + 1) * Dims.Heads * Dims.V).ToArray(), Slots + 1, Dims.Heads * Dims.V));
        }

        public CpuBackend B { get; }
        public StepRows Rows { get; }
        public LatentPool Pool { get; }
        public BlockTable Table { get; }
        public Tensor H { get; }
        public Tensor Normed { get; }
        public Tensor Q { get; }
        public Tensor Kv { get; }
        public Tensor Attention { get; }

        /// <summary>[Slots + 1, H·v]: row 0 never written, rows 1.. the attention output (through a view).</summary>
        public Tensor Output { get; }

        private T Own<T>(T resource)
            where T : IDisposable
        {
            _owned.Add(resource);
            return resource;
        }

        /// <summary>The step's operations, as a runner queues them: the last through a view made (and disposed) here.</summary>
        public void Run(Weights w)
        {
            B.EmbeddingRows(w.Embed, Rows, H);
            B.RmsNorm(H, w.Norm, Normed);
            B.Linear(Normed, w.Q, Q);
            B.Linear(Normed, w.KvA, Kv);
            B.ApplyRopeRows(Q, w.Rope, Rows, Dims.QkHead, Dims.QkNope);
            B.AppendLatentRows(Kv, w.KvNorm, w.Rope, Pool, Table, Rows);
            B.MlaAttentionRows(Q, Pool, Table, Rows, w.KvB, Dims, 1f / MathF.Sqrt(Dims.QkHead), Attention);
            using var tail = B.View(Output, 1, Slots);
            B.CopyRows(Attention, 0, tail, 0, Slots);
        }

        /// <summary>Every slot's cached latent and rotated key at positions 0 .. <paramref name="length"/> − 1.</summary>
        public float[] Cache(int length)
        {
            var all = new List<float>();
            for (var s = 0; s < Slots; s++)
            {
                using var view = B.PagedCache(Pool, Table, s);
                var c = (CpuLatentCache)view;
                for (var p = 0; p < length; p++)
                {
                    all.AddRange(c.Latent(p).ToArray());
                    all.AddRange(c.Rope(p).ToArray());
                }
            }

            return [.. all];
        }

        public void Dispose()
        {
            for (var i = _owned.Count - 1; i >= 0; i--)
            {
                _owned[i].Dispose();
            }
        }
    }

    private static Weights MakeWeights(CpuBackend b, Random r)
    {
        var embed = Normal(r, Vocab * Width);
        BFloat16.Round(embed);
        var (rope, kvNorm, kvB) = AttentionWeights(b, r, Positions);
        return new Weights(new CpuEmbeddingWeight(Vocab, Width, embed), new CpuNormWeight(Width, 1e-6f, [.. Normal(r, Width, 0.1f).Select(v => 1 + v)]),
            new CpuLinearWeight(Dims.Heads * Dims.QkHead, Width, true, Normal(r, Dims.Heads * Dims.QkHead * Width, 0.2f)),
            new CpuLinearWeight(Dims.KvLora + Dims.QkRope, Width, true, Normal(r, (Dims.KvLora + Dims.QkRope) * Width, 0.2f)), rope, kvNorm, kvB);
    }

    /// <summary>
    /// A step captured once (after its first rows are uploaded: the capture runs nothing) and replayed for 66 steps, each
    /// with new rows (random tokens, the slots in a rotating order, positions crossing a block boundary), against the same
    /// calls made eagerly on another backend: the outputs after every step and the caches at the end are bitwise equal.
    /// </summary>
    [TestMethod]
    [DataRow(CpuNumerics.Float32)]
    [DataRow(CpuNumerics.GpuEmulation)]
    public void ReplaysRunTheRecordedOperationsOverTheRowsUploadedSince(CpuNumerics numerics)
    {
        const int Seed = 20261205, Steps = 66;
        var r = new Random(Seed);
        using CpuBackend graphed = new(numerics), eager = new(numerics);
        var w = MakeWeights(graphed, r);
        using var rope = w.Rope;
        int[] entries = [.. Enumerable.Range(0, Slots * MaxBlocks).OrderBy(_ => r.Next())];
        using Step g = new(graphed, entries), e = new(eager, entries);
        StepGraph? graph = null;
        try
        {
            for (var k = 0; k < Steps; k++)
            {
                int[] slots = [.. Enumerable.Range(0, Slots).Select(i => (i + k) % Slots)];
                int[] tokens = [.. slots.Select(_ => r.Next(Vocab))];
                int[] positions = [.. slots.Select(_ => k)];
                graphed.UploadStepRows(tokens, slots, positions, g.Rows);
                eager.UploadStepRows(tokens, slots, positions, e.Rows);
                if (graph is null)
                {
                    graph = graphed.CaptureGraph(() => g.Run(w));
                    Assert.AreEqual(8, graph.Operations, "operations recorded (the view is not one)");
                    Assert.IsTrue(Read(graphed, g.Output).All(float.IsNaN), "the capture wrote no output");
                    var unwritten = Assert.ThrowsExactly<InvalidOperationException>(() => g.Cache(1), "the capture appended nothing");
                    StringAssert.Contains(unwritten.Message, "read before any row of it was written");
                }

                graphed.ReplayGraph(graph);
                e.Run(w);
                var want = Read(eager, e.Output);
                Assert.IsTrue(want.Skip(Dims.Heads * Dims.V).All(float.IsFinite) && want.Any(v => v != 0), $"step {k}: the eager output is finite and not all zero");
                Bitwise(Read(graphed, g.Output), want, $"{numerics} seed {Seed} step {k} (slots {string.Join(",", slots)}, position {k})");
            }

            Bitwise(g.Cache(Steps), e.Cache(Steps), $"{numerics} caches after {Steps} steps");
        }
        finally
        {
            graph?.Dispose();
        }
    }

    /// <summary>
    /// Inside a capture, every call a graph cannot hold (memory, host data, per-sequence positions, nested capture or replay)
    /// is refused naming the call, and the backend then runs eagerly; a graph of another backend, or a disposed one, is
    /// refused at replay; another thread's calls during a capture run at once and are not recorded.
    /// </summary>
    [TestMethod]
    public void CaptureRefusesWhatAGraphCannotHoldAndLeavesTheBackendAsItWas()
    {
        using var b = new CpuBackend();
        var r = new Random(3);
        using var x = b.Upload([1, 2, 3, 4], 1, 4);
        using var y = b.Allocate(1, 4);
        var norm = new CpuNormWeight(4, 1e-6f, [1, 1, 1, 1]);
        var expected = new float[] { 1, 2, 3, 4 }.Select(v => v / MathF.Sqrt(7.5f + 1e-6f)).ToArray();
        using var rows = b.AllocateStepRows(1);
        using var table = b.AllocateBlockTable(1, 1);
        using var cache = b.AllocateLatentCache(4, Dims.KvLora, Dims.QkRope);
        var (rope, kvNorm, kvB) = AttentionWeights(b, r, 4);
        using var _ = rope;
        using var q = b.Allocate(1, Dims.Heads * Dims.QkHead);
        using var kv = b.Allocate(1, Dims.KvLora + Dims.QkRope);
        using var o = b.Allocate(1, Dims.Heads * Dims.V);
        using var choices = b.AllocateTokenChoices(1, 4);
        using var routing = b.AllocateRouting(1, 4, 2);
        using var empty = b.CaptureGraph(() => { });
        (string Call, Action Run)[] refused =
        [
            ("Allocate", () => b.Allocate(1, 1)),
            ("Upload", () => b.Upload([1f], 1, 1)),
            ("Download", () => b.Download(x, new float[4])),
            ("AllocateStepRows", () => b.AllocateStepRows(1)),
            ("UploadStepRows", () => b.UploadStepRows([0], [0], [0], rows)),
            ("UploadBlockTable", () => b.UploadBlockTable([0], table)),
            ("DownloadRouting", () => b.DownloadRouting(routing, [], new int[2], [])),
            ("SetTokenChoices", () => b.SetTokenChoices([TokenChoice.Greedy(4)], choices)),
            ("ReadTokenChoices", () => b.ReadTokenChoices(choices, new int[1])),
            ("Embedding", () => b.Embedding(new CpuEmbeddingWeight(2, 4, new float[8]), [1], y)),
            ("ApplyRope", () => b.ApplyRope(q, rope, 0, Dims.QkHead, Dims.QkNope)),
            ("AppendLatent", () => b.AppendLatent(kv, kvNorm, rope, cache, 0)),
            ("MlaAttentionAbsorbed", () => b.MlaAttentionAbsorbed(q, cache, kvB, Dims, 0, 0.25f, o)),
            ("MlaAttentionNaive", () => b.MlaAttentionNaive(q, cache, kvB, Dims, 0, 0.25f, o)),
            ("CaptureGraph", () => b.CaptureGraph(() => { })),
            ("ReplayGraph", () => b.ReplayGraph(empty)),
        ];
        foreach (var (call, run) in refused)
        {
            var e = Assert.ThrowsExactly<InvalidOperationException>(() => b.CaptureGraph(() =>
            {
                b.RmsNorm(x, norm, y);
                run();
            }), call);
            StringAssert.StartsWith(e.Message, $"{call} cannot be part of a graph", call);
            using var fresh = b.Allocate(1, 4);
            b.RmsNorm(x, norm, fresh);
            Tolerance.AssertClose(Read(b, fresh), expected, 0, 1e-6, $"after the refused {call}, calls run at once");
        }

        Assert.IsTrue(Read(b, y).All(v => v == 0), "no refused capture ran its recorded norm");
        using (var other = new CpuBackend())
        {
            using var foreign = other.CaptureGraph(() => { });
            Assert.ThrowsExactly<ArgumentException>(() => b.ReplayGraph(foreign));
        }

        empty.Dispose();
        Assert.ThrowsExactly<ObjectDisposedException>(() => b.ReplayGraph(empty));

        using var elsewhere = b.Allocate(1, 4);
        using var graph = b.CaptureGraph(() =>
        {
            b.RmsNorm(x, norm, y);
            var thread = new Thread(() => b.RmsNorm(x, norm, elsewhere));
            thread.Start();
            thread.Join();
        });
        Assert.AreEqual(1, graph.Operations, "only the capturing thread's call is recorded");
        Tolerance.AssertClose(Read(b, elsewhere), expected, 0, 1e-6, "another thread's call ran during the capture");
        Assert.IsTrue(Read(b, y).All(v => v == 0), "the recorded call did not run");
        b.ReplayGraph(graph);
        Tolerance.AssertClose(Read(b, y), expected, 0, 1e-6, "the replay ran it");
    }

    /// <summary>
    /// Token choice inside a graph: each replay chooses under the settings set before it (a mask as it was when set, later
    /// changes to the caller's array unseen), a row past the last settings is not chosen, and the capture itself chooses
    /// nothing. Greedy rows against the largest logit worked out here, seeded rows against the rule.
    /// </summary>
    [TestMethod]
    public void AGraphsTokenChoiceFollowsTheSettingsSetBeforeEachReplay()
    {
        const int rows = 4, v = 300;
        var values = RandomLogits(rows, v, new Random(11));
        var settings = ChoiceSettings(v);
        using var b = new CpuBackend();
        var ids = ChoicesAcrossReplays(b, values, rows, v, settings);

        int Largest(int row, Func<int, bool> allowed) => Enumerable.Range(0, v).Where(allowed).MaxBy(i => values[(row * v) + i]);
        int Rule(int row, TokenChoice c) => TokenSampling.Choose(values.AsSpan(row * v, v), c);
        CollectionAssert.AreEqual(new[] { Largest(0, _ => true), -1, Rule(2, settings[0][2]), -1 }, ids[0], "eager: three rows set, the fourth not chosen");
        CollectionAssert.AreEqual(ids[0], ids[1], "the capture chose nothing");
        CollectionAssert.AreEqual(new[] { Rule(0, settings[1][0]), Largest(1, i => i % 2 == 1), Largest(2, i => i < v - 7), Rule(3, settings[1][3]) }, ids[2], "the first replay");
        Assert.AreEqual(1, ids[2][3] % 2, "the seeded masked row draws an odd id");
        CollectionAssert.AreEqual(new[] { Largest(0, i => i % 2 == 1), -1, -1, -1 }, ids[3], "one row set: the rows past it are not chosen");
    }

    /// <summary>
    /// Step rows whose tokens name rows of a token choice buffer embed the ids chosen there, eagerly and in a graph that holds
    /// the choice and the embedding (replayed over new logits): each row the table's row of the largest logit of the choice
    /// row it names, worked out here, and of token 0 where that row was not chosen. A token past the buffer's rows, and a
    /// buffer that chooses ids the table does not have, are refused by name.
    /// </summary>
    [TestMethod]
    public void ChosenTokensAreEmbeddedWhereTheyWereChosen()
    {
        using var b = new CpuBackend();
        var rng = new Random(13);
        var tableValues = Normal(rng, Vocab * Width);
        BFloat16.Round(tableValues); // a checkpoint's table is BF16
        using var table = new CpuEmbeddingWeight(Vocab, Width, tableValues);
        var logits = new[] { RandomLogits(ChosenRows, Vocab, rng), RandomLogits(ChosenRows, Vocab, rng) };
        var got = ChosenEmbeddingsAcrossReplays(b, table, logits, Vocab);
        for (var k = 0; k < logits.Length; k++)
        {
            var tokens = ChosenRowsOfTokens.Select(row => row == NotChosenRow ? 0 : Enumerable.Range(0, Vocab).MaxBy(i => logits[k][(row * Vocab) + i])).ToArray();
            CollectionAssert.AreEqual(tokens.SelectMany(t => tableValues.AsSpan(t * Width, Width).ToArray()).ToArray(), got[k], $"{(k == 0 ? "eager" : "replayed")}: tokens {string.Join(", ", tokens)}");
        }

        using var rows = b.AllocateStepRows(2);
        using var buffer = b.AllocateTokenChoices(ChosenRows, Vocab);
        using var output = b.Allocate(2, Width);
        b.UploadStepRows([1, ChosenRows], [0, 0], [0, 1], rows);
        var past = Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => b.EmbeddingChosenRows(table, rows, buffer, output));
        StringAssert.Contains(past.Message, $"token {ChosenRows} names no row of the token choice buffer (0..{ChosenRows - 1})");
        using var wide = b.AllocateTokenChoices(ChosenRows + 1, Vocab + 1);
        var vocab = Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => b.EmbeddingChosenRows(table, rows, wide, output));
        StringAssert.Contains(vocab.Message, $"chooses ids below {Vocab + 1}; the embedding table has {Vocab} rows");
    }

    /// <summary>Rows of the token choice buffer of <see cref="ChosenEmbeddingsAcrossReplays"/>, the one among them not chosen, and the rows the step rows' tokens name.</summary>
    private const int ChosenRows = 4, NotChosenRow = 2;

    private static readonly int[] ChosenRowsOfTokens = [2, 0, 3, 1, 2, 0];

    /// <summary>
    /// On <paramref name="b"/>: step rows whose tokens name rows of a choice buffer (<see cref="ChosenRowsOfTokens"/>), every
    /// row greedy but <see cref="NotChosenRow"/>; the choice over <paramref name="logits"/>[0] and the embedding of the chosen
    /// tokens run eagerly, then captured as a graph, the logits overwritten by each later set and the graph replayed. Returns
    /// the embedded rows after the eager run and after each replay.
    /// </summary>
    internal static List<float[]> ChosenEmbeddingsAcrossReplays(IBackend b, EmbeddingWeight table, float[][] logits, int v)
    {
        var n = ChosenRowsOfTokens.Length;
        using var scores = b.Upload(logits[0], ChosenRows, v, TensorKind.Logits);
        using var buffer = b.AllocateTokenChoices(ChosenRows, v);
        using var rows = b.AllocateStepRows(n);
        using var output = b.Allocate(n, table.Width);
        b.UploadStepRows(ChosenRowsOfTokens, new int[n], [.. Enumerable.Range(0, n)], rows);
        b.SetTokenChoices([.. Enumerable.Range(0, ChosenRows).Select(r => r == NotChosenRow ? default : TokenChoice.Greedy(v))], buffer);
        var embedded = new List<float[]>();
        void Run()
        {
            b.ChooseTokenRows(scores, buffer);
            b.EmbeddingChosenRows(table, rows, buffer, output);
        }

        void Read()
        {
            var values = new float[output.Length];
            b.Download(output, values);
            embedded.Add(values);
        }

        Run();
        Read();
        using var graph = b.CaptureGraph(Run);
        foreach (var next in logits.Skip(1))
        {
            using var fresh = b.Upload(next, ChosenRows, v, TensorKind.Logits);
            b.CopyRows(fresh, 0, scores, 0, ChosenRows);
            b.ReplayGraph(graph);
            Read();
        }

        return embedded;
    }

    /// <summary><paramref name="rows"/> rows of <paramref name="v"/> logits uniform in [−4, 4).</summary>
    internal static float[] RandomLogits(int rows, int v, Random rng) => [.. Enumerable.Range(0, rows * v).Select(_ => (float)(rng.NextDouble() * 8 - 4))];

    /// <summary>
    /// The settings of <see cref="ChoicesAcrossReplays"/>: three rows of four (greedy, not chosen, seeded), then four (seeded,
    /// greedy among odd ids, greedy under a smaller limit, seeded among odd ids), then one (greedy among odd ids).
    /// </summary>
    internal static TokenChoice[][] ChoiceSettings(int v)
    {
        ulong[] Odd() => Enumerable.Repeat(0xAAAAAAAAAAAAAAAAUL, TokenChoice.MaskWords(v)).ToArray();
        return
        [
            [TokenChoice.Greedy(v), default, new(v, 0.8f, 20, 0.9f, 3, 1)],
            [new(v, 1.1f, 0, 1, 3, 2), TokenChoice.Greedy(v) with { Allowed = Odd() }, TokenChoice.Greedy(v - 7), new(v, 0.9f, 0, 0.95f, 8, 5, Odd())],
            [TokenChoice.Greedy(v) with { Allowed = Odd() }],
        ];
    }

    /// <summary>
    /// On <paramref name="b"/>: the first settings and one eager choice over every row of the logits, then a graph of that
    /// choice captured and each later settings set (a copy of its masks, cleared once set) before a replay. Returns the ids
    /// read after the eager choice, after the capture, and after each replay.
    /// </summary>
    internal static List<int[]> ChoicesAcrossReplays(IBackend b, float[] values, int rows, int v, TokenChoice[][] settings)
    {
        using var logits = b.Upload(values, rows, v, TensorKind.Logits);
        using var buffer = b.AllocateTokenChoices(rows, v);
        var ids = new List<int[]>();
        void Read()
        {
            var read = new int[rows];
            b.ReadTokenChoices(buffer, read);
            ids.Add(read);
        }

        b.SetTokenChoices(settings[0], buffer);
        b.ChooseTokenRows(logits, buffer);
        Read();
        b.SetTokenChoices(settings[1], buffer);
        using var graph = b.CaptureGraph(() => b.ChooseTokenRows(logits, buffer));
        Read();
        foreach (var set in settings.Skip(1))
        {
            TokenChoice[] copies = [.. set.Select(c => c with { Allowed = (ulong[]?)c.Allowed?.Clone() })];
            b.SetTokenChoices(copies, buffer);
            foreach (var c in copies)
            {
                Array.Clear(c.Allowed ?? []);
            }

            b.ReplayGraph(graph);
            Read();
        }

        return ids;
    }
}
