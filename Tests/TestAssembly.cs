using DeepSeekCuda.Distributed;

namespace DeepSeekCuda.Tests;

/// <summary>Process-wide setup of the test host.</summary>
[TestClass]
public static class TestAssembly
{
    /// <summary>
    /// Before any test can initialize the CUDA driver: give every stream its own hardware queue
    /// (CUDA_DEVICE_MAX_CONNECTIONS = 32 unless the environment set it), which the logical-rank all-reduce tests need
    /// (see <see cref="CudaParallel.ConfigureConnections"/>); tools/gpu/run.sh also exports it.
    /// </summary>
    [AssemblyInitialize]
    public static void Initialize(TestContext _) => CudaParallel.ConfigureConnections();
}
