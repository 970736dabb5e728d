using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Kernels;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Tests.Model;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>The one-block-per-token gate kernel.</summary>
[TestClass]
[TestCategory("Gpu")]
public sealed class MoeGateGpuTests : MoeGateGpuChecks
{
    private protected override bool TensorCores => false;
}

/// <summary>
/// The router on tensor cores: logits from the BF16 GEMM split over K, routed by moe_route_kernel (a shape the GEMM
/// cannot run, D = 100, shows the fallback to the gate kernel). A class of its own so that the device run takes it after
/// the default kernels.
/// </summary>
[TestClass]
[TestCategory("Gpu")]
public sealed class MoeGateTensorCoreGpuTests : MoeGateGpuChecks
{
    private protected override bool TensorCores => true;
}

/// <summary>The gate against the CPU Router on fresh random data and against the reference's own routing of tiny-a.</summary>
public abstract class MoeGateGpuChecks : GpuTestBase
{
    private protected abstract bool TensorCores { get; }

    private Bf16MmaKernel? _mma;

    private MoeGateKernel NewKernel()
    {
        _mma ??= TensorCores ? new Bf16MmaKernel(Device, Compiler) : null;
        return new MoeGateKernel(Device, Compiler, _mma);
    }

    [TestCleanup]
    public void DisposeTensorCores()
    {
        _mma?.Dispose();
        _mma = null;
    }

    /// <summary>The workspace the kernel asks for (a 4-byte placeholder when none).</summary>
    private DeviceBuffer<byte> Workspace(MoeGateKernel kernel, MoeGateShape shape, int tokens) =>
        DeviceBuffer<byte>.Allocate(Device, Math.Max(4, kernel.WorkspaceBytes(shape, tokens)));

    public static IEnumerable<object[]> Cases =>
        from s in MoeGateShape.Known.Append(new MoeGateShape(10, 100, 5, 3, 4))
        from tokens in new[] { 1, 7, 129, 300 }
        from input in new[] { ElementType.F32, ElementType.BF16 }
        select new object[] { s.Experts, s.Width, s.Groups, s.GroupsKept, s.TopK, tokens, input.ToString() };

    [TestMethod]
    [DynamicData(nameof(Cases))]
    public void MatchesRouterOnRandomInputs(int experts, int width, int groups, int kept, int k, int tokens, string inputName)
    {
        var input = Enum.Parse<ElementType>(inputName);
        var shape = new MoeGateShape(experts, width, groups, kept, k);
        var options = new GateOptions(experts, groups, kept, k, Normalize: true, ScalingFactor: 2.5f);
        var r = Rng(experts * 1000 + width + tokens + (int)input);
        var x = Normal(r, tokens * width);
        var w = Normal(r, experts * width, 1f / MathF.Sqrt(width));
        var bias = Normal(r, experts, 0.05f);
        using var kernel = NewKernel();
        Assert.AreEqual(TensorCores, kernel.WorkspaceBytes(shape, tokens) > 0);
        using var workspace = Workspace(kernel, shape, tokens);
        using var xd = Upload(x, input); // rounds x to bf16 in place when the input is bf16
        using var wd = Upload(w, ElementType.BF16);
        using var bd = Upload(bias, ElementType.F32);
        using var idxD = DeviceBuffer<int>.Allocate(Device, tokens * k);
        idxD.Fill32(NaNPattern, Stream);
        using var wOut = Poisoned(tokens * k, ElementType.F32);
        using var scoresD = Poisoned((long)tokens * experts, ElementType.F32);
        kernel.Launch(Stream, shape, Rows(xd, input, tokens, width), Rows(wd, ElementType.BF16, experts, width), Rows(bd, ElementType.F32, 1, experts),
            new DeviceRouting(idxD.Pointer, wOut.Pointer, tokens, k), true, 2.5f, scoresD.Pointer, workspace: TensorCores ? workspace.Pointer : 0);
        var idx = idxD.ToArray(Stream);
        var weights = Read(wOut, ElementType.F32, Stream);
        var scores = Read(scoresD, ElementType.F32, Stream);

        var refScores = new float[tokens * experts];
        var refIdx = new int[tokens * k];
        var refW = new float[tokens * k];
        var skipped = 0;
        for (var t = 0; t < tokens; t++)
        {
            Router.Route(x.AsSpan(t * width, width), w, bias, options, refScores.AsSpan(t * experts, experts), refIdx.AsSpan(t * k, k),
                refW.AsSpan(t * k, k));
            var what = $"{shape} {input} token {t}";
            if (Margin(refScores.AsSpan(t * experts, experts), bias, shape) < 1e-5f)
            {
                skipped++; // a near-tie: fp32 summation order may legitimately flip it
                continue;
            }

            CollectionAssert.AreEqual(refIdx.AsSpan(t * k, k).ToArray(), idx.AsSpan(t * k, k).ToArray(), $"{what}: experts (best first)");
            Tolerance.AssertClose(weights.AsSpan(t * k, k), refW.AsSpan(t * k, k), 1e-5, 0, $"{what}: weights");
        }

        Assert.IsLessThanOrEqualTo(Math.Max(1, tokens / 20), skipped, "too many near-ties skipped");
        Tolerance.AssertClose(scores, refScores, 1e-6, 0, $"{shape} {input}: scores");
    }

    /// <summary>The smallest gap of the decisions Router makes (groups kept, then the k-th expert), in biased scores.</summary>
    private static float Margin(ReadOnlySpan<float> scores, float[] bias, MoeGateShape s)
    {
        var biased = new float[s.Experts];
        for (var e = 0; e < s.Experts; e++)
        {
            biased[e] = scores[e] + bias[e];
        }

        var margin = float.PositiveInfinity;
        var per = s.Experts / s.Groups;
        var keep = Enumerable.Range(0, s.Groups).ToArray();
        if (s.Groups > 1 && s.GroupsKept < s.Groups)
        {
            var gs = Enumerable.Range(0, s.Groups).Select(g => biased.Skip(g * per).Take(per).OrderDescending().Take(Math.Min(2, per)).Sum()).ToArray();
            var sorted = gs.OrderDescending().ToArray();
            margin = sorted[s.GroupsKept - 1] - sorted[s.GroupsKept];
            keep = [.. Enumerable.Range(0, s.Groups).OrderByDescending(g => gs[g]).Take(s.GroupsKept)];
        }

        var cand = keep.SelectMany(g => biased.Skip(g * per).Take(per)).OrderDescending().ToArray();
        for (var j = 0; j + 1 < Math.Min(cand.Length, s.TopK + 1); j++)
        {
            margin = Math.Min(margin, cand[j] - cand[j + 1]); // the order of the k chosen is compared too
        }

        return margin;
    }

    [TestMethod]
    public void ReproducesTheReferenceRoutingOfTinyA()
    {
        using var checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        using var reference = new TinyAReference();
        using var kernel = NewKernel();
        var c = checkpoint.Config;
        var shape = new MoeGateShape(c.NRoutedExperts, c.HiddenSize, c.NGroup, c.TopkGroup, c.NumExpertsPerTok);
        var layers = 0;
        for (var i = 0; i < c.NumHiddenLayers; i++)
        {
            if (!c.IsMoeLayer(i))
            {
                continue;
            }

            var names = CheckpointLayout.Layer(c, i);
            var gateIn = reference.F32($"p1.layer{i}.gate_in");
            var tokens = gateIn.Length / c.HiddenSize;
            using var xd = Upload(gateIn, ElementType.F32);
            using var wd = Upload(checkpoint.ReadFloat32(names.Gate), ElementType.BF16);
            using var bd = Upload(checkpoint.ReadFloat32(names.GateBias), ElementType.F32);
            using var workspace = Workspace(kernel, shape, tokens);
            using var idxD = DeviceBuffer<int>.Allocate(Device, tokens * shape.TopK);
            idxD.Fill32(NaNPattern, Stream);
            using var wOut = Poisoned(tokens * shape.TopK, ElementType.F32);
            using var scoresD = Poisoned((long)tokens * shape.Experts, ElementType.F32);
            kernel.Launch(Stream, shape, Rows(xd, ElementType.F32, tokens, shape.Width), Rows(wd, ElementType.BF16, shape.Experts, shape.Width),
                Rows(bd, ElementType.F32, 1, shape.Experts), new DeviceRouting(idxD.Pointer, wOut.Pointer, tokens, shape.TopK), c.NormTopkProb,
                (float)c.RoutedScalingFactor, scoresD.Pointer, workspace: TensorCores ? workspace.Pointer : 0);
            Tolerance.AssertClose(Read(scoresD, ElementType.F32, Stream), reference.F32($"p1.layer{i}.gate_scores"), 1e-5, 0, $"layer{i}.gate_scores");
            RoutingAssert.SameExpertsAndWeights(idxD.ToArray(Stream), Read(wOut, ElementType.F32, Stream), reference.I64($"p1.layer{i}.topk_idx"),
                reference.F32($"p1.layer{i}.topk_weight"), shape.TopK, 1e-4, $"GPU gate layer{i}");
            layers++;
        }

        Assert.IsGreaterThan(0, layers, "tiny-a has MoE layers");
    }
}
