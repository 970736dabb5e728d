using DeepSeekCuda.Cuda;
using DeepSeekCuda.Kernels;
using DeepSeekCuda.Loader.Numerics;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>
/// Base of the GPU tests: without a device every test ends Inconclusive with the reason (never a pass), and after a
/// kernel fault the later tests of the process name the test that caused it (<see cref="GpuGuard"/>).
/// Outputs are poisoned with NaN before each launch so an element the kernel skips cannot pass.
/// </summary>
public abstract class GpuTestBase
{
    protected const uint NaNPattern = 0x7FC00000;

    private protected CudaDevice Device { get; private set; } = null!;

    private protected CudaStream Stream { get; private set; } = null!;

    private protected NvrtcCompiler Compiler { get; private set; } = null!;

    public TestContext TestContext { get; set; } = null!;

    protected static Random Rng(int seed) => new(seed);

    [TestInitialize]
    public void OpenDevice()
    {
        GpuGuard.Require();
        Device = CudaDevice.Open();
        Stream = new CudaStream(Device);
        Compiler = new NvrtcCompiler(cache: new KernelCache(KernelCache.DefaultDirectory));
    }

    /// <summary>Releases the stream and the device even when one release throws, then checks for a sticky fault.</summary>
    [TestCleanup]
    public void CloseDevice()
    {
        try
        {
            Stream?.Dispose();
        }
        finally
        {
            try
            {
                Device?.Dispose();
            }
            finally
            {
                GpuGuard.After(TestContext);
            }
        }
    }

    protected static float[] Normal(Random r, int n, float scale = 1f)
    {
        var a = new float[n];
        for (var i = 0; i < n; i++)
        {
            a[i] = scale * (float)(Math.Sqrt(-2 * Math.Log(1 - r.NextDouble())) * Math.Cos(2 * Math.PI * r.NextDouble()));
        }

        return a;
    }

    /// <summary>Uploads values as F32 or BF16 (rounding <paramref name="values"/> in place to what the GPU sees).</summary>
    private protected DeviceBuffer<byte> Upload(float[] values, ElementType type)
    {
        if (type == ElementType.F32)
        {
            var b = DeviceBuffer<byte>.Allocate(Device, values.Length * 4L);
            b.Upload(System.Runtime.InteropServices.MemoryMarshal.AsBytes(values.AsSpan()));
            return b;
        }

        var bits = new ushort[values.Length];
        for (var i = 0; i < values.Length; i++)
        {
            bits[i] = BFloat16.FromFloat(values[i]);
            values[i] = BFloat16.ToFloat(bits[i]);
        }

        var d = DeviceBuffer<byte>.Allocate(Device, values.Length * 2L);
        d.Upload(System.Runtime.InteropServices.MemoryMarshal.AsBytes(bits.AsSpan()));
        return d;
    }

    /// <summary><paramref name="rows"/> × <paramref name="cols"/> elements of <paramref name="type"/> in <paramref name="b"/> as a launcher takes them.</summary>
    private protected static DeviceRows Rows(DeviceBuffer<byte> b, ElementType type, int rows, int cols, long stride = -1) =>
        new(b.Pointer, type, rows, cols, stride);

    private protected DeviceBuffer<byte> Poisoned(long elements, ElementType type)
    {
        var b = DeviceBuffer<byte>.Allocate(Device, elements * type.Bytes());
        // bf16 NaN 0x7FC0 twice is the same 32-bit pattern as f32 0x7FC07FC0: NaN either way.
        b.Fill32(type == ElementType.F32 ? NaNPattern : 0x7FC07FC0u, Stream);
        return b;
    }

    private protected static float[] Read(DeviceBuffer<byte> b, ElementType type, CudaStream stream)
    {
        var bytes = b.ToArray(stream);
        if (type == ElementType.F32)
        {
            return System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(bytes).ToArray();
        }

        var bits = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, ushort>(bytes);
        var f = new float[bits.Length];
        BFloat16.Decode(bits, f);
        return f;
    }

    /// <summary>Rounds a reference to what a bf16 output can hold.</summary>
    private protected static float[] AsStored(float[] reference, ElementType type)
    {
        if (type == ElementType.F32)
        {
            return reference;
        }

        var r = (float[])reference.Clone();
        BFloat16.Round(r);
        return r;
    }
}
