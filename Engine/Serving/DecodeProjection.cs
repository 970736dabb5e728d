using System.Globalization;

namespace DeepSeekCuda.Serving;

/// <summary>
/// Decode-step times measured on one GPU for a slice of the model, split per layer kind: GPU time (kernels) and host
/// time the GPU waits for (launch, allocation, synchronization), in microseconds.
/// </summary>
/// <param name="DenseGpuUs">GPU time of one dense layer.</param>
/// <param name="DenseHostUs">Host overhead of one dense layer.</param>
/// <param name="MoeGpuUs">GPU time of one MoE layer.</param>
/// <param name="MoeHostUs">Host overhead of one MoE layer.</param>
/// <param name="OuterGpuUs">GPU time outside the layers: embedding, final norm, lm_head.</param>
/// <param name="OuterHostUs">Host overhead outside the layers (the logits download included).</param>
internal sealed record LayerStepTimes(double DenseGpuUs, double DenseHostUs, double MoeGpuUs, double MoeHostUs, double OuterGpuUs, double OuterHostUs);

/// <summary>
/// How the full model is laid out for <see cref="DecodeProjection.Project"/>: every layer on every GPU, attention,
/// dense MLP and shared expert tensor-parallel, routed experts expert-parallel, lm_head vocabulary-parallel.
/// </summary>
/// <param name="Gpus">GPUs the work divides over.</param>
/// <param name="DenseLayers">Dense layers of the full model (V3: 3).</param>
/// <param name="MoeLayers">MoE layers of the full model (V3: 58).</param>
/// <param name="AllReducesPerLayer">All-reduces of the hidden state per layer (after attention and after the FFN: 2).</param>
/// <param name="AllReduceUs">Microseconds of one all-reduce of one step's hidden rows over <paramref name="Gpus"/> GPUs (a parameter: the allreduce bench or NVLink numbers).</param>
/// <param name="ParallelEfficiency">Fraction of perfect division the GPU time reaches (1: time / Gpus; load imbalance of experts and smaller GEMMs lower it).</param>
internal sealed record DeploymentPlan(int Gpus = 8, int DenseLayers = 3, int MoeLayers = 58, int AllReducesPerLayer = 2, double AllReduceUs = 20, double ParallelEfficiency = 1)
{
    /// <summary>The plan's assumptions in words, one per line.</summary>
    public IReadOnlyList<string> Assumptions =>
    [
        string.Create(CultureInfo.InvariantCulture, $"{DenseLayers} dense + {MoeLayers} MoE layers, every layer spread over all {Gpus} GPUs: attention heads, dense MLP and shared expert tensor-parallel, routed experts expert-parallel ({Gpus} shards), lm_head split by vocabulary"),
        string.Create(CultureInfo.InvariantCulture, $"GPU time of a layer divides by {Gpus} × efficiency {ParallelEfficiency:F2} (decode is bandwidth-bound: each GPU reads 1/{Gpus} of the layer's bytes)"),
        "host overhead per layer does not divide: each GPU's host thread issues the whole layer sequence, in parallel with the others",
        string.Create(CultureInfo.InvariantCulture, $"{AllReducesPerLayer} all-reduces of the hidden state per layer at {AllReduceUs:F1} µs each, not overlapped with compute"),
        "per-layer times are the slice's, measured on one GPU at the same batch and context; MTP, sampling and the scheduler are left out",
        "memory is not checked: the FP8 weights alone are about 671 GB, more than 8 × 80 GB (an H100 node needs more GPUs or H200s)",
    ];
}

/// <summary>A projected decode step of the full model and its parts, microseconds.</summary>
/// <param name="StepUs">The whole step.</param>
/// <param name="GpuUs">GPU time on the critical path (layers and the outer ops, divided).</param>
/// <param name="HostUs">Host overhead (not divided).</param>
/// <param name="CommUs">All-reduces.</param>
internal sealed record ProjectedStep(double StepUs, double GpuUs, double HostUs, double CommUs);

/// <summary>Extrapolates per-layer step times measured on a slice to the full model on several GPUs.</summary>
internal static class DecodeProjection
{
    /// <summary>
    /// step = [dense·DenseGpu + moe·MoeGpu + OuterGpu] / (gpus · efficiency)
    ///      + dense·DenseHost + moe·MoeHost + OuterHost
    ///      + (dense + moe) · allReducesPerLayer · allReduceUs.
    /// </summary>
    public static ProjectedStep Project(LayerStepTimes measured, DeploymentPlan plan)
    {
        ArgumentNullException.ThrowIfNull(measured);
        ArgumentNullException.ThrowIfNull(plan);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(plan.Gpus);
        if (plan.ParallelEfficiency is <= 0 or > 1)
        {
            throw new ArgumentOutOfRangeException(nameof(plan), plan.ParallelEfficiency, "ParallelEfficiency must be in (0, 1]");
        }

        double dense = plan.DenseLayers, moe = plan.MoeLayers;
        var gpu = (dense * measured.DenseGpuUs + moe * measured.MoeGpuUs + measured.OuterGpuUs) / (plan.Gpus * plan.ParallelEfficiency);
        var host = dense * measured.DenseHostUs + moe * measured.MoeHostUs + measured.OuterHostUs;
        var comm = plan.Gpus > 1 ? (dense + moe) * plan.AllReducesPerLayer * plan.AllReduceUs : 0;
        return new ProjectedStep(gpu + host + comm, gpu, host, comm);
    }
}
