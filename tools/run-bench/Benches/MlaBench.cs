using DeepSeekCuda.Bench.Harness;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Kernels;

namespace DeepSeekCuda.Bench.Benches;

/// <summary>
/// MLA decode attention (<see cref="MlaDecodeKernel.Decode"/>: split-KV kernel plus combine, the device's default split
/// count) on FlashMLA's shapes: batch 128, mean context 4096 and 8192 (lengths drawn around the mean with a fixed
/// seed, as FlashMLA's test: normal(mean, mean/2), at least s_q), heads 16/32/64/128, s_q 1 and 2, rows 576, values
/// 512, blocks of 64. FLOPs = 2·s_q·Σcontext·heads·(576 + 512); bytes = 2·(Σcontext·576 + batch·s_q·heads·(576 + 512)).
/// Baseline: the same-run device copy time for those bytes. The cache exceeds L2 and L2 is flushed before each run.
/// </summary>
internal static class MlaBench
{
    private const int Batch = 128;

    public static void Run(GpuBench gpu, bool quick, BenchReport report)
    {
        using var dec = new MlaDecodeKernel(gpu.Device, gpu.Compiler);
        var shape = LatentShape.V3;
        foreach (var context in quick ? [4096] : new[] { 4096, 8192 })
        {
            var lengths = Lengths(context, 2);
            foreach (var heads in quick ? [16, 128] : new[] { 16, 32, 64, 128 })
            {
                foreach (var qTokens in new[] { 1, 2 })
                {
                    long sum = lengths.Sum(l => (long)Math.Max(l, qTokens));
                    var us = Time(gpu, dec, shape, lengths, heads, qTokens, context);
                    var flops = 2.0 * qTokens * sum * heads * (shape.RowWidth + shape.Latent);
                    var bytes = 2.0 * (sum * shape.RowWidth + (double)Batch * qTokens * heads * (shape.RowWidth + shape.Latent));
                    var s = new Dictionary<string, object> { ["batch"] = Batch, ["context"] = context, ["heads"] = heads, ["q_tokens"] = qTokens };
                    report.Add(new BenchResult("mla_decode", s, us, flops / (us * 1e-6) / 1e12, bytes / (us * 1e-6) / 1e9, "copy", gpu.CopyUs(bytes)));
                }
            }
        }
    }

    private static int[] Lengths(int mean, int minimum)
    {
        var r = new Random(mean);
        var lengths = new int[Batch];
        for (var i = 0; i < Batch; i++)
        {
            var z = Math.Sqrt(-2 * Math.Log(1 - r.NextDouble())) * Math.Cos(2 * Math.PI * r.NextDouble());
            lengths[i] = Math.Max(minimum, (int)(mean + z * mean / 2));
        }

        return lengths;
    }

    private static double Time(GpuBench gpu, MlaDecodeKernel dec, LatentShape shape, int[] lengths, int heads, int qTokens, int context)
    {
        var stream = gpu.Stream;
        var maxBlocks = lengths.Max(PagedLatentCache.BlocksFor);
        var table = new int[Batch * maxBlocks];
        var next = 0;
        for (var r = 0; r < Batch; r++)
        {
            for (var b = 0; b < maxBlocks; b++)
            {
                table[r * maxBlocks + b] = b < PagedLatentCache.BlocksFor(lengths[r]) ? next++ : -1;
            }
        }

        var splits = dec.DefaultSplits(shape, Batch, heads, qTokens, context);
        var rows = (long)Batch * qTokens * heads;
        using var cache = DeviceBuffer<byte>.Allocate(gpu.Device, PagedLatentCache.Bytes(next, shape));
        using var q = DeviceBuffer<byte>.Allocate(gpu.Device, rows * shape.RowWidth * 2);
        using var tableD = DeviceBuffer<int>.From(gpu.Device, table, stream);
        using var lengthsD = DeviceBuffer<int>.From(gpu.Device, lengths, stream);
        using var output = DeviceBuffer<float>.Allocate(gpu.Device, rows * shape.Latent);
        using var lse = DeviceBuffer<float>.Allocate(gpu.Device, rows);
        using var workspace = DeviceBuffer<byte>.Allocate(gpu.Device, Math.Max(4, MlaDecodeKernel.WorkspaceBytes(shape, Batch, heads, qTokens, splits)));
        cache.Fill32(0x3C003C00u, stream); // bf16 2^-7 pairs: finite, unremarkable scores
        q.Fill32(0x3C003C00u, stream);
        var queries = Batch * qTokens;
        return gpu.Measure(_ => dec.Decode(stream, shape, heads, new DeviceRows(q.Pointer, ElementType.BF16, queries, heads * shape.RowWidth),
            new LatentPages(cache.Pointer, tableD.Pointer, maxBlocks), new DeviceInts(lengthsD.Pointer, Batch), null, 0.1352338f,
            new DeviceRows(output.Pointer, ElementType.F32, queries, heads * shape.Latent), new DeviceRows(lse.Pointer, ElementType.F32, queries, heads),
            splits, workspace.Pointer));
    }
}
