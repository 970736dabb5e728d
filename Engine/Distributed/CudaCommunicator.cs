using System.Runtime.CompilerServices;
using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cuda;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Cuda.Native;
using DeepSeekCuda.Kernels;

namespace DeepSeekCuda.Distributed;

/// <summary>
/// <see cref="ICommunicator"/> over a <see cref="DeviceMesh"/> and one <see cref="CudaBackend"/> per rank (rank r's
/// backend on rank r's GPU; several ranks may share one GPU as logical ranks). The all-reduce is the mesh's, of the
/// tensors' storage type (<see cref="AllReduceKernel"/> where every pair is a peer and N is 2, 4 or 8, else staged
/// through the host), summed in fp32 in rank order exactly as <see cref="HostCommunicator"/> does; an activation's sum
/// is stored as BF16 values (BF16 storage, or f32 storage rounded after the sum), logits as summed.
/// <para>
/// Ordering is kept on the GPU: when a backend queues on its rank's mesh stream (as <see cref="CudaParallel"/> builds
/// them) nothing is needed; otherwise events join the backend's stream to the mesh stream and back around each
/// collective. Copies between ranks that can reach each other (peers, or logical ranks of one GPU) are queued on the
/// destination's stream after an event of the source's stream, and the source's stream then waits for the copy
/// (so later work there cannot overwrite the source before it is read). The host waits only where it must:
/// copies between non-peer GPUs and all-reduces the kernels do not cover (staged through pinned host memory by the
/// mesh), growing the all-reduce input buffer (the old one is freed after its rank's queue drains), and
/// <see cref="Barrier"/>, which also surfaces an all-reduce that timed out at a device-side barrier.
/// A source tensor may be disposed right after <see cref="Copy"/> returns (as <c>ModelPass</c> does at a pipeline boundary): its
/// memory, if reused, is next written on the source's or the destination's stream, both ordered after the copy.
/// </para>
/// <para>
/// <see cref="CaptureGraph"/> captures every rank's stream at once (one graph per rank) when the all-reduces run the
/// kernels: they count their barriers' calls on the device, so a replay meets its peers as a fresh call would. The input
/// buffers a live graph points into are kept until the last graph is disposed.
/// </para>
/// With logical ranks on one GPU every rank's stream needs its own hardware queue, or a spinning all-reduce block
/// can wait behind a peer that never starts (it then times out, see <see cref="DeviceMesh.TimeoutCycles"/>): set
/// <c>CUDA_DEVICE_MAX_CONNECTIONS</c> to at least the streams in use (32 is the maximum) before CUDA initializes
/// (<see cref="CudaParallel.ConfigureConnections"/>).
/// </summary>
internal sealed class CudaCommunicator : ICommunicator
{
    private readonly DeviceMesh _mesh;
    private readonly CudaBackend[] _devices;
    private readonly DeviceBuffer<float>?[] _inputs;
    private readonly CudaEvent[] _events;
    private readonly List<DeviceBuffer<float>> _retired = []; // inputs replaced while graphs that point into them live
    private CommunicatorStats _stats;
    private bool _capturing;
    private int _liveGraphs;
    private bool _disposed;

    /// <summary>A communicator over <paramref name="mesh"/> with <paramref name="devices"/>[r] as rank r (neither owned).</summary>
    /// <exception cref="ArgumentException">The counts differ, or a backend is not on its rank's GPU.</exception>
    public CudaCommunicator(DeviceMesh mesh, IReadOnlyList<CudaBackend> devices)
    {
        ArgumentNullException.ThrowIfNull(mesh);
        ArgumentNullException.ThrowIfNull(devices);
        if (devices.Count != mesh.Ranks)
        {
            throw new ArgumentException($"{devices.Count} backends for a mesh of {mesh.Ranks} ranks", nameof(devices));
        }

        for (var r = 0; r < devices.Count; r++)
        {
            var b = devices[r] ?? throw new ArgumentNullException(nameof(devices), $"no backend for rank {r}");
            if (b.Device.Handle != mesh.Device(r).Handle)
            {
                throw new ArgumentException($"the backend of rank {r} is on GPU {b.Device.Ordinal}; the mesh puts rank {r} on GPU {mesh.Device(r).Ordinal}", nameof(devices));
            }

            if (devices.Take(r).Any(o => ReferenceEquals(o, b)))
            {
                throw new ArgumentException($"rank {r} reuses another rank's backend (each rank needs its own)", nameof(devices));
            }
        }

        _mesh = mesh;
        _devices = [.. devices];
        _inputs = new DeviceBuffer<float>?[devices.Count];
        _events = new CudaEvent[devices.Count];
        try
        {
            for (var r = 0; r < _events.Length; r++)
            {
                _events[r] = new CudaEvent(_devices[r].Device, timing: false);
            }
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    /// <inheritdoc />
    public int DeviceCount => _devices.Length;

    /// <summary>The mesh.</summary>
    public DeviceMesh Mesh => _mesh;

    /// <summary>Traffic so far (all-reduce bytes are float32 per device, as <see cref="HostCommunicator"/> counts them).</summary>
    public CommunicatorStats Stats => _stats;

    /// <inheritdoc />
    public IBackend Device(int device) => Backend(device);

    /// <summary>The CUDA backend of rank <paramref name="device"/>.</summary>
    public CudaBackend Backend(int device)
    {
        CommunicatorArguments.CheckDevice(device, _devices.Length, nameof(device));
        return _devices[device];
    }

    /// <inheritdoc />
    /// <remarks>
    /// Each rank copies its tensor into its own input buffer (the kernels need distinct inputs and outputs), then the
    /// mesh reduces those into the tensors, all queued on the ranks' streams.
    /// </remarks>
    public void AllReduceSum(IReadOnlyList<Tensor> tensors)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        CommunicatorArguments.CheckAllReduce(tensors, _devices.Length, (t, r) => _devices[r].Holds(t));
        var count = tensors[0].Length;
        var type = StorageType(tensors);
        var bytes = count * type.Bytes();
        _stats = _stats with { AllReduces = _stats.AllReduces + 1, AllReduceBytes = _stats.AllReduceBytes + bytes };
        if (_devices.Length == 1 || count == 0)
        {
            return;
        }

        var inputs = new ulong[_devices.Length];
        var outputs = new ulong[_devices.Length];
        for (var r = 0; r < _devices.Length; r++)
        {
            var input = Input(r, count);
            ToMesh(r);
            var stream = _mesh.Stream(r);
            outputs[r] = CudaBackend.StorageOf(tensors[r]).Pointer;
            inputs[r] = input.Pointer;
            _mesh.Device(r).MakeCurrent();
            CudaCheck.Driver(CuDriver.cuMemcpyDtoDAsync(inputs[r], outputs[r], (nuint)bytes, stream.Handle), _mesh.Device(r).Ordinal);
        }

        _mesh.AllReduce(inputs, outputs, count, type);
        for (var r = 0; r < _devices.Length; r++)
        {
            FromMesh(r);
            // An f32 sum of activations in f32 storage holds BF16 values again (BF16 storage rounded as it stored).
            _devices[r].RoundActivation(tensors[r]);
        }
    }

    /// <inheritdoc />
    public void Copy(Tensor source, int sourceDevice, Tensor destination, int destinationDevice)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        CommunicatorArguments.CheckCopy(source, sourceDevice, destination, destinationDevice, _devices.Length, (t, r) => _devices[r].Holds(t));
        if (ReferenceEquals(source, destination))
        {
            return;
        }

        NotCapturing();
        var (src, type) = CudaBackend.StorageOf(source);
        var (dst, destinationType) = CudaBackend.StorageOf(destination);
        if (type != destinationType)
        {
            throw new ArgumentException($"copy of {source} ({type}) into {destination} ({destinationType}): storage types differ", nameof(destination));
        }

        var bytes = source.Length * type.Bytes();
        _stats = _stats with { Copies = _stats.Copies + 1, CopyBytes = _stats.CopyBytes + bytes };
        if (bytes == 0)
        {
            return;
        }

        CudaBackend from = _devices[sourceDevice], to = _devices[destinationDevice];
        if (sourceDevice != destinationDevice && !_mesh.CanAccess(destinationDevice, sourceDevice))
        {
            // Non-peer GPUs: the mesh stages through pinned host memory and waits (host-synchronous).
            ToMesh(sourceDevice);
            ToMesh(destinationDevice);
            _mesh.Copy(src, sourceDevice, dst, destinationDevice, bytes);
            FromMesh(sourceDevice);
            FromMesh(destinationDevice);
            return;
        }

        // Destination's stream waits for the source's queued work, copies, and the source's stream waits for the copy.
        Join(from.Stream, _events[sourceDevice], to.Stream);
        to.Device.MakeCurrent();
        var result = from.Device.Context == to.Device.Context
            ? CuDriver.cuMemcpyDtoDAsync(dst, src, (nuint)bytes, to.Stream.Handle)
            : CuDriver.cuMemcpyPeerAsync(dst, to.Device.Context, src, from.Device.Context, (nuint)bytes, to.Stream.Handle);
        CudaCheck.Driver(result, to.Device.Ordinal);
        Join(to.Stream, _events[destinationDevice], from.Stream);
    }

    /// <inheritdoc />
    /// <exception cref="InvalidOperationException">An all-reduce since the last barrier timed out at a device-side barrier.</exception>
    public void Barrier()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        NotCapturing();
        foreach (var b in _devices)
        {
            b.Synchronize();
        }

        _mesh.Synchronize();
    }

    /// <inheritdoc />
    /// <remarks>One rank, or all-reduces that run the kernels (every pair a peer, 2, 4 or 8 ranks).</remarks>
    public bool CanCaptureGraphs => _devices.Length == 1 || _mesh.UsesKernels;

    /// <inheritdoc />
    /// <remarks>
    /// Each rank's backend captures its stream (<see cref="CudaBackend.CaptureGraph"/>), rank 0's outermost, all at once;
    /// the all-reduces (and their copies into the ranks' input buffers) join the ranks' graphs. Traffic is counted when a
    /// graph is replayed, not when it is captured.
    /// </remarks>
    public StepGraph CaptureGraph(Action record)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ArgumentNullException.ThrowIfNull(record);
        NotCapturing();
        if (!CanCaptureGraphs)
        {
            throw new NotSupportedException(
                $"the all-reduces of these {_devices.Length} ranks are staged through host memory, which a graph cannot hold (the kernels need every pair of GPUs to be peers and 2, 4 or 8 ranks)");
        }

        var graphs = new StepGraph[_devices.Length];
        var before = _stats;
        CommunicatorStats traffic;
        _capturing = true;
        try
        {
            Capture(0);
        }
        catch
        {
            foreach (var g in graphs)
            {
                g?.Dispose();
            }

            throw;
        }
        finally
        {
            // A capture moves nothing: its all-reduces (copies are refused) count at each replay.
            _capturing = false;
            traffic = new CommunicatorStats(_stats.AllReduces - before.AllReduces, _stats.AllReduceBytes - before.AllReduceBytes, 0, 0);
            _stats = before;
        }

        _liveGraphs++;
        return new CudaParallelGraph(this, graphs, traffic);

        void Capture(int r)
        {
            if (r == graphs.Length)
            {
                record();
                return;
            }

            graphs[r] = _devices[r].CaptureGraph(() => Capture(r + 1));
        }
    }

    /// <inheritdoc />
    public void ReplayGraph(StepGraph graph)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        NotCapturing();
        var g = graph as CudaParallelGraph is { } p && p.Owner == this ? p : throw new ArgumentException("the graph does not belong to this communicator", nameof(graph));
        ObjectDisposedException.ThrowIf(g.IsDisposed, g);
        for (var r = 0; r < _devices.Length; r++)
        {
            _devices[r].ReplayGraph(g.Graphs[r]);
        }

        _stats = _stats with { AllReduces = _stats.AllReduces + g.Traffic.AllReduces, AllReduceBytes = _stats.AllReduceBytes + g.Traffic.AllReduceBytes };
    }

    /// <summary>A graph of this communicator is gone (its ranks' graphs disposed); once none lives, frees the retired input buffers.</summary>
    internal void Release()
    {
        if (--_liveGraphs > 0 || _disposed || _retired.Count == 0)
        {
            return;
        }

        for (var r = 0; r < _devices.Length; r++)
        {
            _mesh.Device(r).MakeCurrent();
            _mesh.Stream(r).Synchronize(); // a replay queued there may still read them
        }

        FreeRetired();
    }

    /// <summary>Frees the all-reduce input buffers (they grow again on demand); waits for the ranks' queues first.</summary>
    /// <exception cref="InvalidOperationException">A graph of this communicator lives (it points into the buffers).</exception>
    public void Trim()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (_liveGraphs > 0)
        {
            throw new InvalidOperationException($"{_liveGraphs} graphs of this communicator point into its all-reduce buffers: dispose them before trimming");
        }

        Barrier();
        FreeInputs();
    }

    /// <summary>Releases the input buffers and events (the mesh and the backends belong to the caller).</summary>
    public void Dispose()
    {
        if (_disposed)
        {
            return;
        }

        _disposed = true;
        try
        {
            foreach (var b in _devices)
            {
                b.Synchronize();
            }

            _mesh.Synchronize();
        }
        catch (Exception e) when (e is CudaException or InvalidOperationException or ObjectDisposedException)
        {
            // A failed or timed-out call must not keep the buffers alive: free them anyway.
        }

        FreeInputs();
        foreach (var e in _events)
        {
            e?.Dispose();
        }
    }

    private void FreeInputs()
    {
        for (var r = 0; r < _inputs.Length; r++)
        {
            _inputs[r]?.Dispose();
            _inputs[r] = null;
        }

        FreeRetired();
    }

    private void FreeRetired()
    {
        foreach (var b in _retired)
        {
            b.Dispose();
        }

        _retired.Clear();
    }

    /// <summary>Refuses <paramref name="call"/> during <see cref="CaptureGraph"/>.</summary>
    private void NotCapturing([CallerMemberName] string call = "")
    {
        if (_capturing)
        {
            throw new InvalidOperationException($"{call} cannot be part of a graph (a communicator's graph holds only the devices' operations and all-reduces: ICommunicator.CaptureGraph)");
        }
    }

    /// <summary>The storage type the tensors of one all-reduce share (devices created with other activation storage are refused).</summary>
    private static ElementType StorageType(IReadOnlyList<Tensor> tensors)
    {
        var type = CudaBackend.StorageOf(tensors[0]).Type;
        for (var r = 1; r < tensors.Count; r++)
        {
            if (CudaBackend.StorageOf(tensors[r]).Type != type)
            {
                throw new ArgumentException(
                    $"all-reduce of {tensors[0]} in {type} on device 0 and {tensors[r]} in another storage type on device {r}", nameof(tensors));
            }
        }

        return type;
    }

    /// <summary>Rank r's all-reduce input buffer with room for <paramref name="count"/> elements of either storage type (f32 at most).</summary>
    private DeviceBuffer<float> Input(int r, long count)
    {
        if (_inputs[r] is { } b && b.Length >= count)
        {
            return b;
        }

        if (_capturing)
        {
            throw new InvalidOperationException(
                $"the all-reduce input of rank {r} would grow to {count} elements during a graph capture: run the captured work once before capturing it");
        }

        if (_inputs[r] is { } old)
        {
            if (_liveGraphs > 0)
            {
                _retired.Add(old); // a live graph points into it
            }
            else
            {
                // The previous call may still read it on the device.
                _mesh.Device(r).MakeCurrent();
                _mesh.Stream(r).Synchronize();
                old.Dispose();
            }

            _inputs[r] = null;
        }

        return _inputs[r] = DeviceBuffer<float>.Allocate(_mesh.Device(r), Math.Max(count, 4096));
    }

    private void ToMesh(int r) => Join(_devices[r].Stream, _events[r], _mesh.Stream(r));

    private void FromMesh(int r) => Join(_mesh.Stream(r), _events[r], _devices[r].Stream);

    /// <summary>Work queued on <paramref name="to"/> from now on waits for what is queued on <paramref name="from"/> (nothing to do on one stream).</summary>
    private static void Join(CudaStream from, CudaEvent evt, CudaStream to)
    {
        if (ReferenceEquals(from, to) || from.Handle == to.Handle)
        {
            return;
        }

        from.Device.MakeCurrent();
        evt.Record(from);
        to.Device.MakeCurrent();
        to.Wait(evt);
    }
}

/// <summary>The argument rules of the communicators' calls (pure: no device needed).</summary>
internal static class CommunicatorArguments
{
    /// <summary>Fails unless 0 ≤ <paramref name="device"/> &lt; <paramref name="count"/>.</summary>
    public static void CheckDevice(int device, int count, string parameter)
    {
        if ((uint)device >= (uint)count)
        {
            throw new ArgumentOutOfRangeException(parameter, device, $"device {device} is outside 0..{count - 1}");
        }
    }

    /// <summary>One tensor per device, each on its device (<paramref name="holds"/>), all of one shape, none twice.</summary>
    public static void CheckAllReduce(IReadOnlyList<Tensor> tensors, int devices, Func<Tensor, int, bool> holds)
    {
        ArgumentNullException.ThrowIfNull(tensors);
        if (tensors.Count != devices)
        {
            throw new ArgumentException($"{tensors.Count} tensors for {devices} devices", nameof(tensors));
        }

        for (var r = 0; r < devices; r++)
        {
            var t = tensors[r] ?? throw new ArgumentNullException(nameof(tensors), $"no tensor for device {r}");
            if (t.Rows != tensors[0].Rows || t.Cols != tensors[0].Cols)
            {
                throw new ArgumentException($"all-reduce of tensors with different shapes: {tensors[0]} on device 0, {t} on device {r}", nameof(tensors));
            }

            if (!holds(t, r))
            {
                throw new ArgumentException($"the all-reduce tensor {t} given for device {r} does not live on device {r}", nameof(tensors));
            }

            for (var o = 0; o < r; o++)
            {
                if (ReferenceEquals(tensors[o], t))
                {
                    throw new ArgumentException($"the all-reduce tensor {t} is given for devices {o} and {r}", nameof(tensors));
                }
            }
        }
    }

    /// <summary>Both devices in range, both tensors on their devices, one shape.</summary>
    public static void CheckCopy(Tensor source, int sourceDevice, Tensor destination, int destinationDevice, int devices, Func<Tensor, int, bool> holds)
    {
        ArgumentNullException.ThrowIfNull(source);
        ArgumentNullException.ThrowIfNull(destination);
        CheckDevice(sourceDevice, devices, nameof(sourceDevice));
        CheckDevice(destinationDevice, devices, nameof(destinationDevice));
        if (source.Rows != destination.Rows || source.Cols != destination.Cols)
        {
            throw new ArgumentException($"copy of {source} (device {sourceDevice}) into {destination} (device {destinationDevice}): shapes differ", nameof(destination));
        }

        if (!holds(source, sourceDevice))
        {
            throw new ArgumentException($"the copy source {source} does not live on device {sourceDevice}", nameof(source));
        }

        if (!holds(destination, destinationDevice))
        {
            throw new ArgumentException($"the copy destination {destination} does not live on device {destinationDevice}", nameof(destination));
        }
    }
}

/// <summary>A <see cref="CudaCommunicator"/>'s graph: each rank's captured stream, and the traffic one replay moves.</summary>
internal sealed class CudaParallelGraph(CudaCommunicator owner, StepGraph[] graphs, CommunicatorStats traffic) : StepGraph
{
    public CudaCommunicator Owner { get; } = owner;

    /// <summary>[rank] the rank's graph (its backend's).</summary>
    public StepGraph[] Graphs { get; } = graphs;

    public CommunicatorStats Traffic { get; } = traffic;

    public override int Operations => Graphs.Sum(g => g.Operations);

    protected override void Dispose(bool disposing)
    {
        foreach (var g in Graphs)
        {
            g.Dispose();
        }

        Owner.Release();
    }
}
