using DeepSeekCuda.Cuda;
using DeepSeekCuda.Kernels;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>Gate shapes beyond the known presets compile (any config must work); shape validation mirrors the kernel's static_asserts.</summary>
[TestClass]
public sealed class MoeGateCompileTests
{
    public static IEnumerable<object[]> OddShapes =>
    [
        [10, 100, 5, 3, 4],   // D not a multiple of 8: the scalar load path
        [64, 2048, 1, 1, 6],  // a single group: no group limit
        [8, 64, 8, 4, 4],     // one expert per group: group score is the expert's own
        [1024, 1024, 32, 8, 8], // the largest expert count and group count
    ];

    [TestMethod]
    [TestCategory("Nvrtc")]
    [DynamicData(nameof(OddShapes))]
    public void OtherShapesCompile(int experts, int width, int groups, int kept, int k)
    {
        NvrtcSupport.RequireNvrtc();
        var s = new MoeGateShape(experts, width, groups, kept, k);
        s.Validate();
        var instances = new[] { MoeGateKernel.Instance(s, ElementType.F32), MoeGateKernel.Instance(s, ElementType.BF16), MoeGateKernel.RouteInstance(s) };
        var compiled = new NvrtcCompiler().Compile(MoeGateKernel.FamilyName, instances, new KernelTarget("sm_90"));
        Assert.HasCount(3, compiled.LoweredNames);
    }

    [TestMethod]
    [TestCategory("Nvrtc")]
    public void AnInvalidShapeFailsTheStaticAsserts()
    {
        NvrtcSupport.RequireNvrtc();
        // 3 groups of 4 keeping 1 cannot hold 5 experts.
        var bad = new KernelInstance("moe_gate_kernel<12, 192, 3, 1, 5, 256, 0>", MoeGateKernel.ParamsType);
        var e = Assert.ThrowsExactly<KernelCompileException>(() => new NvrtcCompiler().Compile(MoeGateKernel.FamilyName, [bad], new KernelTarget("compute_80")));
        StringAssert.Contains(e.Log, "k experts must exist in the kept groups");

        // The route kernel shares the selection and its asserts.
        var route = MoeGateKernel.RouteInstance(new MoeGateShape(12, 192, 3, 1, 5));
        e = Assert.ThrowsExactly<KernelCompileException>(() => new NvrtcCompiler().Compile(MoeGateKernel.FamilyName, [route], new KernelTarget("compute_80")));
        StringAssert.Contains(e.Log, "k experts must exist in the kept groups");
    }

    [TestMethod]
    [TestCategory("Nvrtc")]
    public void TheRouteKernelTakesAsManyTokensPerBlockAsTheLauncherCounts()
    {
        NvrtcSupport.RequireNvrtc();
        var source = $"#include \"{MoeGateKernel.FamilyName}.cu\"\nstatic_assert(kMoeRouteWarps == {MoeGateKernel.RouteWarps}, \"route warps differ from C#\");\n";
        Assert.IsNotEmpty(new NvrtcCompiler().CompileSource(MoeGateKernel.FamilyName, source, [], new KernelTarget("compute_80")).Image);
    }

    [TestMethod]
    public void ValidateRejectsWhatTheKernelCannotRoute()
    {
        foreach (var s in MoeGateShape.Known)
        {
            s.Validate();
        }

        Assert.ThrowsExactly<ArgumentException>(() => new MoeGateShape(12, 192, 3, 1, 5).Validate());
        Assert.ThrowsExactly<ArgumentException>(() => new MoeGateShape(10, 64, 3, 2, 2).Validate());
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => new MoeGateShape(2048, 64, 8, 4, 8).Validate());
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => new MoeGateShape(256, 7168, 64, 4, 8).Validate());
        Assert.AreEqual("moe_gate_kernel<256, 7168, 8, 4, 8, 1024, 0>", MoeGateKernel.Instance(MoeGateShape.V3, ElementType.F32).NameExpression);
        Assert.AreEqual("moe_gate_kernel<16, 256, 4, 2, 4, 256, 1>", MoeGateKernel.Instance(MoeGateShape.TinyA, ElementType.BF16).NameExpression);
    }
}
