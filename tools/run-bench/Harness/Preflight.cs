using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Text.Json;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Cuda.Inspection;
using DeepSeekCuda.Cuda.Native;
using DeepSeekCuda.Kernels;
using CudaRt = DeepSeekCuda.Cuda.Cuda;

namespace DeepSeekCuda.Bench.Harness;

/// <summary>Where a library was loaded from and its version, or why it did not load.</summary>
internal sealed record LibraryFinding(string? Path, string? Version, string? Error);

/// <summary>One CUDA device as the driver reports it, and the NVRTC target the engine compiles for it.</summary>
internal sealed record DeviceFinding(int Ordinal, string Name, string Arch, int Multiprocessors, long MemoryMib, string? Target);

/// <summary>One smoke step: what was tried, whether it worked, how long it took, and what it showed.</summary>
internal sealed record SmokeFinding(string Step, bool Ok, double Ms, string Detail);

/// <summary>
/// <c>run-bench preflight</c>'s file: the driver, devices, NVRTC and cuBLAS found (file and version, or the reason),
/// the smoke steps, and every problem in one list (<see cref="Ok"/>: none).
/// </summary>
internal sealed record PreflightReport(
    string Date, string? Commit, string Host, string Runtime, LibraryFinding Driver, string? DriverCuda, string? DeviceError,
    IReadOnlyList<DeviceFinding> Devices, LibraryFinding Nvrtc, LibraryFinding Cublas, LibraryFinding CublasLt,
    IReadOnlyList<SmokeFinding> Smoke, IReadOnlyList<string> Problems)
{
    /// <summary>No problem found.</summary>
    public bool Ok => Problems.Count == 0;
}

/// <summary>
/// <c>run-bench preflight [--arch sm_90a] [--family allreduce,rmsnorm] [--out DIR]</c>: seconds-long checks before a GPU
/// run spends its time. Reports the driver (file, CUDA version, devices), NVRTC and cuBLAS/cuBLASLt (file, version),
/// compiles the given families to CUBIN for each <c>--arch</c> with NVRTC (no cache: the compiler itself is tested), and
/// on a device compiles for the device's own target, loads the module and makes a memory round trip. Prints every
/// finding, writes <c>preflight.json</c>, and exits 0 when nothing failed, 1 otherwise (a machine without a device
/// fails: preflight is for GPU servers).
/// </summary>
internal static class Preflight
{
    private const uint Pattern = 0x3F8000A5;

    public static Command Create()
    {
        var archOption = new Option<string>("--arch") { Description = "Comma-separated CUBIN targets to smoke-compile", DefaultValueFactory = _ => "sm_90a" };
        var familyOption = new Option<string>("--family")
        {
            Description = "Comma-separated kernel families to smoke-compile",
            DefaultValueFactory = _ => $"{AllReduceKernel.FamilyName},{RmsNormKernel.FamilyName}",
        };
        var outOption = new Option<string?>("--out") { Description = "Folder to write preflight.json into" };
        var command = new Command("preflight", "Driver, devices, NVRTC and cuBLAS found (where, which version), smoke compiles and a device round trip");
        command.Options.Add(archOption);
        command.Options.Add(familyOption);
        command.Options.Add(outOption);
        command.SetAction(p => Run(Split(p.GetValue(archOption)!), Split(p.GetValue(familyOption)!), p.GetValue(outOption)));
        return command;
    }

    private static string[] Split(string list) => list.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);

    private static int Run(string[] archs, string[] families, string? outDir)
    {
        var unknown = families.Where(f => !KernelCatalog.Names.Contains(f)).ToArray();
        if (unknown.Length > 0)
        {
            Console.Error.WriteLine($"run-bench preflight: unknown family {string.Join(", ", unknown)} (families: {string.Join(", ", KernelCatalog.Names)})");
            return 2;
        }

        var problems = new List<string>();
        var smoke = new List<SmokeFinding>();

        var driver = NativeLibraries.TryDriver(out var driverHandle, out var driverError)
            ? new LibraryFinding(NativeLibraries.FileOf(driverHandle, "cuInit") ?? NativeLibraries.DriverPath, null, null)
            : new LibraryFinding(null, null, driverError);
        var deviceError = CudaRt.UnavailableReason;
        if (deviceError is not null)
        {
            problems.Add($"no CUDA device: {NativeLibraries.Headline(deviceError)}");
        }

        var nvrtc = NativeLibraries.TryNvrtc(out _, out var nvrtcError)
            ? new LibraryFinding(NativeLibraries.NvrtcFile ?? NativeLibraries.NvrtcPath, Try(() => $"{NvrtcCompiler.Version.Major}.{NvrtcCompiler.Version.Minor}"), null)
            : new LibraryFinding(null, null, nvrtcError);
        if (nvrtc.Error is not null)
        {
            problems.Add($"no NVRTC: {NativeLibraries.Headline(nvrtc.Error)}");
        }

        var cublasLt = NativeLibraries.TryCublasLt(out var ltHandle, out var ltError)
            ? new LibraryFinding(NativeLibraries.FileOf(ltHandle, "cublasLtGetVersion") ?? NativeLibraries.CublasLtPath, Try(() => VersionText((long)CublasLtApi.cublasLtGetVersion())), null)
            : new LibraryFinding(null, null, ltError);
        var cublas = NativeLibraries.TryCublas(out var blasHandle, out var blasError)
            ? new LibraryFinding(NativeLibraries.FileOf(blasHandle, "cublasCreate_v2") ?? NativeLibraries.CublasPath, cublasLt.Version, null)
            : new LibraryFinding(null, null, blasError);
        if (cublas.Error is not null)
        {
            problems.Add($"no cuBLAS (the baselines of run-bench and the cuBLAS tests need it): {NativeLibraries.Headline(cublas.Error)}");
        }

        var devices = deviceError is null ? Devices() : [];
        if (nvrtc.Error is null)
        {
            var compiler = new NvrtcCompiler();
            foreach (var arch in archs)
            {
                var catalog = Catalog(arch);
                foreach (var family in families.Where(catalog.ContainsKey)) // a family only some targets run is skipped on the others
                {
                    smoke.Add(Step($"compile {family} for {arch}", () =>
                    {
                        var image = compiler.Compile(family, catalog[family], new KernelTarget(arch));
                        return $"{image.Image.Length} bytes of CUBIN, {image.LoweredNames.Count} kernels";
                    }));
                }
            }

            if (devices.Count > 0)
            {
                smoke.Add(Step("load a module on device 0", () =>
                {
                    using var device = CudaDevice.Open();
                    var catalog = Catalog(device.Target.Arch);
                    var family = families.FirstOrDefault(catalog.ContainsKey) ?? RmsNormKernel.FamilyName;
                    var image = compiler.Compile(family, catalog[family], device.Target);
                    using var module = new CudaModule(device, image);
                    foreach (var name in image.LoweredNames.Keys)
                    {
                        _ = module.GetKernel(name);
                    }

                    return $"{family} for {device.Target}: {image.LoweredNames.Count} kernels loaded";
                }));
            }
        }

        if (devices.Count > 0)
        {
            smoke.Add(Step("memory round trip on device 0", () =>
            {
                using var device = CudaDevice.Open();
                using var stream = new CudaStream(device);
                const int words = 1 << 20;
                using var buffer = DeviceBuffer<uint>.Allocate(device, words);
                buffer.Fill32(Pattern, stream);
                var back = buffer.ToArray(stream);
                var wrong = back.Count(v => v != Pattern);
                return wrong == 0 ? $"{words * 4L >> 20} MiB filled and read back" : throw new InvalidOperationException($"{wrong} of {words} words read back wrong");
            }));
        }

        problems.AddRange(smoke.Where(s => !s.Ok).Select(s => $"{s.Step}: {NativeLibraries.Headline(s.Detail)}"));
        var report = new PreflightReport(
            DateTime.UtcNow.ToString("yyyy-MM-ddTHH:mm:ssZ", CultureInfo.InvariantCulture), BenchReport.Commit, Environment.MachineName,
            RuntimeInformation.FrameworkDescription, driver, Try(() => CudaRt.DriverVersion), deviceError, devices, nvrtc, cublas, cublasLt, smoke, problems);
        Print(report);
        if (outDir is not null)
        {
            Directory.CreateDirectory(outDir);
            var path = Path.Combine(outDir, "preflight.json");
            File.WriteAllText(path, JsonSerializer.Serialize(report, BenchJson.Default.PreflightReport));
            Console.WriteLine($"wrote {path}");
        }

        return report.Ok ? 0 : 1;
    }

    private static List<DeviceFinding> Devices()
    {
        var list = new List<DeviceFinding>();
        for (var i = 0; i < CudaRt.DeviceCount; i++)
        {
            using var d = CudaDevice.Open(i);
            list.Add(new DeviceFinding(i, d.Name, $"sm_{d.ComputeMajor}{d.ComputeMinor}", d.MultiprocessorCount, d.TotalMemory >> 20,
                Try(() => d.Target.Arch)));
        }

        return list;
    }

    /// <summary>The families <paramref name="arch"/> runs with their specializations (sm_80's, the smallest limits, for a target without a table entry).</summary>
    private static IReadOnlyDictionary<string, IReadOnlyList<KernelInstance>> Catalog(string arch) =>
        KernelCatalog.For(ArchLimits.IsKnown(arch) ? arch : "sm_80");

    private static SmokeFinding Step(string what, Func<string> step)
    {
        var clock = Stopwatch.StartNew();
        try
        {
            var detail = step();
            return new SmokeFinding(what, true, Math.Round(clock.Elapsed.TotalMilliseconds, 1), detail);
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            return new SmokeFinding(what, false, Math.Round(clock.Elapsed.TotalMilliseconds, 1), $"{e.GetType().Name}: {e.Message}");
        }
    }

    private static string? Try(Func<string?> read)
    {
        try
        {
            return read();
        }
        catch (Exception e) when (e is CudaException or CudaUnavailableException or DllNotFoundException or EntryPointNotFoundException)
        {
            return null;
        }
    }

    /// <summary>cublasLtGetVersion's major·10000 + minor·100 + patch as "major.minor.patch".</summary>
    internal static string VersionText(long version) => $"{version / 10000}.{version / 100 % 100}.{version % 100}";

    private static void Print(PreflightReport r)
    {
        static string Lib(LibraryFinding l) => l.Error is null ? $"{l.Path} ({l.Version ?? "version unknown"})" : $"not found: {NativeLibraries.Headline(l.Error)}";
        Console.WriteLine($"driver:   {Lib(r.Driver)}{(r.DriverCuda is null ? "" : $", CUDA {r.DriverCuda}")}");
        Console.WriteLine(r.Devices.Count == 0
            ? $"devices:  none ({NativeLibraries.Headline(r.DeviceError ?? "the driver reports no device")})"
            : $"devices:  {string.Join("; ", r.Devices.Select(d => $"{d.Ordinal}: {d.Name} {d.Arch}, {d.Multiprocessors} SMs, {d.MemoryMib} MiB, target {d.Target}"))}");
        Console.WriteLine($"nvrtc:    {Lib(r.Nvrtc)}");
        Console.WriteLine($"cublas:   {Lib(r.Cublas)}");
        Console.WriteLine($"cublasLt: {Lib(r.CublasLt)}");
        foreach (var s in r.Smoke)
        {
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"smoke:    {(s.Ok ? "ok  " : "FAIL")} {s.Step} ({s.Ms:F0} ms): {NativeLibraries.Headline(s.Detail)}"));
        }

        Console.WriteLine(r.Ok ? "preflight: ok" : $"preflight: {r.Problems.Count} problem(s)\n  " + string.Join("\n  ", r.Problems));
    }
}
