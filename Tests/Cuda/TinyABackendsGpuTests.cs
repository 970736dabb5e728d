using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Backends.Cuda;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Numerics;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>
/// What the GPU tests of <see cref="CudaBackend"/> against <see cref="CpuBackend"/> in <see cref="CpuNumerics.GpuEmulation"/>
/// share: tiny-a's checkpoint, both backends opened per test and disposed after it, and fresh random inputs from a seed
/// logged per test.
/// </summary>
public abstract class TinyABackendsGpuTests : GpuTestBase
{
    /// <summary>One BF16 step relative (2⁻⁷): how far a BF16-rounded result may land when only fp32 summation order differs.</summary>
    private protected const double Bf16Step = 1.0 / 128;

    private protected Checkpoint Checkpoint { get; private set; } = null!;

    private protected CudaBackend Cuda { get; private set; } = null!;

    private protected CpuBackend Cpu { get; private set; } = null!;

    /// <summary>This test's seed (logged).</summary>
    private protected int Seed { get; private set; }

    private protected Random Random { get; private set; } = null!;

    private protected ModelConfig Config => Checkpoint.Config;

    /// <summary>The options the CUDA backend under test is opened with.</summary>
    private protected virtual CudaBackendOptions CudaOptions => new();

    [TestInitialize]
    public void OpenBackends()
    {
        Checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        Cuda = new CudaBackend(CudaOptions);
        Cpu = new CpuBackend(CpuNumerics.GpuEmulation);
        Seed = Environment.TickCount;
        TestContext.WriteLine($"seed {Seed}");
        Random = new Random(Seed);
    }

    [TestCleanup]
    public void CloseBackends()
    {
        Cuda?.Dispose();
        Cpu?.Dispose();
        Checkpoint?.Dispose();
    }

    /// <summary>Random values already BF16 (what activations hold), so Upload means the same on both backends.</summary>
    private protected float[] Bf16Normal(int n, float scale = 1f)
    {
        var a = Normal(Random, n, scale);
        BFloat16.Round(a);
        return a;
    }
}
