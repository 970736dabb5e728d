using DeepSeekCuda.Backends.Cuda;
using DeepSeekCuda.Bench.Harness;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Kernels;

namespace DeepSeekCuda.Bench.Benches;

/// <summary>
/// DeepSeek-V3's BF16 products, each on its CUDA-core kernel and on the tensor-core GEMM (<see cref="Bf16MmaKernel"/>,
/// which <c>CudaBackendOptions.TensorCoreBf16Gemm</c> selects), with the operand types CudaBackend uses (f32 activations):
/// <list type="bullet">
/// <item>lm_head (N = 129280, K = 7168): <c>bf16_gemm</c> (one warp per column, 4 rows per weight pass) and
/// <c>bf16_gemm_mma</c>, at M = 1 … 128, against <c>copy</c> (the weight, activations and logits once) and
/// <c>cublas_bf16</c> (BF16 inputs) from the same run.</item>
/// <item>the router (E = 256, D = 7168, with top-8 routing): <c>moe_gate</c> (one block per token) and
/// <c>moe_gate_mma</c> (logits split over K, then the route kernel), at 1 … 4096 tokens, against <c>copy</c>.</item>
/// <item>MLA fold and unfold at 128 heads (W_UK and W_UV, 8 MiB each): <c>mla_fold</c>/<c>mla_unfold</c> and their
/// <c>_mma</c> forms at 1, 2 and 64 tokens, against <c>copy</c>.</item>
/// </list>
/// Every CUDA-core row is timed before any tensor-core row: a fault in the kernel no GPU has confirmed then cannot
/// cost the others. Inputs are constants (the values do not change the work); L2 is flushed before each timed run.
/// </summary>
internal static class Bf16Bench
{
    private const int HeadN = 129280, Hidden = 7168, Heads = 128, Nope = 128, V = 128;
    private static readonly int[] HeadMs = [1, 4, 16, 64, 128];
    private static readonly int[] GateTokens = [1, 8, 64, 512, 4096];
    private static readonly int[] MlaTokens = [1, 2, 64];

    public static void Run(GpuBench gpu, bool quick, BenchReport report)
    {
        var device = gpu.Device;
        var stream = gpu.Stream;
        using var owned = new DeviceOwnership();
        using var mma = new Bf16MmaKernel(device, gpu.Compiler);
        using var warp = new Bf16GemmKernel(device, gpu.Compiler);
        using var gatePlain = new MoeGateKernel(device, gpu.Compiler);
        using var gateMma = new MoeGateKernel(device, gpu.Compiler, mma);
        using var mlaPlain = new MlaDecodeKernel(device, gpu.Compiler);
        using var mlaMma = new MlaDecodeKernel(device, gpu.Compiler, mma);
        using var blas = GemmBench.OpenCublas(device, "bf16");
        var shape = LatentShape.V3;
        var gate = MoeGateShape.V3;
        int headMax = HeadMs[^1], gateMax = GateTokens[^1], mlaMax = MlaTokens[^1];

        var head = owned.Own(DeviceBuffer<ushort>.Allocate(device, (long)HeadN * Hidden));
        var gateW = owned.Own(DeviceBuffer<ushort>.Allocate(device, (long)gate.Experts * Hidden));
        var gateB = owned.Own(DeviceBuffer<float>.Allocate(device, gate.Experts));
        var kvB = owned.Own(DeviceBuffer<ushort>.Allocate(device, (long)Heads * (Nope + V) * shape.Latent));
        var x = owned.Own(DeviceBuffer<float>.Allocate(device, (long)Math.Max(headMax, gateMax) * Hidden));
        var logits = owned.Own(DeviceBuffer<float>.Allocate(device, (long)headMax * HeadN));
        var idx = owned.Own(DeviceBuffer<int>.Allocate(device, (long)gateMax * gate.TopK));
        var wts = owned.Own(DeviceBuffer<float>.Allocate(device, (long)gateMax * gate.TopK));
        var gateWork = owned.Own(DeviceBuffer<byte>.Allocate(device, Math.Max(4, GateTokens.Max(t => gateMma.WorkspaceBytes(gate, t)))));
        var q = owned.Own(DeviceBuffer<float>.Allocate(device, (long)mlaMax * Heads * (Nope + shape.Rope)));
        var qAbs = owned.Own(DeviceBuffer<ushort>.Allocate(device, (long)mlaMax * Heads * shape.RowWidth));
        var latent = owned.Own(DeviceBuffer<float>.Allocate(device, (long)mlaMax * Heads * shape.Latent));
        var outV = owned.Own(DeviceBuffer<float>.Allocate(device, (long)mlaMax * Heads * V));
        foreach (var b in new[] { head, gateW, kvB })
        {
            b.Fill32(0x3C003C00u, stream); // bf16 2^-7 pairs
        }

        foreach (var b in new[] { x, q, latent })
        {
            b.Fill32(0x3F800000u, stream); // f32 1.0: BF16 values, as CudaBackend's activations
        }

        gateB.Fill32(0, stream);

        // (name, shape, bytes, flops, call, tensor cores, extra baselines)
        var cases = new List<(string Name, Dictionary<string, object> Shape, double Bytes, double Flops, Action Call, bool Mma, (string, double)[] Extra)>();
        foreach (var m in quick ? [1, 64] : HeadMs)
        {
            var s = new Dictionary<string, object> { ["M"] = m, ["N"] = HeadN, ["K"] = Hidden, ["op"] = "lm_head" };
            var bytes = 2.0 * HeadN * Hidden + 4.0 * m * Hidden + 4.0 * m * HeadN;
            var flops = 2.0 * m * HeadN * Hidden;
            (string, double)[] extra = blas is not null && GemmBench.Baseline("cublas_bf16", m, HeadN, Hidden,
                () => GemmBench.TimeCublasBf16(gpu, blas, m, HeadN, Hidden)) is { } cublasUs ? [("cublas_bf16", cublasUs)] : [];
            cases.Add(("bf16_gemm", s, bytes, flops, () => warp.Launch(stream, new DeviceRows(x.Pointer, ElementType.F32, m, Hidden),
                new DeviceRows(head.Pointer, ElementType.BF16, HeadN, Hidden), new DeviceRows(logits.Pointer, ElementType.F32, m, HeadN)), false, extra));
            var p = new Bf16MmaProblem(x.Pointer, ElementType.F32, Hidden, head.Pointer, false, Hidden, logits.Pointer, ElementType.F32, HeadN, m, HeadN, Hidden);
            cases.Add(("bf16_gemm_mma", s, bytes, flops, () => mma.Launch(stream, p), true, extra));
        }

        foreach (var t in quick ? [1, 64, 4096] : GateTokens)
        {
            var s = new Dictionary<string, object> { ["tokens"] = t, ["E"] = gate.Experts, ["D"] = Hidden, ["op"] = "router" };
            var bytes = 2.0 * gate.Experts * Hidden + 4.0 * t * Hidden + 8.0 * t * gate.TopK;
            var flops = 2.0 * t * gate.Experts * Hidden;
            void Gate(MoeGateKernel k, ulong work) => k.Launch(stream, gate, new DeviceRows(x.Pointer, ElementType.F32, t, Hidden),
                new DeviceRows(gateW.Pointer, ElementType.BF16, gate.Experts, Hidden), new DeviceRows(gateB.Pointer, ElementType.F32, 1, gate.Experts),
                new DeviceRouting(idx.Pointer, wts.Pointer, t, gate.TopK), normalize: true, scaling: 2.5f, workspace: work);
            cases.Add(("moe_gate", s, bytes, flops, () => Gate(gatePlain, 0), false, []));
            cases.Add(("moe_gate_mma", s, bytes, flops, () => Gate(gateMma, gateWork.Pointer), true, []));
        }

        var heads = new MlaHeadDims(Heads, Nope, V);
        var kvBRows = new DeviceRows(kvB.Pointer, ElementType.BF16, Heads * (Nope + V), shape.Latent);
        foreach (var t in quick ? [1, 64] : MlaTokens)
        {
            var s = new Dictionary<string, object> { ["tokens"] = t, ["heads"] = Heads, ["latent"] = shape.Latent };
            var w = 2.0 * Heads * Nope * shape.Latent; // W_UK and W_UV are the same size
            var foldBytes = w + 4.0 * t * Heads * (Nope + shape.Rope) + 2.0 * t * Heads * shape.RowWidth;
            var unfoldBytes = w + 4.0 * t * Heads * shape.Latent + 4.0 * t * Heads * V;
            var flops = 2.0 * t * Heads * Nope * shape.Latent;
            foreach (var (k, suffix, tc) in new[] { (mlaPlain, "", false), (mlaMma, "_mma", true) })
            {
                cases.Add(("mla_fold" + suffix, s, foldBytes, flops,
                    () => k.Fold(stream, shape, heads, new DeviceRows(q.Pointer, ElementType.F32, t, Heads * (Nope + shape.Rope)), kvBRows,
                        new DeviceRows(qAbs.Pointer, ElementType.BF16, t, Heads * shape.RowWidth)), tc, []));
                cases.Add(("mla_unfold" + suffix, s, unfoldBytes, flops,
                    () => k.Unfold(stream, shape, heads, new DeviceRows(latent.Pointer, ElementType.F32, t, Heads * shape.Latent), kvBRows,
                        new DeviceRows(outV.Pointer, ElementType.F32, t, Heads * V)), tc, []));
            }
        }

        foreach (var c in cases.OrderBy(c => c.Mma))
        {
            var us = gpu.Measure(_ => c.Call());
            foreach (var (baseline, baselineUs) in c.Extra.Prepend(("copy", gpu.CopyUs(c.Bytes))))
            {
                report.Add(new BenchResult(c.Name, c.Shape, us, c.Flops / (us * 1e-6) / 1e12, c.Bytes / (us * 1e-6) / 1e9, baseline, baselineUs));
            }
        }
    }
}
