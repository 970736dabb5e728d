using DeepSeekCuda.Distributed;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Synthetic;
using DeepSeekCuda.Model;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Distributed;

/// <summary>
/// The synthetic configurations the multi-device tests split (heads and experts divisible by N = 1, 2, 4, 8), and what
/// those tests hold a spread model to: its values against one device's, and its traffic.
/// </summary>
internal static class DistributedModels
{
    /// <summary>8 heads, 16 experts in 4 groups, 8 layers (one dense): every N of 1, 2, 4, 8 divides.</summary>
    public static ModelConfig Wide8 { get; } = (ModelPresets.Tiny with
    {
        NumAttentionHeads = 8,
        NumHiddenLayers = 8,
        NRoutedExperts = 16,
        NGroup = 4,
        TopkGroup = 2,
        NumExpertsPerTok = 4,
        NSharedExperts = 1,
        NumNextNPredictLayers = 0,
        MaxPositionEmbeddings = 256,
    }).Validate();

    /// <summary>Bytes <paramref name="tensors"/> are stored in (checkpoint dtype).</summary>
    public static long StoredBytes(IEnumerable<ExpectedTensor> tensors) => tensors.Sum(t => t.Shape.Aggregate(1L, (a, d) => a * d) * DTypes.SizeOf(t.DType));

    /// <summary>The first MTP layer's own tensors: everything stored under its prefix but its copies of the embedding and head.</summary>
    public static List<ExpectedTensor> MtpLayerTensors(ModelConfig config)
    {
        var index = config.NumHiddenLayers;
        var names = CheckpointLayout.Layer(config, index);
        return [.. CheckpointLayout.Expected(config).Where(t => t.Layer == index && t.Name != names.MtpEmbedding && t.Name != names.MtpHead)];
    }

    /// <summary><see cref="Wide8"/> with the output head tied to the embedding.</summary>
    public static ModelConfig Tied8 { get; } = (Wide8 with { TieWordEmbeddings = true }).Validate();

    /// <summary>
    /// <see cref="Wide8"/> at tiny-a's shapes (head dims 64/64/64, hidden 256): every tensor-parallel shard of N = 2, 4, 8
    /// falls on the FP8 128×128 scale grid, as the CUDA backend requires.
    /// </summary>
    public static ModelConfig Wide8Fp8Aligned { get; } = (Wide8 with
    {
        VocabSize = 1024,
        HiddenSize = 256,
        IntermediateSize = 512,
        MoeIntermediateSize = 128,
        KvLoraRank = 128,
        QLoraRank = 192,
        QkRopeHeadDim = 64,
        QkNopeHeadDim = 64,
        VHeadDim = 64,
    }).Validate();

    /// <summary>
    /// How far a spread model's float32 values may move from one device's under tensor/expert parallelism: it regroups the
    /// sums of o_proj, the dense/shared MLP's down projection and the expert combine into per-device partials added in
    /// device order, a few ulps per layer (measured about 1e-7 … 1e-6).
    /// </summary>
    public const double TensorParallelMaxRel = 1e-5;

    /// <summary>
    /// Each device received exactly what <paramref name="plan"/> places on it, as many times as the plan lists it (a tied head:
    /// the embedding twice where lm_head runs). The CPU backend dequantizes FP8 with the scale grid as it reads the weight, so
    /// scale placements arrive with their weight and are not recorded separately.
    /// </summary>
    public static void AssertEachDeviceReceivedItsPlacements(PlacementPlan plan, IReadOnlyList<RecordingBackend> devices, string what)
    {
        for (var d = 0; d < devices.Count; d++)
        {
            var planned = plan.On(d).Where(p => !p.Tensor.EndsWith("_scale_inv", StringComparison.Ordinal))
                .Select(p => Key(p.Tensor, p.Slice)).Order().ToArray();
            var received = devices[d].Received.Select(r => Key(r.Tensor, r.Slice)).Order().ToArray();
            CollectionAssert.AreEqual(planned, received, $"{what} device {d}: planned {planned.Length}, received {received.Length}: "
                + string.Join(", ", planned.Except(received).Concat(received.Except(planned).Select(x => "+" + x)).Take(5)));
        }

        static string Key(string tensor, TensorSlice? slice) => slice is null ? tensor : $"{tensor} {slice}";
    }

    /// <summary>
    /// A spread model's values against one device's: equal where <paramref name="exact"/> (a pipeline performs the same
    /// operations in the same order, and copies between devices are exact), else within <see cref="TensorParallelMaxRel"/>.
    /// </summary>
    public static void AssertLikeOneDevice(bool exact, float[] actual, float[] expected, string what)
    {
        if (exact)
        {
            CollectionAssert.AreEqual(expected, actual, $"{what} differ");
        }
        else
        {
            Console.WriteLine(Tolerance.Describe(what, Tolerance.AssertMaxRel(actual, expected, TensorParallelMaxRel, what)));
        }
    }

    /// <summary>
    /// The traffic one forward pass of <paramref name="layers"/> layers must cause: a pipeline copies the residual and
    /// its normed copy once per stage boundary; tensor/expert parallelism all-reduces twice per layer (after o_proj and
    /// after the FFN).
    /// </summary>
    public static void AssertTraffic(CommunicatorStats stats, PlacementKind kind, int n, int layers)
    {
        Assert.AreEqual(kind == PlacementKind.Pipeline ? 2 * (n - 1) : 0, stats.Copies, "copies");
        Assert.AreEqual(kind == PlacementKind.TensorExpertParallel && n > 1 ? 2 * layers : 0, stats.AllReduces, "all-reduces");
    }
}
