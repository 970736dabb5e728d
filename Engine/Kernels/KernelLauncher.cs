using System.Collections.Concurrent;
using DeepSeekCuda.Cuda;

namespace DeepSeekCuda.Kernels;

/// <summary>Storage type of an activation tensor.</summary>
internal enum ElementType
{
    /// <summary>IEEE float32.</summary>
    F32 = 0,

    /// <summary>bfloat16 stored as 16 bits.</summary>
    BF16 = 1,
}

/// <summary>
/// Base of the per-family launchers: compiles each specialization on first use (through the disk cache),
/// loads it on the launcher's device and keeps it. Subclasses own geometry and argument packing.
/// </summary>
internal abstract class KernelLauncher : IDisposable
{
    private readonly ConcurrentDictionary<string, Lazy<(CudaModule Module, CudaKernel Kernel)>> _loaded = new(StringComparer.Ordinal);

    /// <summary>Creates a launcher for <paramref name="family"/> on <paramref name="device"/>.</summary>
    protected KernelLauncher(CudaDevice device, NvrtcCompiler compiler, string family)
    {
        Device = device;
        Compiler = compiler;
        Family = family;
        Target = device.Target;
    }

    /// <summary>The device kernels are loaded on.</summary>
    public CudaDevice Device { get; }

    /// <summary>The compiler (and its cache).</summary>
    public NvrtcCompiler Compiler { get; }

    /// <summary>The kernel family (Kernels/&lt;family&gt;.cu).</summary>
    public string Family { get; }

    /// <summary>The architecture compiled for.</summary>
    public KernelTarget Target { get; }

    /// <summary>Dynamic shared memory a kernel may take without opting in.</summary>
    public const int DefaultDynamicSharedLimit = 48 * 1024;

    /// <summary>
    /// The loaded kernel of one specialization, compiling it the first time; one that launches with more than
    /// <see cref="DefaultDynamicSharedLimit"/> of dynamic shared memory is opted in to its
    /// <see cref="KernelInstance.DynamicSharedBytes"/> as it loads.
    /// </summary>
    protected CudaKernel Get(KernelInstance instance) =>
        _loaded.GetOrAdd(instance.NameExpression, _ => new Lazy<(CudaModule, CudaKernel)>(() =>
        {
            var image = Compiler.Compile(Family, [instance], Target);
            var module = new CudaModule(Device, image);
            try
            {
                var kernel = module.GetKernel(instance.NameExpression);
                if (instance.DynamicSharedBytes > DefaultDynamicSharedLimit)
                {
                    kernel.SetMaxDynamicSharedMemory(instance.DynamicSharedBytes);
                }

                return (module, kernel);
            }
            catch
            {
                module.Dispose();
                throw;
            }
        })).Value.Kernel;

    /// <summary>Number of blocks to cover <paramref name="n"/> items with <paramref name="per"/> per block.</summary>
    protected static uint Blocks(long n, long per) => checked((uint)Math.Max(1, (n + per - 1) / per));

    /// <summary>0/1 template flag of an element type.</summary>
    protected static int Flag(ElementType t) => t == ElementType.BF16 ? 1 : 0;

    /// <summary>Throws unless a launch that rounds to bf16 values (<paramref name="round"/>) reads and writes f32: f32 storage holding bf16 values.</summary>
    protected static void RequireF32IfRounded(bool round, ElementType input, ElementType output, string what)
    {
        if (round && (input != ElementType.F32 || output != ElementType.F32))
        {
            throw new ArgumentException($"a rounded {what} reads and writes f32 (f32 storage holding bf16 values)", nameof(round));
        }
    }

    /// <inheritdoc />
    public virtual void Dispose()
    {
        foreach (var l in _loaded.Values)
        {
            if (l.IsValueCreated)
            {
                l.Value.Module.Dispose();
            }
        }

        _loaded.Clear();
        GC.SuppressFinalize(this);
    }
}
