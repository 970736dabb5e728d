using DeepSeekCuda.Backends.Cuda;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Cuda.Native;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Model;
using CudaRt = DeepSeekCuda.Cuda.Cuda;

namespace DeepSeekCuda.Distributed;

/// <summary>What <see cref="CudaParallel.ConfigureConnections"/> found or did.</summary>
public enum ConnectionSetting
{
    /// <summary>The variable was already set (by the caller or the environment); its value is used as is.</summary>
    AlreadySet,

    /// <summary>It was unset and CUDA not yet initialized: set now, so the driver will see it.</summary>
    Set,

    /// <summary>It was unset but CUDA is already initialized in this process: too late to take effect.</summary>
    TooLate,
}

/// <summary>
/// N CUDA devices ready for a <see cref="DeepSeekModel"/> spread over them: a <see cref="DeviceMesh"/>, one <see cref="CudaBackend"/> per rank
/// queued on that rank's mesh stream (so compute and collectives of a rank share one in-order queue) and their
/// <see cref="CudaCommunicator"/>. <c>using var gpus = CudaParallel.Logical(4); using var model = gpus.Load(checkpoint, plan);</c>
/// Owns everything it creates.
/// </summary>
public sealed class CudaParallel : IDisposable
{
    /// <summary>The driver variable that sets how many hardware queues a context's streams map onto (default 8).</summary>
    public const string ConnectionsVariable = "CUDA_DEVICE_MAX_CONNECTIONS";

    /// <summary>The most hardware queues the driver gives a context.</summary>
    public const int MaxConnections = 32;

    private readonly List<CudaDevice> _meshDevices;
    private readonly CudaBackend[] _backends;

    private CudaParallel(List<CudaDevice> meshDevices, DeviceMesh mesh, CudaBackend[] backends, CudaCommunicator communicator)
    {
        _meshDevices = meshDevices;
        Mesh = mesh;
        _backends = backends;
        Communicator = communicator;
    }

    /// <summary>The ranks' mesh.</summary>
    internal DeviceMesh Mesh { get; }

    /// <summary>Rank r's backend.</summary>
    public IReadOnlyList<CudaBackend> Backends => _backends;

    /// <summary>The ranks' communicator, which <see cref="Load"/> passes to <see cref="DeepSeekModel.Load(Checkpoint, PlacementPlan, DeepSeekCuda.Backends.ICommunicator, ModelOptions?, IProgress{double}?, CancellationToken)"/>.</summary>
    internal CudaCommunicator Communicator { get; }

    /// <summary>
    /// Sets <see cref="ConnectionsVariable"/> to <see cref="MaxConnections"/> in the process environment if nothing set it,
    /// which only works before the CUDA driver initializes in this process (it reads the variable then). Logical ranks on
    /// one GPU need it: with the default 8 queues, two ranks' streams can share a queue and a spinning all-reduce block
    /// of one then waits for a peer queued behind it until the kernel's timeout. <see cref="Logical"/> calls this first;
    /// a process that touches CUDA earlier (a test host, a server) should call it at start or export the variable.
    /// </summary>
    public static ConnectionSetting ConfigureConnections()
    {
        if (!OperatingSystem.IsLinux())
        {
            return Environment.GetEnvironmentVariable(ConnectionsVariable) is null ? ConnectionSetting.TooLate : ConnectionSetting.AlreadySet;
        }

        if (LibC.GetEnv(ConnectionsVariable) is not null)
        {
            return ConnectionSetting.AlreadySet;
        }

        if (CudaRt.InitializationAttempted)
        {
            return ConnectionSetting.TooLate;
        }

        LibC.SetEnv(ConnectionsVariable, MaxConnections.ToString(System.Globalization.CultureInfo.InvariantCulture));
        return ConnectionSetting.Set;
    }

    /// <summary><paramref name="ranks"/> logical ranks on GPU <see cref="CudaBackendOptions.Device"/> of <paramref name="options"/>.</summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="ranks"/> is outside 1..8.</exception>
    /// <exception cref="CudaUnavailableException">No usable CUDA device or driver, or NVRTC cannot be loaded.</exception>
    public static CudaParallel Logical(int ranks, CudaBackendOptions? options = null)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(ranks, 1);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(ranks, Kernels.AllReduceKernel.MaxRanks);
        options ??= new CudaBackendOptions();
        return Create(options, [options.Device], ranks);
    }

    /// <summary>One rank per GPU in <paramref name="ordinals"/> (rank r on GPU ordinals[r]), peer access enabled where supported.</summary>
    /// <exception cref="ArgumentException">No GPUs, more than 8, or one listed twice.</exception>
    /// <exception cref="CudaUnavailableException">No usable CUDA device or driver, or NVRTC cannot be loaded.</exception>
    public static CudaParallel Devices(IReadOnlyList<int> ordinals, CudaBackendOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(ordinals);
        if (ordinals.Count is < 1 or > Kernels.AllReduceKernel.MaxRanks)
        {
            throw new ArgumentException($"{ordinals.Count} GPUs; a mesh has 1..{Kernels.AllReduceKernel.MaxRanks}", nameof(ordinals));
        }

        if (ordinals.Distinct().Count() != ordinals.Count)
        {
            throw new ArgumentException($"GPU list [{string.Join(", ", ordinals)}] names a GPU twice; use Logical for several ranks on one GPU", nameof(ordinals));
        }

        return Create(options ?? new CudaBackendOptions(), ordinals, 1);
    }

    private static CudaParallel Create(CudaBackendOptions options, IReadOnlyList<int> ordinals, int ranksPerDevice)
    {
        if (ranksPerDevice > 1)
        {
            ConfigureConnections();
        }

        if (!CudaBackend.IsSupported(out var reason))
        {
            throw new CudaUnavailableException(reason);
        }

        var devices = new List<CudaDevice>();
        DeviceMesh? mesh = null;
        var backends = new List<CudaBackend>();
        CudaCommunicator? communicator = null;
        try
        {
            foreach (var o in ordinals)
            {
                devices.Add(CudaDevice.Open(o));
            }

            var compiler = new NvrtcCompiler(cache: new KernelCache(options.KernelCacheDirectory ?? KernelCache.DefaultDirectory));
            mesh = ranksPerDevice > 1 ? DeviceMesh.Logical(devices[0], ranksPerDevice, compiler) : DeviceMesh.Open(devices, compiler);
            for (var r = 0; r < mesh.Ranks; r++)
            {
                backends.Add(new CudaBackend(options with { Device = mesh.Device(r).Ordinal }, mesh.Stream(r)));
            }

            communicator = new CudaCommunicator(mesh, backends);
            return new CudaParallel(devices, mesh, [.. backends], communicator);
        }
        catch
        {
            communicator?.Dispose();
            foreach (var b in backends)
            {
                b.Dispose();
            }

            mesh?.Dispose();
            foreach (var d in devices)
            {
                d.Dispose();
            }

            throw;
        }
    }

    /// <summary>Loads <paramref name="checkpoint"/> over these ranks as <paramref name="plan"/> places it (<see cref="DeepSeekModel.Load(Checkpoint, PlacementPlan, DeepSeekCuda.Backends.ICommunicator, ModelOptions?, IProgress{double}?, CancellationToken)"/>).</summary>
    public DeepSeekModel Load(Checkpoint checkpoint, PlacementPlan plan, ModelOptions? options = null, IProgress<double>? progress = null,
        CancellationToken cancellationToken = default) =>
        DeepSeekModel.Load(checkpoint, plan, Communicator, options, progress, cancellationToken);

    /// <summary>Waits for every rank, then frees the backends' scratch and the communicator's buffers (they grow again on demand).</summary>
    public void Trim()
    {
        Communicator.Trim();
        foreach (var b in _backends)
        {
            b.Trim();
        }
    }

    /// <summary>Releases the communicator, the backends, the mesh and the devices (models loaded on them must be disposed first).</summary>
    public void Dispose()
    {
        Communicator.Dispose();
        foreach (var b in _backends)
        {
            b.Dispose();
        }

        Mesh.Dispose();
        foreach (var d in _meshDevices)
        {
            d.Dispose();
        }
    }
}
