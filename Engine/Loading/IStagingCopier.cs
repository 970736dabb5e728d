namespace DeepSeekCuda.Loading;

/// <summary>
/// The device end of a weight upload: a few host staging slots and an asynchronous copy queue.
/// <see cref="CudaStagingCopier"/> is the real one (pinned buffers, one stream, one event per slot); tests
/// use a fake that copies into host arrays. Calls come from one thread, in the order
/// <c>WaitForSlot(s)</c>, fill <c>Slot(s)</c>, <c>Copy(s, ..)</c>…, <c>Queued(s)</c>, and finally <see cref="Finish"/>.
/// </summary>
internal interface IStagingCopier
{
    /// <summary>Number of staging slots.</summary>
    int Slots { get; }

    /// <summary>Capacity of each slot in bytes.</summary>
    int SlotBytes { get; }

    /// <summary>Host memory of slot <paramref name="slot"/>; only written between <see cref="WaitForSlot"/> and <see cref="Queued"/>.</summary>
    Span<byte> Slot(int slot);

    /// <summary>Blocks until the copies queued from <paramref name="slot"/> so far have completed, so it may be refilled.</summary>
    void WaitForSlot(int slot);

    /// <summary>Queues a copy of slot bytes <c>[offset, offset + bytes)</c> to device address <paramref name="destination"/> (no wait).</summary>
    void Copy(int slot, int offset, ulong destination, int bytes);

    /// <summary>Marks the end of the copies from <paramref name="slot"/> (what <see cref="WaitForSlot"/> waits for next).</summary>
    void Queued(int slot);

    /// <summary>Blocks until every queued copy has completed.</summary>
    void Finish();
}
