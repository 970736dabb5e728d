using System.Collections.Immutable;

namespace DeepSeekCuda.Cuda;

/// <summary>
/// The kernel sources NVRTC sees: every <c>Kernels/*.cu</c> family and <c>*.cuh</c> header, by file name.
/// They travel as embedded resources of the engine and are handed to NVRTC as in-memory headers, so no
/// CUDA toolkit headers or files on disk are involved.
/// </summary>
internal sealed class KernelSources
{
    private const string Prefix = "Kernels/";

    private static readonly Lazy<KernelSources> EmbeddedSources = new(LoadEmbedded);

    /// <summary>Creates a source set from file name → contents (tests use this to compile variants).</summary>
    public KernelSources(IReadOnlyDictionary<string, string> files)
    {
        Files = files.ToImmutableSortedDictionary(StringComparer.Ordinal);
    }

    /// <summary>The sources shipped in this assembly.</summary>
    public static KernelSources Embedded => EmbeddedSources.Value;

    /// <summary>File name → contents, sorted by name.</summary>
    public ImmutableSortedDictionary<string, string> Files { get; }

    /// <summary>The family names (the .cu files without extension).</summary>
    public IEnumerable<string> Families => Files.Keys.Where(k => k.EndsWith(".cu", StringComparison.Ordinal)).Select(k => k[..^3]);

    /// <summary>A copy with one file replaced or added.</summary>
    public KernelSources With(string name, string contents) => new(Files.SetItem(name, contents));

    /// <summary>The source of family <paramref name="family"/>.</summary>
    public string Family(string family) =>
        Files.TryGetValue(family + ".cu", out var s) ? s : throw new KeyNotFoundException($"no kernel family '{family}' (Kernels/{family}.cu)");

    /// <summary>The shared headers (*.cuh).</summary>
    public IEnumerable<KeyValuePair<string, string>> Headers => Files.Where(f => f.Key.EndsWith(".cuh", StringComparison.Ordinal));

    private static KernelSources LoadEmbedded()
    {
        var assembly = typeof(KernelSources).Assembly;
        var files = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var name in assembly.GetManifestResourceNames().Where(n => n.StartsWith(Prefix, StringComparison.Ordinal)))
        {
            using var stream = assembly.GetManifestResourceStream(name)!;
            using var reader = new StreamReader(stream);
            files[name[Prefix.Length..]] = reader.ReadToEnd();
        }

        if (files.Count == 0)
        {
            throw new InvalidOperationException("no kernel sources are embedded in the engine assembly (Kernels/*.cu)");
        }

        return new KernelSources(files);
    }
}
