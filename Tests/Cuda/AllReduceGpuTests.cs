using System.Runtime.InteropServices;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Distributed;
using DeepSeekCuda.Kernels;
using DeepSeekCuda.Loader.Numerics;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>
/// The P2P all-reduce on N logical ranks of one GPU against a host sum in the kernels' order (float32,
/// rank 0 first; BF16 inputs widened, the sum rounded once): exact, bit for bit, on every rank. Outputs
/// are poisoned with NaN first; several calls in a row reuse the flags with new epochs.
/// </summary>
[TestClass]
[TestCategory("Gpu")]
public sealed class AllReduceGpuTests : GpuTestBase
{
    // 1 element, ragged sizes around block and chunk edges, a decode message (7168 × 4 tokens), and several MB.
    private static readonly long[] s_sizes = [1, 7, 511, 513, 4099, 7168 * 4, 65_536 + 3, 3 * 1024 * 1024 + 5];

    public static IEnumerable<object[]> Cases =>
        from ranks in new[] { 2, 4, 8 }
        from type in new[] { ElementType.F32, ElementType.BF16 }
        from algorithm in new[] { AllReduceAlgorithm.OneShot, AllReduceAlgorithm.TwoStep }
        select new object[] { ranks, type.ToString(), algorithm.ToString() };

    [TestMethod]
    [DynamicData(nameof(Cases))]
    public void SumsExactlyInRankOrderOnEveryRank(int ranks, string typeName, string algorithmName)
    {
        var type = Enum.Parse<ElementType>(typeName);
        var algorithm = Enum.Parse<AllReduceAlgorithm>(algorithmName);
        using var mesh = DeviceMesh.Logical(Device, ranks, Compiler);
        Assert.IsTrue(mesh.AllPeers && mesh.UsesKernels, mesh.Topology());
        foreach (var count in s_sizes)
        {
            // Two calls per size: the second reuses every flag slot with the next epoch.
            for (var call = 0; call < 2; call++)
            {
                RunAndCheck(mesh, count, type, algorithm, seed: (int)count * 31 + ranks * 7 + call, $"{ranks} ranks {type} {algorithm} {count} elements call {call}");
            }
        }
    }

    [TestMethod]
    public void AutomaticChoiceAndSpecialValues()
    {
        using var mesh = DeviceMesh.Logical(Device, 4, Compiler);
        foreach (var count in new long[] { 1000, AllReduceKernel.OneShotMaxBytes / 4 + 1 })
        {
            RunAndCheck(mesh, count, ElementType.F32, null, seed: 5, $"auto {count}", special: true);
        }
    }

    [TestMethod]
    public void ThreeRanksFallBackToTheStagedHostSum()
    {
        // 3 is not a compiled rank count: the mesh stages through the host with the same order and bits.
        using var mesh = DeviceMesh.Logical(Device, 3, Compiler);
        Assert.IsFalse(mesh.UsesKernels);
        foreach (var type in new[] { ElementType.F32, ElementType.BF16 })
        {
            RunAndCheck(mesh, 4099, type, null, seed: 9, $"staged {type}");
        }
    }

    [TestMethod]
    public void CopyBetweenLogicalRanks()
    {
        using var mesh = DeviceMesh.Logical(Device, 2, Compiler);
        var values = Normal(Rng(3), 1000);
        using var src = DeviceBuffer<float>.From(Device, values, mesh.Stream(0));
        using var dst = DeviceBuffer<float>.Allocate(Device, 1000);
        dst.Fill32(NaNPattern, mesh.Stream(1));
        mesh.Copy(src.Pointer, 0, dst.Pointer, 1, 4000);
        mesh.Synchronize();
        CollectionAssert.AreEqual(values, dst.ToArray(mesh.Stream(1)));
    }

    [TestMethod]
    public void TopologyOfTheMachine()
    {
        // Every GPU of this machine as one rank each: the peer matrix is reported, and an all-reduce works
        // either through the kernels (all peers) or staged through the host.
        var count = DeepSeekCuda.Cuda.Cuda.DeviceCount;
        var devices = Enumerable.Range(0, Math.Min(count, AllReduceKernel.MaxRanks)).Select(i => i == 0 ? Device : CudaDevice.Open(i)).ToArray();
        try
        {
            using var mesh = DeviceMesh.Open(devices, Compiler);
            Console.WriteLine(mesh.Topology());
            Assert.AreEqual(devices.Length, mesh.Ranks);
            if (devices.Length > 1)
            {
                RunAndCheck(mesh, 70_000, ElementType.BF16, null, seed: 1, "physical devices");
            }
        }
        finally
        {
            foreach (var d in devices.Skip(1))
            {
                d.Dispose();
            }
        }
    }

    private static void RunAndCheck(DeviceMesh mesh, long count, ElementType type, AllReduceAlgorithm? algorithm, int seed, string what, bool special = false)
    {
        var n = mesh.Ranks;
        var rng = new Random(seed);
        var size = type == ElementType.F32 ? 4 : 2;
        var host = new float[n][];
        var inputs = new DeviceBuffer<byte>[n];
        var outputs = new DeviceBuffer<byte>[n];
        try
        {
            for (var r = 0; r < n; r++)
            {
                host[r] = Normal(rng, checked((int)count), scale: 1f + r);
                if (special && count > 8)
                {
                    // A NaN and an infinity on one rank reach every output at the same index; a large value tests order.
                    host[r][3] = r == 1 ? float.NaN : 1f;
                    host[r][5] = r == 0 ? float.PositiveInfinity : 2f;
                    host[r][7] = r == 0 ? 1e8f : 1f;
                }

                var d = mesh.Device(r);
                var s = mesh.Stream(r);
                inputs[r] = DeviceBuffer<byte>.Allocate(d, count * size);
                inputs[r].Upload(Encode(host[r], type), s); // rounds host[r] to bf16 in place for BF16
                outputs[r] = DeviceBuffer<byte>.Allocate(d, count * size);
                outputs[r].Fill8(0xFF, s); // 0xFFFF... is a NaN in f32 and in bf16
                s.Synchronize();
            }

            mesh.AllReduce([.. inputs.Select(b => b.Pointer)], [.. outputs.Select(b => b.Pointer)], count, type, algorithm);
            mesh.Synchronize();

            // Reference: the same order, in float32, rounded once to the payload type.
            var expected = (float[])host[0].Clone();
            for (var r = 1; r < n; r++)
            {
                for (var i = 0; i < count; i++)
                {
                    expected[i] += host[r][i];
                }
            }

            var expectedBits = Encode(expected, type);
            for (var r = 0; r < n; r++)
            {
                var got = outputs[r].ToArray(mesh.Stream(r)).AsSpan(0, checked((int)(count * size)));
                for (var i = 0; i < count; i++)
                {
                    float g = Decode(got, type, i), e = Decode(expectedBits, type, i);
                    // Bit-exact, except that NaN payloads may differ between the GPU and the host.
                    var same = (float.IsNaN(g) && float.IsNaN(e)) || BitConverter.SingleToInt32Bits(g) == BitConverter.SingleToInt32Bits(e);
                    if (!same)
                    {
                        Assert.Fail($"{what}: rank {r} element {i}: got {g:R}, expected {e:R}");
                    }
                }
            }
        }
        finally
        {
            foreach (var b in inputs.Concat(outputs))
            {
                b?.Dispose();
            }
        }
    }

    private static byte[] Encode(float[] values, ElementType type)
    {
        if (type == ElementType.F32)
        {
            return MemoryMarshal.AsBytes(values.AsSpan()).ToArray();
        }

        var bits = new ushort[values.Length];
        for (var i = 0; i < values.Length; i++)
        {
            bits[i] = BFloat16.FromFloat(values[i]);
            values[i] = BFloat16.ToFloat(bits[i]);
        }

        return MemoryMarshal.AsBytes(bits.AsSpan()).ToArray();
    }

    private static float Decode(ReadOnlySpan<byte> bytes, ElementType type, int index) =>
        type == ElementType.F32 ? MemoryMarshal.Cast<byte, float>(bytes)[index]
        : BFloat16.ToFloat(MemoryMarshal.Cast<byte, ushort>(bytes)[index]);
}
