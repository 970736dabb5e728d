using System.Diagnostics;
using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Model;
using DeepSeekCuda.Tests.Distributed;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Model;

/// <summary>
/// The float32 CPU model against the official reference's outputs for tiny-a, tolerance (i) of the
/// fixtures' README: max_rel ≤ 1e-4 on logits and hidden states, exact greedy ids and expert sets.
/// </summary>
[TestClass]
public sealed class TinyAModelTests
{
    private const double MaxRel = 1e-4;

    private static Checkpoint s_checkpoint = null!;
    private static TinyAReference s_ref = null!;
    private static CpuBackend s_backend = null!;
    private static DeepSeekModel s_auto = null!;
    private static DeepSeekModel s_naive = null!;
    private static DeepSeekModel s_absorbed = null!;

    public TestContext TestContext { get; set; } = null!;

    [ClassInitialize]
    public static void Init(TestContext _)
    {
        s_checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        s_ref = new TinyAReference();
        s_backend = new CpuBackend();
        s_auto = DeepSeekModel.Load(s_checkpoint, s_backend);
        s_naive = DeepSeekModel.Load(s_checkpoint, s_backend, new ModelOptions { Attention = AttentionForm.Naive });
        s_absorbed = DeepSeekModel.Load(s_checkpoint, s_backend, new ModelOptions { Attention = AttentionForm.Absorbed });
    }

    [ClassCleanup]
    public static void Cleanup()
    {
        s_auto.Dispose();
        s_naive.Dispose();
        s_absorbed.Dispose();
        s_backend.Dispose();
        s_ref.Dispose();
        s_checkpoint.Dispose();
    }

    private static DeepSeekModel Model(string form) => form switch
    {
        "auto" => s_auto,
        "naive" => s_naive,
        "absorbed" => s_absorbed,
        _ => throw new ArgumentException(form),
    };

    [TestMethod]
    [DataRow("p0", "auto")]
    [DataRow("p1", "auto")]
    [DataRow("p2", "auto")]
    [DataRow("p0", "naive")]
    [DataRow("p2", "naive")]
    [DataRow("p0", "absorbed")]
    [DataRow("p2", "absorbed")]
    public void PrefillLogitsMatchReference(string prompt, string form)
    {
        var ids = s_ref.Ids(prompt);
        var watch = Stopwatch.StartNew();
        var logits = Model(form).ComputeLogits(ids);
        watch.Stop();
        var c = Tolerance.AssertMaxRel(logits, s_ref.F32(prompt + ".logits"), MaxRel, $"{prompt}.logits ({form})");
        TestContext.WriteLine($"{Tolerance.Describe($"{prompt}.logits ({form})", c)}; {watch.Elapsed.TotalMilliseconds:F1} ms for {ids.Length} tokens");
    }

    [TestMethod]
    [DataRow("p0", "auto")]
    [DataRow("p1", "auto")]
    [DataRow("p2", "auto")]
    [DataRow("p1", "naive")]
    [DataRow("p1", "absorbed")]
    public void GreedyDecodingThroughTheCacheMatchesReference(string prompt, string form)
    {
        var model = Model(form);
        var greedy = s_ref.Greedy(prompt);
        var steps = s_ref.F32(prompt + ".step_logits");
        var v = model.VocabSize;
        using var session = model.CreateSession();
        var logits = new float[v];
        session.Forward(s_ref.Ids(prompt), logits);
        var worst = 0.0;
        for (var j = 0; j < greedy.Length; j++)
        {
            if (j > 0)
            {
                session.Forward([greedy[j - 1]], logits);
            }

            var c = Tolerance.AssertMaxRel(logits, steps.AsSpan(j * v, v), MaxRel, $"{prompt}.step_logits[{j}] ({form})");
            worst = Math.Max(worst, c.MaxRel);
            Assert.AreEqual(greedy[j], TinyAReference.ArgMax(logits), $"{prompt}.greedy_ids[{j}] ({form})");
        }

        Assert.AreEqual(s_ref.Ids(prompt).Length + greedy.Length - 1, session.Length);
        TestContext.WriteLine($"{prompt} step logits ({form}): worst max_rel {worst:g3}");
    }

    [TestMethod]
    public void EveryStageOfP1MatchesReference()
    {
        var stages = new Dictionary<string, Intermediate>();
        s_auto.ComputeLogits(s_ref.Ids("p1"), x => stages.Add(x.Name, x));
        var config = s_auto.Config;

        void Hidden(string name)
        {
            Assert.IsTrue(stages.TryGetValue(name, out var got), $"stage {name} was not observed");
            var c = Tolerance.AssertMaxRel(got.Values, s_ref.F32("p1." + name), MaxRel, "p1." + name);
            TestContext.WriteLine(Tolerance.Describe("p1." + name, c));
        }

        Hidden("embed");
        for (var i = 0; i < config.NumHiddenLayers; i++)
        {
            Hidden($"layer{i}.attn_out");
            Hidden($"layer{i}.ffn_out");
            Hidden($"layer{i}.out");
            if (!config.IsMoeLayer(i))
            {
                Assert.IsFalse(stages.ContainsKey($"layer{i}.gate_in"), $"dense layer {i} has no gate");
                continue;
            }

            Hidden($"layer{i}.gate_in");
            Tolerance.AssertClose(stages[$"layer{i}.gate_scores"].Values, s_ref.F32($"p1.layer{i}.gate_scores"), 1e-5, 0, $"p1.layer{i}.gate_scores");
            RoutingAssert.SameExpertsAndWeights(stages[$"layer{i}.topk_idx"].Indices!, stages[$"layer{i}.topk_weight"].Values!,
                s_ref.I64($"p1.layer{i}.topk_idx"), s_ref.F32($"p1.layer{i}.topk_weight"), config.NumExpertsPerTok, 1e-5, $"p1.layer{i}");
        }

        Hidden("final_norm");
    }

    [TestMethod]
    [DataRow("naive")]
    [DataRow("absorbed")]
    public void TokenByTokenEqualsPrefill(string form)
    {
        var model = Model(form);
        var ids = s_ref.Ids("p1");
        var reference = s_ref.F32("p1.logits");
        var v = model.VocabSize;
        using var session = model.CreateSession();
        for (var t = 0; t < ids.Length; t++)
        {
            var row = session.ForwardAll(ids.AsSpan(t, 1));
            Tolerance.AssertMaxRel(row, reference.AsSpan(t * v, v), MaxRel, $"p1.logits[{t}] one token at a time ({form})");
        }
    }

    [TestMethod]
    [DataRow("naive", 50)]
    [DataRow("absorbed", 50)]
    [DataRow("auto", 129)]
    public void ChunkedPrefillEqualsOnePrefill(string form, int firstChunk)
    {
        var model = Model(form);
        var ids = s_ref.Ids("p2");
        using var session = model.CreateSession();
        var first = session.ForwardAll(ids.AsSpan(0, firstChunk));
        var second = session.ForwardAll(ids.AsSpan(firstChunk));
        Tolerance.AssertMaxRel([.. first, .. second], s_ref.F32("p2.logits"), MaxRel, $"p2.logits in chunks {firstChunk}+{ids.Length - firstChunk} ({form})");
    }

    /// <summary>
    /// A session's caches hold what it has used. Fed p2 one token at a time and then its greedy continuation, every
    /// position's logits match the reference; each layer's cache is made at the first token with one block, and grown to two
    /// blocks at position 64 and four at 128, the positions held copied each time and the old caches released.
    /// </summary>
    [TestMethod]
    public void ASessionGrowsItsCachesAsItGoesAndMatchesTheReference()
    {
        using var device = new RecordingBackend(new CpuBackend());
        using var model = DeepSeekModel.Load(s_checkpoint, device, new ModelOptions { LoadMtp = false });
        var allocated = new List<BackendResource>();
        device.Allocated = allocated;
        var ids = s_ref.Ids("p2");
        var greedy = s_ref.Greedy("p2");
        var reference = s_ref.F32("p2.logits");
        var steps = s_ref.F32("p2.step_logits");
        var v = model.VocabSize;
        var layers = s_checkpoint.Config.NumHiddenLayers;
        var made = new List<(int Position, int Capacity)>();
        using var session = model.CreateSession();
        var fed = ids.Concat(greedy[..^1]).ToArray();
        for (var t = 0; t < fed.Length; t++)
        {
            var row = session.ForwardAll(fed.AsSpan(t, 1));
            var step = t - (ids.Length - 1); // the prompt's last position gives the first step's logits
            var want = step < 0 ? reference.AsSpan(t * v, v) : steps.AsSpan(step * v, v);
            Tolerance.AssertMaxRel(row, want, MaxRel, step < 0 ? $"p2.logits[{t}] one token at a time" : $"p2.step_logits[{step}]");
            allocated.RemoveAll(a => a is not LatentCache);
            made.AddRange(allocated.Skip(made.Count).Select(c => (t, ((LatentCache)c).Capacity)));
        }

        (int, int)[] expected = [.. new[] { (0, 64), (64, 128), (128, 256) }.SelectMany(x => Enumerable.Repeat(x, layers))];
        CollectionAssert.AreEqual(expected, made, "caches made: (position, capacity)");
        var copies = device.Operations.Where(o => o.StartsWith("CopyLatentCache(", StringComparison.Ordinal)).Select(o => o[(o.LastIndexOf(' ') + 1)..^1]).ToArray();
        CollectionAssert.AreEqual(new[] { "64", "128" }.SelectMany(p => Enumerable.Repeat(p, layers)).ToArray(), copies, "positions copied at each growth");
        var caches = allocated.OfType<LatentCache>().ToList();
        Assert.AreEqual(2 * layers, caches.Take(2 * layers).Count(c => c.IsDisposed), "the outgrown caches are released");
        Assert.IsFalse(caches.Skip(2 * layers).Any(c => c.IsDisposed), "the session's caches are held");
    }

    [TestMethod]
    public void LastHiddenIsTheFinalNormOfTheLastToken()
    {
        using var session = s_auto.CreateSession();
        var ids = s_ref.Ids("p1");
        session.Forward(ids, new float[s_auto.VocabSize]);
        var d = s_auto.Config.HiddenSize;
        Tolerance.AssertMaxRel(session.GetLastHidden(), s_ref.F32("p1.final_norm").AsSpan((ids.Length - 1) * d, d), MaxRel, "last hidden");
    }

    [TestMethod]
    public void RotaryTableMatchesReference()
    {
        var config = s_checkpoint.Config;
        Tolerance.AssertMaxRel(YarnRope.InverseFrequencies(config), s_ref.F32("rope.inv_freq"), 1e-6, "rope.inv_freq");
        var positions = (int)s_ref.Shape("rope.cos")[0];
        var (cos, sin) = YarnRope.Table(config, positions);
        Tolerance.AssertClose(cos, s_ref.F32("rope.cos"), 2e-5, 0, "rope.cos");
        Tolerance.AssertClose(sin, s_ref.F32("rope.sin"), 2e-5, 0, "rope.sin");
    }

    [TestMethod]
    public void MtpRunsInOneCallOrPositionByPositionAlike()
    {
        Assert.IsTrue(s_auto.HasMtp);
        var ids = s_ref.Ids("p1");
        var stages = new Dictionary<string, Intermediate>();
        s_auto.ComputeLogits(ids, x => stages[x.Name] = x);
        var hiddens = stages["final_norm"].Values!; // [T, D]
        int d = s_auto.Config.HiddenSize, v = s_auto.VocabSize, n = ids.Length - 1;
        var next = ids.AsSpan(1).ToArray();

        using var all = s_auto.CreateSession();
        var together = all.MtpForward(hiddens.AsSpan(0, n * d), next, 0);
        Assert.AreEqual(n * v, together.Length);
        Assert.IsTrue(together.All(float.IsFinite), "MTP logits are finite");
        Assert.AreEqual(n, all.MtpLength);

        using var one = s_absorbed.CreateSession();
        for (var i = 0; i < n; i++)
        {
            var row = one.MtpForward(hiddens.AsSpan(i * d, d), next.AsSpan(i, 1), i);
            Tolerance.AssertMaxRel(row, together.AsSpan(i * v, v), MaxRel, $"MTP position {i}");
        }
    }

    /// <summary>
    /// The MTP layer's cache grows as the main layers' do: fed p2's 129 positions in three calls (one block, then two, then
    /// three), each row's draft logits are the ones of a session fed them in one call.
    /// </summary>
    [TestMethod]
    public void MtpCacheGrowsWithThePositionsItHolds()
    {
        var ids = s_ref.Ids("p2");
        var stages = new Dictionary<string, Intermediate>();
        s_auto.ComputeLogits(ids, x => stages[x.Name] = x);
        var hiddens = stages["final_norm"].Values!;
        int d = s_auto.Config.HiddenSize, v = s_auto.VocabSize, n = ids.Length - 1;
        var next = ids.AsSpan(1).ToArray();
        using var all = s_auto.CreateSession();
        var together = all.MtpForward(hiddens.AsSpan(0, n * d), next, 0);
        using var grown = s_auto.CreateSession();
        foreach (var (start, end) in new[] { (0, 50), (50, 100), (100, n) })
        {
            var rows = grown.MtpForward(hiddens.AsSpan(start * d, (end - start) * d), next.AsSpan(start, end - start), start);
            Tolerance.AssertMaxRel(rows, together.AsSpan(start * v, (end - start) * v), MaxRel, $"MTP positions {start}..{end - 1}");
        }
    }

    [TestMethod]
    public void TruncateRollsBackTheCache()
    {
        var ids = s_ref.Ids("p1");
        var v = s_auto.VocabSize;
        using var session = s_auto.CreateSession();
        session.ForwardAll(ids.AsSpan(0, 20));
        session.ForwardAll([5, 6, 7]);
        session.Truncate(20);
        var rest = session.ForwardAll(ids.AsSpan(20));
        Tolerance.AssertMaxRel(rest, s_ref.F32("p1.logits").AsSpan(20 * v), MaxRel, "p1.logits after rollback");
    }

    [TestMethod]
    public void BadInputIsRejected()
    {
        using var session = s_auto.CreateSession();
        var logits = new float[s_auto.VocabSize];
        Assert.ThrowsExactly<ArgumentException>(() => session.Forward([], logits));
        Assert.ThrowsExactly<ArgumentException>(() => session.Forward([s_auto.VocabSize], logits));
        Assert.ThrowsExactly<ArgumentException>(() => session.Forward([-1], logits));
        Assert.ThrowsExactly<ArgumentException>(() => session.Forward([1], new float[3]));
        using var small = DeepSeekModel.Load(s_checkpoint, s_backend, new ModelOptions { MaxSequenceLength = 4 });
        using var s2 = small.CreateSession();
        Assert.ThrowsExactly<ArgumentException>(() => s2.Forward([0, 1, 2, 3, 4], logits));
        Assert.AreEqual(0, s2.Length);
    }
}
