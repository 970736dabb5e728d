using System.Globalization;
using DeepSeekCuda.Loader;

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

    /// <summary>Place the MTP layer (weights and its own latent cache) on the last device.</summary>
    public bool IncludeMtp { get; init; }

    /// <summary>
    /// Split-KV partitions the decode attention may use per (request, head); each keeps an fp32 partial
    /// output and its log-sum-exp until the combine kernel. The MLA decode launcher owns the real number.
    /// </summary>
    public int AttentionSplits { get; init; } = 16;

    /// <summary>Fraction of each device's free bytes left untouched (allocator fragmentation, cuBLAS/graph workspaces, driver growth).</summary>
    public double ReserveFraction { get; init; } = 0.05;

    /// <summary>Lower bound of the reserve in bytes.</summary>
    public long MinReserveBytes { get; init; } = 512L << 20;

    /// <summary>Main layers per device, in order (pipeline placement); null: as even as possible, earlier devices taking the remainder.</summary>
    public IReadOnlyList<int>? LayersPerDevice { get; init; }

    internal void Validate(int layers, int devices)
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
        if (LayersPerDevice is { } split && (split.Count != devices || split.Any(n => n < 1) || split.Sum() != layers))
        {
            throw new ArgumentException(
                $"LayersPerDevice [{string.Join(", ", split)}] must give each of the {devices} devices at least one layer and sum to {layers}",
                nameof(LayersPerDevice));
        }
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

/// <summary>The outcome of <see cref="MemoryPlanner.Plan(ModelConfig, IReadOnlyList{long}, MemoryPlanOptions?)"/>.</summary>
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

    /// <summary>The devices that fall short.</summary>
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
/// weights by pipeline placement, the activation arena for the worst step, a safety reserve, and the
/// paged latent cache from what is left, as whole blocks every device can hold.
/// </summary>
public static class MemoryPlanner
{
    /// <summary>
    /// Plans <paramref name="config"/> over devices with <paramref name="freeBytes"/> free each (main layers
    /// split in order; the embedding on the first device; final norm, lm_head and the MTP layer on the last).
    /// </summary>
    /// <exception cref="InsufficientDeviceMemoryException">Some device cannot hold its weights, the arena, the reserve and the cache of one full-length request.</exception>
    /// <exception cref="ArgumentException">Bad options, no devices, or more devices than layers.</exception>
    public static MemoryPlan Plan(ModelConfig config, IReadOnlyList<long> freeBytes, MemoryPlanOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(freeBytes);
        options ??= new MemoryPlanOptions();
        var devices = freeBytes.Count;
        if (devices == 0 || devices > config.NumHiddenLayers)
        {
            throw new ArgumentException($"need 1..{config.NumHiddenLayers} devices (one layer each at least), got {devices}", nameof(freeBytes));
        }

        if (freeBytes.Any(b => b < 0))
        {
            throw new ArgumentOutOfRangeException(nameof(freeBytes), "free bytes must be >= 0");
        }

        options.Validate(config.NumHiddenLayers, devices);
        var split = options.LayersPerDevice ?? EvenSplit(config.NumHiddenLayers, devices);
        var mtp = options.IncludeMtp && config.NumNextNPredictLayers > 0;
        var layerBytes = LayerWeightBytes(config, out var embedBytes, out var tailBytes);
        var shares = new DeviceShare[devices];
        var first = 0;
        for (var d = 0; d < devices; d++)
        {
            var last = d == devices - 1;
            long weights = 0;
            for (var i = first; i < first + split[d]; i++)
            {
                weights += layerBytes[i];
            }

            if (d == 0)
            {
                weights += embedBytes;
            }

            var cacheLayers = split[d];
            if (last)
            {
                // A tied head is the embedding table itself when one device holds both.
                weights += d == 0 && config.TieWordEmbeddings ? tailBytes - embedBytes : tailBytes;
                if (mtp)
                {
                    // The MTP layer, less its embedding/head copies; it embeds with the main table, a second copy past device 0.
                    weights += layerBytes[config.NumHiddenLayers] + (d > 0 ? embedBytes : 0);
                    cacheLayers++;
                }
            }

            shares[d] = new DeviceShare(freeBytes[d], weights, first, split[d], cacheLayers, ComputesLogits: last);
            first += split[d];
        }

        return PlanShares(config, shares, options);
    }

    /// <summary>
    /// Plans devices whose weights are already placed (any placement: a pipeline, or tensor/expert parallel shards that
    /// each hold every layer's latent cache): per device the activation arena, the reserve and the latent cache from what
    /// is left beside its <see cref="DeviceShare.WeightBytes"/>, as whole blocks every device can hold.
    /// <see cref="MemoryPlanOptions.LayersPerDevice"/> and <see cref="MemoryPlanOptions.IncludeMtp"/> are the shares' business and ignored here.
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

        (options with { LayersPerDevice = null }).Validate(config.NumHiddenLayers, devices.Count);
        return PlanShares(config, devices, options);
    }

    /// <summary>The plan over validated shares and options (both overloads' common part).</summary>
    private static MemoryPlan PlanShares(ModelConfig config, IReadOnlyList<DeviceShare> devices, MemoryPlanOptions options)
    {
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
            var reserve = Math.Max(options.MinReserveBytes, (long)(share.FreeBytes * options.ReserveFraction));
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

    /// <summary>Main layers per device, as even as possible; earlier devices take the remainder.</summary>
    public static int[] EvenSplit(int layers, int devices) =>
        [.. Enumerable.Range(0, devices).Select(d => layers / devices + (d < layers % devices ? 1 : 0))];

    /// <summary>
    /// Stored bytes of each stored layer (main then MTP; an MTP layer's embedding and head copies left out:
    /// the model uses the main ones), of the embedding, and of the final norm plus lm_head.
    /// </summary>
    internal static long[] LayerWeightBytes(ModelConfig config, out long embedBytes, out long tailBytes)
    {
        var layers = new long[config.StoredLayerCount];
        embedBytes = 0;
        tailBytes = 0;
        foreach (var t in CheckpointLayout.Expected(config))
        {
            var size = t.Shape.Aggregate(1L, (a, b) => a * b) * DTypes.SizeOf(t.DType);
            if (t.Layer < 0)
            {
                if (t.Name == CheckpointLayout.Embedding)
                {
                    embedBytes += size;
                    if (config.TieWordEmbeddings)
                    {
                        tailBytes += size; // the last device needs the table as its head too
                    }
                }
                else
                {
                    tailBytes += size;
                }

                continue;
            }

            var names = CheckpointLayout.Layer(config, t.Layer);
            if (names.IsMtp && (t.Name == names.MtpEmbedding || t.Name == names.MtpHead))
            {
                continue;
            }

            layers[t.Layer] += size;
        }

        return layers;
    }

    internal static string Format(long bytes) => string.Create(CultureInfo.InvariantCulture, $"{bytes / 1e9:F2} GB");
}
