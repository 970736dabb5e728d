using System.Reflection;
using DeepSeekCuda.Hosting;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Api;

/// <summary>
/// The libraries' public surface is what a user needs (hosting, loading, inference, text, the checkpoint reader);
/// native bindings, kernel launchers, their params structs and the cuBLAS wrappers are internal (the tests,
/// <c>dscuda</c> and <c>run-bench</c> see them through <c>InternalsVisibleTo</c>). The exported types are pinned in
/// <c>Tests/Api/PublicApi.txt</c>, so that a change to the surface is a deliberate edit of that file.
/// </summary>
[TestClass]
public sealed class PublicApiTests
{
    private static readonly Assembly[] Libraries = [typeof(Checkpoint).Assembly, typeof(LocalModel).Assembly];

    private static string ListPath => Path.Combine(SharedData.Checkout, "Tests", "Api", "PublicApi.txt");

    [TestMethod]
    public void ExportedTypesAreTheCheckedInList()
    {
        var actual = Libraries.SelectMany(a => a.GetExportedTypes().Select(t => Line(a, t))).Order(StringComparer.Ordinal).ToArray();
        var expected = File.ReadAllLines(ListPath).Where(l => l.Length > 0 && !l.StartsWith('#')).ToArray();

        var added = actual.Except(expected, StringComparer.Ordinal).ToArray();
        var removed = expected.Except(actual, StringComparer.Ordinal).ToArray();
        if (added.Length > 0 || removed.Length > 0)
        {
            Assert.Fail(
                $"The public surface differs from {ListPath} ({actual.Length} exported types, {expected.Length} listed).\n" +
                string.Concat(added.Select(l => $"+ {l}\n")) + string.Concat(removed.Select(l => $"- {l}\n")) +
                "If the change is deliberate, make the list (header lines starting with # are kept as they are):\n" + string.Join('\n', actual));
        }

        CollectionAssert.AreEqual(expected, expected.Order(StringComparer.Ordinal).ToArray(), "the list is kept sorted (ordinal)");
    }

    [TestMethod]
    public void NoBindingLauncherParamsStructOrCublasWrapperIsPublic()
    {
        // Independent of the list: namespaces and kinds that must never be exported, whatever the file says.
        string[] internalNamespaces =
        [
            "DeepSeekCuda.Cuda.Native", "DeepSeekCuda.Cuda.Blas", "DeepSeekCuda.Cuda.Inspection", "DeepSeekCuda.Kernels",
            "DeepSeekCuda.Loading", "DeepSeekCuda.Loader.Numerics", "DeepSeekCuda.Loader.Synthetic",
        ];
        var exported = Libraries.SelectMany(a => a.GetExportedTypes()).ToArray();
        var leaked = exported.Where(t => internalNamespaces.Contains(t.Namespace)
                                         || t.Name.EndsWith("Params", StringComparison.Ordinal)
                                         || t.Name.EndsWith("Kernel", StringComparison.Ordinal)
                                         || t.Name.StartsWith("Cublas", StringComparison.Ordinal)
                                         || t.Name.StartsWith("Nvrtc", StringComparison.Ordinal))
            .Select(t => t.FullName).ToArray();
        Assert.IsEmpty(leaked, "exported: " + string.Join(", ", leaked));

        // The exceptions of the CUDA layer stay catchable; every other type of that namespace is internal.
        CollectionAssert.AreEquivalent(
            new[] { "CudaException", "CudaUnavailableException", "KernelCompileException" },
            exported.Where(t => t.Namespace == "DeepSeekCuda.Cuda").Select(t => t.Name).ToArray());

        // One SamplingOptions, the one TextGenerator and the chat client take.
        var sampling = Libraries.SelectMany(a => a.GetTypes()).Where(t => t.Name == "SamplingOptions").ToArray();
        Assert.HasCount(1, sampling, string.Join(", ", sampling.Select(t => t.FullName)));
        Assert.AreEqual(typeof(DeepSeekCuda.Inference.SamplingOptions), sampling[0]);
    }

    [TestMethod]
    public void ListFileFormatMatchesWhatTheTestWrites()
    {
        // The line format is the contract of the file; pin it on two known types so an edit of Line() is caught here.
        Assert.AreEqual("DeepSeekCuda.Engine: class DeepSeekCuda.Hosting.LocalModel", Line(typeof(LocalModel).Assembly, typeof(LocalModel)));
        Assert.AreEqual("DeepSeekCuda.Loader: enum DeepSeekCuda.Loader.DType", Line(typeof(DType).Assembly, typeof(DType)));
    }

    private static string Line(Assembly assembly, Type t)
    {
        var kind = t.IsEnum ? "enum"
            : t.IsInterface ? "interface"
            : t.IsValueType ? "struct"
            : typeof(Delegate).IsAssignableFrom(t) ? "delegate"
            : t.IsAbstract && t.IsSealed ? "static class"
            : t.IsAbstract ? "abstract class"
            : "class";
        return $"{assembly.GetName().Name}: {kind} {t.FullName}";
    }
}
