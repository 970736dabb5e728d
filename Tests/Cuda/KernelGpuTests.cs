using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Backends.Cuda;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Kernels;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Numerics;
using DeepSeekCuda.Model;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>Each kernel against the CPU backend on fresh random inputs, ragged shapes included.</summary>
[TestClass]
[TestCategory("Gpu")]
public sealed class KernelGpuTests : GpuTestBase
{
    private static readonly ElementType[] Types = [ElementType.F32, ElementType.BF16];

    // bf16 outputs: the GPU rounds its own fp32 result, which can differ from the CPU's by one bf16 step.
    private static double Rtol(ElementType t) => t == ElementType.BF16 ? 1.0 / 128 : 1e-5;

    public static IEnumerable<object[]> RowShapes => [[1, 256], [7, 7168], [33, 100], [3, 1000], [2, 129]];

    /// <summary>
    /// Every storage variant, the fused residual add included (its residual in the update's storage type), against the CPU.
    /// The forms the CUDA backend runs, the rounded f32 form (f32 holding bf16 values) and the fused form over a bf16
    /// residual, against the CPU's GpuEmulation: their residual exact, their output within one bf16 step.
    /// </summary>
    [TestMethod]
    [DynamicData(nameof(RowShapes))]
    public void RmsNormMatchesCpuBackend(int rows, int dim)
    {
        using var k = new RmsNormKernel(Device, Compiler);
        var variants = from inT in Types from outT in Types from fused in new[] { false, true } from round in new[] { false, true }
            where !round || (inT == ElementType.F32 && outT == ElementType.F32) select (inT, outT, fused, round);
        foreach (var (inT, outT, fused, round) in variants)
        {
            // A bf16 residual holds the rounded sum, as the emulation's residual does.
            var emulated = round || (fused && inT == ElementType.BF16);
            var cpu = new CpuBackend(emulated ? CpuNumerics.GpuEmulation : CpuNumerics.Float32);
            var what = $"rmsnorm {rows}x{dim} in {inT} out {outT} fused {fused} rounded {round}";
            var r = Rng(rows * 31 + dim + (int)inT * 7 + (int)outT * 3 + (fused ? 1 : 0) + (round ? 11 : 0));
            var x = Normal(r, rows * dim, 2f);
            if (rows > 2)
            {
                x[dim + 3] = float.NaN;
                x[2 * dim + 5] = float.PositiveInfinity;
            }

            var w = Normal(r, dim, 0.1f).Select(v => 1 + v).ToArray();
            var h = Normal(r, rows * dim);
            if (emulated)
            {
                // Activations of the emulation hold bf16 values (its upload rounds them): the kernel reads the same.
                BFloat16.Round(x);
                BFloat16.Round(h);
            }

            using var xd = Upload(x, inT);
            using var wd = Upload(w, ElementType.BF16);
            using var hd = Upload(h, inT);
            using var yd = Poisoned((long)rows * dim, outT);
            var weight = new CpuNormWeight(dim, 1e-6f, w);
            var yRef = cpu.Allocate(rows, dim);
            if (fused)
            {
                k.LaunchFused(Stream, Rows(hd, inT, rows, dim), Rows(xd, inT, rows, dim), Rows(wd, ElementType.BF16, 1, dim), Rows(yd, outT, rows, dim), 1e-6f, round: round);
                var hRef = cpu.Upload(h, rows, dim);
                cpu.AddRmsNorm(hRef, cpu.Upload(x, rows, dim), weight, yRef);
                var hExp = new float[rows * dim];
                cpu.Download(hRef, hExp);
                Tolerance.AssertClose(Read(hd, inT, Stream), hExp, 0, 0, $"{what}: residual");
            }
            else
            {
                k.Launch(Stream, Rows(xd, inT, rows, dim), Rows(wd, ElementType.BF16, 1, dim), Rows(yd, outT, rows, dim), 1e-6f, round: round);
                cpu.RmsNorm(cpu.Upload(x, rows, dim), weight, yRef);
            }

            var expected = new float[rows * dim];
            cpu.Download(yRef, expected);
            var actual = Read(yd, outT, Stream);
            Tolerance.AssertClose(actual, AsStored(expected, outT), 1e-5, Rtol(emulated ? ElementType.BF16 : outT), what);
            if (round)
            {
                AssertBf16Values(actual, what);
            }
        }
    }

    /// <summary>Every value of an f32 output that holds bf16 values is one: rounding it again changes no bit.</summary>
    private static void AssertBf16Values(float[] values, string what)
    {
        var rounded = AsStored(values, ElementType.BF16);
        for (var i = 0; i < values.Length; i++)
        {
            Assert.AreEqual(BitConverter.SingleToInt32Bits(rounded[i]), BitConverter.SingleToInt32Bits(values[i]), $"{what}: [{i}] = {values[i]:R} is not a bf16 value");
        }
    }

    public static IEnumerable<object[]> QuantShapes => [[5, 300], [3, 7168], [1, 128], [2, 129], [64, 512]];

    [TestMethod]
    [DynamicData(nameof(QuantShapes))]
    public void ActQuantMatchesCpuExactly(int rows, int cols)
    {
        using var k = new ActQuantKernel(Device, Compiler);
        foreach (var inT in Types)
        {
            foreach (var ue8m0 in new[] { false, true })
            {
                var r = Rng(rows * 7 + cols);
                var x = Normal(r, rows * cols, 3f);
                for (var i = 0; i < x.Length; i += 97)
                {
                    x[i] *= 1e-6f; // tiny groups exercise the 1e-4 amax floor
                }

                var groups = ActQuantKernel.GroupsFor(cols);
                using var xd = Upload(x, inT);
                using var qd = DeviceBuffer<byte>.Allocate(Device, (long)rows * cols);
                using var sd = DeviceBuffer<float>.Allocate(Device, (long)rows * groups);
                qd.Fill8(0x7F, Stream);
                sd.Fill32(NaNPattern, Stream);
                k.Launch(Stream, Rows(xd, inT, rows, cols), new Fp8Rows(qd.Pointer, sd.Pointer, rows, cols), ue8m0);
                AssertQuant(x, rows, cols, ue8m0, qd.ToArray(Stream), sd.ToArray(Stream), $"{rows}x{cols} {inT} ue8m0 {ue8m0}");
            }
        }
    }

    private static void AssertQuant(float[] x, int rows, int cols, bool ue8m0, byte[] codes, float[] scales, string what)
    {
        var groups = ActQuantKernel.GroupsFor(cols);
        var qRef = new byte[cols];
        var sRef = new float[groups];
        for (var row = 0; row < rows; row++)
        {
            ActivationQuant.Quantize(x.AsSpan(row * cols, cols), qRef, sRef, 128, ue8m0 ? ScaleFormat.Ue8m0 : ScaleFormat.Float32);
            for (var g = 0; g < groups; g++)
            {
                Assert.AreEqual(BitConverter.SingleToInt32Bits(sRef[g]), BitConverter.SingleToInt32Bits(scales[row * groups + g]),
                    $"{what}: scale [{row}, {g}] {scales[row * groups + g]:R} vs {sRef[g]:R}");
            }

            for (var c = 0; c < cols; c++)
            {
                Assert.AreEqual(qRef[c], codes[row * cols + c], $"{what}: code [{row}, {c}] of x = {x[row * cols + c]:R}");
            }
        }
    }

    [TestMethod]
    public void ActQuantMatchesTheFixtureCodesAndScales()
    {
        using var k = new ActQuantKernel(Device, Compiler);
        using var reference = SafetensorsFile.Open(Path.Combine(SharedData.TinyA, "reference.safetensors"));
        foreach (var (prefix, ue8m0) in new[] { ("actq", false), ("actq_ue8m0", true) })
        {
            var x = reference.GetSpan<float>(reference.Get(prefix + ".x")).ToArray();
            var codes = reference.GetSpan<long>(reference.Get(prefix + ".codes")).ToArray();
            var scale = reference.GetSpan<float>(reference.Get(prefix + ".scale")).ToArray();
            int rows = 8, cols = x.Length / 8, groups = ActQuantKernel.GroupsFor(cols);
            using var xd = Upload(x, ElementType.F32);
            using var qd = DeviceBuffer<byte>.Allocate(Device, x.Length);
            using var sd = DeviceBuffer<float>.Allocate(Device, rows * groups);
            qd.Fill8(0x7F, Stream);
            sd.Fill32(NaNPattern, Stream);
            k.Launch(Stream, Rows(xd, ElementType.F32, rows, cols), new Fp8Rows(qd.Pointer, sd.Pointer, rows, cols), ue8m0);
            var q = qd.ToArray(Stream);
            var s = sd.ToArray(Stream);
            for (var i = 0; i < s.Length; i++)
            {
                Assert.AreEqual(BitConverter.SingleToInt32Bits(scale[i]), BitConverter.SingleToInt32Bits(s[i]), $"{prefix}.scale[{i}]");
            }

            for (var i = 0; i < q.Length; i++)
            {
                Assert.AreEqual(codes[i], q[i], $"{prefix}.codes[{i}] (x = {x[i]:R})");
            }
        }
    }

    public static IEnumerable<object[]> RopeShapes => [[1, 4, 0], [7, 4, 60], [33, 1, 2000], [130, 3, 0]];

    /// <summary>
    /// The one RoPE kernel against <c>CpuBackend.ApplyRope</c> from the same table, bit for bit in every storage variant (f32,
    /// f32 rounded to bf16 values against the GpuEmulation, bf16 storage), rows at start + t and at device positions given
    /// out of order; a device position outside the table leaves its row untouched.
    /// </summary>
    [TestMethod]
    [DynamicData(nameof(RopeShapes))]
    public void RopeMatchesCpuBackendExactly(int tokens, int heads, int start)
    {
        var config = ModelConfig.Load(Path.Combine(SharedData.TinyAModel, "config.json"));
        int pairs = config.QkRopeHeadDim / 2, headStride = config.QkHeadDim, width = heads * headStride;
        var layout = new RopeLayout(heads, headStride, config.QkNopeHeadDim);
        using var k = new RopeKernel(Device, Compiler);
        var tablePositions = start + tokens;
        var (cos, sin) = YarnRope.Table(config, tablePositions);
        using var cosD = DeviceBuffer<float>.From(Device, cos, Stream);
        using var sinD = DeviceBuffer<float>.From(Device, sin, Stream);
        var table = new RopeTableView(cosD.Pointer, sinD.Pointer, tablePositions, pairs);
        // Device positions: the rows reversed, and the last row (when there are two) past the table.
        var positions = Enumerable.Range(0, tokens).Select(t => start + tokens - 1 - t).ToArray();
        if (tokens > 1)
        {
            positions[^1] = tablePositions;
        }

        using var posD = DeviceBuffer<int>.From(Device, positions, Stream);
        foreach (var (type, round) in new[] { (ElementType.F32, false), (ElementType.F32, true), (ElementType.BF16, false) })
        {
            var cpu = new CpuBackend(round ? CpuNumerics.GpuEmulation : CpuNumerics.Float32);
            var cpuTable = cpu.UploadRope(cos, sin, tablePositions, pairs);
            var x = AsStored(Normal(Rng(tokens + heads + start + (int)type), tokens * width), ElementType.BF16); // activations hold bf16 values
            foreach (var byPosition in new[] { false, true })
            {
                var what = $"rope {tokens}x{heads} {(byPosition ? "at device positions" : $"from {start}")} {type} rounded {round}";
                using var xd = Upload(x, type);
                k.Launch(Stream, Rows(xd, type, tokens, width), round, layout, table, byPosition ? new DeviceInts(posD.Pointer, tokens) : null, byPosition ? 0 : start);
                var expected = (float[])x.Clone();
                for (var t = 0; t < tokens; t++)
                {
                    var p = byPosition ? positions[t] : start + t;
                    if (p < tablePositions)
                    {
                        var row = cpu.Upload(x.AsSpan(t * width, width).ToArray(), 1, width);
                        cpu.ApplyRope(row, cpuTable, p, headStride, config.QkNopeHeadDim);
                        cpu.Download(row, expected.AsSpan(t * width, width));
                    }
                }

                Tolerance.AssertClose(Read(xd, type, Stream), AsStored(expected, type), 0, 0, what);
            }
        }

        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() =>
            k.Launch(Stream, new DeviceRows(0, ElementType.F32, tokens, width), false, layout, table, positions: null, start: start + 1));
        Assert.ThrowsExactly<ArgumentException>(() =>
            k.Launch(Stream, new DeviceRows(0, ElementType.F32, tokens, width - 1), false, layout, table, positions: null, start: start));
    }

    public static IEnumerable<object[]> SiluShapes => [[1, 128], [7, 2048], [3, 1000], [65, 129]];

    [TestMethod]
    [DynamicData(nameof(SiluShapes))]
    public void SiluMulMatchesCpuBackend(int rows, int cols)
    {
        using var k = new SiluMulKernel(Device, Compiler);
        var cpu = new CpuBackend();
        var variants = from inT in Types from outT in Types from round in new[] { false, true }
            where !round || (inT == ElementType.F32 && outT == ElementType.F32) select (inT, outT, round);
        foreach (var (inT, outT, round) in variants)
        {
            var what = $"silu_mul {rows}x{cols} {inT}->{outT} rounded {round}";
            var r = Rng(rows * cols + (int)inT);
            var g = Normal(r, rows * cols, 4f);
            var u = Normal(r, rows * cols);
            g[0] = float.NaN;
            u[Math.Min(1, u.Length - 1)] = float.PositiveInfinity;
            using var gd = Upload(g, inT);
            using var ud = Upload(u, inT);
            using var od = Poisoned((long)rows * cols, outT);
            k.Launch(Stream, Rows(gd, inT, rows, cols), Rows(ud, inT, rows, cols), Rows(od, outT, rows, cols), round: round);
            var o = cpu.Allocate(rows, cols);
            cpu.SiluMul(cpu.Upload(g, rows, cols), cpu.Upload(u, rows, cols), o);
            var expected = new float[rows * cols];
            cpu.Download(o, expected);
            var stored = round ? ElementType.BF16 : outT;
            var actual = Read(od, outT, Stream);
            Tolerance.AssertClose(actual, AsStored(expected, stored), 1e-6, Rtol(stored) * 2, what);
            if (round)
            {
                AssertBf16Values(actual, what);
            }
        }
    }

    [TestMethod]
    public void EmbeddingGathersRowsExactlyAndPoisonsBadIds()
    {
        const int vocab = 1000, dim = 300;
        using var k = new EmbeddingKernel(Device, Compiler);
        var table = Normal(Rng(5), vocab * dim);
        using var td = Upload(table, ElementType.BF16); // table now holds the bf16 values
        int[] ids = [0, 999, 17, 17, 500, vocab, -1];
        using var idd = DeviceBuffer<int>.From(Device, ids);
        foreach (var outT in Types)
        {
            using var od = Poisoned((long)ids.Length * dim, outT);
            k.Launch(Stream, new DeviceInts(idd.Pointer, ids.Length), Rows(td, ElementType.BF16, vocab, dim), Rows(od, outT, ids.Length, dim));
            var o = Read(od, outT, Stream);
            for (var t = 0; t < ids.Length; t++)
            {
                for (var i = 0; i < dim; i++)
                {
                    var expected = ids[t] is >= 0 and < vocab ? table[ids[t] * dim + i] : float.NaN;
                    Assert.AreEqual(expected, o[t * dim + i], $"out[{t}, {i}] (id {ids[t]}, {outT})");
                }
            }
        }
    }

    /// <summary>
    /// Runs the choose kernel over <paramref name="logits"/> [rows, vocab] under <paramref name="choices"/>, a row with allowed
    /// ids reading them from <paramref name="masks"/> [masks, ⌈vocab / 64⌉ words] at its AllowedRow.
    /// </summary>
    private int[] Choose(float[] logits, int vocab, TokenChoiceRow[] choices, ulong[]? masks = null)
    {
        using var k = new SamplingKernel(Device, Compiler);
        using var ld = DeviceBuffer<float>.From(Device, logits);
        using var cd = DeviceBuffer<TokenChoiceRow>.From(Device, choices);
        using var md = DeviceBuffer<ulong>.From(Device, masks ?? [0UL]);
        using var ids = DeviceBuffer<int>.Allocate(Device, choices.Length);
        ids.Fill32(0xDEADBEEF, Stream);
        k.Launch(Stream, new DeviceRows(ld.Pointer, ElementType.F32, choices.Length, vocab), cd.Pointer, new DeviceInts(ids.Pointer, choices.Length), md.Pointer,
            TokenChoice.MaskWords(vocab));
        return ids.ToArray(Stream);
    }

    [TestMethod]
    public void ChoiceFollowsTheCpuRuleRowByRow()
    {
        // Fresh rows of the full vocabulary, each under its own settings: greedy with ties, NaN and +inf (which make a row
        // unsampleable: -1), all -inf (-1), a limit with garbage past it, rows not chosen here (-1), and seeded draws.
        const int vocab = 129280, rows = 56;
        var rng = Rng(9);
        var logits = Normal(rng, rows * vocab, 3f);
        var choices = new TokenChoice[rows];
        for (var r = 0; r < rows; r++)
        {
            choices[r] = (r % 7) switch
            {
                0 => TokenChoice.Greedy(vocab),
                1 => new TokenChoice(vocab, 0.6f, 0, 0.95f, 1234, (ulong)r),
                2 => new TokenChoice(vocab, 1f, 50, 1, 99, (ulong)(r * 3)),
                3 => new TokenChoice(vocab, 0.8f, 40, 0.9f, 7, 5),
                4 => new TokenChoice(100_000, 1.3f, 0, 1, 42, (ulong)r),
                5 => default,
                _ => new TokenChoice(vocab, 2f, 1000, 0.5f, (ulong)r, 1),
            };
        }

        var row = (int r) => logits.AsSpan(r * vocab, vocab);
        row(0)[500] = 50; row(0)[70000] = 50;                                  // tie: 500
        row(7)[129279] = 60;                                                     // the last id
        row(14)[3] = float.NaN;                                                  // NaN: not sampleable
        row(21).Fill(float.NegativeInfinity);                                    // nothing possible
        row(28)[77] = float.PositiveInfinity;                                    // +inf: not sampleable
        row(11)[100_001] = float.NaN; row(11)[120_000] = 1e30f;                  // past the limit: ignored
        row(1).Fill(float.NegativeInfinity); row(1)[9] = 0; row(1)[4] = -0.5f;   // -inf is a mask
        var got = Choose(logits, vocab, [.. choices.Select(c => CudaBackend.KernelRow(c))]);

        var differ = new List<string>();
        for (var r = 0; r < rows; r++)
        {
            var want = TokenSampling.Choose(row(r), choices[r]);
            var drawn = choices[r].OnDevice && choices[r].Temperature > 0 && want >= 0;
            if (!drawn)
            {
                Assert.AreEqual(want, got[r], $"row {r} ({choices[r]}): greedy, not chosen or unsampleable rows follow the rule exactly");
            }
            else if (want != got[r])
            {
                differ.Add($"row {r}: cpu {want}, gpu {got[r]}");
            }
        }

        Assert.AreEqual(-1, got[14]);
        Assert.AreEqual(-1, got[21]);
        Assert.AreEqual(-1, got[28]);
        Assert.AreEqual(500, got[0]);
        Assert.IsTrue(got[1] is 4 or 9, $"masked row drew {got[1]}");

        // Sums in another order move a boundary by rounding only: a draw within it may differ, seldom.
        Assert.IsLessThanOrEqualTo(2, differ.Count, string.Join("; ", differ));
    }

    [TestMethod]
    public void MaskedChoiceFollowsTheCpuRuleRowByRow()
    {
        // Rows of the full vocabulary under masks of every kind: every id, half at random, one in 64, one id, one word's worth
        // (ids 64..127), none, a mask that leaves out the row's argmax, a NaN and a +inf at ids the mask leaves out (still
        // unsampleable: a mask never hides broken numerics), allowed ids all -inf; greedy and seeded draws, some rows unmasked.
        const int vocab = 129280, rows = 40;
        var words = TokenChoice.MaskWords(vocab);
        var rng = Rng(12);
        var logits = Normal(rng, rows * vocab, 3f);
        var row = (int r) => logits.AsSpan(r * vocab, vocab);
        var choices = new TokenChoice[rows];
        var masks = new List<ulong>();
        var kernelRows = new TokenChoiceRow[rows];
        for (var r = 0; r < rows; r++)
        {
            ulong[]? allowed = (r % 10) switch
            {
                0 => null,
                1 => Enumerable.Repeat(ulong.MaxValue, words).ToArray(),
                2 => Enumerable.Range(0, words).Select(_ => (ulong)rng.NextInt64() ^ ((ulong)rng.NextInt64() << 1)).ToArray(),
                3 => Enumerable.Range(0, words).Select(_ => 1UL << rng.Next(64)).ToArray(),
                4 => OneId(words, rng.Next(vocab)),
                5 => Enumerable.Range(0, words).Select(w => w == 1 ? ulong.MaxValue : 0UL).ToArray(),
                6 => new ulong[words],
                _ => Enumerable.Range(0, words).Select(_ => (ulong)rng.NextInt64() | 1UL).ToArray(),
            };
            var settings = (r % 4) switch
            {
                0 => TokenChoice.Greedy(vocab),
                1 => new TokenChoice(vocab, 0.7f, 0, 0.9f, 31, (ulong)r),
                2 => new TokenChoice(vocab, 1.1f, 40, 1, 5, (ulong)(r * 7)),
                _ => new TokenChoice(120_000, 1f, 0, 1, 77, 2),
            };
            choices[r] = settings with { Allowed = allowed };
            kernelRows[r] = CudaBackend.KernelRow(choices[r]);
            if (allowed is not null)
            {
                kernelRows[r].AllowedRow = masks.Count / words;
                masks.AddRange(allowed);
            }
        }

        // Rows 7 and 17: the largest logits at ids the mask leaves out; rows 27 and 37: a NaN, a +inf where the mask says no;
        // row 39: every allowed id -inf.
        foreach (var r in new[] { 7, 17 })
        {
            for (var i = 0; i < vocab; i += 97)
            {
                row(r)[i] = TokenChoice.IsAllowed(choices[r].Allowed, i) ? row(r)[i] : 40f;
            }
        }

        row(27)[Enumerable.Range(0, vocab).First(i => !TokenChoice.IsAllowed(choices[27].Allowed, i))] = float.NaN;
        row(37)[Enumerable.Range(0, vocab).First(i => !TokenChoice.IsAllowed(choices[37].Allowed, i))] = float.PositiveInfinity;
        for (var i = 0; i < vocab; i++)
        {
            if (TokenChoice.IsAllowed(choices[39].Allowed, i))
            {
                row(39)[i] = float.NegativeInfinity;
            }
        }

        var got = Choose(logits, vocab, kernelRows, [.. masks]);
        var differ = new List<string>();
        for (var r = 0; r < rows; r++)
        {
            var want = TokenSampling.Choose(row(r), choices[r]);
            if (got[r] >= 0 && choices[r].Allowed is { } allowed)
            {
                Assert.IsTrue(TokenChoice.IsAllowed(allowed, got[r]), $"row {r} chose {got[r]}, which its mask leaves out");
            }

            if (choices[r].Temperature <= 0 || want < 0 || got[r] < 0)
            {
                Assert.AreEqual(want, got[r], $"row {r} ({choices[r] with { Allowed = null }}, mask {r % 10}): greedy and unsampleable rows follow the rule exactly");
            }
            else if (want != got[r])
            {
                differ.Add($"row {r}: cpu {want}, gpu {got[r]}");
            }
        }

        Assert.AreEqual(TokenSampling.NotChosen, got[6], "nothing allowed");
        Assert.AreEqual(TokenSampling.NotChosen, got[27], "a NaN the mask leaves out");
        Assert.AreEqual(TokenSampling.NotChosen, got[37], "a +inf the mask leaves out");
        Assert.AreEqual(TokenSampling.NotChosen, got[39], "every allowed id -inf");
        Assert.IsTrue(got[15] is >= 64 and < 128, $"one word's worth drew {got[15]}");
        Assert.IsLessThanOrEqualTo(2, differ.Count, string.Join("; ", differ));
    }

    private static ulong[] OneId(int words, int id)
    {
        var mask = new ulong[words];
        mask[id >> 6] = 1UL << (id & 63);
        return mask;
    }

    [TestMethod]
    public void SamplingFrequenciesFollowTheSoftmax()
    {
        // 4096 rows of the same 8 logits, each its own draw of one seed: independent draws.
        const int vocab = 8, rows = 4096;
        float[] row = [0f, 1f, 2f, 0.5f, -1f, 1.5f, -3f, 2f];
        var logits = Enumerable.Range(0, rows).SelectMany(_ => row).ToArray();
        var ids = Choose(logits, vocab, [.. Enumerable.Range(0, rows).Select(r => CudaBackend.KernelRow(new TokenChoice(vocab, 1f, 0, 1, 7, (ulong)r)))]);
        var counts = new int[vocab];
        foreach (var id in ids)
        {
            counts[id]++;
        }

        var z = row.Sum(v => Math.Exp(v));
        for (var i = 0; i < vocab; i++)
        {
            var p = Math.Exp(row[i]) / z;
            var sigma = Math.Sqrt(rows * p * (1 - p));
            Assert.IsLessThan(5 * sigma + 1, Math.Abs(counts[i] - rows * p), $"token {i}: {counts[i]} draws, expected {rows * p:F0}");
        }
    }

    [TestMethod]
    public void GraphReplaysCapturedKernelsAndArenaCarvesAlignedViews()
    {
        using var arena = new DeviceArena(Device, 1 << 20);
        var a = arena.Take<float>(1000);
        var b = arena.Take<float>(1000);
        Assert.AreEqual(0UL, b.Pointer % DeviceArena.Alignment);
        var x = Normal(Rng(3), 1000);
        a.Upload(x);
        using var k = new SiluMulKernel(Device, Compiler);
        DeviceRows input = new(a.Pointer, ElementType.F32, 1, 1000), output = new(b.Pointer, ElementType.F32, 1, 1000);
        k.Launch(Stream, input, input, output); // compile and load outside capture
        b.Fill32(NaNPattern, Stream);
        using var graph = CudaGraph.Capture(Stream, s => k.Launch(s, input, input, output));
        Assert.IsTrue(float.IsNaN(b.ToArray(Stream)[0]), "capture does not run the work");
        graph.Launch(Stream);
        var y = b.ToArray(Stream);
        for (var i = 0; i < x.Length; i++)
        {
            Assert.AreEqual(x[i] / (1 + MathF.Exp(-x[i])) * x[i], y[i], 1e-5f * Math.Max(1, Math.Abs(y[i])));
        }
    }
}
