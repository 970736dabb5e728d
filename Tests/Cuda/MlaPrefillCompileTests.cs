using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cuda;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Kernels;
using DeepSeekCuda.Loader.Synthetic;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>MLA prefill shapes beyond the presets compile (padding paths); shape validation mirrors the kernel's static_asserts. No GPU.</summary>
[TestClass]
public sealed class MlaPrefillCompileTests
{
    [TestMethod]
    [TestCategory("Nvrtc")]
    [DataRow(30, 14, 38, 70)]   // q.k 44 and v 38: zero-padded to 48 and 40 in shared memory
    [DataRow(128, 64, 128, 512)] // V3 once more on its own, for sm_80 SASS
    [DataRow(2, 2, 2, 2)]        // the smallest
    [DataRow(160, 32, 144, 256)] // v wider than V3 (144): 45 KiB of the 48 KiB of shared memory
    public void OtherShapesCompile(int nope, int rope, int v, int lora)
    {
        NvrtcSupport.RequireNvrtc();
        var s = new MlaPrefillShape(nope, rope, v, lora);
        s.Validate();
        var compiled = new NvrtcCompiler().Compile(MlaPrefillKernel.FamilyName,
            [MlaPrefillKernel.AttentionInstance(s), MlaPrefillKernel.GatherInstance(s)], new KernelTarget("sm_80"));
        Assert.HasCount(2, compiled.LoweredNames);
    }

    [TestMethod]
    [TestCategory("Nvrtc")]
    public void TooLargeHeadDimsFailTheStaticAssert()
    {
        NvrtcSupport.RequireNvrtc();
        var bad = new KernelInstance("mla_prefill_attn_kernel<256, 64, 256, 512>", MlaPrefillKernel.ParamsType);
        var e = Assert.ThrowsExactly<KernelCompileException>(() => new NvrtcCompiler().Compile(MlaPrefillKernel.FamilyName, [bad], new KernelTarget("compute_80")));
        StringAssert.Contains(e.Log, "too large for static shared memory");
    }

    [TestMethod]
    public void ValidateRejectsWhatTheKernelCannotRun()
    {
        foreach (var s in MlaPrefillShape.Known)
        {
            s.Validate();
        }

        Assert.AreEqual(MlaPrefillShape.V3, CudaBackendLayout.PrefillShape(new MlaDims(128, 128, 64, 128, 512)));
        Assert.AreEqual(MlaPrefillShape.TinyPreset, CudaBackendLayout.PrefillShape(new MlaDims(3, ModelPresets.Tiny.QkNopeHeadDim,
            ModelPresets.Tiny.QkRopeHeadDim, ModelPresets.Tiny.VHeadDim, ModelPresets.Tiny.KvLoraRank)));
        Assert.ThrowsExactly<ArgumentException>(() => new MlaPrefillShape(31, 16, 40, 80).Validate());
        Assert.ThrowsExactly<ArgumentException>(() => new MlaPrefillShape(32, 16, 40, 81).Validate());
        Assert.ThrowsExactly<ArgumentException>(() => new MlaPrefillShape(256, 64, 256, 512).Validate());
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => new MlaPrefillShape(0, 16, 40, 80).Validate());
        Assert.AreEqual("mla_prefill_attn_kernel<128, 64, 128, 512>", MlaPrefillKernel.AttentionInstance(MlaPrefillShape.V3).NameExpression);
        Assert.AreEqual("mla_prefill_gather_kernel<80, 16>", MlaPrefillKernel.GatherInstance(MlaPrefillShape.TinyPreset).NameExpression);
    }
}
