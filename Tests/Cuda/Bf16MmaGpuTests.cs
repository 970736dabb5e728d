using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Backends.Cuda;
using DeepSeekCuda.Kernels;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Numerics;
using DeepSeekCuda.Model;
using DeepSeekCuda.Tests.Model;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>
/// The tensor-core BF16 GEMM (Kernels/bf16_gemm_mma.cu) against the float64 meaning of its problem
/// (<see cref="Bf16MmaReference"/>) on fresh random inputs: ragged M (1 .. 129), N and K, both weight layouts, both
/// activation and output types, batches with strided operands (the fold and unfold layouts), split-K partials, and
/// f32 activations that are BF16 values in one half of K and not in the other (the per-stage skip of the lo products
/// must not lose the other half). NaN-poisoned outputs; a NaN activation makes its row NaN. Then its callers:
/// lm_head above 4 rows, MLA's fold and unfold on the V3 and tiny shapes, and tiny-a on a CudaBackend that takes the
/// tensor cores everywhere it can (prefill logits and greedy decoding against the CPU emulation).
/// </summary>
[TestClass]
[TestCategory("Gpu")]
public sealed class Bf16MmaGpuTests : GpuTestBase
{
    public static IEnumerable<object[]> Cases()
    {
        foreach (var a in new[] { "F32", "BF16" })
        {
            foreach (var y in new[] { "F32", "BF16" })
            {
                foreach (var m in new[] { 1, 3, 17, 64, 129 })
                {
                    yield return ["nt", m, 300, 1000, 1, 1, a, y];
                }

                yield return ["kn", 9, 512, 128, 4, 1, a, y];   // the fold: per head [nope, latent]
                yield return ["kn", 70, 136, 264, 2, 1, a, y];  // ragged M and K over two tiles
                yield return ["nt", 2, 128, 512, 3, 1, a, y];   // the unfold: per head [v, latent]
            }

            yield return ["nt", 7, 256, 2048, 1, 5, a, "F32"];  // split-K partials
            yield return ["nt", 1, 256, 7168, 1, 28, a, "F32"]; // the V3 router at one token
            yield return ["nt", 64, 1000, 7168, 1, 1, a, "F32"]; // lm_head-like, 64 rows
        }
    }

    [TestMethod]
    [DynamicData(nameof(Cases))]
    public void MatchesTheFloat64Reference(string layout, int m, int n, int k, int batch, int splits, string aName, string yName)
    {
        var aType = Enum.Parse<ElementType>(aName);
        var yType = Enum.Parse<ElementType>(yName);
        var kn = layout == "kn";
        var rng = Rng(Environment.TickCount);
        // Padded strides, so a kernel that assumed dense rows or batches would read the wrong elements.
        long lda = k + 8, ldb = (kn ? n : k) + 16, ldy = n + 3;
        var shape = new Bf16MmaProblem(0, aType, lda, 0, kn, ldb, 0, yType, ldy, m, n, k)
        {
            Batch = batch, ABatch = m * lda + 8, BBatch = (kn ? k : n) * ldb + 8, YBatch = splits * (m * ldy + 1) + 5,
            Splits = splits, YSplit = m * ldy + 1,
        };
        var a = Normal(rng, (int)(batch * shape.ABatch));
        for (var i = 0; i < a.Length; i++)
        {
            var within = i % shape.ABatch;
            if (within < m * lda && within % lda < k / 2)
            {
                a[i] = BFloat16.Round(a[i]); // BF16 values in the first half of K: those stages skip the lo products
            }
        }

        if (m > 1)
        {
            a[(m - 1) * lda + k / 2] = float.NaN; // batch 0, last row: NaN in the split holding k / 2
        }

        var b = Normal(rng, (int)(batch * shape.BBatch), 0.05f);
        using var aD = Upload(a, aType); // rounds a to BF16 in place for a BF16 input
        using var bD = Upload(b, ElementType.BF16);
        var outputs = batch * shape.YBatch;
        using var yD = Poisoned(outputs, yType);
        using var mma = new Bf16MmaKernel(Device, Compiler);
        mma.Launch(Stream, shape with { A = aD.Pointer, B = bD.Pointer, Y = yD.Pointer });
        var y = Read(yD, yType, Stream);

        var (sum, mag) = Bf16MmaReference.Run(shape, a, b);
        var chunk = Bf16MmaKernel.ChunkFor(k, splits);
        var i2 = 0;
        for (var bi = 0; bi < batch; bi++)
        {
            for (var s = 0; s < splits; s++)
            {
                for (var r = 0; r < m; r++)
                {
                    for (var c = 0; c < n; c++, i2++)
                    {
                        var got = y[Bf16MmaReference.OutputIndex(shape, bi, s, r, c)];
                        var what = $"{layout} m={m} n={n} k={k} {aType}->{yType} batch {bi} split {s} [{r}, {c}]";
                        if (double.IsNaN(sum[i2]))
                        {
                            Assert.IsTrue(bi == 0 && r == m - 1 && k / 2 >= s * chunk && k / 2 < (s + 1) * chunk, $"{what}: NaN where no NaN was put");
                            Assert.IsTrue(float.IsNaN(got), $"{what}: expected NaN, got {got}");
                            continue;
                        }

                        // fp32 accumulation (~1e-5 of Σ|terms| per 1000 of K), the f32 input kept to 2^-17 by hi + lo,
                        // and half a BF16 step for a BF16 output.
                        var bound = 1e-5 * Math.Max(1, k / 1000.0) * mag[i2] + 1e-7 + (yType == ElementType.BF16 ? Math.Abs(sum[i2]) / 256 : 0);
                        Assert.IsLessThanOrEqualTo(bound, Math.Abs(got - sum[i2]), $"{what}: got {got}, expected {sum[i2]}");
                    }
                }
            }
        }

        // The padding between rows, batches and splits was not written.
        var written = new HashSet<long>();
        for (var bi = 0; bi < batch; bi++)
        {
            for (var s = 0; s < splits; s++)
            {
                for (var r = 0; r < m; r++)
                {
                    for (var c = 0; c < n; c++)
                    {
                        written.Add(Bf16MmaReference.OutputIndex(shape, bi, s, r, c));
                    }
                }
            }
        }

        for (var i = 0L; i < y.Length; i++)
        {
            if (!written.Contains(i))
            {
                Assert.IsTrue(float.IsNaN(y[i]), $"output element {i} outside the problem was written ({y[i]})");
            }
        }
    }

    [TestMethod]
    public void LmHeadRunsOnTheTensorCoresAboveFourRows()
    {
        var rng = Rng(Environment.TickCount);
        const int n = 2000, k = 1024;
        using var mma = new Bf16MmaKernel(Device, Compiler);
        using var gemm = new Bf16GemmKernel(Device, Compiler, mma);
        foreach (var m in new[] { 3, 5, 64, 100 })
        {
            var x = Normal(rng, m * k);
            var w = Normal(rng, n * k, 0.05f);
            using var xd = Upload(x, ElementType.F32);
            using var wd = Upload(w, ElementType.BF16);
            using var yd = Poisoned((long)m * n, ElementType.F32);
            gemm.Launch(Stream, Rows(xd, ElementType.F32, m, k), Rows(wd, ElementType.BF16, n, k), Rows(yd, ElementType.F32, m, n));
            var y = Read(yd, ElementType.F32, Stream);
            var (sum, mag) = Bf16MmaReference.Run(new Bf16MmaProblem(0, ElementType.F32, k, 0, false, k, 0, ElementType.F32, n, m, n, k), x, w);
            for (var i = 0; i < y.Length; i++)
            {
                Assert.IsLessThanOrEqualTo(2e-5 * mag[i] + 1e-7, Math.Abs(y[i] - sum[i]), $"m={m} element {i}: got {y[i]}, expected {sum[i]}");
            }
        }
    }

    [TestMethod]
    [DataRow(512, 64, 128, 128, 128, 1)]
    [DataRow(512, 64, 128, 128, 128, 2)]
    [DataRow(512, 64, 128, 128, 16, 9)]
    [DataRow(80, 16, 32, 48, 3, 70)]
    public void FoldAndUnfoldRunAsOneGemmPerHead(int latent, int rope, int nope, int v, int heads, int tokens)
    {
        var shape = new LatentShape(latent, rope);
        var rng = Rng(Environment.TickCount);
        using var mma = new Bf16MmaKernel(Device, Compiler);
        using var dec = new MlaDecodeKernel(Device, Compiler, mma);
        var kvB = Normal(rng, heads * (nope + v) * latent, 1f / MathF.Sqrt(nope));
        using var wD = Upload(kvB, ElementType.BF16);
        var dims = new MlaHeadDims(heads, nope, v);
        var weight = Rows(wD, ElementType.BF16, heads * (nope + v), latent);
        foreach (var qType in Enum.GetValues<ElementType>())
        {
            var q = Normal(rng, tokens * heads * (nope + rope));
            using var qD = Upload(q, qType);
            using var qAbs = Poisoned((long)tokens * heads * shape.RowWidth, ElementType.BF16);
            DeviceRows qRows = Rows(qD, qType, tokens, heads * (nope + rope)), qAbsRows = Rows(qAbs, ElementType.BF16, tokens, heads * shape.RowWidth);
            Assert.IsTrue(Bf16MmaKernel.Runs(MlaDecodeKernel.FoldProblem(shape, dims, qRows, weight, qAbsRows)));
            dec.Fold(Stream, shape, dims, qRows, weight, qAbsRows);
            MlaGpuTests.AssertFold(q, kvB, Read(qAbs, ElementType.BF16, Stream), heads, nope, v, shape, $"tensor cores {qType} tokens {tokens}");
        }

        var lat = Normal(rng, tokens * heads * latent);
        foreach (var outType in Enum.GetValues<ElementType>())
        {
            using var latD = Upload(lat, ElementType.F32);
            using var outD = Poisoned((long)tokens * heads * v, outType);
            DeviceRows latRows = Rows(latD, ElementType.F32, tokens, heads * latent), outRows = Rows(outD, outType, tokens, heads * v);
            dec.Unfold(Stream, shape, dims, latRows, weight, outRows);
            var got = Read(outD, outType, Stream);
            var problem = MlaDecodeKernel.UnfoldProblem(shape, dims, new DeviceRows(0, ElementType.F32, tokens, heads * latent),
                new DeviceRows(0, ElementType.BF16, heads * (nope + v), latent), new DeviceRows(0, outType, tokens, heads * v));
            Assert.IsTrue(Bf16MmaKernel.Runs(problem with { A = latD.Pointer, B = wD.Pointer + (ulong)(nope * latent * 2), Y = outD.Pointer }));
            var (sum, mag) = Bf16MmaReference.Run(problem, lat, kvB);
            for (var h = 0; h < heads; h++)
            {
                for (var t = 0; t < tokens; t++)
                {
                    for (var d = 0; d < v; d++)
                    {
                        var i = ((long)h * tokens + t) * v + d;
                        var bound = 2e-5 * mag[i] + 1e-7 + (outType == ElementType.BF16 ? Math.Abs(sum[i]) / 256 : 0);
                        var value = got[Bf16MmaReference.OutputIndex(problem, h, 0, t, d)];
                        Assert.IsLessThanOrEqualTo(bound, Math.Abs(value - sum[i]), $"unfold {outType} t{t} h{h} d{d}: got {value}, expected {sum[i]}");
                    }
                }
            }
        }
    }

    [TestMethod]
    public void TinyAOnTheTensorCoresStaysWithTheEmulation()
    {
        using var checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        using var reference = new TinyAReference();
        using var cuda = new CudaBackend(new CudaBackendOptions { TensorCoreBf16Gemm = true });
        using var cpu = new CpuBackend(CpuNumerics.GpuEmulation);
        using var model = DeepSeekModel.Load(checkpoint, cuda);
        using var emulated = DeepSeekModel.Load(checkpoint, cpu);
        foreach (var prompt in TinyAReference.Prompts)
        {
            // Prefill: lm_head over every position and the router over the prompt on the tensor cores.
            var ids = reference.Ids(prompt);
            var e = Tolerance.AssertRmsRel(model.ComputeLogits(ids), emulated.ComputeLogits(ids), CudaModelGpuTests.EmulationRmsRel,
                $"{prompt}.logits (tensor cores vs cpu emulation)");
            TestContext.WriteLine(Tolerance.Describe($"{prompt}.logits tensor cores vs emulation", e));

            // Decode: one-token router (split over K), fold and unfold per head.
            var steps = reference.Greedy(prompt).Length;
            CollectionAssert.AreEqual(CudaModelGpuTests.Greedy(emulated, ids, steps), CudaModelGpuTests.Greedy(model, ids, steps),
                $"{prompt}: greedy ids (tensor cores vs cpu emulation)");
        }
    }
}
