using System.Runtime.CompilerServices;
using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cpu;

namespace DeepSeekCuda.Distributed;

/// <summary>Traffic counted by a communicator (tests and diagnostics).</summary>
/// <param name="AllReduces">All-reduce calls.</param>
/// <param name="AllReduceBytes">Payload bytes per device summed over all-reduce calls (float32 on the host).</param>
/// <param name="Copies">Device-to-device copies.</param>
/// <param name="CopyBytes">Bytes moved by copies.</param>
public readonly record struct CommunicatorStats(long AllReduces, long AllReduceBytes, long Copies, long CopyBytes);

/// <summary>
/// <see cref="ICommunicator"/> over simulated devices (any <see cref="IBackend"/>s, typically one
/// <c>CpuBackend</c> per device): data moves through host memory with <see cref="IBackend.Download"/> and
/// <see cref="IBackend.Upload"/>. The reference semantics of the GPU all-reduce: fp32 sum in device order, stored as the
/// backend stores the tensor's kind (an activation as BF16 values, on every backend but the CPU backend's float32 reference).
/// </summary>
public sealed class HostCommunicator : ICommunicator
{
    private readonly IBackend[] _devices;
    private long _allReduces, _allReduceBytes, _copies, _copyBytes;
    private CpuGraphRecording? _recording; // the graph being captured

    /// <summary>Creates a communicator over <paramref name="devices"/> (not owned).</summary>
    public HostCommunicator(IReadOnlyList<IBackend> devices)
    {
        ArgumentNullException.ThrowIfNull(devices);
        if (devices.Count == 0)
        {
            throw new ArgumentException("no devices", nameof(devices));
        }

        _devices = [.. devices];
    }

    /// <inheritdoc />
    public int DeviceCount => _devices.Length;

    /// <summary>Traffic so far.</summary>
    public CommunicatorStats Stats => new(_allReduces, _allReduceBytes, _copies, _copyBytes);

    /// <inheritdoc />
    public IBackend Device(int device) => _devices[device];

    /// <inheritdoc />
    public void AllReduceSum(IReadOnlyList<Tensor> tensors)
    {
        ArgumentNullException.ThrowIfNull(tensors);
        if (tensors.Count != _devices.Length)
        {
            throw new ArgumentException($"{tensors.Count} tensors for {_devices.Length} devices", nameof(tensors));
        }

        var first = tensors[0];
        foreach (var t in tensors)
        {
            if (t.Rows != first.Rows || t.Cols != first.Cols)
            {
                throw new ArgumentException($"all-reduce of tensors with different shapes: {first} and {t}", nameof(tensors));
            }
        }

        Tensor[] all = [.. tensors];
        if (_recording?.Add(() => Sum(all)) != true)
        {
            Sum(all);
        }
    }

    private void Sum(Tensor[] tensors)
    {
        var first = tensors[0];
        var sum = new float[first.Length];
        var part = new float[first.Length];
        _devices[0].Download(tensors[0], sum);
        for (var d = 1; d < _devices.Length; d++)
        {
            _devices[d].Download(tensors[d], part);
            for (var i = 0; i < sum.Length; i++)
            {
                sum[i] += part[i];
            }
        }

        for (var d = 0; d < _devices.Length; d++)
        {
            Write(d, sum, tensors[d]);
        }

        _allReduces++;
        _allReduceBytes += first.Length * sizeof(float);
    }

    /// <inheritdoc />
    public void Copy(Tensor source, int sourceDevice, Tensor destination, int destinationDevice)
    {
        ArgumentNullException.ThrowIfNull(source);
        ArgumentNullException.ThrowIfNull(destination);
        if (source.Rows != destination.Rows || source.Cols != destination.Cols)
        {
            throw new ArgumentException($"copy of {source} into {destination}");
        }

        NotCapturing();
        var values = new float[source.Length];
        _devices[sourceDevice].Download(source, values);
        Write(destinationDevice, values, destination);
        _copies++;
        _copyBytes += source.Length * sizeof(float);
    }

    /// <inheritdoc />
    /// <remarks>Host backends run every call to completion, so there is nothing to wait for.</remarks>
    public void Barrier() => NotCapturing();

    /// <inheritdoc />
    /// <remarks>When every device is a <see cref="CpuBackend"/>.</remarks>
    public bool CanCaptureGraphs => _devices.All(d => d is CpuBackend);

    /// <inheritdoc />
    /// <remarks>
    /// One list of recorded calls in call order, the devices' operations and the all-reduces interleaved as they were made,
    /// made again at each replay (as <see cref="CpuBackend.CaptureGraph"/> records one device).
    /// </remarks>
    public StepGraph CaptureGraph(Action record)
    {
        ArgumentNullException.ThrowIfNull(record);
        var backends = new CpuBackend[_devices.Length];
        for (var d = 0; d < backends.Length; d++)
        {
            backends[d] = _devices[d] as CpuBackend ?? throw new NotSupportedException(
                $"device {d} is a {_devices[d].GetType().Name}; a host communicator records graphs over CPU backends only");
        }

        NotCapturing();
        _recording = new CpuGraphRecording();
        try
        {
            return new CpuStepGraph(this, CpuBackend.Record(backends, _recording, record));
        }
        finally
        {
            _recording = null;
        }
    }

    /// <inheritdoc />
    public void ReplayGraph(StepGraph graph)
    {
        NotCapturing();
        CpuStepGraph.Of(graph, this).Replay();
    }

    /// <summary>Refuses <paramref name="call"/> while this thread captures a graph (<see cref="CaptureGraph"/>).</summary>
    private void NotCapturing([CallerMemberName] string call = "")
    {
        if (_recording?.OnThisThread == true)
        {
            throw new InvalidOperationException($"{call} cannot be part of a graph (a communicator's graph holds only the devices' operations and all-reduces: ICommunicator.CaptureGraph)");
        }
    }

    private void Write(int device, float[] values, Tensor destination)
    {
        var b = _devices[device];
        using var staged = b.Upload(values, destination.Rows, destination.Cols, destination.Kind);
        b.CopyRows(staged, 0, destination, 0, destination.Rows);
    }

    /// <summary>Nothing to release: the backends belong to the caller.</summary>
    public void Dispose()
    {
    }
}
