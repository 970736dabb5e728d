using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Distributed;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Model;

namespace DeepSeekCuda.Tests.Distributed;

/// <summary>
/// N recording CPU devices (float32 <see cref="CpuBackend"/>s), their host communicator, a plan of the kind asked for and the
/// <see cref="DeepSeekModel"/> loaded over them. With <c>uncountedCollectives</c> the collectives stage through host memory
/// on the devices' inner backends, so the recording devices count only what the model and its runner allocate; with
/// <c>mtp</c> the plan places the MTP layer (and the options say whether it loads).
/// </summary>
internal sealed class SimulatedDevices : IDisposable
{
    public required RecordingBackend[] Devices { get; init; }
    public required HostCommunicator Communicator { get; init; }
    public required PlacementPlan Plan { get; init; }
    public required DeepSeekModel Model { get; init; }

    public static SimulatedDevices Load(Checkpoint checkpoint, PlacementKind kind, int n, ModelOptions options, bool uncountedCollectives = false, bool mtp = false)
    {
        var inner = Enumerable.Range(0, n).Select(_ => (IBackend)new CpuBackend(maxDegreeOfParallelism: 2)).ToArray();
        var devices = inner.Select(b => new RecordingBackend(b)).ToArray();
        var host = new HostCommunicator(uncountedCollectives ? inner : devices);
        ICommunicator comm = uncountedCollectives ? new SeenThrough(devices, host) : host;
        var plan = PlanOf(checkpoint.Config, kind, n, mtp);
        return new SimulatedDevices { Devices = devices, Communicator = host, Plan = plan, Model = DeepSeekModel.Load(checkpoint, plan, comm, options) };
    }

    /// <summary>The plan of <paramref name="kind"/> over <paramref name="n"/> devices, with the MTP layer when <paramref name="mtp"/>.</summary>
    public static PlacementPlan PlanOf(ModelConfig config, PlacementKind kind, int n, bool mtp = false) =>
        kind == PlacementKind.Pipeline ? PlacementPlan.Pipeline(config, n, mtp) : PlacementPlan.TensorExpertParallel(config, n, includeMtp: mtp);

    public void Dispose()
    {
        Model.Dispose();
        Communicator.Dispose();
        foreach (var d in Devices)
        {
            d.Dispose();
        }
    }

    /// <summary>A communicator whose devices are the recording backends and whose collectives are another's.</summary>
    private sealed class SeenThrough(IBackend[] devices, ICommunicator collectives) : ICommunicator
    {
        public int DeviceCount => devices.Length;
        public IBackend Device(int device) => devices[device];
        public void AllReduceSum(IReadOnlyList<Tensor> tensors) => collectives.AllReduceSum(tensors);
        public void Copy(Tensor source, int sourceDevice, Tensor destination, int destinationDevice) => collectives.Copy(source, sourceDevice, destination, destinationDevice);
        public void Barrier() => collectives.Barrier();
        public bool CanCaptureGraphs => false; // the recording devices are not CPU backends a host communicator can record
        public StepGraph CaptureGraph(Action record) => throw new NotSupportedException();
        public void ReplayGraph(StepGraph graph) => throw new NotSupportedException();

        public void Dispose()
        {
        }
    }
}
