using System.Text.RegularExpressions;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Api;

/// <summary>
/// The engine's namespaces are layers, bottom to top (DESIGN.md's table, with the scheduler's namespace,
/// <c>Serving</c>, above the model it runs): a source file uses its own layer and the ones below it, never one
/// above, so there are no cycles. Read from the sources: <c>using</c> directives and fully qualified names.
/// </summary>
[TestClass]
public sealed partial class LayeringTests
{
    private static readonly string[] Layers =
        ["Loader", "Cuda", "Kernels", "Loading", "Backends", "Text", "Inference", "Model", "Serving", "Distributed", "Hosting"];

    [GeneratedRegex(@"^namespace DeepSeekCuda\.(\w+)", RegexOptions.Multiline)]
    private static partial Regex NamespaceLine();

    [GeneratedRegex(@"^using (?:static )?DeepSeekCuda\.(\w+)", RegexOptions.Multiline)]
    private static partial Regex UsingLine();

    [GeneratedRegex(@"(?<![\w.])DeepSeekCuda\.(\w+)\.[A-Z]")]
    private static partial Regex QualifiedName();

    /// <summary>Each engine source file: its path, its layer and the layers it names.</summary>
    private static List<(string File, string Layer, HashSet<string> Uses)> Sources()
    {
        var root = Path.Combine(SharedData.Checkout, "Engine");
        var files = new List<(string, string, HashSet<string>)>();
        foreach (var path in Directory.EnumerateFiles(root, "*.cs", SearchOption.AllDirectories))
        {
            var relative = Path.GetRelativePath(SharedData.Checkout, path);
            if (relative.Split(Path.DirectorySeparatorChar).Any(p => p is "bin" or "obj"))
            {
                continue;
            }

            var text = File.ReadAllText(path);
            var ns = NamespaceLine().Match(text);
            Assert.IsTrue(ns.Success, $"{relative} declares no DeepSeekCuda namespace");
            var uses = UsingLine().Matches(text).Concat(QualifiedName().Matches(text)).Select(m => m.Groups[1].Value).ToHashSet();
            files.Add((relative, ns.Groups[1].Value, uses));
        }

        return files;
    }

    [TestMethod]
    public void EngineFilesUseOnlyTheirLayerAndTheOnesBelow()
    {
        var sources = Sources();
        Assert.IsGreaterThan(100, sources.Count, "the engine's sources were found");
        var unknown = sources.Where(s => !Layers.Contains(s.Layer)).Select(s => $"{s.File}: namespace DeepSeekCuda.{s.Layer} is no layer").ToList();
        CollectionAssert.AreEqual(Array.Empty<string>(), unknown, "every namespace is placed in the order");

        var upward = new List<string>();
        foreach (var (file, layer, uses) in sources)
        {
            var level = Array.IndexOf(Layers, layer);
            upward.AddRange(uses.Where(u => Array.IndexOf(Layers, u) > level).Select(u => $"{file} ({layer}) uses DeepSeekCuda.{u}"));
        }

        Assert.AreEqual("", string.Join("\n", upward.Order(StringComparer.Ordinal)), "files that reach a layer above their own");
    }

    [TestMethod]
    public void TheScanSeesDependencies()
    {
        // The scan itself: known downward uses are found, so an empty list of violations means something.
        var sources = Sources();
        bool Uses(string file, string layer) => sources.Single(s => s.File.Replace('\\', '/') == file).Uses.Contains(layer);
        Assert.IsTrue(Uses("Engine/Serving/BatchScheduler.cs", "Inference"));
        Assert.IsTrue(Uses("Engine/Model/DeepSeekModel.cs", "Backends"));
        Assert.IsTrue(Uses("Engine/Backends/Cuda/CudaBackend.cs", "Kernels"));
        Assert.IsFalse(Uses("Engine/Text/ChatTemplate.cs", "Hosting"));
    }
}
