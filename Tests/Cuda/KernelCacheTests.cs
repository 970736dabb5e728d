using System.Security.Cryptography;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Cuda.Native;

namespace DeepSeekCuda.Tests.Cuda;

[TestClass]
[TestCategory("Nvrtc")]
public sealed class KernelCacheTests
{
    private static readonly KernelTarget Ptx = new("compute_80");
    private string _dir = "";

    [TestInitialize]
    public void Init()
    {
        NvrtcSupport.RequireNvrtc();
        _dir = NvrtcSupport.TempCacheDir();
    }

    [TestCleanup]
    public void Cleanup()
    {
        if (Directory.Exists(_dir))
        {
            Directory.Delete(_dir, recursive: true);
        }
    }

    private static IReadOnlyList<KernelInstance> Rope => NvrtcSupport.Instances("rope");

    [TestMethod]
    public void SecondCompileIsAHitWithoutNvrtc()
    {
        var cache = new KernelCache(_dir);
        var compiler = new NvrtcCompiler(cache: cache);
        var first = compiler.Compile("rope", Rope, Ptx);
        var second = compiler.Compile("rope", Rope, Ptx);
        Assert.AreEqual(1, compiler.NvrtcInvocations);
        Assert.IsFalse(first.FromCache);
        Assert.IsTrue(second.FromCache);
        Assert.AreEqual(1, cache.Hits);
        CollectionAssert.AreEqual(first.Image, second.Image);
        CollectionAssert.AreEquivalent(first.LoweredNames.ToArray(), second.LoweredNames.ToArray());

        // A new process (new compiler and cache objects) finds it on disk too.
        var fresh = new NvrtcCompiler(cache: new KernelCache(_dir));
        Assert.IsTrue(fresh.Compile("rope", Rope, Ptx).FromCache);
        Assert.AreEqual(0, fresh.NvrtcInvocations);

        var entry = Directory.GetDirectories(_dir).Single();
        Assert.IsTrue(File.Exists(Path.Combine(entry, "nvrtc.log")), "the NVRTC log is kept beside the image");
        Assert.IsTrue(File.Exists(Path.Combine(entry, "image.ptx")));
    }

    [TestMethod]
    public void KeyChangesWithHeadersOptionsArchSourceAndFamilyContents()
    {
        var compiler = new NvrtcCompiler();
        var source = NvrtcCompiler.GenerateSource("rope", Rope);
        string[] names = [.. Rope.Select(i => i.NameExpression)];
        string[] options = ["-std=c++17", "-default-device"];
        const string Nvrtc = "12.4 libnvrtc.so.12.4.127 sha256:00";
        var key = compiler.CacheKey("rope", source, names, options, Ptx, Nvrtc);

        Assert.AreNotEqual(key, compiler.CacheKey("rope", source, names, options.Reverse(), Ptx, Nvrtc),
            "options keep their order: NVRTC lets a later option override an earlier one");
        Assert.AreNotEqual(key, compiler.CacheKey("rope", source, names, [.. options, "-lineinfo"], Ptx, Nvrtc));
        Assert.AreNotEqual(key, compiler.CacheKey("rope", source, names, options, new KernelTarget("compute_90"), Nvrtc));
        Assert.AreNotEqual(key, compiler.CacheKey("rope", source + "\n", names, options, Ptx, Nvrtc));
        Assert.AreNotEqual(key, compiler.CacheKey("rope", source, names[..1], options, Ptx, Nvrtc), "the names looked up in the image");
        Assert.AreNotEqual(key, compiler.CacheKey("rope", source, names, options, Ptx, "12.4 libnvrtc.so.12.4.99 sha256:00"), "NVRTC's patch level");
        Assert.AreNotEqual(key, compiler.CacheKey("rope", source, names, options, Ptx, "12.4 libnvrtc.so.12 sha256:01"), "NVRTC's bytes");

        var headerChanged = new NvrtcCompiler(KernelSources.Embedded.With("common.cuh", KernelSources.Embedded.Files["common.cuh"] + "\n// changed\n"));
        Assert.AreNotEqual(key, headerChanged.CacheKey("rope", source, names, options, Ptx, Nvrtc));
        var familyChanged = new NvrtcCompiler(KernelSources.Embedded.With("rope.cu", KernelSources.Embedded.Files["rope.cu"] + "\n// changed\n"));
        Assert.AreNotEqual(key, familyChanged.CacheKey("rope", source, names, options, Ptx, Nvrtc));
        var otherFamilyChanged = new NvrtcCompiler(KernelSources.Embedded.With("rmsnorm.cu", KernelSources.Embedded.Files["rmsnorm.cu"] + "\n// changed\n"));
        Assert.AreEqual(key, otherFamilyChanged.CacheKey("rope", source, names, options, Ptx, Nvrtc), "another family's source does not invalidate this one");
    }

    [TestMethod]
    public void NvrtcIdentityIsTheLoadedLibrarysRealFileAndItsHash()
    {
        var loaded = NativeLibraries.NvrtcPath!;
        var link = File.ResolveLinkTarget(loaded, returnFinalTarget: true);
        var real = link?.FullName ?? Path.GetFullPath(loaded);
        Assert.AreEqual(real, NativeLibraries.NvrtcFile);
        var (major, minor) = NvrtcCompiler.Version;
        if (link is not null)
        {
            // A toolkit's (and tools/cuda/toolchain.sh's) libnvrtc.so.12 links to libnvrtc.so.12.4.127: the key names the patch level.
            StringAssert.StartsWith(Path.GetFileName(real), $"libnvrtc.so.{major}.{minor}.", "the real file carries the patch level");
        }

        using var file = File.OpenRead(real);
        Assert.AreEqual($"{major}.{minor} {Path.GetFileName(real)} sha256:{Convert.ToHexStringLower(SHA256.HashData(file))}", NvrtcCompiler.LibraryIdentity);
    }

    [TestMethod]
    public void ChangedHeaderCompilesAgain()
    {
        var cache = new KernelCache(_dir);
        new NvrtcCompiler(cache: cache).Compile("rope", Rope, Ptx);
        var changed = new NvrtcCompiler(KernelSources.Embedded.With("common.cuh", KernelSources.Embedded.Files["common.cuh"] + "\n// changed\n"), cache);
        Assert.IsFalse(changed.Compile("rope", Rope, Ptx).FromCache);
        Assert.AreEqual(1, changed.NvrtcInvocations);
        Assert.HasCount(2, Directory.GetDirectories(_dir));
    }

    [TestMethod]
    public void CorruptOrTruncatedEntryIsRebuilt()
    {
        var cache = new KernelCache(_dir);
        var original = new NvrtcCompiler(cache: cache).Compile("rope", Rope, Ptx);
        var image = Path.Combine(Directory.GetDirectories(_dir).Single(), "image.ptx");

        File.WriteAllBytes(image, original.Image[..(original.Image.Length / 2)]);
        var compiler = new NvrtcCompiler(cache: cache);
        var rebuilt = compiler.Compile("rope", Rope, Ptx);
        Assert.IsFalse(rebuilt.FromCache);
        Assert.AreEqual(1, compiler.NvrtcInvocations);
        Assert.AreEqual(1, cache.Rebuilt);
        CollectionAssert.AreEqual(original.Image, rebuilt.Image);

        File.Delete(Path.Combine(Directory.GetDirectories(_dir).Single(), "manifest.txt"));
        Assert.IsFalse(compiler.Compile("rope", Rope, Ptx).FromCache);
        Assert.AreEqual(2, cache.Rebuilt);
        Assert.IsTrue(compiler.Compile("rope", Rope, Ptx).FromCache);
    }

    [TestMethod]
    public void ConcurrentCompilesOfOneKeyAreSafe()
    {
        // Several "processes" (own cache objects) and several threads of one process race on one key.
        var shared = new KernelCache(_dir);
        var results = new CompiledKernel[8];
        Parallel.For(0, results.Length, new ParallelOptions { MaxDegreeOfParallelism = 8 }, i =>
        {
            var cache = i % 2 == 0 ? shared : new KernelCache(_dir);
            results[i] = new NvrtcCompiler(cache: cache).Compile("rope", Rope, Ptx);
        });

        foreach (var r in results)
        {
            CollectionAssert.AreEqual(results[0].Image, r.Image);
        }

        Assert.HasCount(1, Directory.GetDirectories(_dir), "one entry, no temporary folders left behind");
        Assert.AreEqual(1, shared.Misses, "threads sharing a cache object compile once");
        Assert.IsTrue(new NvrtcCompiler(cache: new KernelCache(_dir)).Compile("rope", Rope, Ptx).FromCache);
    }
}
