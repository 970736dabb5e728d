using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Model;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Model;

/// <summary>
/// The CPU backend's GPU emulation (bf16 storage, FP8 activation quantization) against the float32
/// reference: within tolerance (ii) of the fixtures' README, and measurably different from float32.
/// </summary>
[TestClass]
public sealed class GpuEmulationTests
{
    public TestContext TestContext { get; set; } = null!;

    [TestMethod]
    public void LogitsStayWithinToleranceTwoAndDifferFromFloat32()
    {
        using var checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        using var reference = new TinyAReference();
        using var backend = new CpuBackend(CpuNumerics.GpuEmulation);
        using var model = DeepSeekModel.Load(checkpoint, backend);
        var v = model.VocabSize;
        int agree = 0, rows = 0;
        foreach (var prompt in TinyAReference.Prompts)
        {
            var logits = model.ComputeLogits(reference.Ids(prompt));
            var expected = reference.F32(prompt + ".logits");
            var c = Tolerance.AssertRmsRel(logits, expected, 0.15, $"{prompt}.logits (gpu emulation)");
            Tolerance.AssertMaxRel(logits, expected, 0.40, $"{prompt}.logits (gpu emulation)");
            Assert.IsGreaterThan(1e-4, c.RmsRel, $"{prompt}: emulation must actually round (rms_rel {c.RmsRel:g3})");
            TestContext.WriteLine(Tolerance.Describe($"{prompt}.logits (gpu emulation)", c));
            for (var t = 0; t < logits.Length / v; t++)
            {
                rows++;
                if (TinyAReference.ArgMax(logits.AsSpan(t * v, v)) == TinyAReference.ArgMax(expected.AsSpan(t * v, v)))
                {
                    agree++;
                }
            }
        }

        TestContext.WriteLine($"prefill top-1 agreement {agree}/{rows}");
        Assert.IsGreaterThanOrEqualTo(0.80, agree / (double)rows, "prefill top-1 agreement over p0–p2");
    }

    [TestMethod]
    public void TeacherForcedDecodeStaysWithinToleranceTwo()
    {
        using var checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        using var reference = new TinyAReference();
        using var backend = new CpuBackend(CpuNumerics.GpuEmulation);
        using var model = DeepSeekModel.Load(checkpoint, backend);
        var v = model.VocabSize;
        int agree = 0, steps = 0;
        foreach (var prompt in TinyAReference.Prompts)
        {
            var greedy = reference.Greedy(prompt);
            var expected = reference.F32(prompt + ".step_logits");
            var got = new float[greedy.Length * v];
            using var session = model.CreateSession();
            session.Forward(reference.Ids(prompt), got.AsSpan(0, v));
            for (var j = 1; j < greedy.Length; j++)
            {
                session.Forward([greedy[j - 1]], got.AsSpan(j * v, v));
            }

            var c = Tolerance.AssertRmsRel(got, expected, 0.20, $"{prompt}.step_logits teacher-forced (gpu emulation)");
            TestContext.WriteLine(Tolerance.Describe($"{prompt}.step_logits (gpu emulation)", c));
            for (var j = 0; j < greedy.Length; j++)
            {
                steps++;
                if (TinyAReference.ArgMax(got.AsSpan(j * v, v)) == greedy[j])
                {
                    agree++;
                }
            }
        }

        TestContext.WriteLine($"teacher-forced top-1 agreement {agree}/{steps}");
        Assert.IsGreaterThanOrEqualTo(0.75, agree / (double)steps, "teacher-forced step top-1 agreement");
    }
}
