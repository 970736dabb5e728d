using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Backends.Cuda;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Numerics;
using DeepSeekCuda.Model;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>
/// Every <see cref="IBackend"/> operation of <see cref="CudaBackend"/> against <see cref="CpuBackend"/> in
/// <see cref="CpuNumerics.GpuEmulation"/> (its tight reference: the same BF16 rounding points and FP8 activation
/// quantization), through the interface only, with tiny-a's real weights (FP8 linears, BF16 head, norms, gate,
/// experts) and fresh random inputs (seed logged). One harness (<see cref="Both"/>) runs an operation on both
/// backends; outputs are poisoned with NaN before the GPU writes them; NaN positions must agree.
/// Tolerances, by what differs between the two: only the summation order of fp32 sums, so a BF16-rounded result
/// may land one BF16 step (2⁻⁷ relative) apart; FP8 GEMMs may additionally see an activation code one e4m3 step
/// apart where x/s is computed differently; MLA adds BF16 probabilities in the tensor-core P·V and (absorbed) a
/// BF16 copy of kv_b.
/// </summary>
[TestClass]
[TestCategory("Gpu")]
public class CudaBackendGpuTests : TinyABackendsGpuTests
{
    private int QLora => Config.QLoraRank ?? throw new InvalidOperationException("tiny-a has q_lora_rank");

    private static LinearSpec Fp8(string weight, int outF, int inF) => new(weight, outF, inF, true);

    // ------------------------------------------------------------------ the harness

    /// <summary>Resources of one backend for one run of an operation, disposed after it.</summary>
    private sealed class Scope(IBackend backend) : IDisposable
    {
        private readonly List<IDisposable> _owned = [];

        public IBackend B => backend;

        public T Own<T>(T resource)
            where T : IDisposable
        {
            _owned.Add(resource);
            return resource;
        }

        public Tensor In(float[] values, int rows, int cols) => Own(backend.Upload(values, rows, cols));

        /// <summary>An output poisoned with NaN, so an element the backend does not write cannot pass.</summary>
        public Tensor Out(int rows, int cols, TensorKind kind = TensorKind.Activation) =>
            Own(backend.Upload(Enumerable.Repeat(float.NaN, rows * cols).ToArray(), rows, cols, kind));

        public float[] Read(Tensor t)
        {
            var a = new float[t.Length];
            backend.Download(t, a);
            return a;
        }

        public void Dispose()
        {
            for (var i = _owned.Count - 1; i >= 0; i--)
            {
                _owned[i].Dispose();
            }
        }
    }

    /// <summary>Runs <paramref name="op"/> on the CUDA backend and on the reference; returns both outputs.</summary>
    private (float[][] Cuda, float[][] Cpu) Both(Func<Scope, float[][]> op)
    {
        float[][] got, want;
        using (var s = new Scope(Cuda))
        {
            got = op(s);
        }

        using (var s = new Scope(Cpu))
        {
            want = op(s);
        }

        Assert.HasCount(want.Length, got);
        return (got, want);
    }

    private static void Exact(string what, float[] got, float[] want)
    {
        Assert.HasCount(want.Length, got, what);
        for (var i = 0; i < want.Length; i++)
        {
            if (!(got[i].Equals(want[i]) || (float.IsNaN(got[i]) && float.IsNaN(want[i]))))
            {
                Assert.Fail($"{what}: [{i}] cuda {got[i]:g9} vs cpu {want[i]:g9}");
            }
        }
    }

    private void Close(string what, float[] got, float[] want, double relToMax, double rtol, double rmsRel = double.PositiveInfinity)
    {
        var c = Tolerance.Compare(got, want, what);
        var maxRef = want.Where(float.IsFinite).Select(Math.Abs).DefaultIfEmpty(0f).Max();
        Tolerance.AssertClose(got, want, Math.Max(1e-6, relToMax * maxRef), rtol, what);
        if (!double.IsPositiveInfinity(rmsRel))
        {
            Tolerance.AssertRmsRel(got, want, rmsRel, what);
        }

        TestContext.WriteLine(Tolerance.Describe(what, c));
    }

    // ------------------------------------------------------------------ memory, embedding, norms, elementwise

    [TestMethod]
    public void ChosenTokensFollowTheRuleAndOnlyIdsComeBack()
    {
        // A view of the middle rows of a larger tensor (as the runner's head arena gives), greedy and seeded rows, a row not
        // chosen there, an unsampleable one; then more rows than the buffer holds is refused by name.
        const int v = 4096, rows = 6;
        var values = Enumerable.Range(0, (rows + 2) * v).Select(_ => (float)(Random.NextDouble() * 10 - 5)).ToArray();
        values[(1 + 4) * v + 99] = float.NaN;
        TokenChoice[] choices =
        [
            TokenChoice.Greedy(v), new(v, 0.7f, 40, 0.9f, (ulong)Seed, 3), new(3000, 1.2f, 0, 1, 5, 8), default,
            TokenChoice.Greedy(v), new(v, 1, 0, 0.5f, 77, 0),
        ];
        int[] Run(IBackend b)
        {
            using var all = b.Upload(values, rows + 2, v, TensorKind.Logits);
            using var logits = b.View(all, 1, rows);
            using var buffer = b.AllocateTokenChoices(rows, v);
            var tokens = new int[rows];
            b.ChooseTokens(logits, choices, buffer, tokens);
            var refused = Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => b.ChooseTokens(all, [.. choices, default, default], buffer, new int[rows + 2]));
            StringAssert.Contains(refused.Message, $"holds {rows} rows");
            return tokens;
        }

        var got = Run(Cuda);
        var want = Run(Cpu);
        TestContext.WriteLine($"cuda [{string.Join(", ", got)}], cpu [{string.Join(", ", want)}]");
        Assert.AreEqual(want[0], got[0], "greedy");
        Assert.AreEqual(TokenSampling.NotChosen, got[3], "not chosen there");
        Assert.AreEqual(TokenSampling.NotChosen, got[4], "a NaN row is not sampleable");
        Assert.IsLessThan(3000, got[2], "the limit");
        var differ = Enumerable.Range(0, rows).Count(r => got[r] != want[r]);
        Assert.IsLessThanOrEqualTo(1, differ, "a seeded draw differs only within rounding of a boundary");
    }

    [TestMethod]
    public void AGraphsTokenChoiceFollowsTheSettingsSetBeforeEachReplay()
    {
        // The choice kernel and the ids' copy to pinned memory captured in a CUDA graph, replayed under settings (masks
        // included) set before each replay, against the CPU backend's graph over the same steps: greedy and not-chosen rows
        // exactly, a seeded draw within rounding of a boundary.
        const int rows = 4, v = 4096;
        var values = Backends.StepGraphTests.RandomLogits(rows, v, Random);
        var settings = Backends.StepGraphTests.ChoiceSettings(v);
        var got = Backends.StepGraphTests.ChoicesAcrossReplays(Cuda, values, rows, v, settings);
        var want = Backends.StepGraphTests.ChoicesAcrossReplays(Cpu, values, rows, v, settings);
        TestContext.WriteLine($"cuda {string.Join(" | ", got.Select(g => string.Join(", ", g)))}; cpu {string.Join(" | ", want.Select(w => string.Join(", ", w)))}");
        TokenChoice[][] setFor = [settings[0], settings[0], settings[1], settings[2]];
        var differ = 0;
        for (var k = 0; k < want.Count; k++)
        {
            for (var r = 0; r < rows; r++)
            {
                var c = r < setFor[k].Length ? setFor[k][r] : default;
                if (c.Temperature > 0)
                {
                    differ += got[k][r] != want[k][r] ? 1 : 0;
                }
                else
                {
                    Assert.AreEqual(want[k][r], got[k][r], $"read {k}, row {r}: greedy and not-chosen rows follow the rule exactly");
                }
            }
        }

        Assert.IsLessThanOrEqualTo(1, differ, "a seeded draw differs only within rounding of a boundary");
    }

    [TestMethod]
    public void ChosenTokensAreEmbeddedWhereTheyWereChosen()
    {
        // The embedding of step rows whose tokens name rows of a choice buffer (the ids chosen on the device, token 0 where a
        // row was not chosen), eagerly and in a CUDA graph with the choice, over tiny-a's table: bitwise the CPU's (greedy
        // choices, a BF16 table widened exactly).
        var v = Config.VocabSize;
        float[][] logits = [Backends.StepGraphTests.RandomLogits(4, v, Random), Backends.StepGraphTests.RandomLogits(4, v, Random)];
        List<float[]> Run(IBackend b)
        {
            using var table = b.UploadEmbedding(Checkpoint, "model.embed_tokens.weight", v, Config.HiddenSize);
            return Backends.StepGraphTests.ChosenEmbeddingsAcrossReplays(b, table, logits, v);
        }

        var got = Run(Cuda);
        var want = Run(Cpu);
        Exact("eager", got[0], want[0]);
        Exact("replayed over new logits", got[1], want[1]);
    }

    [TestMethod]
    public void MaskedRowsAreChosenAmongTheirAllowedIds()
    {
        // Masked rows between unmasked ones (the masks packed in row order as they cross), a mask under a smaller limit, a row
        // not chosen there; then a mask too short and one wider than the buffer's are refused by name.
        const int v = 4096, rows = 6;
        var words = TokenChoice.MaskWords(v);
        var values = Enumerable.Range(0, rows * v).Select(_ => (float)(Random.NextDouble() * 10 - 5)).ToArray();
        var odd = Enumerable.Repeat(0xAAAAAAAAAAAAAAAAUL, words).ToArray();
        var band = Enumerable.Range(0, words).Select(w => w is 1 or 2 ? ulong.MaxValue : 0UL).ToArray();
        TokenChoice[] choices =
        [
            TokenChoice.Greedy(v) with { Allowed = odd }, TokenChoice.Greedy(v), new(v, 0.9f, 30, 0.95f, (ulong)Seed, 2, band), default,
            TokenChoice.Greedy(3000) with { Allowed = band }, new(v, 1.3f, 0, 1, 4, 9, odd),
        ];
        int[] Run(IBackend b)
        {
            using var logits = b.Upload(values, rows, v, TensorKind.Logits);
            using var buffer = b.AllocateTokenChoices(rows, v);
            var tokens = new int[rows];
            b.ChooseTokens(logits, choices, buffer, tokens);
            var shortMask = Assert.ThrowsExactly<ArgumentException>(() => b.ChooseTokens(logits, [TokenChoice.Greedy(v) with { Allowed = new ulong[words - 1] }], buffer, new int[1]));
            StringAssert.Contains(shortMask.Message, "row 0: the allowed ids hold");
            using var narrow = b.AllocateTokenChoices(rows, v / 2);
            var wide = Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => b.ChooseTokens(logits, choices, narrow, tokens.ToArray()));
            StringAssert.Contains(wide.Message, $"row 0: the vocabulary limit must be 0..{v / 2} (the token choice buffer's)");
            return tokens;
        }

        var got = Run(Cuda);
        var want = Run(Cpu);
        TestContext.WriteLine($"cuda [{string.Join(", ", got)}], cpu [{string.Join(", ", want)}]");
        foreach (var r in new[] { 0, 1, 3, 4 })
        {
            Assert.AreEqual(want[r], got[r], $"row {r}: greedy and not-chosen rows follow the rule exactly");
        }

        Assert.AreEqual(1, got[0] % 2, "an odd id");
        Assert.IsTrue(got[2] is >= 64 and < 192, $"row 2 drew {got[2]}, outside its band");
        Assert.IsTrue(got[4] is >= 64 and < 192, $"row 4 chose {got[4]}, outside its band");
        Assert.AreEqual(1, got[5] % 2, "a draw among odd ids");
        Assert.IsLessThanOrEqualTo(1, new[] { 2, 5 }.Count(r => got[r] != want[r]), "a seeded draw differs only within rounding of a boundary");
    }

    [TestMethod]
    public void EmbeddingCopyRowsAndConcatAreExact()
    {
        int vocab = Config.VocabSize, d = Config.HiddenSize;
        int[] ids = [0, vocab - 1, .. Enumerable.Range(0, 13).Select(_ => Random.Next(vocab)), 5, 5];
        var a = Bf16Normal(7 * 100);
        var b = Bf16Normal(7 * 28);
        var (got, want) = Both(s =>
        {
            var table = s.Own(s.B.UploadEmbedding(Checkpoint, "model.embed_tokens.weight", vocab, d));
            var e = s.Out(ids.Length, d);
            s.B.Embedding(table, ids, e);
            var src = s.In(a, 7, 100);
            var dst = s.Out(9, 100);
            s.B.CopyRows(src, 2, dst, 3, 4);
            var cat = s.Out(7, 128);
            s.B.ConcatColumns(src, s.In(b, 7, 28), cat);
            var zero = s.Own(s.B.Allocate(3, 5));
            var zeroed = s.In(a, 7, 100);
            using (var middle = s.B.View(zeroed, 2, 3))
            {
                s.B.Zero(middle);
            }

            return [s.Read(e), s.Read(dst), s.Read(cat), s.Read(zero), s.Read(zeroed)];
        });
        Exact("embedding", got[0], want[0]);
        Exact("copy rows (untouched rows stay NaN)", got[1], want[1]);
        Exact("concat", got[2], want[2]);
        Exact("allocate zero-fills", got[3], want[3]);
        Exact("zero rows 2..4 of a view", got[4], want[4]);
        Assert.IsTrue(got[4].AsSpan(200, 300).ToArray().All(v => v == 0) && got[4].AsSpan(0, 200).ToArray().Any(v => v != 0), "the view's rows zeroed, the rows before kept");
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() =>
        {
            using var s = new Scope(Cuda);
            s.B.Embedding(s.Own(s.B.UploadEmbedding(Checkpoint, "model.embed_tokens.weight", vocab, d)), [vocab], s.Out(1, d));
        });
    }

    /// <summary>
    /// Values round trip as each kind stores them (an activation rounded to BF16 as the emulation's upload, logits exact, both
    /// from f32 or BF16 storage), a kind that is none is refused before any device memory is asked for, and a copy between
    /// kinds is refused by name.
    /// </summary>
    [TestMethod]
    public void EachKindStoresItsValuesAndABadKindAllocatesNothing()
    {
        var values = Enumerable.Range(0, 3 * 50).Select(_ => (float)(Random.NextDouble() * 6 - 3)).ToArray();
        values[7] = float.NaN;
        values[8] = float.NegativeInfinity;
        var (got, want) = Both(s =>
        {
            var activation = s.Own(s.B.Upload(values, 3, 50));
            var logits = s.Own(s.B.Upload(values, 3, 50, TensorKind.Logits));
            var copy = s.Own(s.B.Allocate(3, 50, TensorKind.Logits));
            s.B.CopyRows(logits, 0, copy, 0, 3);
            var refused = Assert.ThrowsExactly<ArgumentException>(() => s.B.CopyRows(activation, 0, copy, 0, 1));
            Assert.AreEqual("a copy of [3, 50] must be an activation; logits [3, 50] is a logits tensor", refused.Message);
            return [s.Read(activation), s.Read(logits), s.Read(copy)];
        });
        Exact("an activation (bf16 values)", got[0], want[0]);
        Exact("logits", got[1], values);
        Exact("logits copied", got[2], values);
        var before = DriverAllocations.Snapshot();
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => Cuda.Allocate(2, 2, (TensorKind)7));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => Cuda.Upload(new float[4], 2, 2, (TensorKind)7));
        Assert.AreEqual(before, DriverAllocations.Snapshot(), "device allocations for a kind that is none");
    }

    [TestMethod]
    [DataRow(1)]
    [DataRow(7)]
    [DataRow(300)]
    public void NormsAndSiluMulMatchWithinOneBf16Step(int rows)
    {
        var d = Config.HiddenSize;
        var x = Bf16Normal(rows * d, 3f);
        var delta = Bf16Normal(rows * d);
        var g = Bf16Normal(rows * d, 4f);
        var u = Bf16Normal(rows * d);
        // A NaN in one input row: the norm's whole row and SiLU's one element must be NaN on both.
        x[Math.Min(rows - 1, 3) * d + 5] = float.NaN;
        g[rows * d / 2] = float.NaN;
        u[rows * d - 1] = float.PositiveInfinity;
        var (got, want) = Both(s =>
        {
            var w = s.Own(s.B.UploadNorm(Checkpoint, "model.layers.0.input_layernorm.weight", d, (float)Config.RmsNormEps));
            var xt = s.In(x, rows, d);
            var n1 = s.Out(rows, d);
            s.B.RmsNorm(xt, w, n1);
            var residual = s.In(x, rows, d);
            var n2 = s.Out(rows, d);
            s.B.AddRmsNorm(residual, s.In(delta, rows, d), w, n2);
            var h = s.Out(rows, d);
            s.B.SiluMul(s.In(g, rows, d), s.In(u, rows, d), h);
            return [s.Read(n1), s.Read(residual), s.Read(n2), s.Read(h)];
        });
        Close("rmsnorm", got[0], want[0], 1e-6, Bf16Step);
        Exact("residual after AddRmsNorm (one fp32 add, one rounding)", got[1], want[1]);
        Close("add+rmsnorm", got[2], want[2], 1e-6, Bf16Step);
        Close("silu·up", got[3], want[3], 1e-6, Bf16Step);
    }

    [TestMethod]
    [DataRow(1, 0)]
    [DataRow(5, 17)]
    [DataRow(70, 100)]
    public void RopeMatches(int rows, int start)
    {
        int heads = Config.NumAttentionHeads, qk = Config.QkNopeHeadDim + Config.QkRopeHeadDim, pairs = Config.QkRopeHeadDim / 2;
        var (cos, sin) = YarnRope.Table(Config, 256);
        var q = Bf16Normal(rows * heads * qk);
        var (got, want) = Both(s =>
        {
            var rope = s.Own(s.B.UploadRope(cos, sin, 256, pairs));
            var t = s.In(q, rows, heads * qk);
            s.B.ApplyRope(t, rope, start, qk, Config.QkNopeHeadDim);
            return [s.Read(t)];
        });
        Exact("rope (one kernel, the CPU's table, each product and sum rounded on its own)", got[0], want[0]);
    }

    // ------------------------------------------------------------------ GEMMs

    [TestMethod]
    [DataRow(1)]
    [DataRow(4)]
    [DataRow(5)]
    [DataRow(64)]
    [DataRow(65)]
    [DataRow(130)]
    public void Fp8LinearMatches(int rows)
    {
        // q_b [512, 192] (K not a multiple of 128) and the dense down_proj [256, 512]: the gemv path up to 64 rows, mma above.
        var q = Bf16Normal(rows * QLora);
        var h = Bf16Normal(rows * Config.IntermediateSize, 0.5f);
        var (got, want) = Both(s =>
        {
            var qb = s.Own(s.B.UploadLinear(Checkpoint, Fp8("model.layers.0.self_attn.q_b_proj.weight", 512, QLora)));
            var down = s.Own(s.B.UploadLinear(Checkpoint, Fp8("model.layers.0.mlp.down_proj.weight", Config.HiddenSize, Config.IntermediateSize)));
            Assert.IsTrue(qb.Fp8 && down.Fp8);
            var y1 = s.Out(rows, 512);
            s.B.Linear(s.In(q, rows, QLora), qb, y1);
            var y2 = s.Out(rows, Config.HiddenSize);
            s.B.Linear(s.In(h, rows, Config.IntermediateSize), down, y2);
            return [s.Read(y1), s.Read(y2)];
        });
        Close($"q_b x{rows}", got[0], want[0], 0.01, 2 * Bf16Step, rmsRel: 4e-3);
        Close($"down x{rows}", got[1], want[1], 0.01, 2 * Bf16Step, rmsRel: 4e-3);
    }

    [TestMethod]
    [DataRow(1)]
    [DataRow(3)]
    [DataRow(9)]
    public void Bf16LinearAndLogitsMatch(int rows)
    {
        int vocab = Config.VocabSize, d = Config.HiddenSize;
        var x = Bf16Normal(rows * d);
        var (got, want) = Both(s =>
        {
            var head = s.Own(s.B.UploadHead(Checkpoint, "lm_head.weight", vocab, d));
            Assert.IsFalse(head.Fp8);
            var xt = s.In(x, rows, d);
            var logits = s.Out(rows, vocab, TensorKind.Logits);
            s.B.Logits(xt, head, logits);
            var y = s.Out(rows, vocab);
            s.B.Linear(xt, head, y);
            return [s.Read(logits), s.Read(y)];
        });
        // Logits are fp32 and never rounded: only the summation order differs.
        Close($"logits x{rows}", got[0], want[0], 1e-5, 1e-4);
        Close($"bf16 linear x{rows}", got[1], want[1], 1e-5, Bf16Step);
    }

    // ------------------------------------------------------------------ MLA

    /// <summary>
    /// Appends a sequence in chunks (1 through a block boundary), and after each chunk runs both attention forms for the
    /// chunk's queries: the absorbed form takes the decode kernel for 1–2 rows and the prefill kernel above.
    /// </summary>
    [TestMethod]
    public void LatentCacheAndBothAttentionFormsMatch()
    {
        var dims = new MlaDims(Config.NumAttentionHeads, Config.QkNopeHeadDim, Config.QkRopeHeadDim, Config.VHeadDim, Config.KvLoraRank);
        int[] chunks = [5, 2, 1, 1, 72, 2, 3];
        var total = chunks.Sum();
        var capacity = 96;
        var (cos, sin) = YarnRope.Table(Config, capacity);
        var kv = Bf16Normal(total * (dims.KvLora + dims.QkRope));
        var q = Bf16Normal(total * dims.Heads * dims.QkHead);
        var scale = (float)Config.SoftmaxScale;
        var (got, want) = Both(s =>
        {
            var norm = s.Own(s.B.UploadNorm(Checkpoint, "model.layers.0.self_attn.kv_a_layernorm.weight", dims.KvLora, (float)Config.RmsNormEps));
            var kvB = s.Own(s.B.UploadLinear(Checkpoint, Fp8("model.layers.0.self_attn.kv_b_proj.weight", dims.Heads * dims.KvBHead, dims.KvLora)));
            var rope = s.Own(s.B.UploadRope(cos, sin, capacity, dims.QkRope / 2));
            var cache = s.Own(s.B.AllocateLatentCache(capacity, dims.KvLora, dims.QkRope));
            var outputs = new List<float[]>();
            var start = 0;
            foreach (var n in chunks)
            {
                var kvt = s.In(kv.AsSpan(start * (dims.KvLora + dims.QkRope), n * (dims.KvLora + dims.QkRope)).ToArray(), n, dims.KvLora + dims.QkRope);
                s.B.AppendLatent(kvt, norm, rope, cache, start);
                var qt = s.In(q.AsSpan(start * dims.Heads * dims.QkHead, n * dims.Heads * dims.QkHead).ToArray(), n, dims.Heads * dims.QkHead);
                var naive = s.Out(n, dims.Heads * dims.V);
                s.B.MlaAttentionNaive(qt, cache, kvB, dims, start, scale, naive);
                var absorbed = s.Out(n, dims.Heads * dims.V);
                s.B.MlaAttentionAbsorbed(qt, cache, kvB, dims, start, scale, absorbed);
                outputs.Add(s.Read(naive));
                outputs.Add(s.Read(absorbed));
                start += n;
            }

            return [.. outputs];
        });
        for (var i = 0; i < got.Length; i++)
        {
            var what = $"chunk {i / 2} ({chunks[i / 2]} rows) {(i % 2 == 0 ? "naive" : "absorbed")}";
            Close(what, got[i], want[i], 0.03, 0.05, rmsRel: 0.02);
        }
    }

    /// <summary>
    /// One decode step's rows of three sequences through a permuted block table over one pool (slot 2; slot 0's token and
    /// draft across a block boundary; slot 1 at a long context that takes KV splits): RoPE at the uploaded positions, the
    /// append, and attention with each row a query of its own (the decode kernel reading each row's block-table row); the
    /// rows' tokens embedded from the device copy; and rows scattered into and gathered from a ring of rows per slot.
    /// </summary>
    [TestMethod]
    public void StepRowOperationsMatch()
    {
        var dims = new MlaDims(Config.NumAttentionHeads, Config.QkNopeHeadDim, Config.QkRopeHeadDim, Config.VHeadDim, Config.KvLoraRank);
        int width = dims.KvLora + dims.QkRope, qWidth = dims.Heads * dims.QkHead;
        int[] history = [63, 700, 9];
        int[] slots = [2, 0, 0, 1];
        var positions = new int[slots.Length];
        var next = (int[])history.Clone();
        for (var t = 0; t < slots.Length; t++)
        {
            positions[t] = next[slots[t]]++;
        }

        const int MaxBlocks = 12, Capacity = MaxBlocks * 64;
        var (cos, sin) = YarnRope.Table(Config, Capacity);
        var kvHistory = history.Select(h => Bf16Normal(h * width)).ToArray();
        var kv = Bf16Normal(slots.Length * width);
        var q = Bf16Normal(slots.Length * qWidth);
        int[] tokens = [Config.VocabSize - 1, .. slots.Skip(1).Select(_ => Random.Next(Config.VocabSize))];
        const int RingRows = 4;
        var ringValues = Bf16Normal(history.Length * RingRows * Config.HiddenSize);
        var hiddens = Bf16Normal(slots.Length * Config.HiddenSize);
        var shuffle = new Random(20261205);
        int[] entries = [.. Enumerable.Range(0, 3 * MaxBlocks).OrderBy(_ => shuffle.Next())];
        var scale = (float)Config.SoftmaxScale;
        TestContext.WriteLine($"rows (slot, position): {string.Join(" ", slots.Select((s, t) => $"({s}, {positions[t]})"))}");
        var (got, want) = Both(s =>
        {
            var norm = s.Own(s.B.UploadNorm(Checkpoint, "model.layers.0.self_attn.kv_a_layernorm.weight", dims.KvLora, (float)Config.RmsNormEps));
            var kvB = s.Own(s.B.UploadLinear(Checkpoint, Fp8("model.layers.0.self_attn.kv_b_proj.weight", dims.Heads * dims.KvBHead, dims.KvLora)));
            var rope = s.Own(s.B.UploadRope(cos, sin, Capacity, dims.QkRope / 2));
            var pool = s.Own(s.B.AllocateLatentPool(3 * MaxBlocks, dims.KvLora, dims.QkRope));
            var table = s.Own(s.B.AllocateBlockTable(3, MaxBlocks));
            s.B.UploadBlockTable(entries, table);
            for (var slot = 0; slot < history.Length; slot++)
            {
                var cache = s.Own(s.B.PagedCache(pool, table, slot));
                s.B.AppendLatent(s.In(kvHistory[slot], history[slot], width), norm, rope, cache, 0);
            }

            var rows = s.Own(s.B.AllocateStepRows(8));
            s.B.UploadStepRows(tokens, slots, positions, rows);
            var qt = s.In(q, slots.Length, qWidth);
            s.B.ApplyRopeRows(qt, rope, rows, dims.QkHead, dims.QkNope);
            s.B.AppendLatentRows(s.In(kv, slots.Length, width), norm, rope, pool, table, rows);
            var o = s.Out(slots.Length, dims.Heads * dims.V);
            s.B.MlaAttentionRows(qt, pool, table, rows, kvB, dims, scale, o);
            var embed = s.Own(s.B.UploadEmbedding(Checkpoint, "model.embed_tokens.weight", Config.VocabSize, Config.HiddenSize));
            var e = s.Out(slots.Length, Config.HiddenSize);
            s.B.EmbeddingRows(embed, rows, e);
            var ring = s.In(ringValues, history.Length * RingRows, Config.HiddenSize);
            s.B.ScatterRows(s.In(hiddens, slots.Length, Config.HiddenSize), rows, RingRows, ring);
            var gathered = s.Out(slots.Length - 1, Config.HiddenSize);
            s.B.GatherRows(ring, RingRows, rows, gathered);
            return [s.Read(qt), s.Read(o), s.Read(e), s.Read(ring), s.Read(gathered)];
        });
        Exact("rope at the rows' positions", got[0], want[0]);
        Close("attention of the step's rows", got[1], want[1], 0.03, 0.05, rmsRel: 0.02);
        Exact("the rows' tokens embedded", got[2], want[2]);
        Exact("the rows scattered into a ring of 4 rows per slot", got[3], want[3]);
        Exact("the first 3 rows gathered from the ring", got[4], want[4]);
    }

    // ------------------------------------------------------------------ graphs

    /// <summary>
    /// A decode step of three rows (embedding from the step rows, the q path, RoPE, the latent append, attention over a
    /// permuted block table, o_proj, MoE, logits) run eagerly once, captured as a graph, and replayed over three new uploads
    /// of rows (other tokens, the slots in another order, positions through a block boundary), against the same calls made
    /// eagerly over a second copy of the step's memory: bitwise equal on each backend (the rows' attention sizes its KV
    /// splits from the block table, the same in both), and each replay's logits differ from the last (it read the new rows).
    /// </summary>
    [TestMethod]
    public void GraphReplaysEqualEagerStepsOverNewRows()
    {
        var dims = new MlaDims(Config.NumAttentionHeads, Config.QkNopeHeadDim, Config.QkRopeHeadDim, Config.VHeadDim, Config.KvLoraRank);
        int d = Config.HiddenSize, vocab = Config.VocabSize, e = Config.NRoutedExperts, k = Config.NumExpertsPerTok, inter = Config.MoeIntermediateSize;
        const int Rows = 3, MaxBlocks = 2, Capacity = MaxBlocks * 64, Steps = 4;
        var options = new GateOptions(e, Config.NGroup, Config.TopkGroup, k, Config.NormTopkProb, (float)Config.RoutedScalingFactor);
        LinearSpec[] Mlp(string prefix, int width) =>
            [Fp8(prefix + ".gate_proj.weight", width, d), Fp8(prefix + ".up_proj.weight", width, d), Fp8(prefix + ".down_proj.weight", d, width)];
        var experts = Enumerable.Range(0, e).Select(i => Mlp($"model.layers.1.mlp.experts.{i}", inter)).ToArray();
        var shared = Mlp("model.layers.1.mlp.shared_experts", inter * Config.NSharedExperts);
        var (cos, sin) = YarnRope.Table(Config, Capacity);
        int[] entries = [.. Enumerable.Range(0, Rows * MaxBlocks).OrderBy(_ => Random.Next())];
        var steps = Enumerable.Range(0, Steps).Select(step => (
            Tokens: Enumerable.Range(0, Rows).Select(_ => Random.Next(vocab)).ToArray(),
            Slots: Enumerable.Range(0, Rows).Select(i => (i + step) % Rows).ToArray(),
            Positions: Enumerable.Repeat(62 + step, Rows).ToArray())).ToArray();
        TestContext.WriteLine($"positions {steps[0].Positions[0]}..{steps[^1].Positions[0]}; tokens {string.Join(" | ", steps.Select(t => string.Join(",", t.Tokens)))}");
        var scale = (float)Config.SoftmaxScale;
        var (got, want) = Both(s =>
        {
            var b = s.B;
            var embed = s.Own(b.UploadEmbedding(Checkpoint, "model.embed_tokens.weight", vocab, d));
            var inNorm = s.Own(b.UploadNorm(Checkpoint, "model.layers.0.input_layernorm.weight", d, (float)Config.RmsNormEps));
            var qa = s.Own(b.UploadLinear(Checkpoint, Fp8("model.layers.0.self_attn.q_a_proj.weight", QLora, d)));
            var qaNorm = s.Own(b.UploadNorm(Checkpoint, "model.layers.0.self_attn.q_a_layernorm.weight", QLora, (float)Config.RmsNormEps));
            var qb = s.Own(b.UploadLinear(Checkpoint, Fp8("model.layers.0.self_attn.q_b_proj.weight", dims.Heads * dims.QkHead, QLora)));
            var kva = s.Own(b.UploadLinear(Checkpoint, Fp8("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", dims.KvLora + dims.QkRope, d)));
            var kvNorm = s.Own(b.UploadNorm(Checkpoint, "model.layers.0.self_attn.kv_a_layernorm.weight", dims.KvLora, (float)Config.RmsNormEps));
            var kvb = s.Own(b.UploadLinear(Checkpoint, Fp8("model.layers.0.self_attn.kv_b_proj.weight", dims.Heads * dims.KvBHead, dims.KvLora)));
            var o = s.Own(b.UploadLinear(Checkpoint, Fp8("model.layers.0.self_attn.o_proj.weight", d, dims.Heads * dims.V)));
            var gate = s.Own(b.UploadGate(Checkpoint, "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias", d, options));
            var moe = s.Own(b.UploadExperts(Checkpoint, experts, shared));
            var head = s.Own(b.UploadHead(Checkpoint, "lm_head.weight", vocab, d));
            var rope = s.Own(b.UploadRope(cos, sin, Capacity, dims.QkRope / 2));

            // Two copies of the step's memory: one replayed, one run eagerly.
            var mem = Enumerable.Range(0, 2).Select(_ =>
            {
                var table = s.Own(b.AllocateBlockTable(Rows, MaxBlocks));
                b.UploadBlockTable(entries, table);
                return (Rows: s.Own(b.AllocateStepRows(Rows)), Pool: s.Own(b.AllocateLatentPool(Rows * MaxBlocks, dims.KvLora, dims.QkRope)), Table: table,
                    H: s.Out(Rows, d), A: s.Out(Rows, d), Cq: s.Out(Rows, QLora), Q: s.Out(Rows, dims.Heads * dims.QkHead),
                    Kv: s.Out(Rows, dims.KvLora + dims.QkRope), Attn: s.Out(Rows, dims.Heads * dims.V), Out: s.Out(Rows, d),
                    Routing: s.Own(b.AllocateRouting(Rows, e, k)), Ffn: s.Out(Rows, d), Logits: s.Out(Rows, vocab, TensorKind.Logits));
            }).ToArray();
            void Run(int m)
            {
                var x = mem[m];
                b.EmbeddingRows(embed, x.Rows, x.H);
                b.RmsNorm(x.H, inNorm, x.A);
                b.Linear(x.A, qa, x.Cq);
                b.RmsNorm(x.Cq, qaNorm, x.Cq);
                b.Linear(x.Cq, qb, x.Q);
                b.ApplyRopeRows(x.Q, rope, x.Rows, dims.QkHead, dims.QkNope);
                b.Linear(x.A, kva, x.Kv);
                b.AppendLatentRows(x.Kv, kvNorm, rope, x.Pool, x.Table, x.Rows);
                b.MlaAttentionRows(x.Q, x.Pool, x.Table, x.Rows, kvb, dims, scale, x.Attn);
                b.Linear(x.Attn, o, x.Out);
                b.MoeGate(x.Out, gate, x.Routing);
                b.MoeExperts(x.Out, x.Routing, moe, x.Ffn);
                b.Logits(x.Ffn, head, x.Logits);
            }

            var outputs = new List<float[]>();
            StepGraph? graph = null;
            try
            {
                for (var step = 0; step < Steps; step++)
                {
                    var (tokens, slots, positions) = steps[step];
                    foreach (var x in mem)
                    {
                        b.UploadStepRows(tokens, slots, positions, x.Rows);
                    }

                    if (step == 0)
                    {
                        Run(0); // the first run compiles kernels and sizes scratch memory
                    }
                    else
                    {
                        graph ??= b.CaptureGraph(() => Run(0));
                        b.ReplayGraph(graph);
                    }

                    Run(1);
                    outputs.AddRange([s.Read(mem[0].Logits), s.Read(mem[1].Logits), s.Read(mem[0].Attn), s.Read(mem[1].Attn)]);
                }

                Assert.AreEqual(13, graph!.Operations, $"{b.Name}: operations recorded");
            }
            finally
            {
                graph?.Dispose();
            }

            return [.. outputs];
        });
        foreach (var (name, run) in new[] { ("cuda", got), ("cpu", want) })
        {
            for (var step = 0; step < Steps; step++)
            {
                var what = step == 0 ? "eager" : "replayed";
                Exact($"{name} step {step} {what} logits (first copy's vs eager copy's)", run[4 * step], run[4 * step + 1]);
                Exact($"{name} step {step} {what} attention (first copy's vs eager copy's)", run[4 * step + 2], run[4 * step + 3]);
                Assert.IsTrue(run[4 * step].All(float.IsFinite), $"{name} step {step}: finite logits");
                if (step > 0)
                {
                    Assert.IsFalse(run[4 * step].SequenceEqual(run[4 * (step - 1)]), $"{name} step {step}: the replay read the new rows");
                }
            }
        }
    }

    // ------------------------------------------------------------------ MoE

    [TestMethod]
    [DataRow(1)]
    [DataRow(3)]
    [DataRow(16)]
    [DataRow(17)]
    [DataRow(40)]
    [DataRow(600)]
    public void GateAndExpertsMatch(int tokens)
    {
        int d = Config.HiddenSize, e = Config.NRoutedExperts, k = Config.NumExpertsPerTok, inter = Config.MoeIntermediateSize;
        var options = new GateOptions(e, Config.NGroup, Config.TopkGroup, k, Config.NormTopkProb, (float)Config.RoutedScalingFactor);
        var x = Bf16Normal(tokens * d);
        LinearSpec[] Mlp(string prefix, int width) =>
            [Fp8(prefix + ".gate_proj.weight", width, d), Fp8(prefix + ".up_proj.weight", width, d), Fp8(prefix + ".down_proj.weight", d, width)];
        var experts = Enumerable.Range(0, e).Select(i => Mlp($"model.layers.1.mlp.experts.{i}", inter)).ToArray();
        var shared = Mlp("model.layers.1.mlp.shared_experts", inter * Config.NSharedExperts);
        var scores = new float[2][];
        var indices = new int[2][];
        var weights = new float[2][];
        var run = 0;
        var (got, want) = Both(s =>
        {
            var gate = s.Own(s.B.UploadGate(Checkpoint, "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias", d, options));
            var ew = s.Own(s.B.UploadExperts(Checkpoint, experts, shared));
            var routing = s.Own(s.B.AllocateRouting(tokens, e, k));
            var xt = s.In(x, tokens, d);
            s.B.MoeGate(xt, gate, routing);
            scores[run] = new float[tokens * e];
            indices[run] = new int[tokens * k];
            weights[run] = new float[tokens * k];
            s.B.DownloadRouting(routing, scores[run], indices[run], weights[run]);
            run++;
            var y = s.Out(tokens, d);
            s.B.MoeExperts(xt, routing, ew, y);
            return [s.Read(y)];
        });
        // fp32 gate logits differ only by summation order; a top-k flip would need two biased scores within ~1e-6.
        CollectionAssert.AreEqual(indices[1], indices[0], "routed experts");
        Close("gate scores", scores[0], scores[1], 1e-6, 1e-5);
        Close("routing weights", weights[0], weights[1], 1e-6, 1e-5);
        Close($"moe x{tokens}", got[0], want[0], 0.01, 2 * Bf16Step, rmsRel: 5e-3);
    }
}

/// <summary>
/// <see cref="CudaBackendGpuTests"/> again with activations in BF16 storage (<see cref="CudaBackendOptions.Bf16Activations"/>):
/// the same values against the same reference, with no rounding pass and no conversion copy.
/// </summary>
[TestClass]
[TestCategory("Gpu")]
public sealed class CudaBackendBf16ActivationsGpuTests : CudaBackendGpuTests
{
    private protected override CudaBackendOptions CudaOptions => new() { Bf16Activations = true };
}
