using DeepSeekCuda.Cuda;
using DeepSeekCuda.Cuda.Native;
using CudaRt = DeepSeekCuda.Cuda.Cuda;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>Binding behaviour that needs no GPU: clear unavailability, error formatting.</summary>
[TestClass]
public sealed class BindingTests
{
    [TestMethod]
    public void WithoutCudaIsAvailableIsFalseAndSaysWhy()
    {
        if (CudaRt.IsAvailable)
        {
            Assert.Inconclusive($"a CUDA device is present ({CudaRt.DeviceCount}); this test is about machines without one");
        }

        var reason = CudaRt.UnavailableReason;
        Assert.IsFalse(string.IsNullOrWhiteSpace(reason));
        if (!NativeLibraries.TryDriver(out _, out _))
        {
            StringAssert.Contains(reason, "libcuda.so.1", "the reason names the missing driver library");
        }

        var e = Assert.ThrowsExactly<CudaUnavailableException>(() => CudaDevice.Open());
        Assert.AreEqual(reason, e.Reason);
        Assert.AreEqual(0, CudaRt.DeviceCount);
    }

    [TestMethod]
    public void DriverCheckFormatsNameTextCallAndDevice()
    {
        // Without a driver the names come from the built-in table; with one, from cuGetErrorName. Both
        // spell CUDA_ERROR_OUT_OF_MEMORY for code 2.
        var e = Assert.ThrowsExactly<CudaException>(() => CudaCheck.Driver(CuResult.OutOfMemory, 3));
        Assert.AreEqual("CUDA_ERROR_OUT_OF_MEMORY", e.ErrorName);
        Assert.AreEqual(2, e.Code);
        Assert.AreEqual(3, e.Device);
        Assert.AreEqual("CuResult.OutOfMemory", e.Call, "the call text comes from CallerArgumentExpression");
        StringAssert.StartsWith(e.Message, "CUDA_ERROR_OUT_OF_MEMORY (2): ");
        StringAssert.EndsWith(e.Message, "in driver call `CuResult.OutOfMemory` on device 3");

        Assert.AreEqual("CUDA_ERROR_INVALID_VALUE (1): invalid argument in driver call `cuFoo(x)` on device 0",
            new CudaException("driver", 1, "CUDA_ERROR_INVALID_VALUE", "invalid argument", "cuFoo(x)", 0).Message);
        Assert.AreEqual("NVRTC_ERROR_COMPILATION (6): NVRTC_ERROR_COMPILATION in nvrtc call `nvrtcCompileProgram(p)`",
            new CudaException("nvrtc", 6, "NVRTC_ERROR_COMPILATION", "NVRTC_ERROR_COMPILATION", "nvrtcCompileProgram(p)", -1).Message);
    }

    [TestMethod]
    public void ReleaseToleratesAContextThatIsGoneOrFaultedButNotOtherErrors()
    {
        CudaCheck.Release(CuResult.Deinitialized);
        CudaCheck.Release(CuResult.InvalidContext);
        CudaCheck.Release((CuResult)709);
        CudaCheck.Release(CuResult.Success);
        // A sticky fault was reported by the call that met it; a Dispose on the way out must not replace that exception.
        CudaCheck.Release(CuResult.IllegalAddress);
        CudaCheck.Release(CuResult.MisalignedAddress);
        CudaCheck.Release(CuResult.LaunchFailed);
        Assert.ThrowsExactly<CudaException>(() => CudaCheck.Release(CuResult.InvalidValue));
        Assert.ThrowsExactly<CudaException>(() => CudaCheck.Release(CuResult.OutOfMemory));
    }

    [TestMethod]
    public void StickyFaultsAreTheDriversContextCorruptingCodes()
    {
        // CUDA_ERROR_ILLEGAL_ADDRESS 700, LAUNCH_TIMEOUT 702, HARDWARE_STACK_ERROR 714 … LAUNCH_FAILED 719 (cuda.h).
        int[] sticky = [700, 702, 714, 715, 716, 717, 718, 719];
        foreach (var code in Enumerable.Range(0, 1000))
        {
            Assert.AreEqual(sticky.Contains(code), CudaCheck.IsContextCorrupted((CuResult)code), $"CUresult {code}");
        }

        // Not sticky: a launch asking for too many resources fails alone; the context stays usable.
        Assert.IsFalse(CudaCheck.IsContextCorrupted(CuResult.LaunchOutOfResources));
    }

    [TestMethod]
    [TestCategory("Nvrtc")]
    public void NvrtcCheckNamesTheError()
    {
        NvrtcSupport.RequireNvrtc();
        var e = Assert.ThrowsExactly<CudaException>(() => NvrtcCheck.Check(NvrtcResult.InvalidOption));
        Assert.AreEqual("NVRTC_ERROR_INVALID_OPTION", e.ErrorName);
        Assert.AreEqual("nvrtc", e.Api);
        var (major, minor) = NvrtcCompiler.Version;
        Assert.IsGreaterThanOrEqualTo(11, major, $"NVRTC {major}.{minor}");
    }
}
