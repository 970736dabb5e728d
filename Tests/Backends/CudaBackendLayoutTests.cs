using DeepSeekCuda.Backends.Cuda;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Hosting;
using DeepSeekCuda.Kernels;

namespace DeepSeekCuda.Tests.Backends;

/// <summary>
/// What of <see cref="CudaBackend"/> runs without a GPU: the typed refusal without a device, the automatic
/// device choice, and the host-side layout glue (expert stacking offsets, block tables, append arguments).
/// </summary>
[TestClass]
public sealed class CudaBackendLayoutTests
{
    [TestMethod]
    public void ConstructionWithoutCudaThrowsTypedExceptionWithTheReason()
    {
        if (CudaBackend.IsSupported(out _))
        {
            Assert.Inconclusive("CUDA and NVRTC are usable here; the refusal cannot be observed");
        }

        var e = Assert.ThrowsExactly<CudaUnavailableException>(() => new CudaBackend());
        Assert.IsFalse(string.IsNullOrWhiteSpace(e.Reason));
        Assert.IsTrue(CudaBackend.IsSupported(out var reason) == false && e.Reason == reason, $"'{e.Reason}' vs '{reason}'");
    }

    [TestMethod]
    public void AutoPicksTheCpuWhenCudaIsUnusableAndSaysWhy()
    {
        if (CudaBackend.IsSupported(out _))
        {
            Assert.AreEqual(ComputeDevice.Cuda, BackendSelection.Resolve(ComputeDevice.Auto, out _));
            return;
        }

        Assert.AreEqual(ComputeDevice.Cpu, BackendSelection.Resolve(ComputeDevice.Auto, out var why));
        StringAssert.StartsWith(why, "auto: ");
        Assert.AreEqual(ComputeDevice.Cpu, BackendSelection.Resolve(ComputeDevice.Cpu, out _));
        using var backend = BackendSelection.Create(ComputeDevice.Auto);
        StringAssert.StartsWith(backend.Name, "cpu");
        Assert.ThrowsExactly<CudaUnavailableException>(() => BackendSelection.Create(ComputeDevice.Cuda));
    }

    [TestMethod]
    [DataRow(1, 1)]
    [DataRow(64, 1)]
    [DataRow(65, 2)]
    [DataRow(200, 4)]
    [DataRow(4096, 64)]
    public void IdentityBlockTableMapsEveryPositionToItself(int capacity, int blocks)
    {
        var table = CudaBackendLayout.IdentityBlockTable(capacity);
        Assert.HasCount(blocks, table);
        for (var p = 0; p < capacity; p++)
        {
            Assert.AreEqual(p, PagedLatentCache.Slot(table, table.Length, 0, p));
        }
    }

    [TestMethod]
    public void AppendArgumentsAreRequestZeroThenPositions()
    {
        CollectionAssert.AreEqual(new[] { 0, 0, 0, 7, 8, 9 }, CudaBackendLayout.AppendArguments(7, 3));
        Assert.IsEmpty(CudaBackendLayout.AppendArguments(5, 0));
    }

    /// <summary>
    /// Stacks random per-expert codes and scales with the layout's offsets into host arrays, then reads them back with
    /// the indexing MoeExpertStack documents (W13 [E, 2I, H], gate rows first; scales [E, 2⌈I/128⌉, ⌈H/128⌉]; W2 [E, H, I]).
    /// </summary>
    [TestMethod]
    [DataRow(3, 256, 128)]
    [DataRow(2, 200, 72)]
    [DataRow(4, 136, 300)]
    public void ExpertStackLayoutMatchesTheGroupedGemmIndexing(int experts, int hidden, int inter)
    {
        var layout = new ExpertStackLayout(experts, hidden, inter);
        var stack = new MoeExpertStack(0, 0, 0, 0, experts, hidden, inter);
        Assert.AreEqual(stack.ExpertBytes * experts, layout.W13Length + layout.W2Length);
        Assert.AreEqual(stack.W13ScaleCount * experts, layout.W13ScaleLength);
        Assert.AreEqual(stack.W2ScaleCount * experts, layout.W2ScaleLength);

        var rng = new Random(Environment.TickCount);
        int ib = Fp8GemmKernel.BlocksFor(inter), hb = Fp8GemmKernel.BlocksFor(hidden);
        var gate = new byte[experts][];
        var up = new byte[experts][];
        var down = new byte[experts][];
        var gs = new float[experts][];
        var us = new float[experts][];
        var ds = new float[experts][];
        var w13 = new byte[layout.W13Length];
        var w2 = new byte[layout.W2Length];
        var s13 = new float[layout.W13ScaleLength];
        var s2 = new float[layout.W2ScaleLength];
        for (var e = 0; e < experts; e++)
        {
            rng.NextBytes(gate[e] = new byte[inter * hidden]);
            rng.NextBytes(up[e] = new byte[inter * hidden]);
            rng.NextBytes(down[e] = new byte[hidden * inter]);
            gs[e] = [.. Enumerable.Range(0, ib * hb).Select(_ => rng.NextSingle())];
            us[e] = [.. Enumerable.Range(0, ib * hb).Select(_ => rng.NextSingle())];
            ds[e] = [.. Enumerable.Range(0, hb * ib).Select(_ => rng.NextSingle())];
            gate[e].CopyTo(w13, layout.Gate(e));
            up[e].CopyTo(w13, layout.Up(e));
            down[e].CopyTo(w2, layout.Down(e));
            gs[e].CopyTo(s13, layout.GateScales(e));
            us[e].CopyTo(s13, layout.UpScales(e));
            ds[e].CopyTo(s2, layout.DownScales(e));
        }

        for (var e = 0; e < experts; e++)
        {
            for (var r = 0; r < 2 * inter; r++)
            {
                for (var c = 0; c < hidden; c += 7)
                {
                    var expected = r < inter ? gate[e][r * hidden + c] : up[e][(r - inter) * hidden + c];
                    Assert.AreEqual(expected, w13[((long)e * 2 * inter + r) * hidden + c], $"W13[{e}, {r}, {c}]");
                }
            }

            for (var rb = 0; rb < 2 * ib; rb++)
            {
                for (var cb = 0; cb < hb; cb++)
                {
                    var expected = rb < ib ? gs[e][rb * hb + cb] : us[e][(rb - ib) * hb + cb];
                    Assert.AreEqual(expected, s13[((long)e * 2 * ib + rb) * hb + cb], $"W13 scales[{e}, {rb}, {cb}]");
                }
            }

            for (var r = 0; r < hidden; r++)
            {
                for (var c = 0; c < inter; c += 5)
                {
                    Assert.AreEqual(down[e][r * inter + c], w2[((long)e * hidden + r) * inter + c], $"W2[{e}, {r}, {c}]");
                }
            }

            CollectionAssert.AreEqual(ds[e], s2.AsSpan((int)((long)e * hb * ib), hb * ib).ToArray(), $"W2 scales of expert {e}");
        }
    }
}
