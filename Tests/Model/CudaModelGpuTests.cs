using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Backends.Cuda;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Model;
using DeepSeekCuda.Tests.Cuda;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Model;

/// <summary>
/// The whole model on <see cref="CudaBackend"/> (DeepSeekModel.Load over tiny-a): logits against the official
/// reference within tolerance (ii) of the fixtures' README, against <see cref="CpuBackend"/> in
/// <see cref="CpuNumerics.GpuEmulation"/> within a tighter bound, greedy decoding identical to the emulation,
/// naive = absorbed attention, chunked prefill = one shot, and device memory returned on disposal.
/// </summary>
[TestClass]
[TestCategory("Gpu")]
public sealed class CudaModelGpuTests
{
    /// <summary>
    /// CUDA vs the emulation, per prompt: the two share every rounding point (BF16 storage, FP8 activation
    /// quantization), so what remains is fp32 summation order, i.e. occasional one-step BF16 flips and the rare
    /// routing flip they cause; 0.05 is a third of tolerance (ii)'s 0.15 and below the 0.05–0.095 that BF16+FP8
    /// numerics themselves move tiny-a's logits from float32.
    /// </summary>
    internal const double EmulationRmsRel = 0.05;

    public TestContext TestContext { get; set; } = null!;

    [TestInitialize]
    public void RequireDevice() => GpuGuard.Require();

    [TestCleanup]
    public void CheckContext() => GpuGuard.After(TestContext);

    [TestMethod]
    [DataRow(false)]
    [DataRow(true)]
    public void LogitsWithinToleranceTwoAndCloseToTheEmulation(bool bf16Activations)
    {
        using var checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        using var reference = new TinyAReference();
        using var cuda = new CudaBackend(new CudaBackendOptions { Bf16Activations = bf16Activations });
        using var cpu = new CpuBackend(CpuNumerics.GpuEmulation);
        using var model = DeepSeekModel.Load(checkpoint, cuda);
        using var emulated = DeepSeekModel.Load(checkpoint, cpu);
        var v = model.VocabSize;
        int agree = 0, agreeEmulation = 0, rows = 0;
        foreach (var prompt in TinyAReference.Prompts)
        {
            var ids = reference.Ids(prompt);
            var logits = model.ComputeLogits(ids);
            var expected = reference.F32(prompt + ".logits");
            var emulation = emulated.ComputeLogits(ids);
            var c = Tolerance.AssertRmsRel(logits, expected, 0.15, $"{prompt}.logits (cuda vs reference)");
            Tolerance.AssertMaxRel(logits, expected, 0.40, $"{prompt}.logits (cuda vs reference)");
            var e = Tolerance.AssertRmsRel(logits, emulation, EmulationRmsRel, $"{prompt}.logits (cuda vs cpu emulation)");
            TestContext.WriteLine(Tolerance.Describe($"{prompt}.logits cuda vs reference", c));
            TestContext.WriteLine(Tolerance.Describe($"{prompt}.logits cuda vs emulation", e));
            for (var t = 0; t < ids.Length; t++)
            {
                rows++;
                var top = TinyAReference.ArgMax(logits.AsSpan(t * v, v));
                agree += top == TinyAReference.ArgMax(expected.AsSpan(t * v, v)) ? 1 : 0;
                agreeEmulation += top == TinyAReference.ArgMax(emulation.AsSpan(t * v, v)) ? 1 : 0;
            }
        }

        TestContext.WriteLine($"prefill top-1 agreement: reference {agree}/{rows}, emulation {agreeEmulation}/{rows}");
        Assert.IsGreaterThanOrEqualTo(0.80, agree / (double)rows, "prefill top-1 agreement with the reference (as the emulation's test)");
        Assert.IsGreaterThanOrEqualTo(0.97, agreeEmulation / (double)rows, "prefill top-1 agreement with the emulation");
    }

    [TestMethod]
    [DataRow(false)]
    [DataRow(true)]
    public void GreedyIdsEqualTheEmulation(bool bf16Activations)
    {
        using var checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        using var reference = new TinyAReference();
        using var cuda = new CudaBackend(new CudaBackendOptions { Bf16Activations = bf16Activations });
        using var cpu = new CpuBackend(CpuNumerics.GpuEmulation);
        using var model = DeepSeekModel.Load(checkpoint, cuda);
        using var emulated = DeepSeekModel.Load(checkpoint, cpu);
        foreach (var prompt in TinyAReference.Prompts)
        {
            var ids = reference.Ids(prompt);
            var steps = reference.Greedy(prompt).Length;
            var got = Greedy(model, ids, steps);
            var want = Greedy(emulated, ids, steps);
            TestContext.WriteLine($"{prompt}: cuda [{string.Join(",", got)}] emulation [{string.Join(",", want)}] reference [{string.Join(",", reference.Greedy(prompt))}]");
            CollectionAssert.AreEqual(want, got, $"{prompt}: greedy ids (cuda vs cpu emulation)");
        }
    }

    /// <summary>
    /// Activations in BF16 storage hold the values f32 storage holds, through the same kernels: the logits of every prompt
    /// position agree within a fifth of the emulation bound (in exact storage arithmetic, bit for bit; the count is logged),
    /// and so do the greedy ids.
    /// </summary>
    [TestMethod]
    public void Bf16StorageComputesWhatF32StorageComputes()
    {
        using var checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        using var reference = new TinyAReference();
        using var f32 = new CudaBackend();
        using var bf16 = new CudaBackend(new CudaBackendOptions { Bf16Activations = true });
        using var wide = DeepSeekModel.Load(checkpoint, f32, new ModelOptions { LoadMtp = false });
        using var narrow = DeepSeekModel.Load(checkpoint, bf16, new ModelOptions { LoadMtp = false });
        StringAssert.Contains(bf16.Name, "bf16 activations");
        foreach (var prompt in TinyAReference.Prompts)
        {
            var ids = reference.Ids(prompt);
            var want = wide.ComputeLogits(ids);
            var got = narrow.ComputeLogits(ids);
            var c = Tolerance.AssertRmsRel(got, want, EmulationRmsRel / 5, $"{prompt}.logits (bf16 storage vs f32 storage)");
            var same = got.Zip(want).Count(p => BitConverter.SingleToInt32Bits(p.First) == BitConverter.SingleToInt32Bits(p.Second));
            TestContext.WriteLine($"{Tolerance.Describe($"{prompt}.logits bf16 vs f32 storage", c)}; bitwise equal {same}/{want.Length}");
            var steps = reference.Greedy(prompt).Length;
            CollectionAssert.AreEqual(Greedy(wide, ids, steps), Greedy(narrow, ids, steps), $"{prompt}: greedy ids (bf16 vs f32 storage)");
        }
    }

    [TestMethod]
    public void NaiveAndAbsorbedAttentionAgree()
    {
        using var checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        using var reference = new TinyAReference();
        using var cuda = new CudaBackend();
        using var naive = DeepSeekModel.Load(checkpoint, cuda, new ModelOptions { Attention = AttentionForm.Naive, LoadMtp = false });
        using var absorbed = DeepSeekModel.Load(checkpoint, cuda, new ModelOptions { Attention = AttentionForm.Absorbed, LoadMtp = false });
        foreach (var prompt in TinyAReference.Prompts)
        {
            // The prompt as one prefill, then single-token steps (the decode kernel on the absorbed side) teacher-forced
            // with the reference's greedy ids, so both sessions see the same tokens.
            var ids = reference.Ids(prompt);
            var greedy = reference.Greedy(prompt);
            var a = StepLogits(naive, ids, greedy);
            var b = StepLogits(absorbed, ids, greedy);
            // Equal in exact arithmetic; the absorbed form rounds differently (BF16 q_abs, BF16 kv_b copy) and can flip a route.
            var c = Tolerance.AssertRmsRel(b, a, EmulationRmsRel, $"{prompt}: absorbed vs naive step logits");
            TestContext.WriteLine(Tolerance.Describe($"{prompt}: absorbed vs naive", c));
        }
    }

    [TestMethod]
    public void ChunkedPrefillEqualsOneShot()
    {
        using var checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        using var reference = new TinyAReference();
        using var cuda = new CudaBackend();
        using var model = DeepSeekModel.Load(checkpoint, cuda, new ModelOptions { LoadMtp = false });
        var v = model.VocabSize;
        foreach (var prompt in TinyAReference.Prompts)
        {
            var ids = reference.Ids(prompt);
            Assert.IsGreaterThan(12, ids.Length);
            var once = new float[v];
            using (var s = model.CreateSession())
            {
                s.Forward(ids, once);
            }

            // Chunks of 7, 2, 1 (decode kernel) and the rest (prefill kernel over a cached prefix); p2's rest grows the
            // session's caches from one block to three, the 10 positions held copied on the device.
            var chunked = new float[v];
            using (var s = model.CreateSession())
            {
                var scratch = new float[v];
                s.Forward(ids.AsSpan(0, 7), scratch);
                s.Forward(ids.AsSpan(7, 2), scratch);
                s.Forward(ids.AsSpan(9, 1), scratch);
                s.Forward(ids.AsSpan(10), chunked);
                Assert.AreEqual(ids.Length, s.Length);
            }

            var c = Tolerance.AssertRmsRel(chunked, once, 0.02, $"{prompt}: chunked vs one-shot last logits");
            TestContext.WriteLine(Tolerance.Describe($"{prompt}: chunked vs one-shot", c));
            Assert.AreEqual(TinyAReference.ArgMax(once), TinyAReference.ArgMax(chunked), $"{prompt}: next token");
        }
    }

    [TestMethod]
    public void DeviceMemoryIsReturnedWhenTheModelIsDisposed()
    {
        using var checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        using var reference = new TinyAReference();
        using var cuda = new CudaBackend();
        var ids = reference.Ids("p1");

        // Warm-up: compiles and loads the kernel modules and grows the backend's scratch to this prompt's size.
        using (var warm = DeepSeekModel.Load(checkpoint, cuda))
        {
            warm.ComputeLogits(ids);
        }

        cuda.Synchronize();
        var before = cuda.Device.MemoryInfo().Free;
        long loaded;
        using (var model = DeepSeekModel.Load(checkpoint, cuda))
        {
            cuda.Synchronize();
            loaded = cuda.Device.MemoryInfo().Free;
            model.ComputeLogits(ids);
            cuda.Synchronize();
        }

        cuda.Synchronize();
        var after = cuda.Device.MemoryInfo().Free;
        TestContext.WriteLine($"free: before {before}, loaded {loaded}, after {after}; checkpoint {checkpoint.TotalTensorBytes} bytes");
        Assert.IsGreaterThanOrEqualTo(checkpoint.TotalTensorBytes / 2, before - loaded, "the weights occupy device memory while loaded");
        Assert.AreEqual(before, after, "device free memory after disposing the model (and its session)");
    }

    internal static int[] Greedy(DeepSeekModel model, int[] prompt, int steps)
    {
        using var session = model.CreateSession();
        var logits = new float[model.VocabSize];
        session.Forward(prompt, logits);
        var ids = new int[steps];
        for (var i = 0; i < steps; i++)
        {
            ids[i] = TinyAReference.ArgMax(logits);
            if (i + 1 < steps)
            {
                session.Forward([ids[i]], logits);
            }
        }

        return ids;
    }

    private static float[] StepLogits(DeepSeekModel model, int[] prompt, int[] forced)
    {
        var v = model.VocabSize;
        var all = new float[forced.Length * v];
        using var session = model.CreateSession();
        session.Forward(prompt, all.AsSpan(0, v));
        for (var j = 1; j < forced.Length; j++)
        {
            session.Forward([forced[j - 1]], all.AsSpan(j * v, v));
        }

        return all;
    }
}
