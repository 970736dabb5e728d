using DeepSeekCuda.Cuda.Native;

namespace DeepSeekCuda.Cuda;

/// <summary>A non-blocking stream on one device.</summary>
internal sealed unsafe class CudaStream : IDisposable
{
    private IntPtr _handle;

    /// <summary>Creates a stream on <paramref name="device"/>.</summary>
    public CudaStream(CudaDevice device)
    {
        Device = device;
        device.MakeCurrent();
        IntPtr s;
        CudaCheck.Driver(CuDriver.cuStreamCreate(&s, CuDriver.StreamNonBlocking), device.Ordinal);
        _handle = s;
    }

    /// <summary>The owning device.</summary>
    public CudaDevice Device { get; }

    /// <summary>The CUstream.</summary>
    public IntPtr Handle => _handle != IntPtr.Zero ? _handle : throw new ObjectDisposedException(nameof(CudaStream));

    /// <summary>Waits for the work queued so far.</summary>
    public void Synchronize() => CudaCheck.Driver(CuDriver.cuStreamSynchronize(Handle), Device.Ordinal);

    /// <summary>
    /// Whether the stream is being captured into a graph (its own capture, or another stream's it joined through an event),
    /// so that work queued now is recorded, not run, and waiting on the stream is an error.
    /// </summary>
    public bool IsCapturing
    {
        get
        {
            int status; // CUstreamCaptureStatus: 0 none, 1 active, 2 invalidated (still capturing until it ends)
            CudaCheck.Driver(CuDriver.cuStreamIsCapturing(Handle, &status), Device.Ordinal);
            return status != 0;
        }
    }

    /// <summary>Makes work queued on this stream after this call wait until <paramref name="evt"/> (as last recorded) has happened; the host does not wait.</summary>
    public void Wait(CudaEvent evt) => CudaCheck.Driver(CuDriver.cuStreamWaitEvent(Handle, evt.Handle, 0), Device.Ordinal);

    /// <inheritdoc />
    public void Dispose()
    {
        if (_handle != IntPtr.Zero)
        {
            var h = _handle;
            _handle = IntPtr.Zero;
            CudaCheck.Release(CuDriver.cuStreamDestroy(h), Device.Ordinal);
        }
    }
}

/// <summary>An event for ordering and timing.</summary>
internal sealed unsafe class CudaEvent : IDisposable
{
    private IntPtr _handle;

    /// <summary>Creates an event; <paramref name="timing"/> false makes a cheaper ordering-only event.</summary>
    public CudaEvent(CudaDevice device, bool timing = true)
    {
        Device = device;
        device.MakeCurrent();
        IntPtr e;
        CudaCheck.Driver(CuDriver.cuEventCreate(&e, timing ? 0u : CuDriver.EventDisableTiming), device.Ordinal);
        _handle = e;
    }

    /// <summary>The owning device.</summary>
    public CudaDevice Device { get; }

    /// <summary>The CUevent.</summary>
    public IntPtr Handle => _handle != IntPtr.Zero ? _handle : throw new ObjectDisposedException(nameof(CudaEvent));

    /// <summary>Records the event on <paramref name="stream"/>.</summary>
    public void Record(CudaStream stream) => CudaCheck.Driver(CuDriver.cuEventRecord(Handle, stream.Handle), Device.Ordinal);

    /// <summary>Waits until the event has happened.</summary>
    public void Synchronize() => CudaCheck.Driver(CuDriver.cuEventSynchronize(Handle), Device.Ordinal);

    /// <summary>Milliseconds from <paramref name="start"/> to this event (both recorded and complete).</summary>
    public float ElapsedSince(CudaEvent start)
    {
        float ms;
        CudaCheck.Driver(CuDriver.cuEventElapsedTime(&ms, start.Handle, Handle), Device.Ordinal);
        return ms;
    }

    /// <inheritdoc />
    public void Dispose()
    {
        if (_handle != IntPtr.Zero)
        {
            var h = _handle;
            _handle = IntPtr.Zero;
            CudaCheck.Release(CuDriver.cuEventDestroy(h), Device.Ordinal);
        }
    }
}

/// <summary>
/// A CUDA graph captured from a stream and instantiated, replayed with one launch (the decode step).
/// </summary>
internal sealed unsafe class CudaGraph : IDisposable
{
    private IntPtr _graph;
    private IntPtr _exec;

    private CudaGraph(CudaDevice device, IntPtr graph, IntPtr exec)
    {
        Device = device;
        _graph = graph;
        _exec = exec;
    }

    /// <summary>The owning device.</summary>
    public CudaDevice Device { get; }

    /// <summary>
    /// Records the work <paramref name="record"/> queues on <paramref name="stream"/> (nothing runs) and
    /// instantiates it. Capture is thread-local so other threads' work is not swept in.
    /// </summary>
    public static CudaGraph Capture(CudaStream stream, Action<CudaStream> record)
    {
        const int threadLocalMode = 1; // CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
        var ordinal = stream.Device.Ordinal;
        stream.Device.MakeCurrent();
        CudaCheck.Driver(CuDriver.cuStreamBeginCapture(stream.Handle, threadLocalMode), ordinal);
        IntPtr graph;
        try
        {
            record(stream);
        }
        catch
        {
            // End the capture so the stream is usable again, then report the original failure.
            stream.Device.MakeCurrent();
            IntPtr broken;
            if (CuDriver.cuStreamEndCapture(stream.Handle, &broken) == CuResult.Success && broken != IntPtr.Zero)
            {
                CudaCheck.Release(CuDriver.cuGraphDestroy(broken), ordinal);
            }

            throw;
        }

        stream.Device.MakeCurrent(); // the recorded work may have made another device current
        CudaCheck.Driver(CuDriver.cuStreamEndCapture(stream.Handle, &graph), ordinal);
        IntPtr exec;
        var r = CuDriver.cuGraphInstantiateWithFlags(&exec, graph, 0);
        if (r != CuResult.Success)
        {
            CudaCheck.Release(CuDriver.cuGraphDestroy(graph), ordinal);
            CudaCheck.Driver(r, ordinal, "cuGraphInstantiateWithFlags");
        }

        return new CudaGraph(stream.Device, graph, exec);
    }

    /// <summary>Replays the graph on <paramref name="stream"/>.</summary>
    public void Launch(CudaStream stream)
    {
        ObjectDisposedException.ThrowIf(_exec == IntPtr.Zero, this);
        CudaCheck.Driver(CuDriver.cuGraphLaunch(_exec, stream.Handle), Device.Ordinal);
    }

    /// <inheritdoc />
    public void Dispose()
    {
        if (_exec != IntPtr.Zero)
        {
            var e = _exec;
            _exec = IntPtr.Zero;
            CudaCheck.Release(CuDriver.cuGraphExecDestroy(e), Device.Ordinal);
        }

        if (_graph != IntPtr.Zero)
        {
            var g = _graph;
            _graph = IntPtr.Zero;
            CudaCheck.Release(CuDriver.cuGraphDestroy(g), Device.Ordinal);
        }
    }
}
