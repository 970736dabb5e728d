using System.Globalization;
using DeepSeekCuda.Model;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Serving;

namespace DeepSeekCuda.Hosting;

/// <summary>A context length (tokens per request) and why it was chosen.</summary>
/// <param name="Tokens">Longest request: prompt and output together.</param>
/// <param name="Limit">The most the model and the memory allow (Tokens is at most this).</param>
/// <param name="Reason">One sentence: which bound decided and the numbers behind it.</param>
/// <param name="CacheBlocks">
/// On devices, the blocks of the shared cache pool the memory planner predicts, before the load; the chat client's pool is
/// what the devices hold when it is created, measured (<see cref="PagedStepRunner.Attach"/>). Null on the CPU backend, where
/// the rule counts a full-length cache per session.
/// </param>
public sealed record ContextSizeChoice(int Tokens, int Limit, string Reason, int? CacheBlocks = null);

/// <summary>
/// Sizes the context length from the model's <c>max_position_embeddings</c> and the memory left for the
/// latent caches of the requests that run at once. The rule, per backend:
/// <list type="bullet">
/// <item>CPU: each request's float32 latent cache per layer (and the MTP layer's) may grow to the full length,
/// <c>(layers + mtp) × (kv_lora_rank + qk_rope_head_dim) × 4</c> bytes per token, and the rule counts that for each. The
/// weights are held as float32 (4 bytes per parameter, an upper bound for what the CPU backend keeps);
/// <see cref="CpuCacheFraction"/> of what the available host memory has left beside them goes to the
/// caches of <c>sessions</c> concurrent requests. The rest is for activations, the runtime and the machine.</item>
/// <item>CUDA, one device or several (<see cref="ChooseForDevices"/>): <see cref="MemoryPlanner.Plan(PlacementPlan, IReadOnlyList{long}, MemoryPlanOptions?)"/>
/// on each device's free memory and its share of the placement (weights, the activation arena for <c>sessions</c> requests,
/// reserve, then BF16 cache blocks; one device is the pipeline of one); one block index addresses a block on every device, so
/// the device with the least room bounds the pool. The <c>sessions</c> requests share the pool (a chat client's default pool
/// is sized the same way after the load, from the memory then left), and one request may fill it, as in vLLM: the context is what the pool holds,
/// at most <c>max_position_embeddings</c>. When running requests together outgrow the pool, the newest is preempted and
/// re-prefilled later (its output does not change).</item>
/// </list>
/// The result is a whole number of 64-token cache blocks, at most <c>max_position_embeddings</c>, and never
/// below <see cref="MinimumTokens"/> (or the model's maximum when that is smaller).
/// </summary>
public static class ContextSize
{
    /// <summary>Share of the host memory left beside the weights that the CPU sessions' caches may take.</summary>
    public const double CpuCacheFraction = 0.5;

    /// <summary>The shortest context chosen automatically: below this a reasoning model cannot say much.</summary>
    public const int MinimumTokens = 256;

    /// <summary>Latent cache bytes one CPU session holds per token of context (float32, every layer, the MTP layer too when loaded).</summary>
    public static long CpuBytesPerToken(ModelConfig config, bool mtp)
    {
        ArgumentNullException.ThrowIfNull(config);
        var layers = config.NumHiddenLayers + (mtp && config.NumNextNPredictLayers > 0 ? 1 : 0);
        return (long)layers * config.KvCacheDim * sizeof(float);
    }

    /// <summary>Host bytes the CPU backend's float32 weights take (an upper bound: every parameter at 4 bytes).</summary>
    public static long CpuWeightBytes(ModelConfig config, bool mtp)
    {
        var stats = CheckpointStats.Compute(config);
        return (stats.MainParameters + (mtp ? stats.MtpParameters : 0)) * sizeof(float);
    }

    /// <summary>
    /// The context for the CPU backend with <paramref name="availableHostBytes"/> of host memory available
    /// before loading, for <paramref name="sessions"/> requests at once.
    /// </summary>
    /// <param name="config">The model.</param>
    /// <param name="availableHostBytes">Free host memory now (see <see cref="AvailableHostBytes"/>).</param>
    /// <param name="sessions">Requests holding a session at once (a chat client's MaxBatch).</param>
    /// <param name="mtp">Whether the MTP layer is loaded (one more cache per session).</param>
    /// <param name="requested">An explicit length: checked against the limit instead of chosen; null to choose.</param>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="requested"/> is above the limit (ParamName <c>MaxSequenceLength</c>).</exception>
    public static ContextSizeChoice ChooseForCpu(ModelConfig config, long availableHostBytes, int sessions, bool mtp, int? requested = null)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentOutOfRangeException.ThrowIfLessThan(sessions, 1);
        var weights = CpuWeightBytes(config, mtp);
        var budget = (long)(Math.Max(0, availableHostBytes - weights) * CpuCacheFraction);
        var perToken = CpuBytesPerToken(config, mtp) * sessions;
        var fit = budget / perToken;
        var why = string.Create(CultureInfo.InvariantCulture,
            $"{sessions} concurrent session(s) x {CpuBytesPerToken(config, mtp)} bytes per token of float32 latent cache in {Percent(CpuCacheFraction)} of the {Gib(availableHostBytes)} GiB of available host memory less {Gib(weights)} GiB of float32 weights");
        return Decide(config, fit, why, requested);
    }

    /// <summary>
    /// The context for a model on the devices of <paramref name="plan"/> (one device: <see cref="PlacementPlan.Pipeline"/> over
    /// 1), with <paramref name="freeBytes"/> free on each before loading, for <paramref name="sessions"/> requests at once:
    /// <see cref="MemoryPlanner.Plan(PlacementPlan, IReadOnlyList{long}, MemoryPlanOptions?)"/> over each device's share (its
    /// weights; the latent caches of the layers it runs, every layer under tensor parallelism; the logits where lm_head runs;
    /// with the MTP layer placed, its cache on each device that holds it and a draft row per request) gives the pool the
    /// requests share (<see cref="ContextSizeChoice.CacheBlocks"/>), and the context is what the pool holds, at most
    /// <c>max_position_embeddings</c>.
    /// </summary>
    /// <param name="plan">The placement (and the model's config).</param>
    /// <param name="freeBytes">Free bytes per device, in the plan's device order.</param>
    /// <param name="sessions">Requests holding a session at once.</param>
    /// <param name="requested">An explicit length: checked against the limit instead of chosen; null to choose.</param>
    /// <exception cref="InsufficientDeviceMemoryException">
    /// Some device cannot hold its weights, arena and reserve with a pool for one request of <see cref="MinimumTokens"/> (with
    /// <paramref name="requested"/>: of one block).
    /// </exception>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="requested"/> is above the limit (ParamName <c>MaxSequenceLength</c>).</exception>
    /// <exception cref="ArgumentException">Not one free-byte count per device of the plan.</exception>
    public static ContextSizeChoice ChooseForDevices(PlacementPlan plan, IReadOnlyList<long> freeBytes, int sessions, int? requested = null)
    {
        ArgumentNullException.ThrowIfNull(plan);
        ArgumentNullException.ThrowIfNull(freeBytes);
        ArgumentOutOfRangeException.ThrowIfLessThan(sessions, 1);
        var config = plan.Config;
        // The pool holds one request of the minimum; a requested length is checked against the pool below, naming the limit.
        var shortest = requested is null ? Math.Min(config.MaxPositionEmbeddings, MinimumTokens) : 1;
        var memory = MemoryPlanner.Plan(plan, freeBytes, GpuPlanOptions(sessions, plan.IncludesMtp, shortest));
        var shared = string.Create(CultureInfo.InvariantCulture,
            $"one request may fill the {memory.KvBlocks} cache blocks of 64 tokens that {sessions} concurrent session(s) share, which the memory planner fits");
        string why;
        if (plan.DeviceCount == 1)
        {
            var device = memory.Devices[0];
            why = string.Create(CultureInfo.InvariantCulture, $"{shared} in {Gib(device.FreeBytes)} GiB free on the device beside {Gib(device.WeightBytes)} GiB of weights");
        }
        else
        {
            // The device that bounds the pool: the fewest blocks in what it has left.
            var tightest = memory.Devices.MinBy(d => (d.FreeBytes - d.WeightBytes - d.ActivationBytes - d.ReserveBytes) / Math.Max(1, d.CacheLayers))!;
            why = string.Create(CultureInfo.InvariantCulture,
                $"{shared} on each of {plan.DeviceCount} devices ({PlacementName(plan.Kind)}); the tightest, device {tightest.Device}, has {Gib(tightest.FreeBytes)} GiB free beside {Gib(tightest.WeightBytes)} GiB of weights and {tightest.CacheLayers} layers' caches");
        }

        return Decide(config, memory.KvTokens, why, requested) with { CacheBlocks = memory.KvBlocks };
    }

    /// <summary>How a placement kind reads in log lines and messages.</summary>
    internal static string PlacementName(PlacementKind kind) => kind == PlacementKind.Pipeline ? "pipeline" : "tensor/expert parallel";

    /// <summary>
    /// Memory available to this process now: the smaller of the GC's limit (a container's memory limit
    /// or the physical memory) and, on Linux, /proc/meminfo's MemAvailable.
    /// </summary>
    public static long AvailableHostBytes()
    {
        var available = GC.GetGCMemoryInfo().TotalAvailableMemoryBytes;
        try
        {
            foreach (var line in File.ReadLines("/proc/meminfo"))
            {
                if (line.StartsWith("MemAvailable:", StringComparison.Ordinal)
                    && long.TryParse(line["MemAvailable:".Length..].Trim().Split(' ')[0], NumberStyles.None, CultureInfo.InvariantCulture, out var kib))
                {
                    available = Math.Min(available, kib * 1024);
                    break;
                }
            }
        }
        catch (IOException)
        {
            // Not Linux: the GC's figure alone.
        }
        catch (UnauthorizedAccessException)
        {
        }

        return available;
    }

    /// <summary>The planner's options for <paramref name="sessions"/> requests, with a pool that holds at least one of <paramref name="shortest"/> tokens.</summary>
    private static MemoryPlanOptions GpuPlanOptions(int sessions, bool mtp, int shortest) => new()
    {
        MaxBatch = sessions,
        MaxSequenceLength = shortest,
        MaxTokensPerStep = 512,
        DraftTokens = mtp ? 1 : 0,
    };

    private static ContextSizeChoice Decide(ModelConfig config, long fit, string why, int? requested)
    {
        var maxPositions = config.MaxPositionEmbeddings;
        var blocks = fit / KvBlockManager.BlockTokens * KvBlockManager.BlockTokens;
        var memoryLimit = (int)Math.Min(blocks, int.MaxValue);
        var limit = Math.Min(maxPositions, memoryLimit);
        if (requested is { } r)
        {
            if (r < 1 || r > maxPositions)
            {
                throw new ArgumentOutOfRangeException("MaxSequenceLength", r, $"must be within 1..{maxPositions} (max_position_embeddings)");
            }

            if (r > memoryLimit)
            {
                throw new ArgumentOutOfRangeException("MaxSequenceLength", r, $"{r} tokens do not fit: the limit is {memoryLimit} ({why})");
            }

            return new ContextSizeChoice(r, limit, "requested");
        }

        var floor = Math.Min(maxPositions, MinimumTokens);
        if (limit >= maxPositions)
        {
            return new ContextSizeChoice(maxPositions, limit, $"max_position_embeddings {maxPositions}; memory would allow {memoryLimit} ({why})");
        }

        if (limit < floor)
        {
            return new ContextSizeChoice(floor, limit, $"the minimum of {floor}, above what memory allows, {memoryLimit} ({why}): expect to run out of memory with that many requests at once");
        }

        return new ContextSizeChoice(limit, limit, $"memory: {why}; max_position_embeddings is {maxPositions}");
    }

    /// <summary>Bytes as GiB with two decimals, culture-invariant (log lines and reasons).</summary>
    internal static string Gib(long bytes) => (bytes / (double)(1L << 30)).ToString("F2", CultureInfo.InvariantCulture);

    private static string Percent(double fraction) => (fraction * 100).ToString("F0", CultureInfo.InvariantCulture) + "%";
}
