using DeepSeekCuda.Cuda;
using DeepSeekCuda.Kernels;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>The dispatch kernels against the CPU reference <see cref="MoeDispatch"/>, bit for bit, outputs poisoned first.</summary>
[TestClass]
[TestCategory("Gpu")]
public sealed class MoeDispatchGpuTests : GpuTestBase
{
    public static IEnumerable<object[]> Cases =>
        from tokens in new[] { 1, 7, 1000, 4096 }
        from shape in new[] { (256, 8), (16, 4), (12, 3) }
        from skewed in new[] { false, true }
        select new object[] { tokens, shape.Item1, shape.Item2, skewed };

    [TestMethod]
    [DynamicData(nameof(Cases))]
    public void MatchesCpuReference(int tokens, int experts, int k, bool skewed)
    {
        using var kernel = new MoeDispatchKernel(Device, Compiler);
        foreach (var (tile, tMax, deviceCount) in new[] { (1, tokens, false), (64, tokens + 5, false), (128, tokens + 1000, true) })
        {
            var idx = MoeDispatchReferenceTests.Routing(new Random(tokens + experts * 3 + tile + (skewed ? 17 : 0)), tMax, k, experts, skewed);
            var what = $"{tokens} tokens (capacity {tMax}), {experts}/{k}, skewed {skewed}, tile {tile}, device count {deviceCount}";
            var expected = MoeDispatch.Compute(idx, tokens, k, experts, tile, tMax);
            MoeDispatchReferenceTests.AssertInvariants(expected, idx, tokens, k, experts, tile, what);

            using var idxD = DeviceBuffer<int>.From(Device, idx, Stream);
            using var countD = DeviceBuffer<int>.From(Device, [tokens], Stream);
            using var counts = Poison(experts);
            using var offsets = Poison(experts + 1);
            using var perm = Poison(MoeDispatch.RowsMax(tMax, k, experts, tile));
            using var inv = Poison(tMax * k);
            using var work = Poison(MoeDispatchKernel.WorkspaceInts(tMax, k, experts));
            kernel.Launch(Stream, new DeviceInts(idxD.Pointer, tMax * k), deviceCount ? 0 : tokens,
                new MoeDispatchBuffers(counts.Pointer, offsets.Pointer, perm.Pointer, inv.Pointer, work.Pointer, tMax, k, experts, tile), deviceCount ? countD.Pointer : 0);

            CollectionAssert.AreEqual(expected.Counts, counts.ToArray(Stream), $"{what}: counts");
            CollectionAssert.AreEqual(expected.Offsets, offsets.ToArray(Stream), $"{what}: offsets");
            CollectionAssert.AreEqual(expected.Perm, perm.ToArray(Stream), $"{what}: perm");
            CollectionAssert.AreEqual(expected.Inv, inv.ToArray(Stream), $"{what}: inv");
        }
    }

    [TestMethod]
    public void OutOfRangeEntriesAreSkipped()
    {
        using var kernel = new MoeDispatchKernel(Device, Compiler);
        int[] idx = [1, -1, 16, 0, 3, 3];
        var expected = MoeDispatch.Compute(idx, 3, 2, 16, 4);
        using var idxD = DeviceBuffer<int>.From(Device, idx, Stream);
        using var counts = Poison(16);
        using var offsets = Poison(17);
        using var perm = Poison(MoeDispatch.RowsMax(3, 2, 16, 4));
        using var inv = Poison(6);
        using var work = Poison(MoeDispatchKernel.WorkspaceInts(3, 2, 16));
        kernel.Launch(Stream, new DeviceInts(idxD.Pointer, 6), 3, new MoeDispatchBuffers(counts.Pointer, offsets.Pointer, perm.Pointer, inv.Pointer, work.Pointer, 3, 2, 16, 4));
        CollectionAssert.AreEqual(expected.Counts, counts.ToArray(Stream));
        CollectionAssert.AreEqual(expected.Offsets, offsets.ToArray(Stream));
        CollectionAssert.AreEqual(expected.Perm, perm.ToArray(Stream));
        CollectionAssert.AreEqual(expected.Inv, inv.ToArray(Stream));
    }

    /// <summary>
    /// Expert parallelism: the kernels translate the gate's global ids through a device's expert map (V3 round-robin over
    /// 8 devices, the Tiny preset split unevenly over 5) and lay out its slots as the reference does on the localized ids.
    /// </summary>
    [TestMethod]
    [DataRow(256, 8, 8, 1000)]
    [DataRow(256, 8, 8, 3)]
    [DataRow(12, 3, 5, 129)]
    public void MappedMatchesCpuReference(int experts, int k, int devices, int tokens)
    {
        using var kernel = new MoeDispatchKernel(Device, Compiler);
        const int tile = 64;
        var tMax = tokens + 7;
        var idx = MoeDispatchReferenceTests.Routing(new Random(experts + tokens), tMax, k, experts, skewed: false);
        idx[0] = experts; // out of the map's range: not routed anywhere
        using var idxD = DeviceBuffer<int>.From(Device, idx, Stream);
        foreach (var deviceCount in new[] { false, true })
        {
            using var countD = DeviceBuffer<int>.From(Device, [tokens], Stream);
            for (var d = 0; d < devices; d++)
            {
                int[] held = [.. Enumerable.Range(0, experts).Where(e => (experts == 256 ? e % devices : e * devices / experts) == d)];
                var map = MoeDispatch.ExpertMap(experts, held);
                var local = MoeDispatch.Localize(idx, tokens * k, map);
                var expected = MoeDispatch.Compute(local, tokens, k, held.Length, tile, tMax);
                var what = $"{experts}/{k} device {d} of {devices}, {tokens} tokens (capacity {tMax}), device count {deviceCount}";

                using var mapD = DeviceBuffer<int>.From(Device, map, Stream);
                using var localD = Poison(tMax * k);
                using var counts = Poison(held.Length);
                using var offsets = Poison(held.Length + 1);
                using var perm = Poison(MoeDispatch.RowsMax(tMax, k, held.Length, tile));
                using var inv = Poison(tMax * k);
                using var work = Poison(MoeDispatchKernel.WorkspaceInts(tMax, k, held.Length));
                kernel.Launch(Stream, new DeviceInts(idxD.Pointer, tMax * k), deviceCount ? 0 : tokens,
                    new MoeDispatchBuffers(counts.Pointer, offsets.Pointer, perm.Pointer, inv.Pointer, work.Pointer, tMax, k, held.Length, tile),
                    deviceCount ? countD.Pointer : 0, new DeviceExpertMap(mapD.Pointer, experts, new DeviceInts(localD.Pointer, tMax * k)));

                CollectionAssert.AreEqual(local, localD.ToArray(Stream)[..(tokens * k)], $"{what}: local ids");
                CollectionAssert.AreEqual(expected.Counts, counts.ToArray(Stream), $"{what}: counts");
                CollectionAssert.AreEqual(expected.Offsets, offsets.ToArray(Stream), $"{what}: offsets");
                CollectionAssert.AreEqual(expected.Perm, perm.ToArray(Stream), $"{what}: perm");
                CollectionAssert.AreEqual(expected.Inv, inv.ToArray(Stream), $"{what}: inv");
            }
        }
    }

    private DeviceBuffer<int> Poison(long n)
    {
        var b = DeviceBuffer<int>.Allocate(Device, n);
        b.Fill32(NaNPattern, Stream);
        return b;
    }
}
