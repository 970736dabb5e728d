using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Synthetic;
using DeepSeekCuda.Tests.Model;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Backends;

/// <summary>
/// Single CPU backend operations on fresh random inputs against direct double-precision formulas (and the
/// fixture's rotary table): the per-op checks a GPU backend's kernels will be held to as well.
/// </summary>
[TestClass]
public sealed class CpuBackendOpsTests
{
    private static float[] Random(int n, int seed, double scale = 1)
    {
        var rng = new Random(seed);
        return [.. Enumerable.Range(0, n).Select(_ => (float)((rng.NextDouble() * 2 - 1) * scale))];
    }

    [TestMethod]
    public void RopeRotatesInterleavedPairsOfEachHeadWithTheReferenceTable()
    {
        using var reference = new TinyAReference();
        var cos = reference.F32("rope.cos");
        var sin = reference.F32("rope.sin");
        var pairs = (int)reference.Shape("rope.cos")[1];
        var positions = (int)reference.Shape("rope.cos")[0];
        using var backend = new CpuBackend();
        using var table = backend.UploadRope(cos, sin, positions, pairs);
        // 3 rows at positions 200..202; 2 heads of [5 untouched | 2·pairs rotated | 3 untouched].
        int start = 200, rows = 3, nope = 5, stride = nope + 2 * pairs + 3, cols = 2 * stride;
        var x = Random(rows * cols, 1);
        using var t = backend.Upload(x, rows, cols);
        backend.ApplyRope(t, table, start, stride, nope);
        var got = new float[x.Length];
        backend.Download(t, got);

        var expected = (float[])x.Clone();
        for (var r = 0; r < rows; r++)
        {
            for (var h = 0; h < 2; h++)
            {
                for (var i = 0; i < pairs; i++)
                {
                    var k = r * cols + h * stride + nope + 2 * i;
                    double c = cos[(start + r) * pairs + i], s = sin[(start + r) * pairs + i];
                    expected[k] = (float)(x[k] * c - x[k + 1] * s);
                    expected[k + 1] = (float)(x[k] * s + x[k + 1] * c);
                }
            }
        }

        Tolerance.AssertClose(got, expected, 1e-6, 1e-6, "interleaved rope");
    }

    /// <summary>
    /// A tensor's kind: the emulation's upload stores an activation's values as a GPU does, rounded to BF16 (to nearest, ties
    /// to even; NaN and infinity kept), and keeps logits exact; the float32 reference keeps both. Views keep the kind; the head
    /// writes only logits, tokens are chosen only from logits and a copy keeps its kind, each refusal naming the tensor.
    /// </summary>
    [TestMethod]
    public void ActivationsHoldBf16ValuesInTheEmulationAndLogitsStayExact()
    {
        float[] values = [1 + 1f / 256, 1 + 3f / 256, 1 / 3f, -2.7182817f, float.NaN, float.PositiveInfinity];
        // By hand: a tie to the even 1, a tie up to the even 1 + 2/128, 1/3 and e to their nearest of 8 significant bits.
        float[] bf16 = [1f, 1.015625f, 0.333984375f, -2.71875f, float.NaN, float.PositiveInfinity];
        float[] Stored(CpuBackend b, TensorKind kind)
        {
            using var t = b.Upload(values, 2, 3, kind);
            Assert.AreEqual(kind, t.Kind);
            using var view = b.View(t, 1, 1);
            Assert.AreEqual(kind, view.Kind, "a view keeps its tensor's kind");
            var got = new float[6];
            b.Download(t, got);
            return got;
        }

        using var emulation = new CpuBackend(CpuNumerics.GpuEmulation);
        using var reference = new CpuBackend();
        CollectionAssert.AreEqual(bf16, Stored(emulation, TensorKind.Activation), "emulation: an activation holds bf16 values");
        CollectionAssert.AreEqual(values, Stored(emulation, TensorKind.Logits), "emulation: logits as given");
        CollectionAssert.AreEqual(values, Stored(reference, TensorKind.Activation), "float32: an activation as given");
        CollectionAssert.AreEqual(values, Stored(reference, TensorKind.Logits), "float32: logits as given");

        using var x = emulation.Upload(values, 2, 3);
        using var activation = emulation.Allocate(2, 4);
        using var logits = emulation.Allocate(2, 4, TensorKind.Logits);
        Assert.AreEqual("logits [2, 4]", logits.ToString());
        using var head = new CpuLinearWeight(4, 3, false, Random(12, 5));
        var notLogits = Assert.ThrowsExactly<ArgumentException>(() => emulation.Logits(x, head, activation));
        Assert.AreEqual("the output of the head must be a logits tensor; [2, 4] is an activation", notLogits.Message);
        emulation.Logits(x, head, logits);
        using var buffer = emulation.AllocateTokenChoices(2, 4);
        var notChosen = Assert.ThrowsExactly<ArgumentException>(() => emulation.ChooseTokens(activation, [TokenChoice.Greedy(4)], buffer, new int[1]));
        Assert.AreEqual("the rows tokens are chosen from must be a logits tensor; [2, 4] is an activation", notChosen.Message);
        var notCopied = Assert.ThrowsExactly<ArgumentException>(() => emulation.CopyRows(logits, 0, activation, 1, 1));
        Assert.AreEqual("a copy of logits [2, 4] must be a logits tensor; [2, 4] is an activation", notCopied.Message);
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => emulation.Allocate(1, 1, (TensorKind)7));
    }

    /// <summary>Zero clears exactly the rows of the view it is given, in the storage's tensor.</summary>
    [TestMethod]
    public void ZeroClearsTheRowsOfAView()
    {
        using var backend = new CpuBackend();
        var values = Random(5 * 7, 4, 1);
        using var x = backend.Upload(values, 5, 7);
        using (var middle = backend.View(x, 1, 3))
        {
            backend.Zero(middle);
        }

        var got = new float[values.Length];
        backend.Download(x, got);
        var want = values.ToArray();
        Array.Clear(want, 7, 21);
        CollectionAssert.AreEqual(want, got);
    }

    [TestMethod]
    public void AddRmsNormAccumulatesTheResidualAndNormalizes()
    {
        using var backend = new CpuBackend();
        int rows = 4, width = 37;
        var h = Random(rows * width, 2, 3);
        var d = Random(rows * width, 3);
        var w = Random(width, 4);
        using var dir = new TempCheckpoint(("norm", w, [width]));
        using var norm = backend.UploadNorm(dir.Checkpoint, "norm", width, 1e-6f);
        using var ht = backend.Upload(h, rows, width);
        using var dt = backend.Upload(d, rows, width);
        using var nt = backend.Allocate(rows, width);
        backend.AddRmsNorm(ht, dt, norm, nt);
        var got = new float[rows * width];
        backend.Download(nt, got);
        var sum = new float[rows * width];
        backend.Download(ht, sum);

        var expected = new float[rows * width];
        for (var r = 0; r < rows; r++)
        {
            double ms = 0;
            for (var i = 0; i < width; i++)
            {
                var v = (double)h[r * width + i] + d[r * width + i];
                ms += v * v;
            }

            var inv = 1 / Math.Sqrt(ms / width + 1e-6);
            for (var i = 0; i < width; i++)
            {
                expected[r * width + i] = (float)(((double)h[r * width + i] + d[r * width + i]) * inv * w[i]);
                Assert.AreEqual(h[r * width + i] + d[r * width + i], sum[r * width + i], "residual += delta");
            }
        }

        Tolerance.AssertMaxRel(got, expected, 1e-6, "add + rmsnorm");
    }

    [TestMethod]
    [DataRow(1, 0)]
    [DataRow(5, 0)]
    [DataRow(3, 7)]
    public void NaiveAndAbsorbedAttentionAgreeOnRandomCaches(int queries, int start)
    {
        // Ragged dims: 3 heads, nope 10, rope 6, v 7, latent 19.
        var dims = new MlaDims(3, 10, 6, 7, 19);
        using var backend = new CpuBackend();
        var positions = start + queries;
        var kvB = Random(dims.Heads * dims.KvBHead * dims.KvLora, 5, 0.3);
        using var dir = new TempCheckpoint(("kvb", kvB, [dims.Heads * dims.KvBHead, dims.KvLora]), ("kvnorm", Random(dims.KvLora, 6), [dims.KvLora]));
        using var w = backend.UploadLinear(dir.Checkpoint, new LinearSpec("kvb", dims.Heads * dims.KvBHead, dims.KvLora, false));
        using var kvNorm = backend.UploadNorm(dir.Checkpoint, "kvnorm", dims.KvLora, 1e-6f);
        var pairs = dims.QkRope / 2;
        var angles = Enumerable.Range(0, positions * pairs).Select(i => (i / pairs + 1) * 0.3 / (1 + i % pairs)).ToArray();
        using var rope = backend.UploadRope([.. angles.Select(a => (float)Math.Cos(a))], [.. angles.Select(a => (float)Math.Sin(a))], positions, pairs);
        using var cache = backend.AllocateLatentCache(positions, dims.KvLora, dims.QkRope);
        using var kv = backend.Upload(Random(positions * (dims.KvLora + dims.QkRope), 7, 2), positions, dims.KvLora + dims.QkRope);
        backend.AppendLatent(kv, kvNorm, rope, cache, 0);
        using var q = backend.Upload(Random(queries * dims.Heads * dims.QkHead, 8, 2), queries, dims.Heads * dims.QkHead);
        using var naive = backend.Allocate(queries, dims.Heads * dims.V);
        using var absorbed = backend.Allocate(queries, dims.Heads * dims.V);
        backend.MlaAttentionNaive(q, cache, w, dims, start, 0.4f, naive);
        backend.MlaAttentionAbsorbed(q, cache, w, dims, start, 0.4f, absorbed);
        var a = new float[queries * dims.Heads * dims.V];
        var b = new float[a.Length];
        backend.Download(naive, a);
        backend.Download(absorbed, b);
        Tolerance.AssertMaxRel(b, a, 1e-5, "absorbed vs naive attention");
    }

    /// <summary>A single-file F32 checkpoint holding just the given tensors (not validated against its placeholder config), for weight uploads.</summary>
    private sealed class TempCheckpoint : IDisposable
    {
        private readonly string _dir;

        public TempCheckpoint(params (string Name, float[] Values, int[] Shape)[] tensors)
        {
            _dir = Path.Combine(Path.GetTempPath(), "dscuda-ops-" + Guid.NewGuid().ToString("N"));
            Directory.CreateDirectory(_dir);
            using (var writer = new SafetensorsWriter(Path.Combine(_dir, Checkpoint.SingleFileName),
                       tensors.Select(t => (t.Name, DType.F32, t.Shape.Select(s => (long)s).ToArray()))))
            {
                foreach (var t in tensors)
                {
                    writer.Write<float>(t.Name, t.Values);
                }

                writer.Commit();
            }

            File.WriteAllText(Path.Combine(_dir, Checkpoint.ConfigFileName), SyntheticCheckpoint.ConfigJson(ModelPresets.Tiny));
            Checkpoint = Checkpoint.Open(_dir, validateAgainstConfig: false);
        }

        public Checkpoint Checkpoint { get; }

        public void Dispose()
        {
            Checkpoint.Dispose();
            try
            {
                Directory.Delete(_dir, recursive: true);
            }
            catch (IOException)
            {
                // The temp cleaner gets it.
            }
        }
    }
}
