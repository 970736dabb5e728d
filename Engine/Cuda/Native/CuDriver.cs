using System.Runtime.InteropServices;

namespace DeepSeekCuda.Cuda.Native;

/// <summary>CUresult codes the engine names itself (the driver names the rest through cuGetErrorName).</summary>
internal enum CuResult
{
    Success = 0,
    InvalidValue = 1,
    OutOfMemory = 2,
    NotInitialized = 3,
    Deinitialized = 4,
    NoDevice = 100,
    InvalidDevice = 101,
    InvalidImage = 200,
    InvalidContext = 201,
    NotFound = 500,
    NotReady = 600,
    IllegalAddress = 700,
    LaunchOutOfResources = 701,
    LaunchTimeout = 702,
    HardwareStackError = 714,
    IllegalInstruction = 715,
    MisalignedAddress = 716,
    InvalidAddressSpace = 717,
    InvalidPc = 718,
    LaunchFailed = 719,
}

/// <summary>CUdevice_attribute values read by <see cref="CudaDevice"/>.</summary>
internal enum CuDeviceAttribute
{
    MaxThreadsPerBlock = 1,
    MaxSharedMemoryPerBlock = 8,
    WarpSize = 10,
    ClockRate = 13,
    MultiprocessorCount = 16,
    MemoryClockRate = 36,
    GlobalMemoryBusWidth = 37,
    L2CacheSize = 38,
    MaxThreadsPerMultiprocessor = 39,
    ComputeCapabilityMajor = 75,
    ComputeCapabilityMinor = 76,
    MaxSharedMemoryPerMultiprocessor = 81,
    MaxRegistersPerMultiprocessor = 82,
    MaxSharedMemoryPerBlockOptin = 97,
}

/// <summary>CUfunction_attribute values.</summary>
internal enum CuFunctionAttribute
{
    MaxThreadsPerBlock = 0,
    SharedSizeBytes = 1,
    ConstSizeBytes = 2,
    LocalSizeBytes = 3,
    NumRegs = 4,
    PtxVersion = 5,
    BinaryVersion = 6,
    MaxDynamicSharedSizeBytes = 8,
}

/// <summary>
/// Thin declarations of the CUDA driver API (the <c>_v2</c> entry points where the driver exports them).
/// Every call returns a CUresult that callers pass to <see cref="CudaCheck.Driver"/>.
/// </summary>
internal static unsafe partial class CuDriver
{
    static CuDriver() => NativeLibraries.EnsureResolver();

    private const string Lib = NativeLibraries.Driver;

    [LibraryImport(Lib)] public static partial CuResult cuInit(uint flags);
    [LibraryImport(Lib)] public static partial CuResult cuDriverGetVersion(int* version);
    [LibraryImport(Lib)] public static partial CuResult cuGetErrorName(CuResult error, byte** name);
    [LibraryImport(Lib)] public static partial CuResult cuGetErrorString(CuResult error, byte** text);

    [LibraryImport(Lib)] public static partial CuResult cuDeviceGetCount(int* count);
    [LibraryImport(Lib)] public static partial CuResult cuDeviceGet(int* device, int ordinal);
    [LibraryImport(Lib)] public static partial CuResult cuDeviceGetName(byte* name, int length, int device);
    [LibraryImport(Lib)] public static partial CuResult cuDeviceGetAttribute(int* value, CuDeviceAttribute attribute, int device);
    [LibraryImport(Lib, EntryPoint = "cuDeviceTotalMem_v2")] public static partial CuResult cuDeviceTotalMem(nuint* bytes, int device);
    [LibraryImport(Lib)] public static partial CuResult cuDeviceCanAccessPeer(int* canAccess, int device, int peerDevice);

    [LibraryImport(Lib)] public static partial CuResult cuDevicePrimaryCtxRetain(IntPtr* context, int device);
    [LibraryImport(Lib, EntryPoint = "cuDevicePrimaryCtxRelease_v2")] public static partial CuResult cuDevicePrimaryCtxRelease(int device);
    [LibraryImport(Lib)] public static partial CuResult cuCtxSetCurrent(IntPtr context);
    [LibraryImport(Lib)] public static partial CuResult cuCtxGetCurrent(IntPtr* context);
    [LibraryImport(Lib)] public static partial CuResult cuCtxSynchronize();
    [LibraryImport(Lib)] public static partial CuResult cuCtxEnablePeerAccess(IntPtr peerContext, uint flags);

    [LibraryImport(Lib, EntryPoint = "cuMemAlloc_v2")] public static partial CuResult cuMemAlloc(ulong* pointer, nuint bytes);
    [LibraryImport(Lib, EntryPoint = "cuMemFree_v2")] public static partial CuResult cuMemFree(ulong pointer);
    [LibraryImport(Lib, EntryPoint = "cuMemGetInfo_v2")] public static partial CuResult cuMemGetInfo(nuint* free, nuint* total);
    [LibraryImport(Lib)] public static partial CuResult cuMemHostAlloc(void** pointer, nuint bytes, uint flags);
    [LibraryImport(Lib)] public static partial CuResult cuMemFreeHost(void* pointer);
    [LibraryImport(Lib, EntryPoint = "cuMemHostRegister_v2")] public static partial CuResult cuMemHostRegister(void* pointer, nuint bytes, uint flags);
    [LibraryImport(Lib)] public static partial CuResult cuMemHostUnregister(void* pointer);
    [LibraryImport(Lib, EntryPoint = "cuMemcpyHtoDAsync_v2")] public static partial CuResult cuMemcpyHtoDAsync(ulong destination, void* source, nuint bytes, IntPtr stream);
    [LibraryImport(Lib, EntryPoint = "cuMemcpyDtoHAsync_v2")] public static partial CuResult cuMemcpyDtoHAsync(void* destination, ulong source, nuint bytes, IntPtr stream);
    [LibraryImport(Lib, EntryPoint = "cuMemcpyDtoDAsync_v2")] public static partial CuResult cuMemcpyDtoDAsync(ulong destination, ulong source, nuint bytes, IntPtr stream);
    [LibraryImport(Lib)] public static partial CuResult cuMemcpyPeerAsync(ulong destination, IntPtr destinationContext, ulong source, IntPtr sourceContext, nuint bytes, IntPtr stream);
    [LibraryImport(Lib)] public static partial CuResult cuMemsetD8Async(ulong destination, byte value, nuint count, IntPtr stream);
    [LibraryImport(Lib)] public static partial CuResult cuMemsetD32Async(ulong destination, uint value, nuint count, IntPtr stream);

    [LibraryImport(Lib)] public static partial CuResult cuModuleLoadData(IntPtr* module, void* image);
    [LibraryImport(Lib)] public static partial CuResult cuModuleUnload(IntPtr module);
    [LibraryImport(Lib)] public static partial CuResult cuModuleGetFunction(IntPtr* function, IntPtr module, byte* name);
    [LibraryImport(Lib)] public static partial CuResult cuFuncGetAttribute(int* value, CuFunctionAttribute attribute, IntPtr function);
    [LibraryImport(Lib)] public static partial CuResult cuFuncSetAttribute(IntPtr function, CuFunctionAttribute attribute, int value);
    [LibraryImport(Lib)]
    public static partial CuResult cuLaunchKernel(IntPtr function, uint gridX, uint gridY, uint gridZ, uint blockX, uint blockY, uint blockZ,
        uint sharedMemBytes, IntPtr stream, void** kernelParams, void** extra);

    [LibraryImport(Lib)]
    public static partial CuResult cuTensorMapEncodeTiled(TensorMap* tensorMap, int dataType, uint rank, ulong globalAddress, ulong* globalDim,
        ulong* globalStrides, uint* boxDim, uint* elementStrides, int interleave, int swizzle, int l2Promotion, int oobFill);

    [LibraryImport(Lib)] public static partial CuResult cuStreamCreate(IntPtr* stream, uint flags);
    [LibraryImport(Lib, EntryPoint = "cuStreamDestroy_v2")] public static partial CuResult cuStreamDestroy(IntPtr stream);
    [LibraryImport(Lib)] public static partial CuResult cuStreamSynchronize(IntPtr stream);
    [LibraryImport(Lib)] public static partial CuResult cuStreamWaitEvent(IntPtr stream, IntPtr evt, uint flags);
    [LibraryImport(Lib, EntryPoint = "cuStreamBeginCapture_v2")] public static partial CuResult cuStreamBeginCapture(IntPtr stream, int mode);
    [LibraryImport(Lib)] public static partial CuResult cuStreamEndCapture(IntPtr stream, IntPtr* graph);
    [LibraryImport(Lib)] public static partial CuResult cuStreamIsCapturing(IntPtr stream, int* status);

    [LibraryImport(Lib)] public static partial CuResult cuEventCreate(IntPtr* evt, uint flags);
    [LibraryImport(Lib)] public static partial CuResult cuEventRecord(IntPtr evt, IntPtr stream);
    [LibraryImport(Lib)] public static partial CuResult cuEventSynchronize(IntPtr evt);
    [LibraryImport(Lib)] public static partial CuResult cuEventElapsedTime(float* milliseconds, IntPtr start, IntPtr end);
    [LibraryImport(Lib, EntryPoint = "cuEventDestroy_v2")] public static partial CuResult cuEventDestroy(IntPtr evt);

    [LibraryImport(Lib)] public static partial CuResult cuGraphInstantiateWithFlags(IntPtr* graphExec, IntPtr graph, ulong flags);
    [LibraryImport(Lib)] public static partial CuResult cuGraphLaunch(IntPtr graphExec, IntPtr stream);
    [LibraryImport(Lib)] public static partial CuResult cuGraphDestroy(IntPtr graph);
    [LibraryImport(Lib)] public static partial CuResult cuGraphExecDestroy(IntPtr graphExec);

    /// <summary>cuMemHostAlloc flag: memory usable by all contexts.</summary>
    public const uint HostAllocPortable = 0x01;

    /// <summary>cuStreamCreate flag: does not synchronize with the legacy default stream.</summary>
    public const uint StreamNonBlocking = 0x1;

    /// <summary>cuEventCreate flag: no timing (cheaper, for ordering only).</summary>
    public const uint EventDisableTiming = 0x2;
}
