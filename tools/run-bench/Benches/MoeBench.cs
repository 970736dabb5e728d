using DeepSeekCuda.Backends.Cuda;
using DeepSeekCuda.Bench.Harness;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Cuda.Blas;
using DeepSeekCuda.Kernels;

namespace DeepSeekCuda.Bench.Benches;

/// <summary>
/// A full-width DeepSeek-V3 MoE layer through <see cref="MoeLayer"/> (hidden 7168, 256 experts of 2048, top-8 in 4 of 8
/// groups, one shared expert of 2048): gate, dispatch, act quant, grouped gate/up + SiLU·up, act quant, grouped down,
/// shared expert, combine with the residual, for 1 … 4096 tokens. Weights are synthetic, filled on the device (11.3 GB of
/// FP8 expert codes, no checkpoint). The routing is fixed per row (seeded): uniform (distinct random experts per token) or
/// skewed (95% of tokens on one hot expert, the rest among a quarter of the experts). The gate kernel runs in every timed
/// call (its cost counts) but writes to a scratch buffer, because constant synthetic weights would route every token to the
/// same experts; the experts read the seeded routing.
/// Rows: bench <c>moe_layer</c> (the default kernels), on Hopper <c>moe_layer_wgmma</c> (the expert GEMMs on the wgmma
/// kernels), and <c>moe_layer_ep8</c>: one GPU's share of the layer under tensor/expert parallelism over 8 (the default
/// kernels on a compact stack of the 32 experts e mod 8 = 0 behind an expert map, and 256 of the shared expert's 2048
/// columns; tokens routed elsewhere only pass through the dispatch), shape {tokens, routing}; GB/s over the touched
/// weights (this GPU's routed experts with at least one token + its shared expert + the gate), TFLOP/s of its GEMMs. Baselines measured in the same run: <c>copy</c>
/// (copy bandwidth over the touched weight bytes) and <c>cublas_bf16_loop</c> (<see cref="CublasLoop"/>).
/// </summary>
internal static class MoeBench
{
    private const int Hidden = 7168, Inter = 2048, Experts = 256, TopK = 8, EpDevices = 8;
    private static readonly int[] Tokens = [1, 8, 64, 512, 4096];

    public static void Run(GpuBench gpu, bool quick, BenchReport report)
    {
        var stream = gpu.Stream;
        var device = gpu.Device;
        var gate = MoeGateShape.V3;
        int hb = Fp8GemmKernel.BlocksFor(Hidden), ib = Fp8GemmKernel.BlocksFor(Inter);
        var maxTokens = Tokens[^1];
        using var owned = new DeviceOwnership();
        // Codes 0x38 = 1.0, scales 2^-7, bf16 activations 1.0: finite everywhere; the values do not change the work.
        var w13 = owned.Own(DeviceBuffer<byte>.Allocate(device, (long)Experts * 2 * Inter * Hidden));
        var w2 = owned.Own(DeviceBuffer<byte>.Allocate(device, (long)Experts * Hidden * Inter));
        var s13 = owned.Own(DeviceBuffer<float>.Allocate(device, (long)Experts * 2 * ib * hb));
        var s2 = owned.Own(DeviceBuffer<float>.Allocate(device, (long)Experts * hb * ib));
        w13.Fill8(0x38, stream);
        w2.Fill8(0x38, stream);
        s13.Fill32(0x3c000000, stream);
        s2.Fill32(0x3c000000, stream);
        var stack = new MoeExpertStack(w13.Pointer, s13.Pointer, w2.Pointer, s2.Pointer, Experts, Hidden, Inter);
        Fp8Linear Linear(int n, int k)
        {
            var w = owned.Own(DeviceBuffer<byte>.Allocate(device, (long)n * k));
            var s = owned.Own(DeviceBuffer<float>.Allocate(device, (long)Fp8GemmKernel.BlocksFor(n) * Fp8GemmKernel.BlocksFor(k)));
            w.Fill8(0x38, stream);
            s.Fill32(0x3c000000, stream);
            return new Fp8Linear(w.Pointer, s.Pointer, n, k);
        }

        var shared = new MoeSharedExpert(Linear(Inter, Hidden), Linear(Inter, Hidden), Linear(Hidden, Inter));
        const int epShared = Inter / EpDevices;
        var epSharedSlice = new MoeSharedExpert(Linear(epShared, Hidden), Linear(epShared, Hidden), Linear(Hidden, epShared));
        static bool EpHeld(int e) => e % EpDevices == 0;
        var epMap = owned.Own(DeviceBuffer<int>.From(device, MoeDispatch.ExpertMap(Experts, [.. Enumerable.Range(0, Experts).Where(EpHeld)]), stream));
        var epStack = stack with { Experts = Experts / EpDevices, ExpertMap = epMap.Pointer, MapExperts = Experts }; // the first 32 slots
        var gateW = owned.Own(DeviceBuffer<ushort>.Allocate(device, (long)Experts * Hidden));
        var gateB = owned.Own(DeviceBuffer<float>.Allocate(device, Experts));
        gateW.Fill32(0x3c003c00u, stream); // bf16 2^-7
        gateB.Fill32(0, stream);
        var x = owned.Own(DeviceBuffer<ushort>.Allocate(device, (long)maxTokens * Hidden));
        var y = owned.Own(DeviceBuffer<ushort>.Allocate(device, (long)maxTokens * Hidden));
        x.Fill32(0x3f803f80u, stream);
        var scratchIdx = owned.Own(DeviceBuffer<int>.Allocate(device, (long)maxTokens * TopK));
        var scratchW = owned.Own(DeviceBuffer<float>.Allocate(device, (long)maxTokens * TopK));
        using var gateKernel = new MoeGateKernel(device, gpu.Compiler);
        using var layer = new MoeLayer(device, gpu.Compiler, gate, Inter, Inter, maxTokens);
        using var hopper = Fp8GemmKernel.HasWgmma(device.Target) ? new MoeLayer(device, gpu.Compiler, gate, Inter, Inter, maxTokens, hopperGemm: true) : null;
        using var ep = new MoeLayer(device, gpu.Compiler, gate, Inter, epShared, maxTokens, slots: Experts / EpDevices);
        using var cublasLoop = CublasLoop.TryCreate(gpu, maxTokens * TopK);

        // The layer on the default kernels over every case first, then on Hopper on the wgmma kernels: a fault in the kernels
        // no GPU has confirmed then cannot cost the default kernels' rows. Baselines are timed once per case.
        var baselines = new Dictionary<(int Tokens, bool Skewed, bool Ep), (double Copy, double? Cublas)>();
        foreach (var (name, l, s, sh, epRow) in new[] { ("moe_layer", layer, stack, shared, false), ("moe_layer_wgmma", hopper, stack, shared, false), ("moe_layer_ep8", ep, epStack, epSharedSlice, true) })
        {
            if (l is null)
            {
                continue;
            }

            foreach (var tokens in quick ? [1, 64, 4096] : Tokens)
            {
                foreach (var skewed in new[] { false, true })
                {
                    var idx = Routing(new Random(1234 + tokens + (skewed ? 1 : 0)), tokens, skewed);
                    var wts = Enumerable.Repeat(1f / TopK, tokens * TopK).ToArray();
                    using var idxD = DeviceBuffer<int>.From(device, idx, stream);
                    using var wD = DeviceBuffer<float>.From(device, wts, stream);
                    var here = epRow ? [.. idx.Where(EpHeld)] : idx; // the slots this GPU's experts serve
                    var touched = here.Distinct().Count();
                    var expertBytes = 3.0 * Hidden * Inter;
                    var sharedInter = sh.Gate.Out;
                    var bytes = (touched * expertBytes) + (3.0 * Hidden * sharedInter) + (2.0 * Experts * Hidden);
                    var flops = (2.0 * here.Length * 3 * Hidden * Inter) + (2.0 * tokens * 3 * Hidden * sharedInter) + (2.0 * tokens * Experts * Hidden);
                    var shape = new Dictionary<string, object> { ["tokens"] = tokens, ["routing"] = skewed ? "skewed" : "uniform" };
                    if (!baselines.TryGetValue((tokens, skewed, epRow), out var b))
                    {
                        b = (gpu.CopyUs(bytes), here.Length > 0 ? cublasLoop?.Time(gpu, here) : null); // no routed GEMM here: no loop to time
                        baselines[(tokens, skewed, epRow)] = b;
                    }

                    var us = gpu.Measure(_ =>
                    {
                        var input = new DeviceRows(x.Pointer, ElementType.BF16, tokens, Hidden);
                        gateKernel.Launch(stream, gate, input, new DeviceRows(gateW.Pointer, ElementType.BF16, Experts, Hidden),
                            new DeviceRows(gateB.Pointer, ElementType.F32, 1, Experts), new DeviceRouting(scratchIdx.Pointer, scratchW.Pointer, tokens, TopK),
                            normalize: true, scaling: 2.5f);
                        l.Experts(stream, input, new DeviceRouting(idxD.Pointer, wD.Pointer, tokens, TopK), s, sh, new DeviceRows(y.Pointer, ElementType.BF16, tokens, Hidden),
                            residual: input);
                    });
                    report.Add(new BenchResult(name, shape, us, flops / (us * 1e-6) / 1e12, bytes / (us * 1e-6) / 1e9, "copy", b.Copy));
                    if (b.Cublas is { } cublasUs)
                    {
                        report.Add(new BenchResult(name, shape, us, flops / (us * 1e-6) / 1e12, bytes / (us * 1e-6) / 1e9, "cublas_bf16_loop", cublasUs));
                    }
                }
            }
        }
    }

    /// <summary>
    /// The <c>cublas_bf16_loop</c> baseline: the same routed-expert GEMMs through cuBLAS BF16 (FP32 accumulation), one
    /// expert at a time — for each expert with c tokens, gate;up as one [c, 2·I] GEMM over K = H, then down [c, H] over
    /// K = I. SiLU, the permutation, the gate, the shared expert and the combine are left out, which favours the baseline.
    /// BF16 copies of all 256 experts' weights (22.5 GB) are allocated once per run.
    /// </summary>
    private sealed class CublasLoop : IDisposable
    {
        private readonly CublasHandle _blas;
        private readonly DeviceBuffer<ushort> _w13, _w2, _x, _h, _y;

        private CublasLoop(GpuBench gpu, CublasHandle blas, int maxRows)
        {
            _blas = blas;
            var device = gpu.Device;
            _w13 = DeviceBuffer<ushort>.Allocate(device, (long)Experts * 2 * Inter * Hidden);
            _w2 = DeviceBuffer<ushort>.Allocate(device, (long)Experts * Hidden * Inter);
            _x = DeviceBuffer<ushort>.Allocate(device, (long)maxRows * Hidden);
            _h = DeviceBuffer<ushort>.Allocate(device, (long)maxRows * 2 * Inter);
            _y = DeviceBuffer<ushort>.Allocate(device, (long)maxRows * Hidden);
            foreach (var b in new[] { _w13, _w2, _x })
            {
                b.Fill32(0x3c003c00u, gpu.Stream); // bf16 2^-7: finite throughout
            }
        }

        /// <summary>The loop, or null (one line saying why) when cuBLAS cannot be loaded or the weights do not fit.</summary>
        public static CublasLoop? TryCreate(GpuBench gpu, int maxRows)
        {
            if (GemmBench.OpenCublas(gpu.Device, "moe", "cublas_bf16_loop") is not { } blas)
            {
                return null;
            }

            try
            {
                return new CublasLoop(gpu, blas, maxRows);
            }
            catch (CudaException e)
            {
                blas.Dispose();
                Console.WriteLine($"run-bench moe: no cublas_bf16_loop baseline: {e.Message}");
                return null;
            }
        }

        /// <summary>Median µs of the per-expert loop for the routing <paramref name="idx"/> [tokens, k].</summary>
        public double Time(GpuBench gpu, int[] idx)
        {
            var counts = new int[Experts];
            foreach (var e in idx)
            {
                counts[e]++;
            }

            return gpu.Measure(_ =>
            {
                long row = 0;
                for (var e = 0; e < Experts; e++)
                {
                    var c = counts[e];
                    if (c == 0)
                    {
                        continue;
                    }

                    var w13 = _w13.Pointer + ((ulong)e * 2 * Inter * Hidden * 2);
                    var w2 = _w2.Pointer + ((ulong)e * Hidden * Inter * 2);
                    _blas.GemmBf16(gpu.Stream, _x.Pointer + ((ulong)row * Hidden * 2), w13, _h.Pointer + ((ulong)row * 2 * Inter * 2), c, 2 * Inter, Hidden);
                    _blas.GemmBf16(gpu.Stream, _h.Pointer + ((ulong)row * 2 * Inter * 2), w2, _y.Pointer + ((ulong)row * Hidden * 2), c, Hidden, Inter);
                    row += c;
                }
            });
        }

        public void Dispose()
        {
            foreach (var b in new[] { _w13, _w2, _x, _h, _y })
            {
                b.Dispose();
            }

            _blas.Dispose();
        }
    }

    /// <summary>
    /// Seeded routing [tokens, 8] with distinct experts per token: uniform over 256, or skewed (95% of tokens include the hot
    /// expert 63, all picks from experts 0..63, so 192 experts receive nothing).
    /// </summary>
    private static int[] Routing(Random r, int tokens, bool skewed)
    {
        var idx = new int[tokens * TopK];
        var pool = skewed ? Experts / 4 : Experts;
        var chosen = new HashSet<int>();
        for (var t = 0; t < tokens; t++)
        {
            chosen.Clear();
            if (skewed && r.NextDouble() < 0.95)
            {
                chosen.Add(pool - 1);
            }

            while (chosen.Count < TopK)
            {
                chosen.Add(r.Next(pool));
            }

            chosen.CopyTo(idx, t * TopK);
        }

        return idx;
    }
}
