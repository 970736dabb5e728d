using DeepSeekCuda.Cuda;
using DeepSeekCuda.Cuda.Native;
using CudaRt = DeepSeekCuda.Cuda.Cuda;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>
/// What every GPU test checks before and after it runs. Before: a device (else Inconclusive with the reason, never a
/// pass), NVRTC, and a usable context. After a failed test: whether the failure left the context broken. A kernel
/// fault (illegal or misaligned address, ...) is sticky: the driver answers every later call in this process with the
/// same error, so every later test would fail with it and the test that caused it would be lost among them. The first
/// test that left the context broken is recorded, and every later GPU test in the process reports Inconclusive naming
/// it. tools/gpu/device-run.sh runs each test class in its own process, so one faulting class does not reach the next.
/// </summary>
internal static class GpuGuard
{
    private static string? s_brokenBy;

    /// <summary>The test whose failure left this process's context unusable, and the fault; null while it is usable.</summary>
    public static string? BrokenBy => Volatile.Read(ref s_brokenBy);

    /// <summary>Ends the test Inconclusive without a device or after a sticky fault; fails without NVRTC.</summary>
    public static void Require()
    {
        if (!CudaRt.IsAvailable)
        {
            Assert.Inconclusive($"no CUDA device: {CudaRt.UnavailableReason}");
        }

        NvrtcSupport.RequireNvrtc();
        if (BrokenBy is { } cause)
        {
            Assert.Inconclusive($"not run: the CUDA context of this process is unusable since {cause}");
        }
    }

    /// <summary>After a test that did not pass: records it when the context is now broken (the first such test only).</summary>
    public static void After(TestContext context)
    {
        if (BrokenBy is not null || !CudaRt.IsAvailable || context.CurrentTestOutcome is UnitTestOutcome.Passed or UnitTestOutcome.Inconclusive)
        {
            return;
        }

        if (ContextFault() is { } fault)
        {
            Interlocked.CompareExchange(ref s_brokenBy, $"{context.FullyQualifiedTestClassName}.{context.TestName} failed ({fault})", null);
        }
    }

    /// <summary>The sticky fault device 0's context reports, or null when it synchronizes cleanly.</summary>
    private static string? ContextFault()
    {
        try
        {
            using var device = CudaDevice.Open();
            device.Synchronize();
            return null;
        }
        catch (CudaException e) when (CudaCheck.IsContextCorrupted((CuResult)e.Code))
        {
            return $"{e.ErrorName}: {e.ErrorText}";
        }
    }
}
