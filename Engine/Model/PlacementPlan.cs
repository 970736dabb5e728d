using DeepSeekCuda.Loader;

namespace DeepSeekCuda.Model;

/// <summary>How a model is split across devices.</summary>
public enum PlacementKind
{
    /// <summary>
    /// Contiguous layer ranges per device, balanced by bytes; the embedding on the first, the final norm and
    /// lm_head on the last. The hidden state crosses each stage boundary once per forward pass.
    /// </summary>
    Pipeline,

    /// <summary>
    /// Every layer on every device: attention heads and the dense/shared MLP columns split (tensor
    /// parallel), routed experts split (expert parallel), an all-reduce after o_proj and after the FFN.
    /// </summary>
    TensorExpertParallel,
}

/// <summary>Which device holds routed expert e under <see cref="PlacementKind.TensorExpertParallel"/>.</summary>
public enum ExpertAssignment
{
    /// <summary>Expert e on device e mod N: each expert group spreads over all devices, so group-limited routing loads them evenly.</summary>
    RoundRobin,

    /// <summary>Contiguous ranges: experts [d·E/N, (d+1)·E/N) on device d.</summary>
    Contiguous,
}

/// <summary>One checkpoint tensor (or a slice of it) placed on one device.</summary>
/// <param name="Tensor">Checkpoint tensor name (<see cref="CheckpointLayout"/>).</param>
/// <param name="Device">Device index.</param>
/// <param name="Slice">The rectangle of a 2-D tensor the device holds; null for the whole tensor.</param>
/// <param name="Bytes">Stored bytes of what the device holds (checkpoint dtype).</param>
public sealed record TensorPlacement(string Tensor, int Device, TensorSlice? Slice, long Bytes);

/// <summary>Which weight of a device an upload of a planned load fills (<see cref="PlannedUpload"/>).</summary>
internal enum UploadKind
{
    /// <summary>The embedding table, on the devices that run the first layer (every device under tensor/expert parallelism).</summary>
    Embedding,

    /// <summary>A copy of the embedding on a pipeline's last device for the MTP layer, which embeds too (when that device is not the first).</summary>
    MtpEmbedding,

    /// <summary>The final norm.</summary>
    FinalNorm,

    /// <summary>lm_head, or the embedding as a tied head: a second copy of the table (the backends hold the embedding and the head apart).</summary>
    Head,

    /// <summary>Main decoder layer <see cref="PlannedUpload.Layer"/>, whole or the device's shard.</summary>
    Layer,

    /// <summary>
    /// On a pipeline stage but the last, the next stage's first input_layernorm (layer <see cref="PlannedUpload.Layer"/>'s),
    /// which the stage's last fused residual step computes.
    /// </summary>
    NextStageNorm,

    /// <summary>
    /// The MTP layer <see cref="PlannedUpload.Layer"/>, whole or the device's shard, with its input side (enorm, hnorm, eh_proj)
    /// where <see cref="PlannedUpload.MtpInput"/>.
    /// </summary>
    Mtp,
}

/// <summary>
/// One upload of a planned load: a weight of one device (<see cref="Kind"/>) and the placements it reads. The plan is made of
/// these, so the load uploads what the plan counts and nothing else, and its progress counts each placement once.
/// </summary>
internal sealed class PlannedUpload(int device, UploadKind kind, int layer = -1, bool mtpInput = false)
{
    private readonly List<TensorPlacement> _placements = [];

    public int Device { get; } = device;

    public UploadKind Kind { get; } = kind;

    /// <summary>
    /// The layer of a <see cref="UploadKind.Layer"/>, <see cref="UploadKind.NextStageNorm"/> or <see cref="UploadKind.Mtp"/>
    /// upload; −1 otherwise.
    /// </summary>
    public int Layer { get; } = layer;

    /// <summary>Whether an <see cref="UploadKind.Mtp"/> upload includes the layer's input side (on the head device alone).</summary>
    public bool MtpInput { get; } = mtpInput;

    /// <summary>The tensors (or slices) it reads, in placement order.</summary>
    public IReadOnlyList<TensorPlacement> Placements => _placements;

    /// <summary>Stored bytes of what it puts on the device.</summary>
    public long Bytes => _placements.Sum(p => p.Bytes);

    /// <summary>Whether it exists only for the MTP module (skipped by a load that does not load it).</summary>
    public bool ForMtp => Kind is UploadKind.Mtp or UploadKind.MtpEmbedding;

    internal void Add(TensorPlacement placement) => _placements.Add(placement);
}

/// <summary>A plan that cannot work for the model and device count (the message names the numbers).</summary>
public sealed class PlacementException(string message) : InvalidOperationException(message);

/// <summary>
/// Which device gets which checkpoint tensor, or which slice of it. Pure: computed from the config and
/// the device count, no I/O. Choices (see DESIGN.md "Several GPUs"):
/// <list type="bullet">
/// <item>Tensor/expert parallel: heads are split contiguously (H mod N must be 0); each device holds its
/// heads' rows of q_b and kv_b and columns of o_proj, and the <b>whole</b> latent cache: MLA's latent
/// (kv_lora_rank + rope per token) is shared by all heads, so every device computes the replicated
/// q_a/kv_a projections and appends the same latent; the cache is small (576 values per token per layer)
/// and splitting it would cost a collective inside attention. Routed experts are split by
/// <see cref="ExpertAssignment"/>; the dense MLP and the shared experts are split by hidden columns
/// (gate/up rows, down columns, ragged when N does not divide the width), so their outputs are partial
/// sums completed by the same all-reduce as the routed experts'. Norms, q_a, kv_a, the router and the
/// embedding are replicated; lm_head lives on device 0 (every device has the same hidden state after the
/// last all-reduce).</item>
/// <item>A head tied to the embedding is placed as a second copy of the embedding where lm_head would go: the backends
/// hold the table and the head apart (<c>UploadEmbedding</c>, <c>UploadHead</c>), so <see cref="BytesOn"/> counts what a
/// device holds.</item>
/// <item>Pipeline: each device holds whole layers; a stage also holds the next stage's first
/// input_layernorm (it computes that norm in its last fused residual step).</item>
/// <item>MTP: the first MTP layer (V3/R1 ship one; one draft token is what the engine uses), placed only when asked,
/// where the last main layer runs, as a main layer is: whole on a pipeline's last stage, which then also holds the main
/// embedding (the MTP layer embeds the token after each position); sharded over every device under tensor/expert parallelism, so that no device holds the whole layer (about 11.5 GB for DeepSeek-V3)
/// and the shared latent pool is not sized by one device's extra bytes. Its input side (enorm, hnorm, eh_proj) is on the
/// head device alone, which embeds with its replica of the embedding and broadcasts the layer's input to the others (one
/// all-reduce in which they add zeros). Its own copies of the embedding and head are never loaded (the main ones serve,
/// README_WEIGHTS: shared parameters).</item>
/// </list>
/// </summary>
public sealed class PlacementPlan
{
    private readonly LayerShard?[] _shards;
    private readonly List<TensorPlacement>[] _byDevice;

    private PlacementPlan(ModelConfig config, PlacementKind kind, int devices, bool includeMtp, (int Start, int Count)[] stages,
        LayerShard?[] shards, List<PlannedUpload> uploads, Dictionary<string, string> skipped)
    {
        var placements = uploads.SelectMany(u => u.Placements).ToList();
        Config = config;
        Kind = kind;
        DeviceCount = devices;
        IncludesMtp = includeMtp;
        Stages = stages;
        _shards = shards;
        Placements = placements;
        Uploads = uploads;
        Skipped = skipped;
        _byDevice = [.. Enumerable.Range(0, devices).Select(d => placements.Where(p => p.Device == d).ToList())];
    }

    /// <summary>The model config.</summary>
    public ModelConfig Config { get; }

    /// <summary>Pipeline or tensor/expert parallel.</summary>
    public PlacementKind Kind { get; }

    /// <summary>Devices N.</summary>
    public int DeviceCount { get; }

    /// <summary>Whether the MTP layer is placed (asked for, and the model has one).</summary>
    public bool IncludesMtp { get; }

    /// <summary>Main layers each device runs (start, count): disjoint ranges for a pipeline, all layers on every device otherwise.</summary>
    public IReadOnlyList<(int Start, int Count)> Stages { get; }

    /// <summary>Every placement, in layer order.</summary>
    public IReadOnlyList<TensorPlacement> Placements { get; }

    /// <summary>
    /// What a load uploads, one weight of one device each, in layer order: every placement is in exactly one
    /// (<see cref="PlannedLoad"/> uploads these and nothing else).
    /// </summary>
    internal IReadOnlyList<PlannedUpload> Uploads { get; }

    /// <summary>Checkpoint tensors placed nowhere, with the reason.</summary>
    public IReadOnlyDictionary<string, string> Skipped { get; }

    /// <summary>The device that holds lm_head and produces logits, and the MTP layer's input side when it is placed.</summary>
    public int HeadDevice => Kind == PlacementKind.Pipeline ? DeviceCount - 1 : 0;

    /// <summary>
    /// The devices that hold (a shard of) the MTP layer and its latent cache: the head device of a pipeline, every device
    /// under tensor/expert parallelism; none when it is not placed.
    /// </summary>
    public IReadOnlyList<int> MtpDevices => !IncludesMtp ? [] : Kind == PlacementKind.Pipeline ? [HeadDevice] : [.. Enumerable.Range(0, DeviceCount)];

    /// <summary>The part of every layer <paramref name="device"/> holds under tensor/expert parallelism; null for a pipeline (whole layers).</summary>
    public LayerShard? Shard(int device) => _shards[device];

    /// <summary>What <paramref name="device"/> holds.</summary>
    public IReadOnlyList<TensorPlacement> On(int device) => _byDevice[device];

    /// <summary>Stored bytes placed on <paramref name="device"/> (weights only; the KV cache and activations come on top).</summary>
    public long BytesOn(int device) => _byDevice[device].Sum(p => p.Bytes);

    /// <summary>
    /// The placements grouped by the shard file that holds each tensor, in the checkpoint's shard order, and
    /// within a shard in file order (by the tensor's first byte, then by device): a loader that walks this
    /// reads each shard once, front to back, and fans each tensor out to its devices while its bytes are hot.
    /// </summary>
    public IReadOnlyList<(string Shard, IReadOnlyList<TensorPlacement> Placements)> LoadOrder(Checkpoint checkpoint)
    {
        ArgumentNullException.ThrowIfNull(checkpoint);
        var order = checkpoint.ShardFiles.Select((f, i) => (f, i)).ToDictionary(x => x.f, x => x.i);
        return
        [
            .. Placements.GroupBy(p => checkpoint.Get(p.Tensor).FilePath)
                .OrderBy(g => order.GetValueOrDefault(g.Key, int.MaxValue))
                .Select(g => (g.Key, (IReadOnlyList<TensorPlacement>)[.. g.OrderBy(p => checkpoint.Get(p.Tensor).Begin).ThenBy(p => p.Device)])),
        ];
    }

    /// <summary>
    /// The planner: one device runs the whole model; otherwise tensor/expert parallel when the heads
    /// divide and it fits (it is what makes several GPUs decode faster), else a pipeline when that fits.
    /// </summary>
    /// <param name="config">The model.</param>
    /// <param name="devices">Devices N (1..8 on one server; any positive count is planned).</param>
    /// <param name="deviceMemoryBytes">Memory of each device.</param>
    /// <param name="weightFraction">Share of each device's memory the weights may take (the rest: KV cache, activations, workspace).</param>
    /// <param name="includeMtp">Place the MTP layer too (where the last layer runs; see the class remarks).</param>
    /// <exception cref="PlacementException">No plan fits; the message gives the bytes per device each plan needs.</exception>
    public static PlacementPlan Choose(ModelConfig config, int devices, long deviceMemoryBytes, double weightFraction = 0.9, bool includeMtp = false)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentOutOfRangeException.ThrowIfLessThan(devices, 1);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(deviceMemoryBytes);
        if (weightFraction is <= 0 or > 1)
        {
            throw new ArgumentOutOfRangeException(nameof(weightFraction), weightFraction, "must be in (0, 1]");
        }

        var budget = (long)(deviceMemoryBytes * weightFraction);
        var reasons = new List<string>();
        return (devices > 1 ? Fits("tensor/expert parallel", () => TensorExpertParallel(config, devices, includeMtp: includeMtp)) : null)
               ?? Fits("pipeline", () => Pipeline(config, devices, includeMtp))
               ?? throw new PlacementException(
                   $"no placement of the model on {devices} device(s) of {deviceMemoryBytes} bytes fits in the weight budget of {budget} bytes ({weightFraction:P0}): {string.Join("; ", reasons)}");

        // The plan when its largest device fits the budget; else null, with why in reasons.
        PlacementPlan? Fits(string kind, Func<PlacementPlan> make)
        {
            try
            {
                var candidate = make();
                var need = Enumerable.Range(0, devices).Max(candidate.BytesOn);
                if (need <= budget)
                {
                    return candidate;
                }

                reasons.Add($"{kind} needs {need} bytes on a device");
            }
            catch (PlacementException e)
            {
                reasons.Add($"{kind}: {e.Message}");
            }

            return null;
        }
    }

    /// <summary>
    /// A pipeline: contiguous layer ranges balanced by stored bytes (the embedding counts with the first layer; the final
    /// norm and lm_head, and with <paramref name="includeMtp"/> the MTP layer and its embedding, with the last).
    /// </summary>
    /// <exception cref="PlacementException">Fewer main layers than devices.</exception>
    public static PlacementPlan Pipeline(ModelConfig config, int devices, bool includeMtp = false)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentOutOfRangeException.ThrowIfLessThan(devices, 1);
        var layers = config.NumHiddenLayers;
        if (layers < devices)
        {
            throw new PlacementException($"a pipeline over {devices} devices needs at least {devices} layers; the model has {layers}");
        }

        var b = new Builder(config, includeMtp);
        var weight = new long[layers];
        foreach (var t in b.Expected.Values.Where(t => t.Layer >= 0 && t.Layer < layers))
        {
            weight[t.Layer] += Builder.StoredBytes(t);
        }

        var embedding = Builder.StoredBytes(b.Expected[CheckpointLayout.Embedding]);
        // The MTP layer embeds on the last device too: a second copy of the embedding unless that device is the first.
        var mtpEmbedding = b.Mtp && devices > 1;
        weight[0] += embedding;
        // A tied head is a second copy of the table on the last device (the backends hold the embedding and the head apart).
        weight[layers - 1] += Builder.StoredBytes(b.Expected[CheckpointLayout.FinalNorm])
                              + (config.TieWordEmbeddings ? embedding : Builder.StoredBytes(b.Expected[CheckpointLayout.LmHead]))
                              + (b.Mtp ? b.MtpBytes() : 0) + (mtpEmbedding ? embedding : 0);
        var stages = Partition(weight, devices);

        var last = devices - 1;
        b.Whole(b.Upload(0, UploadKind.Embedding), CheckpointLayout.Embedding);
        for (var d = 0; d < devices; d++)
        {
            var (start, count) = stages[d];
            for (var i = start; i < start + count; i++)
            {
                b.WholeLayer(b.Upload(d, UploadKind.Layer, i));
            }

            if (d < last)
            {
                // The stage's last fused residual step computes the next stage's first input norm.
                var next = start + count;
                b.Whole(b.Upload(d, UploadKind.NextStageNorm, next), CheckpointLayout.Layer(config, next).InputNorm);
            }
        }

        b.Whole(b.Upload(last, UploadKind.FinalNorm), CheckpointLayout.FinalNorm);
        b.Whole(b.Upload(last, UploadKind.Head), config.TieWordEmbeddings ? CheckpointLayout.Embedding : CheckpointLayout.LmHead);

        if (b.Mtp)
        {
            b.WholeLayer(b.Upload(last, UploadKind.Mtp, b.MtpLayer, mtpInput: true));
            if (mtpEmbedding)
            {
                b.Whole(b.Upload(last, UploadKind.MtpEmbedding), CheckpointLayout.Embedding);
            }
        }

        return b.Build(PlacementKind.Pipeline, devices, stages, new LayerShard?[devices]);
    }

    /// <summary>Tensor parallel attention and dense/shared MLP with expert parallel MoE (see the class remarks).</summary>
    /// <exception cref="PlacementException">The heads do not divide by N, or there are fewer experts or MLP columns than devices.</exception>
    public static PlacementPlan TensorExpertParallel(ModelConfig config, int devices, ExpertAssignment experts = ExpertAssignment.RoundRobin,
        bool includeMtp = false)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentOutOfRangeException.ThrowIfLessThan(devices, 1);
        var heads = config.NumAttentionHeads;
        if (heads % devices != 0)
        {
            throw new PlacementException($"{heads} attention heads do not divide across {devices} devices (tensor parallel attention splits heads evenly)");
        }

        // The layers sharded: the main ones, and the (first) MTP layer when it is placed.
        var sharded = Enumerable.Range(0, config.NumHiddenLayers + (includeMtp && config.NumNextNPredictLayers > 0 ? 1 : 0)).ToArray();
        var moe = sharded.Any(config.IsMoeLayer);
        if (moe && config.NRoutedExperts < devices)
        {
            throw new PlacementException($"{config.NRoutedExperts} routed experts cannot be spread over {devices} devices (expert parallelism needs at least one per device)");
        }

        var dense = sharded.Any(i => !config.IsMoeLayer(i));
        if (dense && config.IntermediateSize < devices)
        {
            throw new PlacementException($"the dense MLP's {config.IntermediateSize} columns cannot be split over {devices} devices");
        }

        if (moe && config.NSharedExperts > 0 && config.SharedIntermediateSize < devices)
        {
            throw new PlacementException($"the shared experts' {config.SharedIntermediateSize} columns cannot be split over {devices} devices");
        }

        var shards = new LayerShard?[devices];
        for (var d = 0; d < devices; d++)
        {
            var held = Enumerable.Range(0, config.NRoutedExperts).Where(e => experts == ExpertAssignment.RoundRobin
                ? e % devices == d
                : Split(config.NRoutedExperts, devices, d) is var r && e >= r.Start && e < r.Start + r.Count).ToArray();
            shards[d] = new LayerShard(d * heads / devices, heads / devices, held, Split(config.IntermediateSize, devices, d),
                config.NSharedExperts > 0 ? Split(config.SharedIntermediateSize, devices, d) : (0, 0));
        }

        var b = new Builder(config, includeMtp);
        for (var d = 0; d < devices; d++)
        {
            b.Whole(b.Upload(d, UploadKind.Embedding), CheckpointLayout.Embedding);
            b.Whole(b.Upload(d, UploadKind.FinalNorm), CheckpointLayout.FinalNorm);
            for (var i = 0; i < config.NumHiddenLayers; i++)
            {
                b.ShardedLayer(b.Upload(d, UploadKind.Layer, i), shards[d]!);
            }
        }

        if (b.Mtp)
        {
            // Sharded as the main layers, the input side on the head device (see the class remarks).
            for (var d = 0; d < devices; d++)
            {
                b.ShardedLayer(b.Upload(d, UploadKind.Mtp, b.MtpLayer, mtpInput: d == 0), shards[d]!);
            }
        }

        // lm_head on device 0; a tied head is a second copy of the table there, as on a pipeline's last device.
        b.Whole(b.Upload(0, UploadKind.Head), config.TieWordEmbeddings ? CheckpointLayout.Embedding : CheckpointLayout.LmHead);
        var all = Enumerable.Repeat((0, config.NumHiddenLayers), devices).ToArray();
        return b.Build(PlacementKind.TensorExpertParallel, devices, all, shards);
    }

    /// <summary>Part <paramref name="index"/> of <paramref name="count"/> items split into <paramref name="parts"/> ragged ranges (sizes differ by at most one).</summary>
    internal static (int Start, int Count) Split(int count, int parts, int index)
    {
        var start = (int)((long)count * index / parts);
        var end = (int)((long)count * (index + 1) / parts);
        return (start, end - start);
    }

    /// <summary>Contiguous ranges of <paramref name="weight"/> into exactly <paramref name="parts"/> non-empty parts minimizing the largest sum.</summary>
    internal static (int Start, int Count)[] Partition(IReadOnlyList<long> weight, int parts)
    {
        long lo = weight.Max(), hi = weight.Sum();
        while (lo < hi)
        {
            var mid = lo + (hi - lo) / 2;
            if (Cut(weight, parts, mid).Count <= parts)
            {
                hi = mid;
            }
            else
            {
                lo = mid + 1;
            }
        }

        var ranges = Cut(weight, parts, lo);
        if (ranges.Count != parts)
        {
            throw new InvalidOperationException($"partition produced {ranges.Count} parts for {parts}");
        }

        return [.. ranges];
    }

    /// <summary>Greedy cuts under <paramref name="capacity"/>, also cutting whenever the items left only just cover the parts left.</summary>
    private static List<(int Start, int Count)> Cut(IReadOnlyList<long> weight, int parts, long capacity)
    {
        var ranges = new List<(int Start, int Count)>();
        int start = 0;
        long sum = 0;
        for (var i = 0; i < weight.Count; i++)
        {
            // Items i.. must still fill the parts after the current one.
            var mustCut = weight.Count - i <= parts - ranges.Count - 1;
            if (i > start && (sum + weight[i] > capacity || mustCut))
            {
                ranges.Add((start, i - start));
                start = i;
                sum = 0;
            }

            sum += weight[i];
        }

        ranges.Add((start, weight.Count - start));
        return ranges;
    }

    /// <summary>Accumulates placements and checks every tensor against the checkpoint's expected list.</summary>
    private sealed class Builder
    {
        private readonly ModelConfig _c;
        private readonly List<PlannedUpload> _uploads = [];

        public Builder(ModelConfig config, bool includeMtp)
        {
            _c = config;
            Mtp = includeMtp && config.NumNextNPredictLayers > 0;
            Expected = CheckpointLayout.Expected(config).ToDictionary(t => t.Name);
        }

        public Dictionary<string, ExpectedTensor> Expected { get; }

        /// <summary>Whether the MTP layer is placed: asked for, and the model has one.</summary>
        public bool Mtp { get; }

        public static long StoredBytes(ExpectedTensor t) => t.Shape.Aggregate(1L, (a, s) => a * s) * DTypes.SizeOf(t.DType);

        /// <summary>
        /// The MTP layer placed: the first (V3/R1 ship one; the engine drafts one token, with it). Any later one is skipped.
        /// </summary>
        public int MtpLayer => _c.NumHiddenLayers;

        public long MtpBytes() => LayerTensors(MtpLayer).Sum(n => StoredBytes(Expected[n]));

        /// <summary>Starts upload <paramref name="kind"/> on <paramref name="device"/>; what is placed into it next is what it reads.</summary>
        public PlannedUpload Upload(int device, UploadKind kind, int layer = -1, bool mtpInput = false)
        {
            var upload = new PlannedUpload(device, kind, layer, mtpInput);
            _uploads.Add(upload);
            return upload;
        }

        /// <summary>
        /// The tensors stored under layer <paramref name="layer"/>'s prefix that a device holding it places: of an MTP layer, all
        /// but its copies of the embedding and head, and its input side (enorm, hnorm, eh_proj) only with <paramref name="mtpInput"/>.
        /// </summary>
        private IEnumerable<string> LayerTensors(int layer, bool mtpInput = true)
        {
            var n = CheckpointLayout.Layer(_c, layer);
            string[] left = !n.IsMtp ? [] : mtpInput ? [n.MtpEmbedding, n.MtpHead] : [n.MtpEmbedding, n.MtpHead, n.MtpEnorm, n.MtpHnorm, n.MtpEhProj];
            return Expected.Values.Where(t => t.Layer == layer && !left.Contains(t.Name)).Select(t => t.Name);
        }

        public void Whole(PlannedUpload upload, string name) => upload.Add(new TensorPlacement(name, upload.Device, null, StoredBytes(Expected[name])));

        /// <summary>Every tensor of the upload's layer that a device holding it places.</summary>
        public void WholeLayer(PlannedUpload upload)
        {
            foreach (var name in LayerTensors(upload.Layer, upload.MtpInput))
            {
                Whole(upload, name);
            }
        }

        /// <summary>
        /// <paramref name="shard"/>'s part of the upload's layer, the rest replicated; of an MTP layer, its input side (enorm,
        /// hnorm, eh_proj) only where the upload has it.
        /// </summary>
        public void ShardedLayer(PlannedUpload upload, LayerShard shard)
        {
            var layer = upload.Layer;
            var n = CheckpointLayout.Layer(_c, layer);
            var sliced = new List<LinearSpec>();
            var (qb, kvb, o) = shard.Attention(_c, n);
            sliced.AddRange([qb, kvb, o]);
            if (n.IsMoe)
            {
                foreach (var e in shard.Experts)
                {
                    foreach (var spec in n.Expert(e))
                    {
                        Linear(upload, spec);
                    }
                }

                if (_c.NSharedExperts > 0)
                {
                    sliced.AddRange(LayerShard.SliceMlp(n.SharedExpert, shard.Shared));
                }
            }
            else
            {
                sliced.AddRange(LayerShard.SliceMlp(n.DenseMlp, shard.Dense));
            }

            foreach (var spec in sliced)
            {
                Linear(upload, spec);
            }

            // Replicated: everything the device places of the layer that is neither sliced nor a routed expert.
            var taken = new HashSet<string>(sliced.SelectMany(s => new[] { s.Weight, s.Scale }));
            var expertPrefix = CheckpointLayout.LayerPrefix(layer) + "mlp.experts.";
            foreach (var name in LayerTensors(layer, upload.MtpInput))
            {
                if (taken.Contains(name) || name.StartsWith(expertPrefix, StringComparison.Ordinal))
                {
                    continue;
                }

                Whole(upload, name);
            }
        }

        /// <summary>A linear weight (whole or slice) and, when FP8, the block rows/columns of its scale grid that cover the slice.</summary>
        private void Linear(PlannedUpload upload, LinearSpec spec)
        {
            var device = upload.Device;
            var w = Expected[spec.Weight];
            var s = spec.Slice;
            var size = DTypes.SizeOf(w.DType);
            upload.Add(new TensorPlacement(spec.Weight, device, s is { IsWhole: false } ? s : null, (long)spec.Out * spec.In * size));
            if (Expected.TryGetValue(spec.Scale, out var scale) && _c.Quantization is { } q)
            {
                if (s is null or { IsWhole: true })
                {
                    Whole(upload, spec.Scale);
                    return;
                }

                int r0 = s.RowStart / q.BlockRows, r1 = CheckpointLayout.CeilDiv(s.RowStart + s.Rows, q.BlockRows);
                int c0 = s.ColStart / q.BlockCols, c1 = CheckpointLayout.CeilDiv(s.ColStart + s.Cols, q.BlockCols);
                var grid = new TensorSlice((int)scale.Shape[0], (int)scale.Shape[1], r0, r1 - r0, c0, c1 - c0);
                upload.Add(new TensorPlacement(spec.Scale, device, grid.IsWhole ? null : grid, (long)grid.Rows * grid.Cols * DTypes.SizeOf(scale.DType)));
            }
        }

        public PlacementPlan Build(PlacementKind kind, int devices, (int Start, int Count)[] stages, LayerShard?[] shards)
        {
            var placed = _uploads.SelectMany(u => u.Placements).Select(p => p.Tensor).ToHashSet();
            var skipped = new Dictionary<string, string>();
            foreach (var name in Expected.Keys.Where(n => !placed.Contains(n)))
            {
                var t = Expected[name];
                skipped[name] = t.Layer < _c.NumHiddenLayers ? throw new InvalidOperationException($"placement plan left '{name}' on no device")
                    : !Mtp ? "MTP layer not placed"
                    : t.Layer > MtpLayer ? "MTP layer after the first (the engine drafts one token, with the first)"
                    : "MTP copy of the main embedding/head (the main one serves)";
            }

            return new PlacementPlan(_c, kind, devices, Mtp, stages, shards, _uploads, skipped);
        }
    }
}
