using System.Diagnostics;
using DeepSeekCuda.Cuda.Native;

namespace DeepSeekCuda.Cuda.Inspection;

/// <summary>
/// The CUDA toolkit's binary utilities the resource report reads CUBIN images with (<c>cuobjdump</c>).
/// Looked for in <c>$DSCUDA_CUDA_BIN</c>, the <c>PATH</c>, <c>$CUDA_HOME/bin</c>, <c>$CUDA_PATH/bin</c>,
/// <c>/usr/local/cuda/bin</c>, and the folder <c>tools/cuda/toolchain.sh</c> fills.
/// </summary>
internal sealed class CudaBinaryTools
{
    private CudaBinaryTools(string cuobjdump) => Cuobjdump = cuobjdump;

    /// <summary>Full path of <c>cuobjdump</c>.</summary>
    public string Cuobjdump { get; }

    /// <summary>Finds the tools, or throws <see cref="FileNotFoundException"/> naming every place looked.</summary>
    public static CudaBinaryTools Find()
    {
        var tried = new List<string>();
        foreach (var dir in SearchDirectories())
        {
            var path = Path.Combine(dir, "cuobjdump");
            tried.Add(path);
            if (File.Exists(path))
            {
                return new CudaBinaryTools(path);
            }
        }

        throw new FileNotFoundException(
            $"cuobjdump not found (looked for {string.Join(", ", tried.Distinct())}). Run tools/cuda/toolchain.sh " +
            $"(fetches it into {Path.Combine(NativeLibraries.ToolchainDirectory, "bin")}) or set DSCUDA_CUDA_BIN to a CUDA toolkit's bin folder.");
    }

    private static IEnumerable<string> SearchDirectories()
    {
        if (Environment.GetEnvironmentVariable("DSCUDA_CUDA_BIN") is { Length: > 0 } explicitBin)
        {
            yield return explicitBin;
        }

        foreach (var dir in (Environment.GetEnvironmentVariable("PATH") ?? "").Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries))
        {
            yield return dir;
        }

        foreach (var env in new[] { "CUDA_HOME", "CUDA_PATH" })
        {
            if (Environment.GetEnvironmentVariable(env) is { Length: > 0 } root)
            {
                yield return Path.Combine(root, "bin");
            }
        }

        yield return "/usr/local/cuda/bin";
        yield return Path.Combine(NativeLibraries.ToolchainDirectory, "bin");
    }

    /// <summary>Runs cuobjdump with <paramref name="option"/> (e.g. <c>-sass</c>) over a CUBIN file and returns its output.</summary>
    public string Dump(string option, string cubinPath) => Run(option, cubinPath);

    /// <summary>The tool's version line (<c>Cuda compilation tools, release ...</c> of <c>cuobjdump --version</c>).</summary>
    public string Version()
    {
        var text = Run("--version");
        return text.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
            .LastOrDefault(l => l.StartsWith("Cuda compilation tools", StringComparison.Ordinal)) ?? text.Trim();
    }

    private string Run(params string[] arguments)
    {
        var psi = new ProcessStartInfo(Cuobjdump) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in arguments)
        {
            psi.ArgumentList.Add(a);
        }

        using var process = Process.Start(psi) ?? throw new InvalidOperationException($"could not start {Cuobjdump}");
        var stderr = process.StandardError.ReadToEndAsync();
        var stdout = process.StandardOutput.ReadToEnd();
        process.WaitForExit();
        if (process.ExitCode != 0)
        {
            throw new InvalidOperationException($"{Cuobjdump} {string.Join(' ', arguments)} failed with exit code {process.ExitCode}: {stderr.Result.Trim()}");
        }

        return stdout;
    }
}
