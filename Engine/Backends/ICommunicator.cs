namespace DeepSeekCuda.Backends;

/// <summary>
/// Collectives and point-to-point copies over the devices of one process: what a model spread over several backends needs
/// between its layer steps (implemented in <c>DeepSeekCuda.Distributed</c>: <c>HostCommunicator</c> over any backends,
/// <c>CudaCommunicator</c> over GPUs; it is declared here, beside <see cref="IBackend"/>, so that the model can run over it
/// without knowing the implementations). Calls take the tensors of
/// all participating devices at once (tensor r lives on device r): one host thread drives every device,
/// which is how a single-process NCCL communicator is used too (a group call per collective, one
/// <c>ncclAllReduce</c> per rank on that rank's stream). On a GPU the calls are enqueued, not waited
/// for; <see cref="Barrier"/> orders them against host code.
/// </summary>
public interface ICommunicator : IDisposable
{
    /// <summary>Devices N.</summary>
    int DeviceCount { get; }

    /// <summary>The backend of device <paramref name="device"/>.</summary>
    IBackend Device(int device);

    /// <summary>
    /// tensors[r] ← Σ_d tensors[d] on every device r, summed in device order 0, 1, …, N−1 so that every
    /// device ends with identical values. All tensors have the same shape; tensors[r] lives on device r.
    /// </summary>
    void AllReduceSum(IReadOnlyList<Tensor> tensors);

    /// <summary>Copies <paramref name="source"/> (on <paramref name="sourceDevice"/>) into <paramref name="destination"/> (on <paramref name="destinationDevice"/>), same shape.</summary>
    void Copy(Tensor source, int sourceDevice, Tensor destination, int destinationDevice);

    /// <summary>Waits until every operation enqueued so far on every device has finished.</summary>
    void Barrier();

    /// <summary>Whether <see cref="CaptureGraph"/> can record this communicator's devices and all-reduces.</summary>
    bool CanCaptureGraphs { get; }

    /// <summary>
    /// Records, without running them, the operations <paramref name="record"/> calls from this thread on every device's
    /// backend and the all-reduces it calls here, as one graph over all the devices that <see cref="ReplayGraph"/> runs (on
    /// GPUs, a CUDA graph per device whose all-reduces meet on the devices). What <see cref="IBackend.CaptureGraph"/> allows
    /// and refuses holds on every device; <see cref="Copy"/> and <see cref="Barrier"/> are refused while capturing. Run the
    /// recorded work once before capturing it: first runs compile kernels and size buffers.
    /// </summary>
    /// <exception cref="NotSupportedException"><see cref="CanCaptureGraphs"/> is false.</exception>
    StepGraph CaptureGraph(Action record);

    /// <summary>Runs <paramref name="graph"/> (captured by <see cref="CaptureGraph"/>) on every device, after the work queued before.</summary>
    void ReplayGraph(StepGraph graph);
}
