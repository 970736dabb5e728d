using DeepSeekCuda.Cuda.Inspection;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>The resource report's parsers on cuobjdump and PTX text (CUDA 12.4's format), and the occupancy rule.</summary>
[TestClass]
public sealed class CubinInspectorTests
{
    private const string ResUsage = """

        Resource usage:
         Common:
          GLOBAL:24 CONSTANT[4]:48
         Function _Z1aILi1EEv1P:
          REG:128 STACK:0 SHARED:19456 LOCAL:0 CONSTANT[0]:632 TEXTURE:0 SURFACE:0 SAMPLER:0
         Function _Z1bv:
          REG:40 STACK:16 SHARED:0 LOCAL:8 CONSTANT[0]:360 TEXTURE:0 SURFACE:0 SAMPLER:0
        """;

    [TestMethod]
    public void ResourceUsageIsReadPerFunction()
    {
        var u = CubinInspector.ParseResourceUsage(ResUsage);
        Assert.HasCount(2, u);
        Assert.AreEqual(new CubinInspector.Usage(128, 0, 19456, 0), u["_Z1aILi1EEv1P"]);
        Assert.AreEqual(new CubinInspector.Usage(40, 16, 0, 8), u["_Z1bv"]);
    }

    [TestMethod]
    public void MaxThreadsIsReadFromEachFunctionsInfoSection()
    {
        const string elf = """
            .nv.info
            	<0x1>
            	Attribute:	EIATTR_MAX_THREADS
            	Format:	EIFMT_SVAL
            	Value:	0x400 0x1 0x1
            .nv.info._Z1aILi1EEv1P
            	<0x1>
            	Attribute:	EIATTR_CUDA_API_VERSION
            	Format:	EIFMT_SVAL
            	Value:	0x7c
            	<0x6>
            	Attribute:	EIATTR_MAX_THREADS
            	Format:	EIFMT_SVAL
            	Value:	0x80 0x1 0x1
            .nv.info._Z1bv
            	<0x1>
            	Attribute:	EIATTR_MAX_THREADS
            	Format:	EIFMT_SVAL
            	Value:	0x100 0x1 0x1
            .section .rela.text._Z1bv	RELA
            """;
        var t = CubinInspector.ParseMaxThreads(elf);
        Assert.HasCount(2, t, "the module-wide .nv.info section names no function");
        Assert.AreEqual(128, t["_Z1aILi1EEv1P"]);
        Assert.AreEqual(256, t["_Z1bv"]);
    }

    [TestMethod]
    public void TensorOpsAreCountedByClassWithPredicatesAndModifiers()
    {
        const string sass = """
            	code for sm_90a
            		Function : _Z1aILi1EEv1P
            	.headerflags	@"EF_CUDA_SM90"
                    /*0000*/                   LDC R1, c[0x0][0x28] ;                               /* 0x00000a00ff017b82 */
                    /*0010*/                   HMMA.16816.F32 R4, R8, R12, R4 ;                     /* 0x000000080c04723c */
                    /*0020*/               @P0 HMMA.16816.F32 R4, R8, R12, R4 ;                     /* 0x000000080c04723c */
                    /*0030*/              @!P1 F2FP.F16.E4M3.UNPACK_B R8, R9 ;                      /* 0x00000009ff08723e */
                    /*0040*/                   HGMMA.64x128x16.F32.BF16 gdesc[UR4], RZ, !UPT ;      /* 0x00000000ff0079f0 */
            		Function : _Z1bv
                    /*0000*/                   QMMA.16832.F32.E4M3.E4M3 R4, R8, R12, R4 ;           /* 0x000000080c04723c */
                    /*0010*/                   EXIT ;                                               /* 0x000000000000794d */
            """;
        var ops = CubinInspector.ParseTensorOps(sass);
        CollectionAssert.AreEquivalent(new Dictionary<string, int> { ["HMMA"] = 2, ["HGMMA"] = 1 }, ops["_Z1aILi1EEv1P"].ToDictionary());
        CollectionAssert.AreEquivalent(new Dictionary<string, int> { ["QMMA"] = 1 }, ops["_Z1bv"].ToDictionary());
    }

    [TestMethod]
    public void Fp8MmaSyncIsCountedPerEntryAndInCalledFunctions()
    {
        const string ptx = """
            .version 8.4
            .target sm_90a
            .visible .entry _Z1av(
            	.param .align 8 .b8 _Z1av_param_0[16]
            )
            {
            	mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%f1, %f2, %f3, %f4}, {%r1, %r2, %r3, %r4}, {%r5, %r6}, {%f1, %f2, %f3, %f4};
            	mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%f1, %f2, %f3, %f4}, {%r1, %r2, %r3, %r4}, {%r5, %r6}, {%f1, %f2, %f3, %f4};
            	cvt.rn.f16x2.e4m3x2 %r7, %rs1;
            }
            .weak .entry _Z1bv(
            )
            {
            	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1, %f2, %f3, %f4}, {%r1, %r2, %r3, %r4}, {%r5, %r6}, {%f1, %f2, %f3, %f4};
            }
            """;
        var counts = CubinInspector.CountPtxFp8Mma(ptx);
        Assert.AreEqual(1, counts["_Z1av"], "the f16 mma and the e4m3 conversion are not FP8 mma.sync");
        Assert.AreEqual(0, counts["_Z1bv"]);

        const string withFunc = """
            .func  (.param .b32 func_retval0) helper(
            )
            {
            	mma.sync.aligned.m16n8k32.row.col.f32.e5m2.e5m2.f32 {%f1, %f2, %f3, %f4}, {%r1, %r2, %r3, %r4}, {%r5, %r6}, {%f1, %f2, %f3, %f4};
            }
            .visible .entry _Z1cv(
            )
            {
            }
            """;
        Assert.AreEqual(1, CubinInspector.CountPtxFp8Mma(withFunc)["_Z1cv"], "a called function's FP8 mma counts for every entry");
    }

    // Reference values: the CUDA occupancy calculator's rules (warps, 256-register warp units, 1 KiB reserved shared per block).
    [TestMethod]
    [DataRow("sm_80", 256, 32, 0, 8, "warps")]         // 8 warps per block, 64 per SM (registers tie at 8; warps are named first)
    [DataRow("sm_90a", 128, 128, 19456, 4, "registers")] // 4096 registers per warp: 16 warps = 4 blocks
    [DataRow("sm_89", 128, 64, 0, 8, "registers")]     // 2048 per warp: 32 warps = 8 blocks (warps alone would allow 12)
    [DataRow("sm_90", 128, 32, 100 * 1024, 2, "shared")] // 233472 / (102400 + 1024) = 2
    [DataRow("sm_90", 1024, 255, 0, 0, "registers")]   // 8192 registers per warp x 32 warps > 65536: does not fit
    [DataRow("sm_89", 128, 32, 100 * 1024, 0, "shared")] // over the 99 KiB per-block maximum
    public void ResidentBlocksFollowTheOccupancyRules(string arch, int threads, int registers, int shared, int blocks, string limiter)
    {
        var (b, l) = ArchLimits.For(arch).ResidentBlocks(threads, registers, shared);
        Assert.AreEqual(blocks, b);
        Assert.AreEqual(limiter, l);
    }

    [TestMethod]
    public void AnUnknownTargetIsRefusedByName()
    {
        var e = Assert.ThrowsExactly<ArgumentException>(() => ArchLimits.For("sm_75"));
        StringAssert.Contains(e.Message, "sm_75");
        StringAssert.Contains(e.Message, "sm_90a");
    }
}
