using System.Text;
using DeepSeekCuda.Cuda.Native;

namespace DeepSeekCuda.Cuda;

/// <summary>
/// One GPU with its primary context retained for the lifetime of this object. Properties are read from
/// the device once, so launchers can size their geometry and shared memory from them.
/// </summary>
internal sealed unsafe class CudaDevice : IDisposable
{
    private IntPtr _context;

    private CudaDevice(int ordinal)
    {
        Ordinal = ordinal;
        int dev;
        CudaCheck.Driver(CuDriver.cuDeviceGet(&dev, ordinal), ordinal);
        Handle = dev;
        var name = stackalloc byte[256];
        CudaCheck.Driver(CuDriver.cuDeviceGetName(name, 256, dev), ordinal);
        Name = Encoding.UTF8.GetString(name, new ReadOnlySpan<byte>(name, 256).IndexOf((byte)0) is var n and >= 0 ? n : 256);
        nuint total;
        CudaCheck.Driver(CuDriver.cuDeviceTotalMem(&total, dev), ordinal);
        TotalMemory = (long)total;
        ComputeMajor = Attribute(CuDeviceAttribute.ComputeCapabilityMajor);
        ComputeMinor = Attribute(CuDeviceAttribute.ComputeCapabilityMinor);
        MultiprocessorCount = Attribute(CuDeviceAttribute.MultiprocessorCount);
        SharedMemoryPerBlock = Attribute(CuDeviceAttribute.MaxSharedMemoryPerBlock);
        SharedMemoryPerBlockOptin = Attribute(CuDeviceAttribute.MaxSharedMemoryPerBlockOptin);
        SharedMemoryPerMultiprocessor = Attribute(CuDeviceAttribute.MaxSharedMemoryPerMultiprocessor);
        L2CacheSize = Attribute(CuDeviceAttribute.L2CacheSize);
        MaxThreadsPerBlock = Attribute(CuDeviceAttribute.MaxThreadsPerBlock);
        IntPtr ctx;
        CudaCheck.Driver(CuDriver.cuDevicePrimaryCtxRetain(&ctx, dev), ordinal);
        _context = ctx;
    }

    /// <summary>Opens device <paramref name="ordinal"/>; throws <see cref="CudaUnavailableException"/> without CUDA.</summary>
    public static CudaDevice Open(int ordinal = 0)
    {
        Cuda.EnsureAvailable();
        var count = Cuda.DeviceCount;
        if (ordinal < 0 || ordinal >= count)
        {
            throw new ArgumentOutOfRangeException(nameof(ordinal), $"device {ordinal} requested; {count} present");
        }

        return new CudaDevice(ordinal);
    }

    /// <summary>The device ordinal.</summary>
    public int Ordinal { get; }

    /// <summary>The CUdevice handle.</summary>
    public int Handle { get; }

    /// <summary>Marketing name, e.g. "NVIDIA H100 80GB HBM3".</summary>
    public string Name { get; }

    /// <summary>Device memory in bytes.</summary>
    public long TotalMemory { get; }

    /// <summary>Compute capability major (9 on Hopper).</summary>
    public int ComputeMajor { get; }

    /// <summary>Compute capability minor.</summary>
    public int ComputeMinor { get; }

    /// <summary>Number of streaming multiprocessors.</summary>
    public int MultiprocessorCount { get; }

    /// <summary>Static shared memory per block without opt-in (48 KiB).</summary>
    public int SharedMemoryPerBlock { get; }

    /// <summary>Shared memory per block after cuFuncSetAttribute raises the dynamic limit.</summary>
    public int SharedMemoryPerBlockOptin { get; }

    /// <summary>Shared memory per multiprocessor.</summary>
    public int SharedMemoryPerMultiprocessor { get; }

    /// <summary>L2 cache size in bytes.</summary>
    public int L2CacheSize { get; }

    /// <summary>Largest block.</summary>
    public int MaxThreadsPerBlock { get; }

    /// <summary>The retained primary context.</summary>
    public IntPtr Context => _context != IntPtr.Zero ? _context : throw new ObjectDisposedException(nameof(CudaDevice));

    /// <summary>The NVRTC target for this device (see <see cref="NvrtcCompiler.TargetFor"/>).</summary>
    public KernelTarget Target => NvrtcCompiler.TargetFor(ComputeMajor, ComputeMinor);

    /// <summary>Reads a device attribute.</summary>
    public int Attribute(CuDeviceAttribute attribute)
    {
        int v;
        CudaCheck.Driver(CuDriver.cuDeviceGetAttribute(&v, attribute, Handle), Ordinal);
        return v;
    }

    /// <summary>Makes this device's primary context current on the calling thread.</summary>
    public void MakeCurrent() => CudaCheck.Driver(CuDriver.cuCtxSetCurrent(Context), Ordinal);

    /// <summary>Waits for all work on the device.</summary>
    public void Synchronize()
    {
        MakeCurrent();
        CudaCheck.Driver(CuDriver.cuCtxSynchronize(), Ordinal);
    }

    /// <summary>Free and total device memory.</summary>
    public (long Free, long Total) MemoryInfo()
    {
        MakeCurrent();
        nuint free, total;
        CudaCheck.Driver(CuDriver.cuMemGetInfo(&free, &total), Ordinal);
        return ((long)free, (long)total);
    }

    /// <summary>Whether this device can map <paramref name="peer"/>'s memory.</summary>
    public bool CanAccessPeer(CudaDevice peer)
    {
        int can;
        CudaCheck.Driver(CuDriver.cuDeviceCanAccessPeer(&can, Handle, peer.Handle), Ordinal);
        return can != 0;
    }

    /// <summary>Lets kernels and copies on this device reach <paramref name="peer"/>'s memory.</summary>
    public void EnablePeerAccess(CudaDevice peer)
    {
        MakeCurrent();
        var r = CuDriver.cuCtxEnablePeerAccess(peer.Context, 0);
        // 704 = CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED: asking twice is not a failure.
        if ((int)r != 704)
        {
            CudaCheck.Driver(r, Ordinal);
        }
    }

    /// <inheritdoc />
    public override string ToString() => $"cuda:{Ordinal} {Name} (sm_{ComputeMajor}{ComputeMinor}, {MultiprocessorCount} SMs, {TotalMemory >> 20} MiB)";

    /// <inheritdoc />
    public void Dispose()
    {
        if (_context != IntPtr.Zero)
        {
            _context = IntPtr.Zero;
            CudaCheck.Release(CuDriver.cuDevicePrimaryCtxRelease(Handle), Ordinal);
        }
    }
}
