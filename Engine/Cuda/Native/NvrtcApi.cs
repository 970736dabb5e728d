using System.Runtime.InteropServices;

namespace DeepSeekCuda.Cuda.Native;

/// <summary>NVRTC result codes.</summary>
internal enum NvrtcResult
{
    Success = 0,
    OutOfMemory = 1,
    ProgramCreationFailure = 2,
    InvalidInput = 3,
    InvalidProgram = 4,
    InvalidOption = 5,
    Compilation = 6,
    BuiltinOperationFailure = 7,
    NoNameExpressionsAfterCompilation = 8,
    NoLoweredNamesBeforeCompilation = 9,
    NameExpressionNotValid = 10,
    InternalError = 11,
}

/// <summary>Thin declarations of NVRTC. Strings travel as NUL-terminated UTF-8.</summary>
internal static unsafe partial class NvrtcApi
{
    static NvrtcApi() => NativeLibraries.EnsureResolver();

    private const string Lib = NativeLibraries.Nvrtc;

    [LibraryImport(Lib)] public static partial byte* nvrtcGetErrorString(NvrtcResult result);
    [LibraryImport(Lib)] public static partial NvrtcResult nvrtcVersion(int* major, int* minor);
    [LibraryImport(Lib)]
    public static partial NvrtcResult nvrtcCreateProgram(IntPtr* program, byte* source, byte* name, int numHeaders, byte** headers, byte** includeNames);
    [LibraryImport(Lib)] public static partial NvrtcResult nvrtcDestroyProgram(IntPtr* program);
    [LibraryImport(Lib)] public static partial NvrtcResult nvrtcCompileProgram(IntPtr program, int numOptions, byte** options);
    [LibraryImport(Lib)] public static partial NvrtcResult nvrtcGetPTXSize(IntPtr program, nuint* size);
    [LibraryImport(Lib)] public static partial NvrtcResult nvrtcGetPTX(IntPtr program, byte* ptx);
    [LibraryImport(Lib)] public static partial NvrtcResult nvrtcGetCUBINSize(IntPtr program, nuint* size);
    [LibraryImport(Lib)] public static partial NvrtcResult nvrtcGetCUBIN(IntPtr program, byte* cubin);
    [LibraryImport(Lib)] public static partial NvrtcResult nvrtcGetProgramLogSize(IntPtr program, nuint* size);
    [LibraryImport(Lib)] public static partial NvrtcResult nvrtcGetProgramLog(IntPtr program, byte* log);
    [LibraryImport(Lib)] public static partial NvrtcResult nvrtcAddNameExpression(IntPtr program, byte* nameExpression);
    [LibraryImport(Lib)] public static partial NvrtcResult nvrtcGetLoweredName(IntPtr program, byte* nameExpression, byte** loweredName);

    /// <summary>
    /// The architectures this NVRTC can target (nvrtcGetSupportedArchs, NVRTC 11.2+), or an empty array
    /// where the entry point is missing.
    /// </summary>
    public static int[] SupportedArchs()
    {
        var lib = NativeLibraries.RequireNvrtc();
        var numFn = (delegate* unmanaged<int*, NvrtcResult>)NativeLibraries.OptionalExport(lib, "nvrtcGetNumSupportedArchs");
        var archFn = (delegate* unmanaged<int*, NvrtcResult>)NativeLibraries.OptionalExport(lib, "nvrtcGetSupportedArchs");
        if (numFn == null || archFn == null)
        {
            return [];
        }

        int n;
        NvrtcCheck.Check(numFn(&n), "nvrtcGetNumSupportedArchs");
        var archs = new int[n];
        fixed (int* p = archs)
        {
            NvrtcCheck.Check(archFn(p), "nvrtcGetSupportedArchs");
        }

        return archs;
    }
}
