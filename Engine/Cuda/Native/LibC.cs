using System.Runtime.InteropServices;

namespace DeepSeekCuda.Cuda.Native;

/// <summary>
/// The C library's environment (glibc): the CUDA driver reads variables such as <c>CUDA_DEVICE_MAX_CONNECTIONS</c>
/// with getenv, which <see cref="Environment.SetEnvironmentVariable(string, string)"/> does not reach on Linux
/// (.NET keeps its own copy of the environment).
/// </summary>
internal static partial class LibC
{
    private const string Lib = "libc.so.6";

    [LibraryImport(Lib, EntryPoint = "setenv", StringMarshalling = StringMarshalling.Utf8)]
    private static partial int SetEnvNative(string name, string value, int overwrite);

    [LibraryImport(Lib, EntryPoint = "getenv", StringMarshalling = StringMarshalling.Utf8)]
    private static partial IntPtr GetEnvNative(string name);

    /// <summary>The process environment's value of <paramref name="name"/> as native code sees it, or null.</summary>
    public static string? GetEnv(string name) => Marshal.PtrToStringUTF8(GetEnvNative(name));

    /// <summary>Sets <paramref name="name"/> in the process environment native code sees (and in .NET's copy).</summary>
    public static void SetEnv(string name, string value)
    {
        if (SetEnvNative(name, value, 1) != 0)
        {
            throw new InvalidOperationException($"setenv({name}) failed");
        }

        Environment.SetEnvironmentVariable(name, value);
    }
}
