using DeepSeekCuda.Cuda;
using DeepSeekCuda.Cuda.Native;

namespace DeepSeekCuda.Loading;

/// <summary>
/// Pinned staging slots on one device: each slot is a <see cref="PinnedBuffer{T}"/>, copies go out with
/// <c>cuMemcpyHtoDAsync</c> on one non-blocking stream, and one event per slot marks when its copies are
/// done. Copies run in order on the stream while the host fills the next slot, which is the overlap.
/// Disposal waits for queued copies before freeing the pinned memory (a DMA never reads freed memory).
/// </summary>
internal sealed unsafe class CudaStagingCopier : IStagingCopier, IDisposable
{
    private readonly PinnedBuffer<byte>[] _slots;
    private readonly CudaEvent[] _done;
    private readonly bool[] _pending;
    private readonly CudaStream _stream;
    private bool _disposed;

    /// <summary>Allocates <paramref name="slots"/> pinned slots of <paramref name="slotBytes"/> bytes, a stream and the events on <paramref name="device"/>.</summary>
    public CudaStagingCopier(CudaDevice device, int slots, int slotBytes)
    {
        ArgumentNullException.ThrowIfNull(device);
        ArgumentOutOfRangeException.ThrowIfLessThan(slots, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(slotBytes, 1);
        Device = device;
        SlotBytes = slotBytes;
        _slots = new PinnedBuffer<byte>[slots];
        _done = new CudaEvent[slots];
        _pending = new bool[slots];
        try
        {
            _stream = new CudaStream(device);
            for (var i = 0; i < slots; i++)
            {
                _slots[i] = new PinnedBuffer<byte>(device, slotBytes);
                _done[i] = new CudaEvent(device, timing: false);
            }
        }
        catch
        {
            Release();
            throw;
        }
    }

    /// <summary>The device copied to.</summary>
    public CudaDevice Device { get; }

    /// <inheritdoc />
    public int Slots => _slots.Length;

    /// <inheritdoc />
    public int SlotBytes { get; }

    /// <inheritdoc />
    public Span<byte> Slot(int slot) => _slots[slot].Span;

    /// <inheritdoc />
    public void WaitForSlot(int slot)
    {
        // Called before every chunk's copies: the driver queues them in the current context.
        Device.MakeCurrent();
        if (_pending[slot])
        {
            _done[slot].Synchronize();
            _pending[slot] = false;
        }
    }

    /// <inheritdoc />
    public void Copy(int slot, int offset, ulong destination, int bytes)
    {
        if (offset < 0 || bytes < 0 || offset + bytes > SlotBytes)
        {
            throw new ArgumentOutOfRangeException(nameof(offset), $"[{offset}, {offset + bytes}) outside a staging slot of {SlotBytes} bytes");
        }

        fixed (byte* source = _slots[slot].Span)
        {
            CudaCheck.Driver(CuDriver.cuMemcpyHtoDAsync(destination, source + offset, (nuint)bytes, _stream.Handle), Device.Ordinal);
        }
    }

    /// <inheritdoc />
    public void Queued(int slot)
    {
        _done[slot].Record(_stream);
        _pending[slot] = true;
    }

    /// <inheritdoc />
    public void Finish()
    {
        _stream.Synchronize();
        Array.Clear(_pending);
    }

    /// <inheritdoc />
    public void Dispose()
    {
        if (_disposed)
        {
            return;
        }

        _disposed = true;
        Release();
    }

    private void Release()
    {
        if (_stream is not null)
        {
            // Copies may still read the slots (a failed or cancelled upload): wait before freeing them. A
            // context already gone has no copies left.
            CudaCheck.Release(CuDriver.cuStreamSynchronize(_stream.Handle), Device.Ordinal);
        }

        foreach (var e in _done)
        {
            e?.Dispose();
        }

        foreach (var s in _slots)
        {
            s?.Dispose();
        }

        _stream?.Dispose();
    }
}
