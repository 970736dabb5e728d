using System.Runtime.InteropServices;
using System.Runtime.Versioning;
using System.Security.Cryptography;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Cuda.Native;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Tests.Support;
using Microsoft.Extensions.Logging;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>
/// The kernel cache: hits through NVRTC (category Nvrtc), and, with fake images and no NVRTC, what a hostile or
/// broken cache folder does: never a wrong image, never a hang, never an exception, no temporary folder left.
/// </summary>
[TestClass]
public sealed partial class KernelCacheTests
{
    private static readonly KernelTarget Ptx = new("compute_80");
    private const string Key = "5ca1ab1e";
    private string _dir = "";
    private readonly ListLogger _log = new();

    [TestInitialize]
    public void Init() => _dir = NvrtcSupport.TempCacheDir();

    [TestCleanup]
    public void Cleanup()
    {
        if (Directory.Exists(_dir))
        {
            Directory.Delete(_dir, recursive: true);
        }
    }

    /// <summary>A stand-in image (bytes that depend on <paramref name="seed"/>), its names and log.</summary>
    private static CompiledKernel Fake(int seed = 1) => new("rope", Ptx.Arch, IsPtx: true,
        [.. Enumerable.Range(0, 4099).Select(i => (byte)(i * 31 + seed))],
        new Dictionary<string, string> { ["rope_kernel<1>"] = $"_Z11rope_kernelILi{seed}EEv" }, "warning: a stand-in", FromCache: false);

    /// <summary>One lookup of <see cref="Key"/>; a miss compiles <see cref="Fake"/>.</summary>
    private static (CompiledKernel Kernel, int Compiles) Lookup(KernelCache cache, Func<CompiledKernel>? compile = null)
    {
        var compiles = 0;
        var kernel = cache.GetOrAdd("rope", Key, Ptx, () =>
        {
            Interlocked.Increment(ref compiles);
            return (compile ?? (() => Fake()))();
        });
        return (kernel, compiles);
    }

    /// <summary>A cache in <see cref="_dir"/> holding a valid entry for <see cref="Key"/>; returns the entry's folder.</summary>
    private string Populated(out KernelCache cache)
    {
        cache = new KernelCache(_dir, _log);
        Assert.AreEqual(1, Lookup(cache).Compiles);
        return cache.EntryPath("rope", Key);
    }

    /// <summary>The lookup compiled (once), returned the right image, and the next lookup is a hit with the same bytes.</summary>
    private void AssertRebuiltThenHit(KernelCache cache, (CompiledKernel Kernel, int Compiles) miss)
    {
        Assert.AreEqual(1, miss.Compiles, "a broken entry is compiled again");
        Assert.IsFalse(miss.Kernel.FromCache);
        CollectionAssert.AreEqual(Fake().Image, miss.Kernel.Image);
        var hit = Lookup(cache);
        Assert.AreEqual(0, hit.Compiles, "the rebuilt entry replaced the broken one");
        Assert.IsTrue(hit.Kernel.FromCache);
        CollectionAssert.AreEqual(Fake().Image, hit.Kernel.Image);
        CollectionAssert.AreEquivalent(Fake().LoweredNames.ToArray(), hit.Kernel.LoweredNames.ToArray());
        Assert.AreEqual(Fake().Log, hit.Kernel.Log);
        Assert.AreEqual(0, cache.StoreFailures);
        AssertNoLeftovers();
    }

    /// <summary>Nothing but entries in the cache folder: no temporary or moved-aside folder.</summary>
    private void AssertNoLeftovers()
    {
        var hidden = Directory.Exists(_dir) ? Directory.GetFileSystemEntries(_dir).Where(e => Path.GetFileName(e).StartsWith('.')).ToArray() : [];
        Assert.IsEmpty(hidden, "left in the cache folder: " + string.Join(", ", hidden));
    }

    /// <summary>Runs <paramref name="lookup"/> under a deadline, so a blocking open fails the test instead of hanging the run.</summary>
    private static T WithinSeconds<T>(int seconds, Func<T> lookup)
    {
        var task = Task.Factory.StartNew(lookup, TaskCreationOptions.LongRunning);
        Assert.IsTrue(task.Wait(TimeSpan.FromSeconds(seconds)), $"the lookup did not finish within {seconds} s (blocked opening a FIFO?)");
        return task.Result;
    }

    private static IReadOnlyList<KernelInstance> Rope => NvrtcSupport.Instances("rope");

    [TestMethod]
    [TestCategory("Nvrtc")]
    public void SecondCompileIsAHitWithoutNvrtc()
    {
        NvrtcSupport.RequireNvrtc();
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
    [TestCategory("Nvrtc")]
    public void NvrtcIdentityIsTheLoadedLibrarysRealFileAndItsHash()
    {
        NvrtcSupport.RequireNvrtc();
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
        var identity = $"{major}.{minor} {Path.GetFileName(real)} sha256:{Convert.ToHexStringLower(SHA256.HashData(file))}";
        Assert.AreEqual(identity, NvrtcCompiler.LibraryIdentity);

        var compiler = new NvrtcCompiler();
        var source = NvrtcCompiler.GenerateSource("rope", Rope);
        string[] names = [.. Rope.Select(i => i.NameExpression)];
        string[] options = ["-std=c++17", "--gpu-architecture=compute_80"];
        Assert.AreEqual(compiler.CacheKey("rope", source, names, options, Ptx, identity), compiler.CacheKey("rope", source, options, Ptx, names),
            "the key holds the loaded NVRTC's identity");
    }

    [TestMethod]
    [TestCategory("Nvrtc")]
    public void ChangedHeaderCompilesAgain()
    {
        NvrtcSupport.RequireNvrtc();
        var cache = new KernelCache(_dir);
        new NvrtcCompiler(cache: cache).Compile("rope", Rope, Ptx);
        var changed = new NvrtcCompiler(KernelSources.Embedded.With("common.cuh", KernelSources.Embedded.Files["common.cuh"] + "\n// changed\n"), cache);
        Assert.IsFalse(changed.Compile("rope", Rope, Ptx).FromCache);
        Assert.AreEqual(1, changed.NvrtcInvocations);
        Assert.HasCount(2, Directory.GetDirectories(_dir));
    }

    [TestMethod]
    [TestCategory("Nvrtc")]
    public void CorruptOrTruncatedEntryIsRebuilt()
    {
        NvrtcSupport.RequireNvrtc();
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
    [TestCategory("Nvrtc")]
    public void ConcurrentCompilesOfOneKeyAreSafe()
    {
        NvrtcSupport.RequireNvrtc();
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

    [TestMethod]
    [TestCategory("Nvrtc")]
    public void UnwritableCacheStillCompiles()
    {
        NvrtcSupport.RequireNvrtc();
        var blocker = Path.Combine(_dir, "a-file");
        File.WriteAllText(blocker, "");
        var cache = new KernelCache(Path.Combine(blocker, "kernels"), _log);
        var compiler = new NvrtcCompiler(cache: cache);
        Assert.IsFalse(compiler.Compile("rope", Rope, Ptx).FromCache);
        Assert.IsNotEmpty(compiler.Compile("rope", Rope, Ptx).Image);
        Assert.AreEqual(2, compiler.NvrtcInvocations, "uncached: each compile runs NVRTC");
        Assert.AreEqual(2, cache.StoreFailures);
    }

    [TestMethod]
    public void FileWhereTheEntryFolderGoesIsReplaced()
    {
        var cache = new KernelCache(_dir, _log);
        File.WriteAllText(cache.EntryPath("rope", Key), "not a folder");
        AssertRebuiltThenHit(cache, Lookup(cache));
        Assert.AreEqual(1, cache.Rebuilt);
        Assert.IsTrue(Directory.Exists(cache.EntryPath("rope", Key)));
        Assert.IsTrue(_log.Entries.Any(e => e.Level == LogLevel.Warning && e.Message.Contains("not a folder")), "the broken entry is logged");
    }

    [TestMethod]
    public void LinksAreNeverFollowed()
    {
        // A valid entry outside the cache, reached through a link where the entry goes: not served, and left alone.
        var outside = new KernelCache(Path.Combine(_dir, "outside"));
        Lookup(outside);
        var outsideEntry = outside.EntryPath("rope", Key);
        var cache = new KernelCache(Path.Combine(_dir, "cache"), _log);
        Directory.CreateDirectory(cache.Directory);
        var entry = cache.EntryPath("rope", Key);
        Directory.CreateSymbolicLink(entry, outsideEntry);
        var miss = Lookup(cache);
        Assert.AreEqual(1, miss.Compiles, "a linked entry is not served");
        Assert.IsNull(new DirectoryInfo(entry).LinkTarget, "the link was replaced by a real entry");
        Assert.IsTrue(Lookup(outside).Kernel.FromCache, "the link's target is untouched");

        // A link to the right bytes in place of the image: not followed either.
        var image = Path.Combine(entry, "image.ptx");
        File.Delete(image);
        File.CreateSymbolicLink(image, Path.Combine(outsideEntry, "image.ptx"));
        Assert.AreEqual(1, Lookup(cache).Compiles);
        Assert.IsNull(new FileInfo(image).LinkTarget);
        Assert.AreEqual(2, cache.Rebuilt);
        Assert.AreEqual(0, cache.StoreFailures);
    }

    [TestMethod]
    [DataRow("manifest.txt")]
    [DataRow("image.ptx")]
    [DataRow("names.tsv")]
    public void FifoInAnEntryIsAMissNotAHang(string file)
    {
        var entry = Populated(out var cache);
        var path = Path.Combine(entry, file);
        File.Delete(path);
        Fifo.Create(path);
        var miss = WithinSeconds(30, () => Lookup(cache));
        Assert.AreEqual(1, cache.Rebuilt);
        AssertRebuiltThenHit(cache, miss);
        Assert.AreEqual(FileKind.Regular, FileStatus.Lstat(path).Kind);
    }

    [TestMethod]
    public void CorruptedImageByteIsRebuiltNeverServed()
    {
        var entry = Populated(out var cache);
        var image = Path.Combine(entry, "image.ptx");
        var bytes = File.ReadAllBytes(image);
        bytes[bytes.Length / 2] ^= 0x01; // same length, one bit off
        File.WriteAllBytes(image, bytes);

        AssertRebuiltThenHit(cache, Lookup(cache));
        CollectionAssert.AreEqual(Fake().Image, File.ReadAllBytes(image), "the corrupt image was replaced on disk");
        Assert.AreEqual(1, cache.Rebuilt);
    }

    [TestMethod]
    [DataRow("foreign key")]
    [DataRow("foreign architecture")]
    [DataRow("older version")]
    [DataRow("oversized manifest")]
    [DataRow("empty manifest")]
    [DataRow("garbage manifest")]
    [DataRow("image grown")]
    [DataRow("image is a folder")]
    [DataRow("names edited")]
    [DataRow("log missing")]
    [DataRow("entry emptied")]
    public void ForeignOrBrokenEntryIsAMiss(string damage)
    {
        var entry = Populated(out var cache);
        var manifest = Path.Combine(entry, "manifest.txt");
        var image = Path.Combine(entry, "image.ptx");
        var text = File.ReadAllText(manifest);
        switch (damage)
        {
            case "foreign key": // a whole valid entry of another key, copied here: its files match its own manifest
                File.WriteAllText(manifest, text.Replace($"key={Key}\n", "key=0ther\n"));
                break;
            case "foreign architecture":
                File.WriteAllText(manifest, text.Replace($"arch={Ptx.Arch}\n", "arch=compute_90\n"));
                break;
            case "older version":
                File.WriteAllText(manifest, text.Replace("version=2\n", "version=1\n"));
                break;
            case "oversized manifest":
                File.WriteAllText(manifest, text + new string('#', (int)KernelCache.MaxManifestBytes));
                break;
            case "empty manifest":
                File.WriteAllText(manifest, "");
                break;
            case "garbage manifest":
                File.WriteAllBytes(manifest, [.. Enumerable.Range(0, 300).Select(i => (byte)(i * 7))]);
                break;
            case "image grown":
                File.AppendAllText(image, "x");
                break;
            case "image is a folder":
                File.Delete(image);
                Directory.CreateDirectory(image);
                break;
            case "names edited":
                File.WriteAllText(Path.Combine(entry, "names.tsv"), "rope_kernel<1>\t_Z11rope_kernelILi2EEv\n");
                break;
            case "log missing":
                File.Delete(Path.Combine(entry, "nvrtc.log"));
                break;
            case "entry emptied":
                Array.ForEach(Directory.GetFiles(entry), File.Delete);
                break;
            default:
                Assert.Fail("unknown damage " + damage);
                break;
        }

        AssertRebuiltThenHit(cache, Lookup(cache));
        Assert.AreEqual(1, cache.Rebuilt);
    }

    [TestMethod]
    [DataRow("under a file")]
    [DataRow("read-only folder")]
    [UnsupportedOSPlatform("windows")] // file modes; the engine loads Linux libraries only
    public void UnwritableCacheRunsUncached(string how)
    {
        var root = Path.Combine(_dir, "root");
        if (how == "under a file")
        {
            File.WriteAllText(root, "");
            root = Path.Combine(root, "kernels"); // cannot be created, not even by root
        }
        else
        {
            Directory.CreateDirectory(root);
            File.SetUnixFileMode(root, UnixFileMode.UserRead | UnixFileMode.UserExecute);
            if (CanWrite(root))
            {
                File.SetUnixFileMode(root, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
                Assert.Inconclusive("running as root: mode 0500 does not stop writes (the 'under a file' row covers an unwritable root)");
            }
        }

        try
        {
            var cache = new KernelCache(root, _log);
            for (var i = 1; i <= 2; i++)
            {
                var (kernel, compiles) = Lookup(cache);
                Assert.AreEqual(1, compiles, "every lookup compiles");
                CollectionAssert.AreEqual(Fake().Image, kernel.Image);
                Assert.AreEqual(i, cache.StoreFailures);
            }

            Assert.HasCount(2, _log.Entries.Where(e => e.Level == LogLevel.Warning && e.Message.Contains("runs uncached")));
            Assert.AreEqual(0, cache.Hits);
        }
        finally
        {
            if (Directory.Exists(root))
            {
                File.SetUnixFileMode(root, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
                Assert.IsEmpty(Directory.GetFileSystemEntries(root), "nothing was left in the read-only folder");
            }
        }

        static bool CanWrite(string folder)
        {
            try
            {
                File.WriteAllText(Path.Combine(folder, "probe"), "");
                File.Delete(Path.Combine(folder, "probe"));
                return true;
            }
            catch (UnauthorizedAccessException)
            {
                return false;
            }
        }
    }

    [TestMethod]
    public void ConcurrentRebuildsAgreeAndLeaveNothingBehind()
    {
        // Rounds of eight lookups of one key racing to rebuild the same broken entry, each through its own cache object
        // (as separate processes would) or two threads through one: the renames collide ("Directory not empty"), and
        // the broken entry is moved aside by several at once.
        const int Racers = 8;
        var shared = new KernelCache(_dir, _log);
        var caches = Enumerable.Range(0, Racers).Select(i => i % 4 == 0 ? shared : new KernelCache(_dir, _log)).ToArray();
        var failures = new List<Exception>();
        for (var round = 0; round < 12; round++)
        {
            var entry = shared.EntryPath("rope", Key);
            switch (round % 3)
            {
                case 1 when Directory.Exists(entry):
                    File.WriteAllText(Path.Combine(entry, "image.ptx"), "corrupt");
                    break;
                case 2 when Directory.Exists(entry):
                    Directory.Delete(entry, recursive: true);
                    File.WriteAllText(entry, "a file where the entry goes");
                    break;
            }

            var start = new Barrier(Racers);
            var results = new CompiledKernel?[Racers];
            Parallel.For(0, Racers, new ParallelOptions { MaxDegreeOfParallelism = Racers }, i =>
            {
                start.SignalAndWait();
                try
                {
                    results[i] = Lookup(caches[i], () =>
                    {
                        Thread.Sleep(5); // a compile takes time: let the others reach the rename too
                        return Fake();
                    }).Kernel;
                }
                catch (Exception e)
                {
                    lock (failures)
                    {
                        failures.Add(e);
                    }
                }
            });

            Assert.IsEmpty(failures, $"round {round}: " + string.Join("\n", failures));
            foreach (var r in results)
            {
                CollectionAssert.AreEqual(Fake().Image, r!.Image, $"round {round}");
            }
        }

        Assert.AreEqual(0, caches.Distinct().Sum(c => c.StoreFailures), string.Join("\n", _log.Entries));
        AssertNoLeftovers();
        Assert.IsTrue(Lookup(new KernelCache(_dir)).Kernel.FromCache, "the entry left is valid");
    }
}
