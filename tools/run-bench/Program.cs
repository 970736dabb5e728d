using System.CommandLine;
using DeepSeekCuda.Bench.Benches;
using DeepSeekCuda.Bench.Harness;

// One subcommand per bench; each lives in Benches/. GPU benches also run together under `all`.
GpuBenchSpec[] gpuBenches =
[
    new("gemm", "FP8 block-scaled GEMM vs same-run baselines", GemmBench.Run),
    new("mla", "MLA decode attention (paged latent cache, split-KV) on FlashMLA shapes vs same-run copy", MlaBench.Run),
    new("mla_prefill", "MLA prefill attention (naive, V3 heads) vs same-run copy", MlaPrefillBench.Run),
    new("moe", "DeepSeek-V3 MoE layer (grouped FP8 experts) vs same-run baselines", MoeBench.Run),
    new("bf16", "BF16 products (lm_head, router, MLA fold/unfold): CUDA-core kernels and the tensor-core GEMM vs same-run baselines", Bf16Bench.Run),
    new("load", "Weight upload of a synthetic checkpoint vs same-run file read and pinned H2D copy; the model load on CudaBackend vs the whole upload", LoadBench.Run),
    new("allreduce", "P2P all-reduce over logical ranks of one GPU vs same-run copy", AllReduceBench.Run),
    new("e2e", "End-to-end prefill and decode (tiny, full-width V3 slice) vs the bandwidth floor; 61-layer 8-GPU projection", E2eBench.Run),
];

// Logical ranks on one GPU (allreduce) need a hardware queue per stream: set CUDA_DEVICE_MAX_CONNECTIONS before CUDA initializes.
DeepSeekCuda.Distributed.CudaParallel.ConfigureConnections();

var root = new RootCommand("DeepSeekCuda benchmarks");
root.Subcommands.Add(TokenizerBench.Create());
root.Subcommands.Add(CpuE2eBench.Create());
root.Subcommands.Add(ConstraintBench.Create());
root.Subcommands.Add(KernelsReport.Create());
root.Subcommands.Add(Preflight.Create());
var list = new Command("list", "The GPU benches' names, one per line, in the order `all` runs them (tools/gpu/device_run.py reads it)");
list.SetAction(_ =>
{
    foreach (var bench in gpuBenches)
    {
        Console.WriteLine(bench.Name);
    }
});
root.Subcommands.Add(list);
foreach (var command in GpuCommands.Create(gpuBenches))
{
    root.Subcommands.Add(command);
}

return root.Parse(args).Invoke();
