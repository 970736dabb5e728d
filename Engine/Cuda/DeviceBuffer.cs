using System.Runtime.CompilerServices;
using DeepSeekCuda.Cuda.Native;

namespace DeepSeekCuda.Cuda;

/// <summary>Typed device memory. Owned buffers free on dispose; views over an arena do not.</summary>
internal sealed unsafe class DeviceBuffer<T> : IDisposable
    where T : unmanaged
{
    private ulong _pointer;
    private readonly bool _owned;

    private DeviceBuffer(CudaDevice device, ulong pointer, long length, bool owned)
    {
        Device = device;
        _pointer = pointer;
        Length = length;
        _owned = owned;
    }

    /// <summary>Allocates <paramref name="length"/> elements (uninitialized).</summary>
    public static DeviceBuffer<T> Allocate(CudaDevice device, long length)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        device.MakeCurrent();
        ulong p = 0;
        if (length > 0)
        {
            CudaCheck.Driver(CuDriver.cuMemAlloc(&p, checked((nuint)(length * sizeof(T)))), device.Ordinal);
            DriverAllocations.CountDevice(length * sizeof(T));
        }

        return new DeviceBuffer<T>(device, p, length, owned: true);
    }

    /// <summary>A non-owning view of memory owned elsewhere (an arena, a larger buffer).</summary>
    public static DeviceBuffer<T> View(CudaDevice device, ulong pointer, long length) => new(device, pointer, length, owned: false);

    /// <summary>Allocates and uploads <paramref name="data"/>.</summary>
    public static DeviceBuffer<T> From(CudaDevice device, ReadOnlySpan<T> data, CudaStream? stream = null)
    {
        var b = Allocate(device, data.Length);
        b.Upload(data, stream);
        return b;
    }

    /// <summary>The owning device.</summary>
    public CudaDevice Device { get; }

    /// <summary>Element count.</summary>
    public long Length { get; }

    /// <summary>Size in bytes.</summary>
    public long Bytes => Length * sizeof(T);

    /// <summary>The device address (CUdeviceptr), for kernel parameter structs.</summary>
    public ulong Pointer => _pointer != 0 || Length == 0 ? _pointer : throw new ObjectDisposedException(nameof(DeviceBuffer<T>));

    /// <summary>Address of element <paramref name="index"/>.</summary>
    public ulong At(long index) => Pointer + (ulong)(index * sizeof(T));

    /// <summary>
    /// Copies host data in. From pageable memory the driver stages the data before returning, so the
    /// span may be reused at once.
    /// </summary>
    public void Upload(ReadOnlySpan<T> data, CudaStream? stream = null, long offset = 0)
    {
        CheckRange(offset, data.Length);
        if (data.IsEmpty)
        {
            return;
        }

        Device.MakeCurrent();
        fixed (T* src = data)
        {
            CudaCheck.Driver(CuDriver.cuMemcpyHtoDAsync(At(offset), src, (nuint)(data.Length * sizeof(T)), stream?.Handle ?? IntPtr.Zero), Device.Ordinal);
        }

        if (stream is null)
        {
            CudaCheck.Driver(CuDriver.cuStreamSynchronize(IntPtr.Zero), Device.Ordinal);
        }
    }

    /// <summary>Copies device data out and waits for it.</summary>
    public void Download(Span<T> destination, CudaStream? stream = null, long offset = 0)
    {
        CheckRange(offset, destination.Length);
        if (destination.IsEmpty)
        {
            return;
        }

        Device.MakeCurrent();
        var s = stream?.Handle ?? IntPtr.Zero;
        fixed (T* dst = destination)
        {
            CudaCheck.Driver(CuDriver.cuMemcpyDtoHAsync(dst, At(offset), (nuint)(destination.Length * sizeof(T)), s), Device.Ordinal);
            CudaCheck.Driver(CuDriver.cuStreamSynchronize(s), Device.Ordinal);
        }
    }

    /// <summary>Downloads everything into a new array.</summary>
    public T[] ToArray(CudaStream? stream = null)
    {
        var a = new T[Length];
        Download(a, stream);
        return a;
    }

    /// <summary>Fills with a 32-bit pattern (T must be 4 bytes wide), e.g. a NaN poison.</summary>
    public void Fill32(uint pattern, CudaStream? stream = null)
    {
        if (Bytes % 4 != 0)
        {
            throw new InvalidOperationException("Fill32 needs a multiple of 4 bytes");
        }

        Device.MakeCurrent();
        CudaCheck.Driver(CuDriver.cuMemsetD32Async(Pointer, pattern, (nuint)(Bytes / 4), stream?.Handle ?? IntPtr.Zero), Device.Ordinal);
    }

    /// <summary>Fills every byte with <paramref name="value"/>.</summary>
    public void Fill8(byte value, CudaStream? stream = null)
    {
        Device.MakeCurrent();
        CudaCheck.Driver(CuDriver.cuMemsetD8Async(Pointer, value, (nuint)Bytes, stream?.Handle ?? IntPtr.Zero), Device.Ordinal);
    }

    /// <summary>Device-to-device copy of the first <paramref name="count"/> elements (−1: the whole) of <paramref name="source"/> into the start of this buffer.</summary>
    public void CopyFrom(DeviceBuffer<T> source, CudaStream stream, long count = -1)
    {
        count = count < 0 ? source.Length : count;
        source.CheckRange(0, count);
        CheckRange(0, count);
        var bytes = (nuint)(count * sizeof(T));
        if (source.Device == Device)
        {
            CudaCheck.Driver(CuDriver.cuMemcpyDtoDAsync(Pointer, source.Pointer, bytes, stream.Handle), Device.Ordinal);
        }
        else
        {
            CudaCheck.Driver(CuDriver.cuMemcpyPeerAsync(Pointer, Device.Context, source.Pointer, source.Device.Context, bytes, stream.Handle), Device.Ordinal);
        }
    }

    private void CheckRange(long offset, long count)
    {
        if (offset < 0 || count < 0 || offset + count > Length)
        {
            throw new ArgumentOutOfRangeException(nameof(offset), $"[{offset}, {offset + count}) outside a buffer of {Length} elements");
        }
    }

    /// <inheritdoc />
    public void Dispose()
    {
        if (_owned && _pointer != 0)
        {
            var p = _pointer;
            _pointer = 0;
            // cuMemFree acts on the pointer's own context; a context already torn down took it along.
            CudaCheck.Release(CuDriver.cuMemFree(p), Device.Ordinal);
        }

        _pointer = 0;
    }
}

/// <summary>Page-locked host memory: the staging end of asynchronous copies.</summary>
internal sealed unsafe class PinnedBuffer<T> : IDisposable
    where T : unmanaged
{
    private T* _pointer;

    /// <summary>Allocates <paramref name="length"/> pinned elements (portable across contexts).</summary>
    public PinnedBuffer(CudaDevice device, long length)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        Device = device;
        Length = length;
        device.MakeCurrent();
        void* p = null;
        CudaCheck.Driver(CuDriver.cuMemHostAlloc(&p, (nuint)Math.Max(1, length * sizeof(T)), CuDriver.HostAllocPortable), device.Ordinal);
        DriverAllocations.CountPinned(length * sizeof(T));
        _pointer = (T*)p;
    }

    /// <summary>The device whose context allocated it.</summary>
    public CudaDevice Device { get; }

    /// <summary>Element count.</summary>
    public long Length { get; }

    /// <summary>The host memory.</summary>
    public Span<T> Span => _pointer != null ? new Span<T>(_pointer, checked((int)Length)) : throw new ObjectDisposedException(nameof(PinnedBuffer<T>));

    /// <summary>Queues a copy of the first <paramref name="count"/> elements (−1: all) to <paramref name="destination"/> at <paramref name="offset"/> (no wait).</summary>
    public void CopyTo(DeviceBuffer<T> destination, CudaStream stream, long offset = 0, long count = -1)
    {
        _ = Span;
        CudaCheck.Driver(CuDriver.cuMemcpyHtoDAsync(destination.At(offset), _pointer, Bytes(count), stream.Handle), Device.Ordinal);
    }

    /// <summary>Queues a copy of <paramref name="count"/> elements (−1: the whole buffer) from <paramref name="source"/> at <paramref name="offset"/> into this buffer (no wait).</summary>
    public void CopyFrom(DeviceBuffer<T> source, CudaStream stream, long offset = 0, long count = -1)
    {
        _ = Span;
        CudaCheck.Driver(CuDriver.cuMemcpyDtoHAsync(_pointer, source.At(offset), Bytes(count), stream.Handle), Device.Ordinal);
    }

    private nuint Bytes(long count)
    {
        if (count > Length)
        {
            throw new ArgumentOutOfRangeException(nameof(count), count, $"the pinned buffer holds {Length} elements");
        }

        return (nuint)((count < 0 ? Length : count) * sizeof(T));
    }

    /// <inheritdoc />
    public void Dispose()
    {
        if (_pointer != null)
        {
            var p = _pointer;
            _pointer = null;
            CudaCheck.Release(CuDriver.cuMemFreeHost(p), Device.Ordinal);
        }
    }
}

/// <summary>Pins existing host memory (cuMemHostRegister) for the lifetime of this object.</summary>
internal sealed unsafe class HostRegistration : IDisposable
{
    private void* _pointer;

    /// <summary>Registers <paramref name="bytes"/> at <paramref name="pointer"/>; the memory must outlive this object.</summary>
    public HostRegistration(CudaDevice device, void* pointer, long bytes)
    {
        Device = device;
        device.MakeCurrent();
        CudaCheck.Driver(CuDriver.cuMemHostRegister(pointer, (nuint)bytes, CuDriver.HostAllocPortable), device.Ordinal);
        _pointer = pointer;
    }

    /// <summary>The device whose context registered it.</summary>
    public CudaDevice Device { get; }

    /// <inheritdoc />
    public void Dispose()
    {
        if (_pointer != null)
        {
            var p = _pointer;
            _pointer = null;
            CudaCheck.Release(CuDriver.cuMemHostUnregister(p), Device.Ordinal);
        }
    }
}

/// <summary>
/// A per-device bump allocator for activations: one allocation planned before the first step, carved
/// into aligned views, reset between steps. Nothing is allocated inside the decode loop, so steps can be
/// captured into a graph.
/// </summary>
internal sealed class DeviceArena : IDisposable
{
    /// <summary>Every view starts on this boundary (enough for 16-byte vector access and TMA).</summary>
    public const int Alignment = 256;

    private readonly DeviceBuffer<byte> _block;
    private long _used;

    /// <summary>Reserves <paramref name="bytes"/> on <paramref name="device"/>.</summary>
    public DeviceArena(CudaDevice device, long bytes)
    {
        _block = DeviceBuffer<byte>.Allocate(device, bytes);
    }

    /// <summary>Capacity in bytes.</summary>
    public long Capacity => _block.Length;

    /// <summary>Bytes handed out since the last reset.</summary>
    public long Used => _used;

    /// <summary>Largest <see cref="Used"/> seen: what a planner should reserve.</summary>
    public long HighWater { get; private set; }

    /// <summary>Carves a view of <paramref name="length"/> elements.</summary>
    public unsafe DeviceBuffer<T> Take<T>(long length)
        where T : unmanaged
    {
        var bytes = length * sizeof(T);
        var start = (_used + Alignment - 1) / Alignment * Alignment;
        if (start + bytes > Capacity)
        {
            throw new InvalidOperationException(
                $"device arena on device {_block.Device.Ordinal} exhausted: {start + bytes} bytes needed, {Capacity} reserved");
        }

        _used = start + bytes;
        HighWater = Math.Max(HighWater, _used);
        return DeviceBuffer<T>.View(_block.Device, _block.Pointer + (ulong)start, length);
    }

    /// <summary>Forgets every view (their memory is reused by the next <see cref="Take{T}"/>).</summary>
    public void Reset() => _used = 0;

    /// <inheritdoc />
    public void Dispose() => _block.Dispose();
}

/// <summary>
/// How many times this process has asked the driver for memory (every <c>cuMemAlloc</c> and <c>cuMemHostAlloc</c> goes
/// through <see cref="DeviceBuffer{T}.Allocate"/> or <see cref="PinnedBuffer{T}"/>), and how many bytes: what proves a
/// decode loop allocates nothing once warm. Process-wide, over every device.
/// </summary>
internal static class DriverAllocations
{
    private static long s_device, s_pinned, s_bytes;

    /// <summary>The counts so far: device allocations, pinned host allocations, and their bytes together.</summary>
    public static (long Device, long Pinned, long Bytes) Snapshot() =>
        (Interlocked.Read(ref s_device), Interlocked.Read(ref s_pinned), Interlocked.Read(ref s_bytes));

    internal static void CountDevice(long bytes)
    {
        Interlocked.Increment(ref s_device);
        Interlocked.Add(ref s_bytes, bytes);
    }

    internal static void CountPinned(long bytes)
    {
        Interlocked.Increment(ref s_pinned);
        Interlocked.Add(ref s_bytes, bytes);
    }
}
