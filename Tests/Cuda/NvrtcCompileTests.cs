using System.Text;
using DeepSeekCuda.Cuda;

namespace DeepSeekCuda.Tests.Cuda;

[TestClass]
[TestCategory("Nvrtc")]
public sealed class NvrtcCompileTests
{
    [TestMethod]
    [DynamicData(nameof(NvrtcSupport.FamilyTargets), typeof(NvrtcSupport))]
    public void EverySpecializationCompiles(string family, string arch)
    {
        NvrtcSupport.RequireNvrtc();
        var instances = NvrtcSupport.Instances(family, arch);
        var compiled = NvrtcSupport.Compiled(family, arch);

        Assert.AreEqual(arch, compiled.Arch);
        Assert.HasCount(instances.Count, compiled.LoweredNames);
        // ELF magic: NVRTC ran ptxas and produced machine code.
        CollectionAssert.AreEqual(new byte[] { 0x7F, (byte)'E', (byte)'L', (byte)'F' }, compiled.Image[..4], $"{family} {arch}: not a CUBIN");
        Assert.IsNotNull(compiled.Ptx, $"{family} {arch}: no PTX kept from the compile");
        StringAssert.Contains(compiled.Ptx, ".target " + arch);
        foreach (var i in instances)
        {
            var lowered = compiled.LoweredNames[i.NameExpression];
            StringAssert.StartsWith(lowered, "_Z", $"{i.NameExpression} is not a mangled template instance");
            StringAssert.Contains(compiled.Ptx, ".entry " + lowered, $"{family}: kernel {lowered} missing from the PTX");
        }
    }

    [TestMethod]
    public void EveryFamilyInKernelsIsCoveredByALauncher()
    {
        var families = KernelSources.Embedded.Families.Order(StringComparer.Ordinal).ToArray();
        CollectionAssert.AreEqual(NvrtcSupport.FamilyNames.ToArray(), families,
            "each Kernels/*.cu needs a launcher listed in KernelCatalog.For (and the reverse)");
        Assert.IsTrue(KernelSources.Embedded.Files.ContainsKey("common.cuh"));
    }

    [TestMethod]
    public void BrokenSourceRaisesKernelCompileExceptionWithTheLog()
    {
        NvrtcSupport.RequireNvrtc();
        var good = KernelSources.Embedded.Family("silu_mul");
        var lines = good.Split('\n').ToList();
        var at = lines.FindIndex(l => l.Contains("const float s =", StringComparison.Ordinal));
        Assert.IsGreaterThanOrEqualTo(0, at);
        lines[at] = "    const float s = undefined_symbol_here(g);";
        var sources = KernelSources.Embedded.With("silu_mul.cu", string.Join('\n', lines));

        var e = Assert.ThrowsExactly<KernelCompileException>(() =>
            new NvrtcCompiler(sources).Compile("silu_mul", NvrtcSupport.Instances("silu_mul"), new KernelTarget("compute_80")));
        Assert.AreEqual("silu_mul", e.Family);
        StringAssert.Contains(e.Log, "undefined_symbol_here");
        StringAssert.Contains(e.Log, $"silu_mul.cu({at + 1})", "the log names the file and line of the error");
        StringAssert.Contains(e.Message, e.Log);
    }

    [TestMethod]
    public void TheLoadedNvrtcIsAtLeastTheFloorCiCompilesWith()
    {
        NvrtcSupport.RequireNvrtc();
        var (major, minor) = NvrtcCompiler.Version;
        Assert.IsTrue((major, minor).CompareTo((12, 4)) >= 0, $"NVRTC {major}.{minor} loaded; the kernels are proven with 12.4 and newer");
    }

    [TestMethod]
    public void TargetSelectionFollowsTheDevice()
    {
        NvrtcSupport.RequireNvrtc();
        Assert.AreEqual("sm_90a", NvrtcCompiler.TargetFor(9, 0).Arch);
        Assert.AreEqual("sm_80", NvrtcCompiler.TargetFor(8, 0).Arch);
        // A device newer than this NVRTC gets PTX the driver can compile forward.
        Assert.StartsWith("compute_", NvrtcCompiler.TargetFor(99, 9).Arch);
    }
}
