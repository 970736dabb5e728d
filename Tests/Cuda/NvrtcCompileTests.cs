using System.Text;
using DeepSeekCuda.Cuda;

namespace DeepSeekCuda.Tests.Cuda;

[TestClass]
[TestCategory("Nvrtc")]
public sealed class NvrtcCompileTests
{
    public static IEnumerable<object[]> FamilyTargets =>
        from f in NvrtcSupport.Families.Keys from t in NvrtcSupport.Targets select new object[] { f, t };

    [TestMethod]
    [DynamicData(nameof(FamilyTargets))]
    public void EverySpecializationCompiles(string family, string arch)
    {
        NvrtcSupport.RequireNvrtc();
        var instances = NvrtcSupport.Families[family];
        var target = new KernelTarget(arch);
        var compiled = new NvrtcCompiler().Compile(family, instances, target);

        Assert.IsNotEmpty(compiled.Image, $"{family} {arch}: empty image");
        Assert.HasCount(instances.Count, compiled.LoweredNames);
        if (target.IsCubin)
        {
            // ELF magic: NVRTC ran ptxas and produced machine code.
            CollectionAssert.AreEqual(new byte[] { 0x7F, (byte)'E', (byte)'L', (byte)'F' }, compiled.Image[..4]);
        }
        else
        {
            var ptx = Encoding.UTF8.GetString(compiled.Image);
            StringAssert.Contains(ptx, ".target " + arch.Replace("compute_", "sm_", StringComparison.Ordinal));
            foreach (var lowered in compiled.LoweredNames.Values)
            {
                StringAssert.Contains(ptx, ".entry " + lowered, $"{family}: kernel {lowered} missing from the PTX");
            }
        }

        foreach (var i in instances)
        {
            StringAssert.StartsWith(compiled.LoweredNames[i.NameExpression], "_Z", $"{i.NameExpression} is not a mangled template instance");
        }
    }

    [TestMethod]
    public void EveryFamilyInKernelsIsCoveredByALauncher()
    {
        var families = KernelSources.Embedded.Families.Order(StringComparer.Ordinal).ToArray();
        CollectionAssert.AreEqual(NvrtcSupport.Families.Keys.Order(StringComparer.Ordinal).ToArray(), families,
            "each Kernels/*.cu needs a launcher listed in NvrtcSupport.Families (and the reverse)");
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
            new NvrtcCompiler(sources).Compile("silu_mul", NvrtcSupport.Families["silu_mul"], new KernelTarget("compute_80")));
        Assert.AreEqual("silu_mul", e.Family);
        StringAssert.Contains(e.Log, "undefined_symbol_here");
        StringAssert.Contains(e.Log, $"silu_mul.cu({at + 1})", "the log names the file and line of the error");
        StringAssert.Contains(e.Message, e.Log);
    }

    [TestMethod]
    public void TargetSelectionFollowsTheNvrtcVersion()
    {
        NvrtcSupport.RequireNvrtc();
        var (major, _) = NvrtcCompiler.Version;
        Assert.AreEqual(major >= 12 ? "sm_90a" : "sm_90", NvrtcCompiler.TargetFor(9, 0).Arch);
        Assert.AreEqual("sm_80", NvrtcCompiler.TargetFor(8, 0).Arch);
        // A device newer than this NVRTC gets PTX the driver can compile forward.
        Assert.StartsWith("compute_", NvrtcCompiler.TargetFor(99, 9).Arch);
    }
}
