using System.Globalization;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Model;

namespace DeepSeekCuda.Serving;

/// <summary>What a serving engine must hold per device, chosen before the first step.</summary>
public sealed record MemoryPlanOptions
{
    /// <summary>Most requests decoding in one step (rows of the decode batch).</summary>
    public int MaxBatch { get; init; } = 64;

    /// <summary>Longest request (prompt and output); the plan guarantees cache blocks for at least one request this long.</summary>
    public int MaxSequenceLength { get; init; } = 4096;

    /// <summary>Most tokens one step feeds, all requests together (the prefill chunk budget).</summary>
    public int MaxTokensPerStep { get; init; } = 2048;

    /// <summary>Draft tokens verified per request per decode step (1 with MTP speculative decoding, else 0).</summary>
    public int DraftTokens { get; init; }

    /// <summary>
    /// Split-KV partitions the decode attention may use per (request, head); each keeps an fp32 partial
    /// output and its log-sum-exp until the combine kernel. The MLA decode launcher owns the real number.
    /// </summary>
    public int AttentionSplits { get; init; } = 16;

    /// <summary>
    /// Fraction of each device's free bytes left untouched (allocator fragmentation, cuBLAS/graph workspaces, driver growth);
    /// a paged runner sizing its pool after the load leaves the same fraction of the device's total memory
    /// (<see cref="PagedStepRunner.Attach"/>).
    /// </summary>
    public double ReserveFraction { get; init; } = 0.05;

    /// <summary>Lower bound of the reserve in bytes.</summary>
    public long MinReserveBytes { get; init; } = 512L << 20;

    /// <summary>The reserve of a device of <paramref name="bytes"/>: <see cref="ReserveFraction"/> of them, at least <see cref="MinReserveBytes"/>.</summary>
    internal long ReserveOf(long bytes) => Math.Max(MinReserveBytes, (long)(bytes * ReserveFraction));

    internal void Validate()
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(MaxBatch, 1, nameof(MaxBatch));
        ArgumentOutOfRangeException.ThrowIfLessThan(MaxSequenceLength, 1, nameof(MaxSequenceLength));
        ArgumentOutOfRangeException.ThrowIfLessThan(MaxTokensPerStep, 1, nameof(MaxTokensPerStep));
        ArgumentOutOfRangeException.ThrowIfNegative(DraftTokens, nameof(DraftTokens));
        ArgumentOutOfRangeException.ThrowIfLessThan(AttentionSplits, 1, nameof(AttentionSplits));
        if (double.IsNaN(ReserveFraction) || ReserveFraction is < 0 or >= 1)
        {
            throw new ArgumentOutOfRangeException(nameof(ReserveFraction), ReserveFraction, "must be in [0, 1)");
        }

        ArgumentOutOfRangeException.ThrowIfNegative(MinReserveBytes, nameof(MinReserveBytes));
    }
}

/// <summary>What one device holds before its memory is planned (<see cref="MemoryPlanner.Plan(ModelConfig, IReadOnlyList{DeviceShare}, MemoryPlanOptions?)"/>).</summary>
/// <param name="FreeBytes">Free bytes on the device before the weights are loaded.</param>
/// <param name="WeightBytes">Weight bytes the device will hold.</param>
/// <param name="FirstLayer">First main layer it runs.</param>
/// <param name="Layers">Main layers it runs.</param>
/// <param name="CacheLayers">Latent caches it holds (under tensor parallelism every layer's: the latent is shared by all heads).</param>
/// <param name="ComputesLogits">Whether lm_head runs here (the fp32 logits buffer).</param>
public sealed record DeviceShare(long FreeBytes, long WeightBytes, int FirstLayer, int Layers, int CacheLayers, bool ComputesLogits);

/// <summary>One device's share of a <see cref="MemoryPlan"/>.</summary>
/// <param name="Device">Device index (position in the free-bytes list).</param>
/// <param name="FirstLayer">First main layer placed here.</param>
/// <param name="Layers">Main layers placed here.</param>
/// <param name="CacheLayers">Latent caches held here: the main layers, plus the MTP layer on the last device when it is placed.</param>
/// <param name="FreeBytes">Free bytes the plan started from.</param>
/// <param name="WeightBytes">Weights as stored (FP8 codes at 1 byte plus float32 block scales; BF16 and F32 tensors as is).</param>
/// <param name="ActivationBytes">The activation arena (<see cref="MemoryPlanner.ActivationArenaBytes"/>).</param>
/// <param name="ReserveBytes">Bytes left untouched.</param>
/// <param name="KvBytes">Bytes given to the latent cache: <see cref="MemoryPlan.KvBlocks"/> blocks of this device's layers.</param>
public sealed record DeviceMemoryPlan(int Device, int FirstLayer, int Layers, int CacheLayers, long FreeBytes, long WeightBytes,
    long ActivationBytes, long ReserveBytes, long KvBytes)
{
    /// <summary>Everything the plan allocates or reserves on this device.</summary>
    public long PlannedBytes => WeightBytes + ActivationBytes + ReserveBytes + KvBytes;
}

/// <summary>The outcome of <see cref="MemoryPlanner.Plan(PlacementPlan, IReadOnlyList{long}, MemoryPlanOptions?)"/>.</summary>
/// <param name="Devices">Per device.</param>
/// <param name="TokensPerStep">Rows of the activation arena: max(MaxTokensPerStep, MaxBatch·(1 + DraftTokens)).</param>
/// <param name="LogitRows">Rows of the fp32 logits buffer: MaxBatch·(1 + DraftTokens).</param>
/// <param name="KvBytesPerTokenPerLayer">(kv_lora_rank + qk_rope_head_dim)·2: 1,152 bytes for V3's 576 BF16 values.</param>
/// <param name="KvBlocks">Blocks of <see cref="KvBlockManager.BlockTokens"/> tokens that fit on every device (the pool's size).</param>
/// <param name="BlocksPerRequest">Blocks of one request of MaxSequenceLength tokens (columns of the block table).</param>
public sealed record MemoryPlan(IReadOnlyList<DeviceMemoryPlan> Devices, int TokensPerStep, int LogitRows, long KvBytesPerTokenPerLayer,
    int KvBlocks, int BlocksPerRequest)
{
    /// <summary>Tokens the cache holds over all requests.</summary>
    public long KvTokens => (long)KvBlocks * KvBlockManager.BlockTokens;

    /// <summary>Requests of MaxSequenceLength tokens that fit at once (shorter ones share the pool more densely).</summary>
    public int FullLengthRequests => KvBlocks / BlocksPerRequest;
}

/// <summary>A device cannot hold its share of the model; carries what each short device needs and has.</summary>
public sealed class InsufficientDeviceMemoryException : Exception
{
    /// <summary>Creates the exception from the devices that fall short.</summary>
    public InsufficientDeviceMemoryException(IReadOnlyList<DeviceMemoryShortfall> shortfalls)
        : base(Describe(shortfalls))
    {
        Shortfalls = shortfalls;
    }

    /// <summary>A shortfall found after the load, by measuring (a runner's cache pool): <paramref name="message"/> names the device and the bytes.</summary>
    internal InsufficientDeviceMemoryException(string message)
        : base(message)
    {
        Shortfalls = [];
    }

    /// <summary>The devices that fall short of the plan (empty for a shortfall measured after the load).</summary>
    public IReadOnlyList<DeviceMemoryShortfall> Shortfalls { get; }

    private static string Describe(IReadOnlyList<DeviceMemoryShortfall> shortfalls) =>
        "not enough device memory for the model: " + string.Join("; ", shortfalls.Select(s => s.ToString()));
}

/// <summary>One device that cannot hold its share.</summary>
/// <param name="Device">Device index.</param>
/// <param name="NeededBytes">Weights, activation arena, reserve and the minimum latent cache (one request of MaxSequenceLength).</param>
/// <param name="FreeBytes">Free bytes on the device.</param>
/// <param name="WeightBytes">Weights part of the need.</param>
/// <param name="ActivationBytes">Activation arena part.</param>
/// <param name="MinKvBytes">Minimum latent cache part.</param>
/// <param name="ReserveBytes">Reserve part.</param>
public sealed record DeviceMemoryShortfall(int Device, long NeededBytes, long FreeBytes, long WeightBytes, long ActivationBytes, long MinKvBytes, long ReserveBytes)
{
    /// <summary>The largest part of the need: "weights", "activations", "kv-cache" or "reserve".</summary>
    public string Dominant
    {
        get
        {
            (string Name, long Bytes)[] parts = [("weights", WeightBytes), ("activations", ActivationBytes), ("kv-cache", MinKvBytes), ("reserve", ReserveBytes)];
            return parts.MaxBy(p => p.Bytes).Name;
        }
    }

    /// <inheritdoc />
    public override string ToString() => string.Create(CultureInfo.InvariantCulture,
        $"device {Device} needs {MemoryPlanner.Format(NeededBytes)} (weights {MemoryPlanner.Format(WeightBytes)}, activations {MemoryPlanner.Format(ActivationBytes)}, "
        + $"KV cache for one full-length request {MemoryPlanner.Format(MinKvBytes)}, reserve {MemoryPlanner.Format(ReserveBytes)}) but has {MemoryPlanner.Format(FreeBytes)} free; {Dominant} dominate");
}

/// <summary>
/// Sizes a serving engine's device memory before the first step (pure arithmetic; no device needed):
/// the weights a placement puts on each device, the activation arena for the worst step, a safety reserve, and the
/// paged latent cache from what is left, as whole blocks every device can hold.
/// </summary>
public static class MemoryPlanner
{
    /// <summary>
    /// Plans the devices of <paramref name="placement"/> with <paramref name="freeBytes"/> free on each: every device's
    /// weights are what the placement puts there (<see cref="PlacementPlan.BytesOn"/>: what the load uploads, a tied head as
    /// a second table included), its latent caches those of the layers it runs (every layer under tensor/expert parallelism)
    /// and of the MTP layer where it is placed, and the logits are computed on the head device. One device is the pipeline
    /// of one (<see cref="PlacementPlan.Pipeline"/> over 1).
    /// </summary>
    /// <param name="placement">What goes where (and the model's config).</param>
    /// <param name="freeBytes">Free bytes per device before loading, in the placement's device order.</param>
    /// <param name="options">Batch, lengths, drafts and reserve.</param>
    /// <exception cref="InsufficientDeviceMemoryException">Some device cannot hold its weights, the arena, the reserve and the cache of one full-length request.</exception>
    /// <exception cref="ArgumentException">Not one free-byte count per device, a negative one, or bad options.</exception>
    public static MemoryPlan Plan(PlacementPlan placement, IReadOnlyList<long> freeBytes, MemoryPlanOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(placement);
        ArgumentNullException.ThrowIfNull(freeBytes);
        if (freeBytes.Count != placement.DeviceCount)
        {
            throw new ArgumentException($"{freeBytes.Count} free-byte counts for a placement over {placement.DeviceCount} devices", nameof(freeBytes));
        }

        if (freeBytes.Any(b => b < 0))
        {
            throw new ArgumentOutOfRangeException(nameof(freeBytes), "free bytes must be >= 0");
        }

        var shares = Enumerable.Range(0, placement.DeviceCount).Select(d =>
        {
            var (first, layers) = placement.Stages[d];
            return new DeviceShare(freeBytes[d], placement.BytesOn(d), first, layers, layers + (placement.MtpDevices.Contains(d) ? 1 : 0), d == placement.HeadDevice);
        }).ToArray();
        return Plan(placement.Config, shares, options);
    }

    /// <summary>
    /// Plans devices whose weights are already placed (any placement: a pipeline, or tensor/expert parallel shards that
    /// each hold every layer's latent cache): per device the activation arena, the reserve and the latent cache from what
    /// is left beside its <see cref="DeviceShare.WeightBytes"/>, as whole blocks every device can hold.
    /// </summary>
    /// <exception cref="InsufficientDeviceMemoryException">Some device cannot hold its weights, the arena, the reserve and the cache of one full-length request.</exception>
    /// <exception cref="ArgumentException">Bad options, no devices, or a share with negative bytes or layers.</exception>
    public static MemoryPlan Plan(ModelConfig config, IReadOnlyList<DeviceShare> devices, MemoryPlanOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(devices);
        options ??= new MemoryPlanOptions();
        if (devices.Count == 0)
        {
            throw new ArgumentException("no devices", nameof(devices));
        }

        if (devices.Any(d => d.FreeBytes < 0 || d.WeightBytes < 0 || d.Layers < 0 || d.CacheLayers < 0))
        {
            throw new ArgumentOutOfRangeException(nameof(devices), "free bytes, weight bytes and layer counts must be >= 0");
        }

        options.Validate();
        var logitRows = checked(options.MaxBatch * (1 + options.DraftTokens));
        var tokens = Math.Max(options.MaxTokensPerStep, logitRows);
        var kvPerTokenLayer = KvBytesPerTokenPerLayer(config);
        var blockBytesPerLayer = kvPerTokenLayer * KvBlockManager.BlockTokens;
        var blocksPerRequest = KvBlockManager.BlocksFor(options.MaxSequenceLength);

        var partial = new (long Arena, long Reserve)[devices.Count];
        var shortfalls = new List<DeviceMemoryShortfall>();
        var blocks = long.MaxValue;
        for (var d = 0; d < devices.Count; d++)
        {
            var share = devices[d];
            var arena = ActivationArenaBytes(config, tokens, share.ComputesLogits ? logitRows : 0, logitRows, options.AttentionSplits);
            var reserve = options.ReserveOf(share.FreeBytes);
            var perBlock = blockBytesPerLayer * share.CacheLayers;
            var minKv = perBlock * blocksPerRequest;
            var left = share.FreeBytes - share.WeightBytes - arena - reserve;
            if (left < minKv)
            {
                shortfalls.Add(new DeviceMemoryShortfall(d, share.WeightBytes + arena + reserve + minKv, share.FreeBytes, share.WeightBytes, arena, minKv, reserve));
            }
            else if (perBlock > 0)
            {
                blocks = Math.Min(blocks, left / perBlock);
            }

            partial[d] = (arena, reserve);
        }

        if (shortfalls.Count > 0)
        {
            throw new InsufficientDeviceMemoryException(shortfalls);
        }

        // The block table is int32 and one pool index addresses a block on every device.
        var kvBlocks = (int)Math.Min(blocks, int.MaxValue);
        var plans = devices.Select((s, d) => new DeviceMemoryPlan(d, s.FirstLayer, s.Layers, s.CacheLayers, s.FreeBytes, s.WeightBytes, partial[d].Arena,
            partial[d].Reserve, blockBytesPerLayer * s.CacheLayers * kvBlocks)).ToArray();
        return new MemoryPlan(plans, tokens, logitRows, kvPerTokenLayer, kvBlocks, blocksPerRequest);
    }

    /// <summary>Latent cache bytes per token per layer: kv_lora_rank normalized latent plus qk_rope_head_dim rotated key, BF16.</summary>
    public static long KvBytesPerTokenPerLayer(ModelConfig config) => (long)config.KvCacheDim * CheckpointStats.KvCacheElementBytes;

    /// <summary>
    /// Activation bytes per token row of one layer's forward, at its peak (layers run one after another, so
    /// their transient buffers are reused; the FFN counts the larger of the dense MLP and the MoE):
    /// <code>
    ///   residual h fp32 4D + two normed ping-pong bf16 2·2D + o_proj out bf16 2D + post-attn normed bf16 2D + FFN out fp32 4D
    /// + MLA: c_q bf16 2·q_lora + q bf16 2·H·(nope+rope) + kv_a out bf16 2·(kv_lora+rope) + absorbed q fp32 4·H·(kv_lora+rope)
    ///        + latent attention out fp32 4·H·kv_lora + attention out bf16 2·H·v
    /// + max(dense: gate, up bf16 2·2·I;
    ///       MoE: scores fp32 4E + top-k ids and weights 8k + per routed copy k·(permuted x bf16 2D + gate, up bf16 2·2·I_moe + out fp32 4D)
    ///            + shared gate, up bf16 2·2·I_shared)
    /// + FP8 activation quantization of the widest GEMM input W = max(D, q_lora, kv_lora, H·v, I): (1 + k)·(W + 4·⌈W/128⌉)
    /// </code>
    /// </summary>
    public static long ActivationBytesPerToken(ModelConfig config)
    {
        long d = config.HiddenSize, h = config.NumAttentionHeads, k = config.NumExpertsPerTok;
        long qLora = config.QLoraRank ?? 0, kvLora = config.KvLoraRank, kvDim = config.KvCacheDim;
        var stream = 4 * d + 2 * 2 * d + 2 * d + 2 * d + 4 * d;
        var mla = 2 * qLora + 2 * h * config.QkHeadDim + 2 * kvDim + 4 * h * kvDim + 4 * h * kvLora + 2 * h * config.VHeadDim;
        var dense = 2 * 2 * (long)config.IntermediateSize;
        var moe = 4L * config.NRoutedExperts + 8 * k + k * (2 * d + 2 * 2 * (long)config.MoeIntermediateSize + 4 * d)
            + 2 * 2 * (long)config.SharedIntermediateSize;
        var anyMoe = Enumerable.Range(0, config.NumHiddenLayers).Any(config.IsMoeLayer);
        var anyDense = Enumerable.Range(0, config.NumHiddenLayers).Any(i => !config.IsMoeLayer(i));
        var ffn = Math.Max(anyDense ? dense : 0, anyMoe ? moe : 0);
        long widest = new[] { d, qLora, kvLora, h * config.VHeadDim, config.IntermediateSize }.Max();
        var quant = (1 + (anyMoe ? k : 0)) * (widest + 4 * CheckpointLayout.CeilDiv((int)widest, 128));
        return stream + mla + ffn + quant;
    }

    /// <summary>
    /// The activation arena of one device: <c>tokens·ActivationBytesPerToken + logitRows·V·4·2</c> (the fp32
    /// logits of a step's rows and, apart, of its MTP drafts) <c>+ decodeRows·H·splits·(kv_lora + 2)·4</c> (split-KV partial
    /// outputs with their max and sum), rounded up to 2 MiB.
    /// </summary>
    /// <param name="config">The model.</param>
    /// <param name="tokens">Token rows of the largest step.</param>
    /// <param name="logitRows">Rows of logits computed on this device (0 where lm_head does not run).</param>
    /// <param name="decodeRows">Query rows of a decode step (requests × (1 + draft tokens)).</param>
    /// <param name="attentionSplits">Split-KV partitions.</param>
    public static long ActivationArenaBytes(ModelConfig config, int tokens, int logitRows, int decodeRows, int attentionSplits)
    {
        ArgumentNullException.ThrowIfNull(config);
        var bytes = tokens * ActivationBytesPerToken(config)
            + (long)logitRows * config.VocabSize * 4 * 2
            + (long)decodeRows * config.NumAttentionHeads * attentionSplits * (config.KvLoraRank + 2) * 4;
        const long granule = 2L << 20;
        return (bytes + granule - 1) / granule * granule;
    }

    internal static string Format(long bytes) => string.Create(CultureInfo.InvariantCulture, $"{bytes / 1e9:F2} GB");
}
