using DeepSeekCuda.Cuda;
using DeepSeekCuda.Kernels;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>The all-reduce launcher's host-side choices (no GPU needed).</summary>
[TestClass]
public sealed class AllReduceLaunchTests
{
    [TestMethod]
    public void GridKeepsEveryRanksBlocksResidentAndCoversTheMessage()
    {
        // H100: 132 SMs. Eight logical ranks on it get 16 blocks each (128 resident blocks); one rank per GPU up to 64.
        Assert.AreEqual(16, AllReduceKernel.Grid(132, 8, 10_000_000));
        Assert.AreEqual(AllReduceKernel.MaxBlocks, AllReduceKernel.Grid(132, 1, 10_000_000));
        Assert.AreEqual(1, AllReduceKernel.Grid(132, 2, 1));
        Assert.AreEqual(2, AllReduceKernel.Grid(132, 2, AllReduceKernel.Block + 1));
        Assert.AreEqual(1, AllReduceKernel.Grid(4, 8, 10_000_000)); // never zero
    }

    [TestMethod]
    public void ChoosesOneShotForDecodeAndTwoStepForPrefill()
    {
        Assert.AreEqual(AllReduceAlgorithm.OneShot, AllReduceKernel.Choose(7168 * 32 * 2)); // 32 tokens of bf16 hidden
        Assert.AreEqual(AllReduceAlgorithm.TwoStep, AllReduceKernel.Choose(7168 * 4096 * 2)); // a 4096-token prefill chunk
        Assert.AreEqual(12, AllReduceKernel.AllInstances().Count);
        Assert.AreEqual("allreduce_twostep<8, 1, 512>", AllReduceKernel.Instance(AllReduceAlgorithm.TwoStep, 8, ElementType.BF16).NameExpression);
    }

    /// <summary>
    /// The flag buffer the mesh allocates per rank against the kernel source (NVRTC evaluates the static_asserts, no GPU):
    /// the barrier flags [blocks][phases][ranks] and then one epoch counter per block, where the kernels count their calls
    /// (so a launch replayed from a CUDA graph takes a fresh call number). A buffer one counter short fails the compile.
    /// </summary>
    [TestMethod]
    public void TheFlagBufferHoldsTheBarrierFlagsAndAnEpochCounterPerBlock()
    {
        NvrtcSupport.RequireNvrtc();
        string Source(int words) =>
            $"#include \"{AllReduceKernel.FamilyName}.cu\"\n" +
            $"static_assert(AR_MAX_BLOCKS == {AllReduceKernel.MaxBlocks} && AR_PHASES == {AllReduceKernel.Phases} && AR_MAX_RANKS == {AllReduceKernel.MaxRanks}, \"limits differ from C#\");\n" +
            $"static_assert((AR_FLAG_WORDS + AR_MAX_BLOCKS) * 4 == {words * 4}, \"flag buffer differs from C#\");\n";
        var target = new KernelTarget("compute_90");
        Assert.IsNotEmpty(new NvrtcCompiler().CompileSource(AllReduceKernel.FamilyName, Source(AllReduceKernel.FlagBytes / 4), [], target).Image);
        var e = Assert.ThrowsExactly<KernelCompileException>(() =>
            new NvrtcCompiler().CompileSource(AllReduceKernel.FamilyName, Source(AllReduceKernel.FlagBytes / 4 - 1), [], target));
        StringAssert.Contains(e.Log, "flag buffer differs from C#");
    }
}
