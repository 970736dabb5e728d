using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Backends.Cuda;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Cuda.Native;
using DeepSeekCuda.Distributed;
using DeepSeekCuda.Kernels;

namespace DeepSeekCuda.Tests.Distributed;

/// <summary>
/// The CUDA communicator's pure glue, without a GPU: its argument rules (typed exceptions naming the device and the
/// tensor), the refusal without CUDA, and the CUDA_DEVICE_MAX_CONNECTIONS setting (set by <see cref="TestAssembly"/> before any test touches CUDA).
/// </summary>
[TestClass]
public sealed class CudaCommunicatorTests
{
    [TestMethod]
    public void ConstructionWithoutCudaThrowsCudaUnavailable()
    {
        if (CudaBackend.IsSupported(out _))
        {
            Assert.Inconclusive("CUDA and NVRTC are usable here; the refusal cannot be observed");
        }

        foreach (var create in new Func<CudaParallel>[] { () => CudaParallel.Logical(2), () => CudaParallel.Devices([0, 1]), () => CudaParallel.Logical(1) })
        {
            var e = Assert.ThrowsExactly<CudaUnavailableException>(() => create().Dispose());
            Assert.IsFalse(string.IsNullOrWhiteSpace(e.Reason));
        }
    }

    [TestMethod]
    public void RankCountsAndDeviceListsAreCheckedBeforeCuda()
    {
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => CudaParallel.Logical(0));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => CudaParallel.Logical(AllReduceKernel.MaxRanks + 1));
        StringAssert.Contains(Assert.ThrowsExactly<ArgumentException>(() => CudaParallel.Devices([0, 1, 0])).Message, "names a GPU twice");
        Assert.ThrowsExactly<ArgumentException>(() => CudaParallel.Devices([]));
        Assert.ThrowsExactly<ArgumentNullException>(() => new CudaCommunicator(null!, []));
    }

    [TestMethod]
    public void AllReduceArgumentsNameTheDeviceAndTheTensor()
    {
        using var cpu = new CpuBackend();
        using Tensor a = cpu.Allocate(2, 4), b = cpu.Allocate(2, 4), c = cpu.Allocate(2, 4), wide = cpu.Allocate(2, 5);
        var home = new Dictionary<Tensor, int> { [a] = 0, [b] = 1, [c] = 2, [wide] = 1 };
        bool Holds(Tensor t, int r) => home[t] == r;

        CommunicatorArguments.CheckAllReduce([a, b, c], 3, Holds);
        Assert.ThrowsExactly<ArgumentNullException>(() => CommunicatorArguments.CheckAllReduce(null!, 3, Holds));
        StringAssert.Contains(Assert.ThrowsExactly<ArgumentException>(() => CommunicatorArguments.CheckAllReduce([a, b], 3, Holds)).Message, "2 tensors for 3 devices");
        StringAssert.Contains(Assert.ThrowsExactly<ArgumentNullException>(() => CommunicatorArguments.CheckAllReduce([a, null!, c], 3, Holds)).Message, "device 1");
        var shape = Assert.ThrowsExactly<ArgumentException>(() => CommunicatorArguments.CheckAllReduce([a, wide, c], 3, Holds));
        StringAssert.Contains(shape.Message, "device 1");
        StringAssert.Contains(shape.Message, wide.ToString());
        var misplaced = Assert.ThrowsExactly<ArgumentException>(() => CommunicatorArguments.CheckAllReduce([a, c, b], 3, Holds));
        StringAssert.Contains(misplaced.Message, "given for device 1 does not live on device 1");
        home[c] = 1;
        StringAssert.Contains(Assert.ThrowsExactly<ArgumentException>(() => CommunicatorArguments.CheckAllReduce([a, c, c], 3, (t, r) => r > 0 || home[t] == r)).Message,
            "given for devices 1 and 2");
    }

    [TestMethod]
    public void CopyArgumentsNameTheDeviceAndTheTensor()
    {
        using var cpu = new CpuBackend();
        using Tensor a = cpu.Allocate(3, 4), b = cpu.Allocate(3, 4), other = cpu.Allocate(4, 3);
        var home = new Dictionary<Tensor, int> { [a] = 0, [b] = 1, [other] = 1 };
        bool Holds(Tensor t, int r) => home[t] == r;

        CommunicatorArguments.CheckCopy(a, 0, b, 1, 2, Holds);
        Assert.AreEqual("sourceDevice", Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => CommunicatorArguments.CheckCopy(a, -1, b, 1, 2, Holds)).ParamName);
        var range = Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => CommunicatorArguments.CheckCopy(a, 0, b, 2, 2, Holds));
        Assert.AreEqual("destinationDevice", range.ParamName);
        StringAssert.Contains(range.Message, "device 2 is outside 0..1");
        StringAssert.Contains(Assert.ThrowsExactly<ArgumentException>(() => CommunicatorArguments.CheckCopy(a, 0, other, 1, 2, Holds)).Message, "shapes differ");
        var source = Assert.ThrowsExactly<ArgumentException>(() => CommunicatorArguments.CheckCopy(b, 0, a, 1, 2, Holds));
        Assert.AreEqual("source", source.ParamName);
        StringAssert.Contains(source.Message, $"{b} does not live on device 0");
        Assert.AreEqual("destination", Assert.ThrowsExactly<ArgumentException>(() => CommunicatorArguments.CheckCopy(a, 0, a, 1, 2, Holds)).ParamName);
        Assert.ThrowsExactly<ArgumentNullException>(() => CommunicatorArguments.CheckCopy(null!, 0, b, 1, 2, Holds));
    }

    [TestMethod]
    public void ConnectionsAreConfiguredBeforeCudaInitializes()
    {
        // TestAssembly set it (or the environment did) before any test could initialize the driver; the driver reads
        // it with getenv, which sees the libc environment.
        var value = LibC.GetEnv(CudaParallel.ConnectionsVariable);
        Assert.IsNotNull(value, "CUDA_DEVICE_MAX_CONNECTIONS is not in the native environment");
        Assert.AreEqual(ConnectionSetting.AlreadySet, CudaParallel.ConfigureConnections());
        Assert.AreEqual(value, LibC.GetEnv(CudaParallel.ConnectionsVariable));
        Assert.AreEqual(value, Environment.GetEnvironmentVariable(CudaParallel.ConnectionsVariable));
    }
}
