using System.Runtime.CompilerServices;
using System.Text;
using DeepSeekCuda.Cuda.Native;

namespace DeepSeekCuda.Cuda;

/// <summary>Grid or block dimensions.</summary>
internal readonly record struct Dim3(uint X, uint Y = 1, uint Z = 1)
{
    /// <summary>A 1-D size.</summary>
    public static implicit operator Dim3(int x) => new(checked((uint)x));
}

/// <summary>A loaded CUBIN or PTX image with the kernels found in it.</summary>
internal sealed unsafe class CudaModule : IDisposable
{
    private IntPtr _handle;

    /// <summary>Loads a compiled image (CUBIN, or PTX that the driver compiles for the device).</summary>
    public CudaModule(CudaDevice device, CompiledKernel image)
    {
        Device = device;
        Image = image;
        device.MakeCurrent();
        var bytes = image.Image;
        if (image.IsPtx && (bytes.Length == 0 || bytes[^1] != 0))
        {
            // The driver reads PTX as a C string.
            bytes = [.. bytes, 0];
        }

        IntPtr m;
        fixed (byte* p = bytes)
        {
            CudaCheck.Driver(CuDriver.cuModuleLoadData(&m, p), device.Ordinal);
        }

        _handle = m;
    }

    /// <summary>The owning device.</summary>
    public CudaDevice Device { get; }

    /// <summary>The image and its lowered names.</summary>
    public CompiledKernel Image { get; }

    /// <summary>The kernel for a name expression given at compilation (e.g. <c>rmsnorm_kernel&lt;256, 1&gt;</c>).</summary>
    public CudaKernel GetKernel(string nameExpression)
    {
        ObjectDisposedException.ThrowIf(_handle == IntPtr.Zero, this);
        if (!Image.LoweredNames.TryGetValue(nameExpression, out var lowered))
        {
            throw new KeyNotFoundException($"'{nameExpression}' was not among the name expressions compiled into {Image.Family}");
        }

        var name = Encoding.UTF8.GetBytes(lowered + "\0");
        IntPtr f;
        fixed (byte* n = name)
        {
            CudaCheck.Driver(CuDriver.cuModuleGetFunction(&f, _handle, n), Device.Ordinal);
        }

        return new CudaKernel(this, nameExpression, f);
    }

    /// <inheritdoc />
    public void Dispose()
    {
        if (_handle != IntPtr.Zero)
        {
            var h = _handle;
            _handle = IntPtr.Zero;
            CudaCheck.Release(CuDriver.cuModuleUnload(h), Device.Ordinal);
        }
    }
}

/// <summary>
/// One kernel function. Every kernel of ours takes a single parameter struct by value, so a launch passes
/// one pointer to that struct: no boxing, no allocation, no synchronization.
/// </summary>
internal sealed unsafe class CudaKernel
{
    internal CudaKernel(CudaModule module, string name, IntPtr function)
    {
        Module = module;
        Name = name;
        Function = function;
    }

    /// <summary>The module that holds it (keep it alive while launching).</summary>
    public CudaModule Module { get; }

    /// <summary>The name expression.</summary>
    public string Name { get; }

    /// <summary>The CUfunction.</summary>
    public IntPtr Function { get; }

    /// <summary>Reads a function attribute (registers, local memory, static shared memory...).</summary>
    public int Attribute(CuFunctionAttribute attribute)
    {
        int v;
        CudaCheck.Driver(CuDriver.cuFuncGetAttribute(&v, attribute, Function), Module.Device.Ordinal);
        return v;
    }

    /// <summary>Allows more than 48 KiB of dynamic shared memory (up to the device's opt-in limit).</summary>
    public void SetMaxDynamicSharedMemory(int bytes)
    {
        if (bytes > Module.Device.SharedMemoryPerBlockOptin)
        {
            throw new ArgumentOutOfRangeException(nameof(bytes), $"{bytes} bytes of shared memory requested; {Module.Device.Name} allows {Module.Device.SharedMemoryPerBlockOptin}");
        }

        CudaCheck.Driver(CuDriver.cuFuncSetAttribute(Function, CuFunctionAttribute.MaxDynamicSharedSizeBytes, bytes), Module.Device.Ordinal);
    }

    /// <summary>Queues the kernel with <paramref name="parameters"/> as its single by-value argument.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public void Launch<TParams>(Dim3 grid, Dim3 block, uint sharedMemoryBytes, CudaStream stream, in TParams parameters)
        where TParams : unmanaged
    {
        var args = stackalloc void*[1];
        fixed (TParams* p = &parameters)
        {
            args[0] = p;
            CudaCheck.Driver(CuDriver.cuLaunchKernel(Function, grid.X, grid.Y, grid.Z, block.X, block.Y, block.Z,
                sharedMemoryBytes, stream.Handle, args, null), Module.Device.Ordinal, Name);
        }
    }
}
