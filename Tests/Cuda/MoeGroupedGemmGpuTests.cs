using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Kernels;
using DeepSeekCuda.Loader.Numerics;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>
/// The MoE expert path on the GPU (<see cref="MoeLayer"/>: dispatch, act quant, grouped gate/up with SiLU·up, act quant,
/// grouped down, shared expert, combine) against <see cref="CpuBackend.MoeExperts"/> in GpuEmulation numerics on fresh
/// random FP8 weights, activations and routings (uniform, and skewed: most tokens on one expert, a quarter of the experts
/// idle). Outputs are poisoned with NaN first. Without a device every test ends Inconclusive (GpuTestBase). The tests run
/// twice: on the default mma.sync kernels (<see cref="MoeGroupedGemmGpuTests"/>) and on the Hopper wgmma kernels
/// (<see cref="MoeWgmmaGpuTests"/>).
/// </summary>
public abstract class MoeExpertGpuChecks : GpuTestBase
{
    /// <summary>Whether the layer runs its expert GEMMs on the Hopper kernels (MoeLayer's hopperGemm).</summary>
    private protected abstract bool Hopper { get; }

    // Both sides round the same intermediates (gate, up, h, each expert's output) to bf16 and quantize x and h to e4m3
    // per 128 by the same rule; only the fp32 summation order of the GEMMs differs (~1e-6 relative). That can move a
    // bf16 rounding of g, u or h by one step (2^-8 relative) in a few elements, and such a step can move one e4m3 code of h
    // (2^-4 relative to that element) or a group's scale; averaged over the down projection's I terms and the k experts the
    // output differs by well under 1% rms, while a wrong expert, row, scale block or column gives errors of order 1.
    private const double RmsRel = 1e-2;

    // A few elements may sit on such a step and differ by more than the rms; any element off by more than this fraction of
    // the output's largest magnitude is a real error.
    private const double MaxRel = 0.1;

    public static IEnumerable<object[]> Cases =>
        from preset in new[] { "tiny", "tiny-a", "ragged" }
        from tokens in new[] { 1, 3, 64, 129, 1025 }
        from skewed in new[] { false, true }
        select new object[] { preset, tokens, skewed };

    [TestMethod]
    [DynamicData(nameof(Cases), typeof(MoeExpertGpuChecks))]
    public void MatchesCpuBackend(string preset, int tokens, bool skewed)
    {
        var (gate, inter, sharedInter) = Preset(preset);
        var r = Rng((tokens * 131) + preset.Length + (skewed ? 5 : 0));
        using var set = new ExpertSet(this, r, gate.Experts, gate.Width, inter, sharedInter, touched: null);
        Check(set, gate, inter, sharedInter, tokens, skewed, r, $"{preset} T={tokens} skewed={skewed}");
    }

    // The full DeepSeek-V3 layer (256 experts of 2048, top-8, hidden 7168, one shared expert) at 3 tokens: only the experts
    // the routing touches hold random weights (the rest are zero and never read), which keeps the CPU side small.
    [TestMethod]
    [DataRow(3, false)]
    [DataRow(5, true)]
    public void MatchesCpuBackendAtDeepSeekV3Width(int tokens, bool skewed)
    {
        var gate = MoeGateShape.V3;
        var r = Rng(7 + tokens);
        var idx = MoeDispatchReferenceTests.Routing(r, tokens, gate.TopK, gate.Experts, skewed);
        using var set = new ExpertSet(this, r, gate.Experts, gate.Width, 2048, 2048, new HashSet<int>(idx));
        Check(set, gate, 2048, 2048, tokens, skewed, r, $"V3 T={tokens} skewed={skewed}", idx);
    }

    // Expert parallelism: one device's compact stack of the experts it holds (round-robin over the devices), routed through
    // its expert map, against the CPU backend holding the same experts (the others null: no contribution).
    [TestMethod]
    [DataRow("tiny-a", 3, 1, 3)]
    [DataRow("tiny-a", 129, 2, 3)]
    [DataRow("tiny", 64, 0, 5)]
    [DataRow("ragged", 17, 1, 4)]
    public void ExpertParallelStackMatchesCpuBackendHoldingTheSameExperts(string preset, int tokens, int device, int devices)
    {
        var (gate, inter, sharedInter) = Preset(preset);
        var r = Rng((tokens * 17) + device + devices);
        int[] held = [.. Enumerable.Range(0, gate.Experts).Where(e => e % devices == device)];
        using var set = new ExpertSet(this, r, gate.Experts, gate.Width, inter, sharedInter, touched: null, held);
        Check(set, gate, inter, sharedInter, tokens, skewed: false, r, $"{preset} T={tokens} device {device} of {devices}");
    }

    // The deployment shape: V3 over 8 devices, device 5's 32 experts (the routing's other 224 are served elsewhere).
    [TestMethod]
    [DataRow(3)]
    [DataRow(17)]
    public void MatchesCpuBackendAtDeepSeekV3WidthOnOneOfEightDevices(int tokens)
    {
        var gate = MoeGateShape.V3;
        var r = Rng(31 + tokens);
        var idx = MoeDispatchReferenceTests.Routing(r, tokens, gate.TopK, gate.Experts, skewed: false);
        int[] held = [.. Enumerable.Range(0, gate.Experts).Where(e => e % 8 == 5)];
        using var set = new ExpertSet(this, r, gate.Experts, gate.Width, 2048, 2048, new HashSet<int>(idx), held);
        Assert.AreEqual(32, set.Stack.Experts);
        Check(set, gate, 2048, 2048, tokens, skewed: false, r, $"V3 T={tokens} device 5 of 8", idx);
    }

    // The whole layer including the gate: the GPU's routing (read back) drives the CPU experts, so near-ties in the
    // gate cannot make the comparison flaky; the gate itself is tested against Router in MoeGateGpuTests.
    [TestMethod]
    [DataRow(1)]
    [DataRow(64)]
    public void ForwardWithGateMatchesCpuOnTheTinyPreset(int tokens)
    {
        var gate = MoeGateShape.TinyPreset;
        const int inter = 96, sharedInter = 192;
        var r = Rng(1000 + tokens);
        using var set = new ExpertSet(this, r, gate.Experts, gate.Width, inter, sharedInter, touched: null);
        var x = Normal(r, tokens * gate.Width);
        using var xd = Upload(x, ElementType.BF16);
        var gw = Normal(r, gate.Experts * gate.Width, 0.1f);
        using var gwd = Upload(gw, ElementType.BF16);
        using var bias = DeviceBuffer<float>.From(Device, Normal(r, gate.Experts, 0.01f), Stream);
        using var layer = new MoeLayer(Device, Compiler, gate, inter, sharedInter, tokens, Hopper);
        using var y = Poisoned((long)tokens * gate.Width, ElementType.F32);
        layer.Forward(Stream, Rows(xd, ElementType.BF16, tokens, gate.Width), Rows(gwd, ElementType.BF16, gate.Experts, gate.Width),
            new DeviceRows(bias.Pointer, ElementType.F32, 1, gate.Experts), normalize: true, scaling: 2.5f, set.Stack, set.Shared, Rows(y, ElementType.F32, tokens, gate.Width));
        var idx = layer.TopkIdx.ToArray(Stream);
        var w = layer.TopkWeight.ToArray(Stream);
        var expected = CpuExperts(set, x, tokens, gate, idx, w);
        AssertMatches(Read(y, ElementType.F32, Stream), expected, $"forward T={tokens}");
    }

    private void Check(ExpertSet set, MoeGateShape gate, int inter, int sharedInter, int tokens, bool skewed, Random r, string what, int[]? idx = null)
    {
        int h = gate.Width, k = gate.TopK;
        idx ??= MoeDispatchReferenceTests.Routing(r, tokens, k, gate.Experts, skewed);
        var wts = new float[tokens * k];
        for (var i = 0; i < wts.Length; i++)
        {
            wts[i] = (float)(0.05 + r.NextDouble());
        }

        var x = Normal(r, tokens * h);
        if (tokens >= 3)
        {
            x[h + 7] = float.NaN;                  // token 1: NaN through its experts and the shared expert
            x[(2 * h) + (h / 2)] = float.PositiveInfinity; // token 2: an Inf scale
        }

        using var xd = Upload(x, ElementType.BF16); // x becomes what the GPU sees
        var expected = CpuExperts(set, x, tokens, gate, idx, wts);
        using var idxd = DeviceBuffer<int>.From(Device, idx, Stream);
        using var wd = DeviceBuffer<float>.From(Device, wts, Stream);
        var residual = Normal(r, tokens * h);
        // Capacity above the count: the device routing is sized for t_max.
        using var layer = new MoeLayer(Device, Compiler, gate, inter, sharedInter, tokens + 3, Hopper, slots: set.Stack.Experts);
        var input = Rows(xd, ElementType.BF16, tokens, h);
        var routing = new DeviceRouting(idxd.Pointer, wd.Pointer, tokens, k);

        float[]? first = null;
        var layouts = tokens <= MoeLayer.MaskedMaxTokens ? new[] { MoeGroupedLayout.Contiguous, MoeGroupedLayout.Masked } : [MoeGroupedLayout.Contiguous];
        foreach (var layout in layouts)
        {
            var where = $"{what} {layout}";
            using (var y = Poisoned((long)tokens * h, ElementType.BF16))
            {
                layer.Experts(Stream, input, routing, set.Stack, set.Shared, Rows(y, ElementType.BF16, tokens, h), layout: layout);
                var got = Read(y, ElementType.BF16, Stream);
                AssertMatches(got, AsStored(expected, ElementType.BF16), where + " bf16");

                // Every (row, column) is computed by the same instruction sequence whatever tile or layout holds it, and
                // every sum has a fixed order: both layouts and repeated runs agree bit for bit.
                if (first is null)
                {
                    first = got;
                }
                else
                {
                    CollectionAssert.AreEqual(Bits(first), Bits(got), where + ": layouts differ");
                }

                y.Fill32(0x7FC07FC0u, Stream);
                layer.Experts(Stream, input, routing, set.Stack, set.Shared, Rows(y, ElementType.BF16, tokens, h), layout: layout);
                CollectionAssert.AreEqual(Bits(got), Bits(Read(y, ElementType.BF16, Stream)), where + ": not deterministic");
            }

            // f32 output with the residual fused, in place (y = residual + moe).
            using (var y = Upload((float[])residual.Clone(), ElementType.F32))
            {
                layer.Experts(Stream, input, routing, set.Stack, set.Shared, Rows(y, ElementType.F32, tokens, h), residual: Rows(y, ElementType.F32, tokens, h),
                    layout: layout);
                AssertMatches(Read(y, ElementType.F32, Stream), expected.Select((v, i) => v + residual[i]).ToArray(), where + " f32 + residual");
            }
        }
    }

    private static void AssertMatches(float[] got, float[] expected, string what)
    {
        var c = Tolerance.AssertRmsRel(got, expected, RmsRel, what);
        if (c.MaxRel > MaxRel)
        {
            throw new AssertFailedException(Tolerance.Describe(what, c) + $" exceeds max_rel {MaxRel}");
        }
    }

    private static int[] Bits(float[] a) => [.. a.Select(BitConverter.SingleToInt32Bits)];

    private static float[] CpuExperts(ExpertSet set, float[] x, int tokens, MoeGateShape gate, int[] idx, float[] wts)
    {
        var cpu = new CpuBackend(CpuNumerics.GpuEmulation);
        var routing = new CpuRouting(tokens, gate.Experts, gate.TopK);
        idx.AsSpan(0, tokens * gate.TopK).CopyTo(routing.Indices);
        wts.AsSpan(0, tokens * gate.TopK).CopyTo(routing.Weights);
        var y = cpu.Allocate(tokens, gate.Width);
        cpu.MoeExperts(cpu.Upload(x, tokens, gate.Width), routing, set.Cpu, y);
        var o = new float[tokens * gate.Width];
        cpu.Download(y, o);
        return o;
    }

    private static (MoeGateShape Gate, int Inter, int SharedInter) Preset(string name) => name switch
    {
        "tiny" => (MoeGateShape.TinyPreset, 96, 192),   // ModelPresets.Tiny: 2 shared experts of 96
        "tiny-a" => (MoeGateShape.TinyA, 128, 128),     // the tiny-a fixture
        _ => (new MoeGateShape(10, 200, 2, 1, 3), 72, 0), // widths off 128 and 16 (200 = 128 + 72), no shared expert
    };

    /// <summary>Random FP8 codes (no NaN codes) and scales; returns codes, scales and the dequantized weight.</summary>
    private static (byte[] Codes, float[] Scales, float[] W) RandomFp8(Random r, int n, int k)
    {
        var codes = new byte[(long)n * k];
        r.NextBytes(codes);
        for (var i = 0; i < codes.Length; i++)
        {
            if ((codes[i] & 0x7F) == 0x7F)
            {
                codes[i] ^= 1;
            }
        }

        var scales = new float[Fp8GemmKernel.BlocksFor(n) * Fp8GemmKernel.BlocksFor(k)];
        for (var i = 0; i < scales.Length; i++)
        {
            scales[i] = (float)(1e-3 * (0.5 + r.NextDouble()));
        }

        var w = new float[(long)n * k];
        Dequantize.Fp8Blocks(codes, scales, n, k, 128, 128, w);
        return (codes, scales, w);
    }

    /// <summary>One layer's experts on both sides: the stacked device layout of <see cref="MoeExpertStack"/> and the CPU's MLPs.</summary>
    private sealed class ExpertSet : IDisposable
    {
        private readonly List<IDisposable> _owned = [];

        // held: the experts this device stacks (expert parallelism; the stack gets their map); null for all.
        public ExpertSet(MoeExpertGpuChecks t, Random r, int experts, int hidden, int inter, int sharedInter, ISet<int>? touched, IReadOnlyList<int>? held = null)
        {
            var device = t.Device;
            var stream = t.Stream;
            int hb = Fp8GemmKernel.BlocksFor(hidden), ib = Fp8GemmKernel.BlocksFor(inter);
            long w13 = 2L * inter * hidden, s13 = 2L * ib * hb, w2 = (long)hidden * inter, s2 = (long)hb * ib;
            var slots = held ?? [.. Enumerable.Range(0, experts)];
            var w13d = Own(DeviceBuffer<byte>.Allocate(device, slots.Count * w13));
            var s13d = Own(DeviceBuffer<float>.Allocate(device, slots.Count * s13));
            var w2d = Own(DeviceBuffer<byte>.Allocate(device, slots.Count * w2));
            var s2d = Own(DeviceBuffer<float>.Allocate(device, slots.Count * s2));
            w13d.Fill8(0, stream);
            s13d.Fill32(0, stream);
            w2d.Fill8(0, stream);
            s2d.Fill32(0, stream);
            var mlps = new CpuMlp?[experts]; // null: held by another device
            CpuMlp? idle = null;
            for (var slot = 0; slot < slots.Count; slot++)
            {
                var e = slots[slot];
                if (touched is not null && !touched.Contains(e))
                {
                    // Never routed to: the CPU never evaluates it, the GPU never reads its (zero) weights.
                    mlps[e] = idle ??= new CpuMlp(new CpuLinearWeight(1, 1, true, [0f]), new CpuLinearWeight(1, 1, true, [0f]), new CpuLinearWeight(1, 1, true, [0f]));
                    continue;
                }

                var (gc, gs, gw) = RandomFp8(r, inter, hidden);
                var (uc, us, uw) = RandomFp8(r, inter, hidden);
                var (dc, ds, dw) = RandomFp8(r, hidden, inter);
                w13d.Upload(gc, stream, slot * w13);
                w13d.Upload(uc, stream, (slot * w13) + ((long)inter * hidden));
                s13d.Upload(gs, stream, slot * s13);
                s13d.Upload(us, stream, (slot * s13) + ((long)ib * hb));
                w2d.Upload(dc, stream, slot * w2);
                s2d.Upload(ds, stream, slot * s2);
                mlps[e] = new CpuMlp(new CpuLinearWeight(inter, hidden, true, gw), new CpuLinearWeight(inter, hidden, true, uw), new CpuLinearWeight(hidden, inter, true, dw));
            }

            Stack = new MoeExpertStack(w13d.Pointer, s13d.Pointer, w2d.Pointer, s2d.Pointer, slots.Count, hidden, inter);
            if (held is not null)
            {
                Stack = Stack with { ExpertMap = Own(DeviceBuffer<int>.From(device, MoeDispatch.ExpertMap(experts, held), stream)).Pointer, MapExperts = experts };
            }
            CpuMlp? shared = null;
            if (sharedInter > 0)
            {
                var (gc, gs, gw) = RandomFp8(r, sharedInter, hidden);
                var (uc, us, uw) = RandomFp8(r, sharedInter, hidden);
                var (dc, ds, dw) = RandomFp8(r, hidden, sharedInter);
                Shared = new MoeSharedExpert(Linear(device, stream, gc, gs, sharedInter, hidden), Linear(device, stream, uc, us, sharedInter, hidden),
                    Linear(device, stream, dc, ds, hidden, sharedInter));
                shared = new CpuMlp(new CpuLinearWeight(sharedInter, hidden, true, gw), new CpuLinearWeight(sharedInter, hidden, true, uw),
                    new CpuLinearWeight(hidden, sharedInter, true, dw));
            }

            Cpu = new CpuExpertWeights(mlps, shared, hidden, inter);
            stream.Synchronize();
        }

        public MoeExpertStack Stack { get; }

        public MoeSharedExpert? Shared { get; }

        public CpuExpertWeights Cpu { get; }

        public void Dispose()
        {
            foreach (var b in _owned)
            {
                b.Dispose();
            }
        }

        private Fp8Linear Linear(CudaDevice device, CudaStream stream, byte[] codes, float[] scales, int n, int k) =>
            new(Own(DeviceBuffer<byte>.From(device, codes, stream)).Pointer, Own(DeviceBuffer<float>.From(device, scales, stream)).Pointer, n, k);

        private DeviceBuffer<T> Own<T>(DeviceBuffer<T> b)
            where T : unmanaged
        {
            _owned.Add(b);
            return b;
        }
    }
}

/// <summary>The MoE expert path on the default mma.sync kernels.</summary>
[TestClass]
[TestCategory("Gpu")]
public sealed class MoeGroupedGemmGpuTests : MoeExpertGpuChecks
{
    private protected override bool Hopper => false;
}

/// <summary>
/// The same tests with the expert GEMMs (grouped and shared) on the Hopper wgmma kernels, in a class of their own so
/// that a fault in them, not yet run on a GPU, cannot fail the default kernels' tests. The presets whose widths are
/// not multiples of 16 (ragged) run on mma.sync here too.
/// </summary>
[TestClass]
[TestCategory("Gpu")]
public sealed class MoeWgmmaGpuTests : MoeExpertGpuChecks
{
    private protected override bool Hopper => true;

    [TestInitialize]
    public void RequireHopper()
    {
        if (!Fp8GemmKernel.HasWgmma(Device.Target))
        {
            Assert.Inconclusive($"the wgmma kernels need sm_90a; this device compiles for {Device.Target}");
        }
    }
}
