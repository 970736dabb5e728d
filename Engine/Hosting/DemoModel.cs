using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Synthetic;

namespace DeepSeekCuda.Hosting;

/// <summary>
/// The embedded default model: a small DeepSeek-V3-architecture checkpoint with deterministic random
/// weights and a byte-level BPE tokenizer, written on first use into a cache folder. It lets the tools
/// and a new user run the whole path (checkpoint, tokenizer, template, generation) with no download
/// and no GPU. Its text is meaningless: the weights are random.
/// </summary>
public static class DemoModel
{
    /// <summary>Bump when the demo's contents change, so old caches are not reused.</summary>
    private const string Version = "demo-v2";

    // Chosen so that the first token after R1's generation prompt is unlikely to be EOS (p < 0.001):
    // random weights give EOS a high logit for some seeds, and a demo that stops at once shows nothing.
    private const int Seed = 1;

    /// <summary>The demo's config: the tiny preset with a vocabulary sized for the demo tokenizer.</summary>
    public static ModelConfig Config => (ModelPresets.Tiny with { VocabSize = 512, BosTokenId = 0, EosTokenId = 1 }).Validate();

    /// <summary>
    /// The cache root: <c>$DSCUDA_CACHE</c>, else <c>$XDG_CACHE_HOME/deepseekcuda</c>, else
    /// <c>~/.cache/deepseekcuda</c>.
    /// </summary>
    public static string CacheRoot
    {
        get
        {
            var explicitRoot = Environment.GetEnvironmentVariable("DSCUDA_CACHE");
            if (!string.IsNullOrEmpty(explicitRoot))
            {
                return explicitRoot;
            }

            var xdg = Environment.GetEnvironmentVariable("XDG_CACHE_HOME");
            var baseDir = !string.IsNullOrEmpty(xdg)
                ? xdg
                : Path.Combine(Environment.GetFolderPath(Environment.SpecialFolder.UserProfile), ".cache");
            return Path.Combine(baseDir, "deepseekcuda");
        }
    }

    /// <summary>Writes the demo checkpoint (weights and tokenizer) into a new folder <paramref name="directory"/>.</summary>
    public static void WriteTo(string directory)
    {
        var config = Config;
        SyntheticCheckpoint.Write(directory, config, Seed);
        var tokens = DemoTokenizer.Write(directory, config.VocabSize);
        if (tokens > config.VocabSize)
        {
            throw new InvalidOperationException($"demo tokenizer has {tokens} tokens, the model {config.VocabSize}");
        }
    }

    /// <summary>Returns the demo checkpoint folder, creating it first if needed.</summary>
    /// <param name="created">Whether this call wrote it.</param>
    public static string Ensure(out bool created)
    {
        var dir = Path.Combine(CacheRoot, Version);
        created = false;
        if (File.Exists(Path.Combine(dir, Checkpoint.ConfigFileName)))
        {
            return dir;
        }

        Directory.CreateDirectory(CacheRoot);
        // Write beside the final folder and rename into place, so an interrupted run never leaves a
        // half-written demo that later runs would trust.
        var staging = Path.Combine(CacheRoot, $"{Version}.tmp-{Environment.ProcessId}-{Guid.NewGuid():N}");
        try
        {
            WriteTo(staging);
            try
            {
                Directory.Move(staging, dir);
                created = true;
            }
            catch (IOException) when (Directory.Exists(dir))
            {
                // Another process finished first; its copy is identical.
            }
        }
        finally
        {
            if (Directory.Exists(staging))
            {
                Directory.Delete(staging, recursive: true);
            }
        }

        return dir;
    }
}
