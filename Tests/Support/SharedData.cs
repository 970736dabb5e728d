namespace DeepSeekCuda.Tests.Support;

/// <summary>
/// Locates the shared test data (<c>../shared</c> beside the checkout, or <c>$DSCUDA_SHARED</c> where a
/// bundle carries its own copy). A missing folder fails the test: fixture tests never pass vacuously.
/// </summary>
internal static class SharedData
{
    private static readonly Lazy<string> Root = new(Find);
    private static readonly Lazy<string> CheckoutRoot = new(FindCheckout);

    public static string Dir => Root.Value;

    public static string Fixture(string name) => Path.Combine(Dir, "fixtures", name);

    public static string TinyA => Fixture("tiny-a");

    public static string TinyAModel => Path.Combine(TinyA, "model");

    public static string Tokenizer => Path.Combine(Dir, "tokenizers", "deepseek-v3");

    /// <summary>The checkout the test binaries were built in (the folder holding DeepSeekCuda.sln).</summary>
    public static string Checkout => CheckoutRoot.Value;

    private static string Find()
    {
        var env = Environment.GetEnvironmentVariable("DSCUDA_SHARED");
        if (!string.IsNullOrEmpty(env))
        {
            return Directory.Exists(env) ? env : throw new DirectoryNotFoundException($"DSCUDA_SHARED='{env}' does not exist");
        }

        var shared = Path.GetFullPath(Path.Combine(FindCheckout(), "..", "shared"));
        return Directory.Exists(shared) ? shared : throw new DirectoryNotFoundException($"shared test data not found at {shared} (set DSCUDA_SHARED)");
    }

    private static string FindCheckout()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            if (File.Exists(Path.Combine(dir.FullName, "DeepSeekCuda.sln")))
            {
                return dir.FullName;
            }
        }

        throw new DirectoryNotFoundException("DeepSeekCuda.sln not found above the test binaries; set DSCUDA_SHARED");
    }
}
