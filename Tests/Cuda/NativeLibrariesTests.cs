using DeepSeekCuda.Cuda;
using DeepSeekCuda.Cuda.Native;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>
/// Where the CUDA libraries are looked for and why a candidate is passed over, on a fake environment and a
/// temporary folder tree; no GPU. The last test checks the real NVRTC where tools/cuda/toolchain.sh has run.
/// </summary>
[TestClass]
public sealed class NativeLibrariesTests
{
    private string _root = "";

    [TestInitialize]
    public void CreateRoot()
    {
        _root = Path.Combine(Path.GetTempPath(), "dscuda-native-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(_root);
    }

    [TestCleanup]
    public void DeleteRoot() => Directory.Delete(_root, recursive: true);

    private static Func<string, string?> Env(params (string Name, string Value)[] vars) =>
        name => vars.FirstOrDefault(v => v.Name == name).Value;

    private string MakeDir(string relative)
    {
        var d = Path.Combine(_root, relative);
        Directory.CreateDirectory(d);
        return d;
    }

    [TestMethod]
    public void ExplicitFoldersComeFirstTheToolchainLastAndWheelFoldersBetween()
    {
        var cu13 = MakeDir("venv/lib/python3.12/site-packages/nvidia/cu13/lib");
        var cublas = MakeDir("venv/lib/python3.12/site-packages/nvidia/cublas/lib");
        var condaNvrtc = MakeDir("conda/lib/python3.11/site-packages/nvidia/cuda_nvrtc/lib");
        MakeDir("venv/lib/python3.12/site-packages/nvidia/cuda_runtime/lib"); // not a layout we read
        var env = Env(("DSCUDA_CUDA_LIB", "/opt/a: /opt/b"), ("CUDA_PATH", "/opt/cuda"), ("VIRTUAL_ENV", Path.Combine(_root, "venv")),
            ("CONDA_PREFIX", Path.Combine(_root, "conda")), ("HOME", Path.Combine(_root, "home")), ("DSCUDA_TOOLCHAIN", "/opt/tc"));

        var paths = NativeLibraries.SearchDirectories(env).Select(f => f.Path).ToList();

        CollectionAssert.AreEqual(new[] { "/opt/a", "/opt/b", null, "/opt/cuda/lib64", "/opt/cuda/lib", "/usr/local/cuda/lib64" },
            paths.Take(6).ToList(), string.Join(", ", paths));
        Assert.AreEqual("/opt/tc/lib", paths[^1], "the toolchain folder is the last resort");
        Assert.AreEqual("/usr/lib/wsl/lib", paths[^2]);
        Assert.AreEqual("/usr/lib/x86_64-linux-gnu", paths[^3]);
        // The wheel folders that exist, virtualenv before conda, between /usr/local/cuda and the system folders.
        var wheels = NativeLibraries.SearchDirectories(env).Where(f => f.Path?.StartsWith(_root, StringComparison.Ordinal) == true).Select(f => f.Path).ToList();
        CollectionAssert.AreEqual(new[] { cu13, cublas, condaNvrtc }, wheels);
        Assert.IsGreaterThan(paths.IndexOf("/usr/local/cuda/lib64"), paths.IndexOf(cu13));
        Assert.IsLessThan(paths.IndexOf("/usr/lib/x86_64-linux-gnu"), paths.IndexOf(condaNvrtc));
        Assert.AreEqual(paths.Count, paths.Distinct().Count(), "no folder twice");
    }

    [TestMethod]
    public void HeadlineIsTheReasonsFirstLineWithoutItsFolderList()
    {
        var reason = NativeLibraries.Load([new(Path.Combine(_root, "none"), null)], ["libnothing.so.1"], "libnothing", "Fix: none.").Error!;
        Assert.AreEqual("libnothing (libnothing.so.1) could not be loaded", NativeLibraries.Headline(reason), reason);
        Assert.AreEqual("cuInit failed: CUDA_ERROR_NO_DEVICE: no CUDA-capable device is detected",
            NativeLibraries.Headline("cuInit failed: CUDA_ERROR_NO_DEVICE: no CUDA-capable device is detected\nmore"));
    }

    [TestMethod]
    public void WithoutTheVariablesTheLoaderSearchIsFirstAndAFolderNamedTwiceIsSearchedOnce()
    {
        var env = Env(("CUDA_PATH", "/opt/cuda"), ("CUDA_HOME", "/opt/x/../cuda/"), ("HOME", "/home/u"));
        var folders = NativeLibraries.SearchDirectories(env).ToList();
        Assert.IsNull(folders[0].Path, "the dynamic loader's own search");
        Assert.AreEqual(1, folders.Count(f => f.Path is not null && Path.GetFullPath(f.Path) == "/opt/cuda/lib64"));
        Assert.AreEqual("/home/u/.cache/deepseekcuda/cuda-12.4/lib", folders[^1].Path);
    }

    [TestMethod]
    public void ToolchainDirectoryFollowsTheScriptsRule()
    {
        Assert.AreEqual("/x/tc", NativeLibraries.ToolchainDirectoryFor(Env(("DSCUDA_TOOLCHAIN", "/x/tc"), ("XDG_CACHE_HOME", "/x/c"), ("HOME", "/h"))));
        Assert.AreEqual("/x/c/deepseekcuda/cuda-12.4", NativeLibraries.ToolchainDirectoryFor(Env(("XDG_CACHE_HOME", "/x/c"), ("HOME", "/h"))));
        Assert.AreEqual("/h/.cache/deepseekcuda/cuda-12.4", NativeLibraries.ToolchainDirectoryFor(Env(("HOME", "/h"))));
        // Empty counts as unset, as in the script's ${VAR:-...}.
        Assert.AreEqual("/h/.cache/deepseekcuda/cuda-12.4",
            NativeLibraries.ToolchainDirectoryFor(Env(("DSCUDA_TOOLCHAIN", ""), ("XDG_CACHE_HOME", ""), ("HOME", "/h"))));
    }

    [TestMethod]
    public void ExplicitFoldersTryEverySonameThenTheNewestMajorWinsAcrossFolders()
    {
        NativeLibraries.SearchFolder Dir(string p, string? origin = null) => new(p, origin);
        var folders = new[] { Dir("/e", "$DSCUDA_CUDA_LIB"), new NativeLibraries.SearchFolder(null, null), Dir("/a"), Dir("/b") };
        var order = NativeLibraries.Candidates(folders, ["x.so.13", "x.so.12"]).Select(c => $"{c.Folder.Path ?? "loader"}/{c.File}").ToList();
        CollectionAssert.AreEqual(
            new[] { "/e/x.so.13", "/e/x.so.12", "loader/x.so.13", "/a/x.so.13", "/b/x.so.13", "loader/x.so.12", "/a/x.so.12", "/b/x.so.12" },
            order);
    }

    [TestMethod]
    public void AFileThatIsNotALibraryIsRejectedWithItsPathAndTheFixIsNamed()
    {
        var dir = MakeDir("fake");
        var fake = Path.Combine(dir, "libnvrtc.so.12");
        File.WriteAllBytes(fake, Enumerable.Range(0, 4096).Select(i => (byte)(i * 31)).ToArray());
        var missing = Path.Combine(_root, "missing");

        var r = NativeLibraries.LoadNvrtc([new(dir, "$DSCUDA_CUDA_LIB"), new(missing, null)], "/tc", NativeLibraries.NvrtcMinimum);

        Assert.AreEqual(IntPtr.Zero, r.Handle);
        Assert.IsNull(r.Path);
        StringAssert.StartsWith(r.Error, "NVRTC 12.4 or newer (libnvrtc.so.13, libnvrtc.so.12) could not be loaded.");
        StringAssert.Contains(r.Error, $"{dir} ($DSCUDA_CUDA_LIB): libnvrtc.so.13 not found; libnvrtc.so.12: failed to load ({fake}: ");
        StringAssert.Contains(r.Error, $"{missing}: no such folder");
        StringAssert.EndsWith(r.Error, "Fix: run tools/cuda/toolchain.sh (fetches NVRTC 12.4 into /tc) or set DSCUDA_CUDA_LIB to the folder holding libnvrtc.so.12/13.");
    }

    [TestMethod]
    public void BuiltinsAreTheSonameOfTheSameMajor()
    {
        var dir = MakeDir("lib");
        foreach (var f in new[] { "libnvrtc-builtins.so.12.4.127", "libnvrtc-builtins.so.12.4", "libnvrtc-builtins.so.13.0", "libnvrtc-builtins.so", "libnvrtc.so.12" })
        {
            File.WriteAllBytes(Path.Combine(dir, f), []);
        }

        Assert.AreEqual(Path.Combine(dir, "libnvrtc-builtins.so.12.4"), NativeLibraries.BuiltinsFor(dir, 12));
        Assert.AreEqual(Path.Combine(dir, "libnvrtc-builtins.so.13.0"), NativeLibraries.BuiltinsFor(dir, 13));
        Assert.IsNull(NativeLibraries.BuiltinsFor(dir, 11));
        Assert.IsNull(NativeLibraries.BuiltinsFor(Path.Combine(_root, "missing"), 12));

        // Only the full version present: that file (its soname is what NVRTC asks for).
        File.Delete(Path.Combine(dir, "libnvrtc-builtins.so.12.4"));
        Assert.AreEqual(Path.Combine(dir, "libnvrtc-builtins.so.12.4.127"), NativeLibraries.BuiltinsFor(dir, 12));
    }

    [TestMethod]
    public void TheLoadedNvrtcIsAtLeastTheFloor()
    {
        if (!NativeLibraries.TryNvrtc(out _, out var reason))
        {
            Assert.Inconclusive("NVRTC is not here (run tools/cuda/toolchain.sh): " + reason);
        }

        Assert.IsTrue(File.Exists(NativeLibraries.NvrtcPath), NativeLibraries.NvrtcPath);
        Assert.IsGreaterThanOrEqualTo(0, NvrtcCompiler.Version.CompareTo(NativeLibraries.NvrtcMinimum), $"{NvrtcCompiler.Version}");
    }

    [TestMethod]
    public void AnNvrtcOlderThanTheFloorIsRejectedAndTheSearchGoesOn()
    {
        if (!NativeLibraries.TryNvrtc(out _, out var reason))
        {
            Assert.Inconclusive("NVRTC is not here (run tools/cuda/toolchain.sh): " + reason);
        }

        // The real library against a floor one minor above it: its version is read through the handle.
        var path = NativeLibraries.NvrtcPath!;
        var (major, minor) = NvrtcCompiler.Version;
        var folder = new NativeLibraries.SearchFolder(Path.GetDirectoryName(path), "$DSCUDA_CUDA_LIB");
        var r = NativeLibraries.LoadNvrtc([folder], "/tc", (major, minor + 1));
        Assert.AreEqual(IntPtr.Zero, r.Handle);
        StringAssert.Contains(r.Error, $"NVRTC {major}.{minor} at {Path.Combine(folder.Path!, Path.GetFileName(path))} is older than {major}.{minor + 1}, the oldest version CI compiles with");

        // At its own version it loads from the same file.
        var ok = NativeLibraries.LoadNvrtc([folder], "/tc", (major, minor));
        Assert.AreEqual(Path.Combine(folder.Path!, Path.GetFileName(path)), ok.Path, ok.Error);
    }
}
