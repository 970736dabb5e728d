using DeepSeekCuda.Bench.Harness;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Kernels;
using DeepSeekCuda.Loader.Synthetic;

namespace DeepSeekCuda.Bench.Benches;

/// <summary>
/// MLA prefill attention (<see cref="MlaPrefillKernel.Attention"/>, naive form) at DeepSeek-V3's geometry
/// (128 heads, q.k 192, v 128, latent 512): 1..4 fresh prompts of 1K/4K/16K tokens, causal. TFLOP/s count
/// the causal work only (N(N+1)/2 query-key pairs per head, 2·(192 + 128) flop each). Baseline measured in
/// the same run: device-to-device copy of the bytes the kernel must move at least once: the kv_b scratch
/// (k_nope | v, 512 bytes per token and head), the k_pe of the paged cache, q and the output. The scratch
/// alone is far above L2 at these sizes, so no input rotation is needed.
/// </summary>
internal static class MlaPrefillBench
{
    private const int Heads = 128;

    public static void Run(GpuBench gpu, bool quick, BenchReport report)
    {
        using var kernel = new MlaPrefillKernel(gpu.Device, gpu.Compiler);
        foreach (var len in quick ? [1024, 4096] : new[] { 1024, 4096, 16384 })
        {
            foreach (var batch in quick ? [1] : new[] { 1, 2, 4 })
            {
                var s = MlaPrefillShape.V3;
                var us = Time(gpu, kernel, s, batch, len);
                double pairs = (double)len * (len + 1) / 2 * batch * Heads;
                double tokens = (double)len * batch;
                var bytes = tokens * Heads * s.KvHead * 2 + tokens * s.QkRope * 2 + tokens * Heads * s.QkHead * 2 + tokens * Heads * s.V * 2;
                var shape = new Dictionary<string, object> { ["batch"] = batch, ["prompt"] = len, ["heads"] = Heads };
                report.Add(new BenchResult("mla_prefill", shape, us, pairs * 2 * (s.QkHead + s.V) / (us * 1e-6) / 1e12,
                    bytes / (us * 1e-6) / 1e9, "copy", gpu.CopyUs(bytes)));
            }
        }
    }

    private static double Time(GpuBench gpu, MlaPrefillKernel kernel, MlaPrefillShape s, int batch, int len)
    {
        var stream = gpu.Stream;
        var blocksPer = PagedLatentCache.BlocksFor(len);
        var table = new int[batch * blocksPer];
        for (var i = 0; i < table.Length; i++)
        {
            table[i] = i;
        }

        var cu = new int[batch + 1];
        for (var r = 0; r < batch; r++)
        {
            cu[r + 1] = cu[r] + len;
        }

        long tokens = (long)batch * len;
        using var tableD = DeviceBuffer<int>.From(gpu.Device, table, stream);
        using var cuD = DeviceBuffer<int>.From(gpu.Device, cu, stream); // fresh prompts: cuQ = cuKv
        using var cache = DeviceBuffer<ushort>.Allocate(gpu.Device, (long)table.Length * PagedLatentCache.BlockSize * s.CacheRow);
        using var q = DeviceBuffer<ushort>.Allocate(gpu.Device, tokens * Heads * s.QkHead);
        using var kv = DeviceBuffer<ushort>.Allocate(gpu.Device, tokens * Heads * s.KvHead);
        using var output = DeviceBuffer<ushort>.Allocate(gpu.Device, tokens * Heads * s.V);
        // Small bf16 values (0.0078125 and 0.5): finite scores, the softmax does its full work.
        cache.Fill32(0x3C003C00, stream);
        q.Fill32(0x3F003F00, stream);
        kv.Fill32(0x3C003C00, stream);
        var rows = (int)tokens;
        var offsets = new DeviceInts(cuD.Pointer, batch + 1);
        return gpu.Measure(_ => kernel.Attention(stream, s, Heads, new DeviceRows(q.Pointer, ElementType.BF16, rows, Heads * s.QkHead),
            new LatentPages(cache.Pointer, tableD.Pointer, blocksPer), offsets, offsets, new DeviceRows(kv.Pointer, ElementType.BF16, rows, Heads * s.KvHead), len,
            (float)ModelPresets.DeepSeekV3.SoftmaxScale, new DeviceRows(output.Pointer, ElementType.BF16, rows, Heads * s.V)));
    }
}
