using DeepSeekCuda.Cuda.Native;
using DeepSeekCuda.Distributed;
using CudaRt = DeepSeekCuda.Cuda.Cuda;

namespace DeepSeekCuda.Tests;

/// <summary>Process-wide setup of the test host.</summary>
[TestClass]
public static class TestAssembly
{
    /// <summary>
    /// Before any test can initialize the CUDA driver: give every stream its own hardware queue
    /// (CUDA_DEVICE_MAX_CONNECTIONS = 32 unless the environment set it), which the logical-rank all-reduce tests need
    /// (see <see cref="CudaParallel.ConfigureConnections"/>); tools/gpu/device-run.sh also exports it.
    /// Without a device, says once why every <c>Gpu</c> test will report Inconclusive (the README's test command
    /// shows only failed tests one by one, so the skipped count in the summary has its reason here).
    /// </summary>
    [AssemblyInitialize]
    public static void Initialize(TestContext _)
    {
        CudaParallel.ConfigureConnections();
        if (!CudaRt.IsAvailable)
        {
            // The process's own stderr: MSTest captures Console per test, and this line belongs to the whole run.
            using var stderr = new StreamWriter(Console.OpenStandardError());
            var reason = NativeLibraries.Headline(CudaRt.UnavailableReason!);
            stderr.WriteLine($"No CUDA device ({reason}): every TestCategory=Gpu test reports Inconclusive, counted as skipped below.");
        }
    }
}
