using System.Diagnostics;
using System.Globalization;
using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cuda;
using DeepSeekCuda.Bench.Harness;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Numerics;
using DeepSeekCuda.Loader.Synthetic;
using DeepSeekCuda.Model;
using DeepSeekCuda.Serving;

namespace DeepSeekCuda.Bench.Benches;

/// <summary>
/// End to end on <see cref="CudaBackend"/> through <see cref="DeepSeekModel"/> and a <see cref="PagedStepRunner"/> (the
/// scheduler's runner, driven here without a scheduler): the <c>tiny</c> preset (random fill) and a full-width
/// DeepSeek-V3 slice (<see cref="ModelPresets.DeepSeekV3Slice"/>: layer 0 dense, the rest MoE; 2 layers by default,
/// <c>$DSCUDA_E2E_LAYERS</c> to change; activations in f32 storage, or in BF16 with <c>$DSCUDA_E2E_ACTIVATIONS=bf16</c>
/// (<see cref="CudaBackendOptions.Bf16Activations"/>; every row's shape says which); weights written with
/// <see cref="SyntheticFill.Pattern"/> into a folder under <c>$DSCUDA_E2E_DIR</c> or the current directory, deleted right
/// after loading; quick: 32 routed experts and a 16384-token vocabulary, about 2.5 GB instead of 16 GB). Per context
/// (1K and 16K; quick: 1K; clamped below the preset's max positions) one runner is attached whose latent pool (one per
/// layer) holds the largest batch that fits: B slots of context + 1 tokens in whole 64-token blocks
/// (<see cref="SlotCacheBytes"/>). A batch is skipped, with the reason printed, when its cache would take more than half
/// the free device memory, or when prefilling its slots, estimated as B times one slot's measured prefill, would take
/// more than 60 s (quick: 15 s) (<see cref="FitBatches"/>).
/// <list type="bullet">
/// <item><c>e2e_prefill</c>: prefill of the whole context into one empty slot (steps of at most 4096 tokens), host
/// wall time with the last logits downloaded; tflops from <see cref="StepCost.PrefillFlops"/>; baseline <c>floor</c> =
/// <see cref="StepCost.PrefillBytes"/> at the same-run copy bandwidth (prefill is compute-bound: expect a low ratio).</item>
/// <item><c>e2e_decode</c>: one batched step of B entries (batch 1, 8, 32, 128; quick: 1, 8), one token each at that
/// context and each entry's greedy token chosen on the device (only the ids come back, as under the scheduler), all B in
/// one <see cref="PagedStepRunner.ForwardAndChoose"/> (one token stream,
/// weights read once, attention per entry over its paged cache; shape <c>runner=paged</c> for every batch, 1
/// included); host wall time of the whole step, median of the runs, every slot rewound after each run
/// (<see cref="PagedStepRunner.Truncate"/>; its blocks stay reserved, so no table is copied) so each run is at the same
/// context. The slots a batch adds are first prefilled with the same prompt, packed into steps of at most 4096 tokens
/// (<see cref="PrefillSteps"/>). Baseline <c>floor</c> = <see cref="StepCost.DecodeBytes"/> at the same-run copy
/// bandwidth, so ratio = floor / measured.</item>
/// <item><c>e2e_decode_graph</c>: the same steps with the runner's decode graphs on (<c>PagedStepRunner.DecodeGraphs</c>: the
/// first step of the batch runs eagerly and is captured, the timed ones replay it after the rows' upload), against the
/// same floor; set against <c>e2e_decode</c> of the same shape it shows what graphs save of the host's launch time. A
/// failed capture is printed and ends the graph rows, not the bench.</item>
/// <item>host overhead at batch 1: the runner's batch-1 decode step re-run with <see cref="OpTimingBackend"/> recording, GPU time = sum of the
/// operations' event spans, host overhead = wall − GPU time, per layer; printed, not a row. A span counts the gaps
/// between the kernels of one operation as GPU time, so the overhead is a lower bound.</item>
/// <item><c>e2e_projection</c> (slice only, batch 1): <see cref="DecodeProjection.Project"/> of the per-layer times to
/// 61 layers (3 dense + 58 MoE) on 8 GPUs, all-reduce cost <c>$DSCUDA_E2E_ALLREDUCE_US</c> (default 20 µs); baseline
/// <c>floor</c> = the full model's <see cref="StepCost.DecodeBytes"/> / 8 at this GPU's copy bandwidth. Its
/// assumptions are printed.</item>
/// </list>
/// L2 is not flushed: a step reads gigabytes (slice) or is launch-bound (tiny).
/// </summary>
internal static class E2eBench
{
    private const int PrefillChunk = 4096;
    private const int QuickExperts = 32;
    private const int QuickVocab = 16384;

    /// <summary>The most prefill a context may take to set up its batches (estimated from one slot's).</summary>
    private const double PrefillBudgetSeconds = 60;

    private const double QuickPrefillBudgetSeconds = 15;

    /// <summary>Activations in BF16 storage (<c>$DSCUDA_E2E_ACTIVATIONS=bf16</c>) rather than f32.</summary>
    private static bool s_bf16Activations;

    /// <summary>Whether <c>$DSCUDA_E2E_ACTIVATIONS</c> asks for BF16 storage: f32 (or unset) or bf16, anything else refused by name.</summary>
    internal static bool Bf16Activations(string? setting) => setting switch
    {
        null or "" or "f32" => false,
        "bf16" => true,
        _ => throw new ArgumentException($"DSCUDA_E2E_ACTIVATIONS={setting}: expected f32 or bf16"),
    };

    public static void Run(GpuBench gpu, bool quick, BenchReport report)
    {
        var layers = Environment.GetEnvironmentVariable("DSCUDA_E2E_LAYERS") is { Length: > 0 } l ? int.Parse(l, CultureInfo.InvariantCulture) : 2;
        var allReduceUs = Environment.GetEnvironmentVariable("DSCUDA_E2E_ALLREDUCE_US") is { Length: > 0 } a ? double.Parse(a, CultureInfo.InvariantCulture) : 20;
        s_bf16Activations = Bf16Activations(Environment.GetEnvironmentVariable("DSCUDA_E2E_ACTIVATIONS"));
        int[] contexts = quick ? [1024] : [1024, 16384];
        int[] batches = quick ? [1, 8] : [1, 8, 32, 128];
        Console.WriteLine("note: decode at batch B is one batched, paged step of B sequences through PagedStepRunner (runner=paged); the slots are prefilled to the context first");
        // The slice first: it is the measurement that matters, and a failure stops the bench loudly either way.
        var slice = ModelPresets.DeepSeekV3Slice(layers);
        if (quick)
        {
            // Seconds, not a 16 GB write: 32 routed experts (a decode step at batch 1 still reads 8 of them and the
            // shared one, as the full model does) and a 16384-token vocabulary, about 2.5 GB at two layers.
            slice = (slice with { NRoutedExperts = QuickExperts, VocabSize = QuickVocab }).Validate();
        }

        RunModel(gpu, report, $"deepseek-v3-slice{layers}", slice, SyntheticFill.Pattern, contexts, batches, quick,
            new DeploymentPlan(AllReduceUs: allReduceUs));
        RunModel(gpu, report, "tiny", ModelPresets.Tiny, SyntheticFill.Random, contexts, batches, quick, null);
    }

    private static void RunModel(GpuBench gpu, BenchReport report, string name, ModelConfig config, SyntheticFill fill, int[] contexts, int[] batches,
        bool quick, DeploymentPlan? plan)
    {
        var usable = contexts.Select(c => Math.Min(c, config.MaxPositionEmbeddings - 1)).Distinct().ToArray();
        var capacity = Math.Min(usable.Max() + 1, config.MaxPositionEmbeddings);
        var root = Environment.GetEnvironmentVariable("DSCUDA_E2E_DIR") is { Length: > 0 } env ? env : Environment.CurrentDirectory;
        var dir = Path.Combine(root, ".e2e-bench-" + Guid.NewGuid().ToString("N")[..8]);
        OpTimingBackend? backend = null;
        DeepSeekModel? model = null;
        try
        {
            var clock = Stopwatch.StartNew();
            SyntheticCheckpoint.Write(dir, config, seed: 1, shards: fill == SyntheticFill.Pattern ? 4 : 1, fill: fill);
            var written = clock.Elapsed.TotalSeconds;
            clock.Restart();
            backend = new OpTimingBackend(new CudaBackend(new CudaBackendOptions { Device = gpu.Device.Ordinal, Bf16Activations = s_bf16Activations }));
            using (var checkpoint = Checkpoint.Open(dir))
            {
                model = DeepSeekModel.Load(checkpoint, backend, new ModelOptions { MaxSequenceLength = capacity, LoadMtp = false });
                Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                    $"{name}: {checkpoint.TotalTensorBytes / 1e9:F2} GB of weights ({fill} fill) written in {written:F1} s, loaded in {clock.Elapsed.TotalSeconds:F1} s"));
            }

            Directory.Delete(dir, recursive: true);
            var rng = Xoshiro256.ForStream(1, "e2e-tokens");
            foreach (var context in usable)
            {
                var prompt = Enumerable.Range(0, context).Select(_ => (int)(rng.NextUInt64() % (ulong)config.VocabSize)).ToArray();
                RunContext(gpu, report, name, config, backend, model, context, prompt, batches, quick, plan, rng);
            }
        }
        finally
        {
            model?.Dispose();
            backend?.Dispose();
            if (Directory.Exists(dir))
            {
                Directory.Delete(dir, recursive: true);
            }
        }
    }

    /// <summary>
    /// One context: a runner whose pool holds the largest batch that fits, the prefill row (slot 0), then per batch
    /// that fits the prefill budget the slots it adds prefilled together, and one decode step of every slot timed.
    /// </summary>
    private static void RunContext(GpuBench gpu, BenchReport report, string name, ModelConfig config, OpTimingBackend backend, DeepSeekModel model,
        int context, int[] prompt, int[] batches, bool quick, DeploymentPlan? plan, Xoshiro256 rng)
    {
        var slotBytes = SlotCacheBytes(config, context);
        var poolBudget = gpu.Device.MemoryInfo().Free / 2;
        var prefillBudget = quick ? QuickPrefillBudgetSeconds : PrefillBudgetSeconds;
        var (fit, skipped) = FitBatches(batches, slotBytes, poolBudget, null, prefillBudget);
        Skipped(context, skipped, "the pool may take half the free device memory");
        if (fit.Length == 0)
        {
            return;
        }

        using var paged = new PagedSlots(model, context, fit.Max(), prompt, PrefillChunk);
        paged.Prefill(1); // warm-up: compiles kernels, grows the step buffers
        var prefillUs = GpuBench.Median(quick || context > 4096 ? 1 : 3, paged.PrefillFirst);
        var prefillBytes = StepCost.PrefillBytes(config, context);
        report.Add(new BenchResult("e2e_prefill", Shape(name, config, 1, context), prefillUs,
            StepCost.PrefillFlops(config, context) / (prefillUs * 1e-6) / 1e12, prefillBytes / (prefillUs * 1e-6) / 1e9, "floor", gpu.CopyUs(prefillBytes)));
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  prefill {context} tokens: {context / (prefillUs * 1e-6):F0} tokens/s"));

        (fit, skipped) = FitBatches(fit, slotBytes, poolBudget, prefillUs * 1e-6, prefillBudget);
        Skipped(context, skipped, "estimated from the prefill above; a batched prefill reads the weights once per step, so it is an upper bound");

        var tokens = new int[fit.Length == 0 ? 0 : fit.Max()];
        double Decode(int batch)
        {
            for (var b = 0; b < batch; b++)
            {
                tokens[b] = (int)(rng.NextUInt64() % (ulong)config.VocabSize);
            }

            return paged.Decode(tokens.AsSpan(0, batch));
        }

        double batch1Us = 0;
        var graphs = true;
        foreach (var batch in fit)
        {
            if (paged.Count < batch)
            {
                var from = paged.Count;
                var t = Stopwatch.StartNew();
                paged.Prefill(batch);
                Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                    $"  prefilled slots {from}..{batch - 1} to {context} tokens together in {t.Elapsed.TotalSeconds:F1} s"));
            }

            for (var i = 0; i < 3; i++)
            {
                Decode(batch);
            }

            var us = GpuBench.Median(gpu.Runs, () => Decode(batch));
            batch1Us = batch == 1 ? us : batch1Us;
            var bytes = StepCost.DecodeBytes(config, batch, context);
            report.Add(new BenchResult("e2e_decode", Shape(name, config, batch, context), us, 0,
                bytes / (us * 1e-6) / 1e9, "floor", gpu.CopyUs(bytes)));
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"  decode batch {batch}, context {context}: {us / 1000:F2} ms per step of the batch, {batch / (us * 1e-6):F1} tokens/s; floor {bytes / 1e9:F2} GB"));
            if (graphs)
            {
                graphs = TimeGraphs(gpu, report, paged, () => Decode(batch), Shape(name, config, batch, context), bytes, us);
            }
        }

        if (!fit.Contains(1))
        {
            Console.WriteLine($"  context {context}: no batch-1 step, so no host overhead split or projection");
            return;
        }

        var parts = HostSplit(backend, gpu.Runs, () => Decode(1));
        var gpuUs = parts.Values.Sum(p => p.GpuUs);
        var wallUs = parts.Values.Sum(p => p.WallUs);
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"  decode batch 1, context {context}: wall {batch1Us:F0} µs; recorded run: GPU {gpuUs:F0} µs, host overhead ≥ {wallUs - gpuUs:F0} µs ({(wallUs - gpuUs) / wallUs:P0} of {wallUs:F0} µs with recording; GPU time = Σ operation event spans)"));
        foreach (var (part, p) in parts)
        {
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"    {(part < 0 ? "embedding+head" : $"layer {part} ({(config.IsMoeLayer(part) ? "MoE" : "dense")})"),-18} GPU {p.GpuUs,8:F0} µs  host overhead {p.WallUs - p.GpuUs,8:F0} µs"));
        }

        if (plan is not null)
        {
            Project(gpu, report, config, plan, context, parts, batch1Us);
        }
    }

    /// <summary>
    /// The decode step with the runner's graphs on: warm-up (the first run captures), then the median of the timed runs as an
    /// <c>e2e_decode_graph</c> row; graphs off again after. False, with the failure printed, when capturing or replaying failed.
    /// </summary>
    private static bool TimeGraphs(GpuBench gpu, BenchReport report, PagedSlots paged, Func<double> decode, Dictionary<string, object> shape, double bytes, double eagerUs)
    {
        paged.Graphs = true;
        try
        {
            for (var i = 0; i < 3; i++)
            {
                decode();
            }

            var us = GpuBench.Median(gpu.Runs, decode);
            report.Add(new BenchResult("e2e_decode_graph", shape, us, 0, bytes / (us * 1e-6) / 1e9, "floor", gpu.CopyUs(bytes)));
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"    with decode graphs: {us / 1000:F2} ms per step ({eagerUs / us:F2}x the eager step's speed)"));
            return true;
        }
        catch (Exception e) when (e is InvalidOperationException or CudaException)
        {
            Console.WriteLine($"    decode graphs failed, no more graph rows: {e.GetType().Name}: {e.Message}");
            return false;
        }
        finally
        {
            paged.Graphs = false;
        }
    }

    private static void Skipped(int context, string[] skipped, string why)
    {
        foreach (var s in skipped)
        {
            Console.WriteLine($"  context {context}: skipped {s} ({why})");
        }
    }

    /// <summary>Latent cache bytes of one slot holding <paramref name="context"/> tokens and the decoded one, over all layers, in whole blocks.</summary>
    internal static long SlotCacheBytes(ModelConfig config, int context) =>
        (long)KvBlockManager.BlocksFor(context + 1) * KvBlockManager.BlockTokens * MemoryPlanner.KvBytesPerTokenPerLayer(config) * config.NumHiddenLayers;

    /// <summary>
    /// The batches (in the given order) whose slots' cache fits <paramref name="poolBudgetBytes"/> and, once a slot's
    /// prefill time is known, whose prefill (that many single-slot prefills) fits <paramref name="prefillBudgetSeconds"/>;
    /// the rest as "batch B: why" lines.
    /// </summary>
    internal static (int[] Fit, string[] Skipped) FitBatches(IEnumerable<int> batches, long slotBytes, long poolBudgetBytes,
        double? prefillSecondsPerSlot, double prefillBudgetSeconds)
    {
        var fit = new List<int>();
        var skipped = new List<string>();
        foreach (var b in batches)
        {
            var bytes = b * slotBytes;
            var seconds = b * prefillSecondsPerSlot;
            if (bytes > poolBudgetBytes)
            {
                skipped.Add(string.Create(CultureInfo.InvariantCulture,
                    $"batch {b}: its cache is {bytes / 1e9:F2} GB ({b} × {slotBytes / 1e6:F1} MB), over the {poolBudgetBytes / 1e9:F2} GB budget"));
            }
            else if (seconds > prefillBudgetSeconds)
            {
                skipped.Add(string.Create(CultureInfo.InvariantCulture,
                    $"batch {b}: prefilling {b} slot{(b == 1 ? "" : "s")} takes about {seconds:F0} s ({b} × {prefillSecondsPerSlot:F2} s), over the {prefillBudgetSeconds:F0} s budget"));
            }
            else
            {
                fit.Add(b);
            }
        }

        return ([.. fit], [.. skipped]);
    }

    /// <summary>
    /// The steps of a prefill of <paramref name="slots"/> slots from position 0 to <paramref name="tokens"/>: each
    /// step a list of (slot, position, count) of at most <paramref name="chunk"/> tokens in all, a slot at most once
    /// per step; slots are filled in order, a step taking the next slot's first tokens where the last one ends short.
    /// </summary>
    internal static List<(int Slot, int Position, int Count)[]> PrefillSteps(int slots, int tokens, int chunk)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(slots);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(tokens);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(chunk);
        var steps = new List<(int Slot, int Position, int Count)[]>();
        var slot = 0;
        var position = 0;
        while (slot < slots)
        {
            var step = new List<(int Slot, int Position, int Count)>();
            var room = chunk;
            while (room > 0 && slot < slots)
            {
                var n = Math.Min(room, tokens - position);
                step.Add((slot, position, n));
                room -= n;
                position += n;
                if (position == tokens)
                {
                    slot++;
                    position = 0;
                }
                else
                {
                    break; // the slot continues in the next step
                }
            }

            steps.Add([.. step]);
        }

        return steps;
    }

    /// <summary>
    /// Slots of one context on a <see cref="PagedStepRunner"/> of their own (any backend): a pool of
    /// <c>maxBatch</c> slots of context + 1 tokens, slots prefilled with one prompt, and decode steps of
    /// the first B slots at position context, rewound after each so every step sees the same context.
    /// </summary>
    internal sealed class PagedSlots : IDisposable
    {
        private readonly int _context;
        private readonly int[] _prompt;
        private readonly int _chunk;
        private readonly KvBlockManager _blocks;
        private readonly PagedStepRunner _runner;
        private readonly List<int> _slots = [];
        private readonly StepSequence[] _entries;
        private readonly int[] _tokens;
        private readonly TokenChoice[] _greedy;
        private readonly int[] _chosen;

        public PagedSlots(DeepSeekModel model, int context, int maxBatch, int[] prompt, int chunk)
        {
            ArgumentOutOfRangeException.ThrowIfNotEqual(prompt.Length, context);
            _context = context;
            _prompt = prompt;
            _chunk = chunk;
            var perSlot = KvBlockManager.BlocksFor(context + 1);
            _blocks = new KvBlockManager(maxBatch * perSlot, maxBatch, perSlot);
            _runner = new PagedStepRunner(model);
            _runner.Attach(_blocks, Math.Max(chunk, maxBatch));
            Logits = new float[(long)maxBatch * model.VocabSize];
            _entries = new StepSequence[maxBatch];
            _tokens = new int[maxBatch];
            _greedy = [.. Enumerable.Repeat(TokenChoice.Greedy(model.VocabSize), maxBatch)];
            _chosen = new int[maxBatch];
        }

        /// <summary>Slots open and prefilled.</summary>
        public int Count => _slots.Count;

        /// <summary>Whether decode steps run as graphs (<see cref="PagedStepRunner.DecodeGraphs"/>).</summary>
        public bool Graphs
        {
            set => _runner.DecodeGraphs = value;
        }

        /// <summary>The last step's logits: one row per entry that asked, in batch order.</summary>
        public float[] Logits { get; }

        /// <summary>The last decode step's greedy ids chosen on the device, in batch order.</summary>
        public ReadOnlySpan<int> Chosen => _chosen;

        /// <summary>
        /// Opens slots up to <paramref name="count"/> and prefills the new ones together, packed into steps of at most
        /// the chunk (<see cref="PrefillSteps"/>); each slot's last position asks for its logits, so the last step
        /// downloads and the host's wall time covers the GPU's work.
        /// </summary>
        public void Prefill(int count)
        {
            var from = _slots.Count;
            while (_slots.Count < count)
            {
                var slot = _blocks.Admit(_context + 1);
                _runner.Open(slot, drafts: false);
                _slots.Add(slot);
            }

            Feed(from);
        }

        /// <summary>Empties the first slot and prefills it again; host wall µs of the prefill.</summary>
        public double PrefillFirst()
        {
            // The slot keeps its blocks (reserved for context + 1 at admission): only the runner forgets its positions.
            _runner.Truncate(_slots[0], 0);
            var t = Stopwatch.StartNew();
            Feed(0, count: 1);
            return t.Elapsed.TotalMicroseconds;
        }

        /// <summary>
        /// One batched step of the first <c>tokens.Length</c> slots, one token each at position context, each one's greedy
        /// token chosen on the device into <see cref="Chosen"/> (or, with <paramref name="downloadLogits"/>, their logits
        /// downloaded into <see cref="Logits"/> instead); then every slot is rewound to the context. Host wall µs of the step.
        /// </summary>
        public double Decode(ReadOnlySpan<int> tokens, bool downloadLogits = false)
        {
            var batch = tokens.Length;
            for (var b = 0; b < batch; b++)
            {
                _tokens[b] = tokens[b];
                _entries[b] = new StepSequence(_slots[b], _context, _tokens.AsMemory(b, 1), 1);
            }

            var t = Stopwatch.StartNew();
            if (downloadLogits)
            {
                _runner.Forward(_entries.AsSpan(0, batch), Logits);
            }
            else
            {
                _runner.ForwardAndChoose(_entries.AsSpan(0, batch), _greedy.AsSpan(0, batch), _chosen, Logits);
            }

            var us = t.Elapsed.TotalMicroseconds;
            // Blocks stay reserved for position context (admission took context + 1), so the rewind changes no table
            // row and the next run copies no table, as a scheduler's steady decode steps do not.
            for (var b = 0; b < batch; b++)
            {
                _runner.Truncate(_slots[b], _context);
            }

            return us;
        }

        private void Feed(int from, int? count = null)
        {
            foreach (var step in PrefillSteps(count ?? _slots.Count - from, _context, _chunk))
            {
                var entries = step.Select(e => new StepSequence(_slots[from + e.Slot], e.Position, _prompt.AsMemory(e.Position, e.Count),
                    e.Position + e.Count == _context ? 1 : 0)).ToArray();
                _runner.Forward(entries, Logits);
            }
        }

        public void Dispose() => _runner.Dispose();
    }

    /// <summary>
    /// Per part, median over <paramref name="runs"/> recorded steps of GPU and host wall µs, host overhead scaled so
    /// the parts' total matches an unrecorded step's overhead (recording adds its own host time).
    /// </summary>
    private static SortedDictionary<int, (double GpuUs, double WallUs)> HostSplit(OpTimingBackend backend, int runs, Action step)
    {
        var samples = new List<SortedDictionary<int, (double GpuUs, double WallUs)>>();
        backend.Recording = true;
        try
        {
            for (var r = 0; r < runs; r++)
            {
                step();
                samples.Add(backend.Collect(Stopwatch.GetTimestamp()));
            }
        }
        finally
        {
            backend.Recording = false;
        }

        var result = new SortedDictionary<int, (double GpuUs, double WallUs)>();
        foreach (var part in samples[0].Keys)
        {
            var gpus = samples.Select(s => s[part].GpuUs).Order().ToArray();
            var walls = samples.Select(s => s[part].WallUs).Order().ToArray();
            result[part] = (gpus[runs / 2], walls[runs / 2]);
        }

        return result;
    }

    private static void Project(GpuBench gpu, BenchReport report, ModelConfig slice, DeploymentPlan plan, int context,
        SortedDictionary<int, (double GpuUs, double WallUs)> parts, double batch1Us)
    {
        // Host overhead of the recorded run scaled to the unrecorded step's: wall(unrecorded) − GPU, spread as recorded.
        var gpuUs = parts.Values.Sum(p => p.GpuUs);
        var recordedOverhead = parts.Values.Sum(p => Math.Max(0, p.WallUs - p.GpuUs));
        var k = recordedOverhead > 0 ? Math.Max(0, batch1Us - gpuUs) / recordedOverhead : 0;
        (double Gpu, double Host) Mean(Func<int, bool> which)
        {
            var sel = parts.Where(p => p.Key >= 0 && which(p.Key)).Select(p => p.Value).ToArray();
            return sel.Length == 0 ? (0, 0) : (sel.Average(p => p.GpuUs), sel.Average(p => Math.Max(0, p.WallUs - p.GpuUs)) * k);
        }

        var dense = Mean(l => !slice.IsMoeLayer(l));
        var moe = Mean(slice.IsMoeLayer);
        var outer = parts.TryGetValue(-1, out var o) ? (o.GpuUs, Math.Max(0, o.WallUs - o.GpuUs) * k) : (0, 0);
        if (moe.Gpu == 0 || dense.Gpu == 0)
        {
            Console.WriteLine("  projection needs a dense and an MoE layer (DSCUDA_E2E_LAYERS >= 2)");
            return;
        }

        var measured = new LayerStepTimes(dense.Gpu, dense.Host, moe.Gpu, moe.Host, outer.Item1, outer.Item2);
        var p = DecodeProjection.Project(measured, plan);
        var full = ModelPresets.DeepSeekV3;
        var floorUs = gpu.CopyUs(StepCost.DecodeBytes(full, 1, context) / plan.Gpus);
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"  projection, {plan.DenseLayers + plan.MoeLayers} layers on {plan.Gpus} GPUs, batch 1, context {context}: {p.StepUs:F0} µs/step ({1e6 / p.StepUs:F1} tokens/s) = GPU {p.GpuUs:F0} + host {p.HostUs:F0} + all-reduce {p.CommUs:F0}; floor {floorUs:F0} µs"));
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"    from: dense layer GPU {dense.Gpu:F0} + host {dense.Host:F0} µs, MoE layer GPU {moe.Gpu:F0} + host {moe.Host:F0} µs, embedding+head GPU {outer.Item1:F0} + host {outer.Item2:F0} µs"));
        foreach (var line in plan.Assumptions)
        {
            Console.WriteLine("    assumes: " + line);
        }

        var shape = new Dictionary<string, object>
        {
            ["model"] = "deepseek-v3",
            ["batch"] = 1,
            ["context"] = context,
            ["layers"] = plan.DenseLayers + plan.MoeLayers,
            ["gpus"] = plan.Gpus,
            ["from_layers"] = slice.NumHiddenLayers,
            ["activations"] = s_bf16Activations ? "bf16" : "f32",
            ["from_experts"] = slice.NRoutedExperts,
            ["allreduce_us"] = plan.AllReduceUs,
        };
        report.Add(new BenchResult("e2e_projection", shape, p.StepUs, 0, StepCost.DecodeBytes(full, 1, context) / plan.Gpus / (p.StepUs * 1e-6) / 1e9, "floor", floorUs));
    }

    private static Dictionary<string, object> Shape(string model, ModelConfig config, int batch, int context) => new()
    {
        ["model"] = model,
        ["batch"] = batch,
        ["context"] = context,
        ["layers"] = config.NumHiddenLayers,
        ["experts"] = config.NRoutedExperts,
        ["runner"] = "paged",
        ["activations"] = s_bf16Activations ? "bf16" : "f32",
    };
}
