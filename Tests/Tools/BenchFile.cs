using System.CommandLine;
using System.Text.Json;

namespace DeepSeekCuda.Tests.Tools;

/// <summary>A <c>run-bench</c> command run in-process, and the harness file it wrote.</summary>
internal static class BenchFile
{
    /// <summary>
    /// Runs <paramref name="command"/> with <paramref name="args"/> (which send its output to <paramref name="outDir"/>),
    /// asserts exit code 0, and returns <paramref name="fileName"/> there, checked to have exactly the harness's
    /// top-level fields and no error.
    /// </summary>
    public static JsonDocument Run(Command command, string[] args, string outDir, string fileName)
    {
        var code = new RootCommand { command }.Parse(args).Invoke();
        Assert.AreEqual(0, code);
        var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(outDir, fileName)));
        var file = doc.RootElement;
        CollectionAssert.AreEquivalent(new[] { "device", "driver", "cuda", "commit", "date", "copy_gbs", "results", "error" },
            file.EnumerateObject().Select(p => p.Name).ToArray());
        Assert.AreEqual(JsonValueKind.Null, file.GetProperty("error").ValueKind);
        return doc;
    }
}
