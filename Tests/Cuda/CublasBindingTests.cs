using System.Runtime.CompilerServices;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Cuda.Blas;
using DeepSeekCuda.Cuda.Native;
using DeepSeekCuda.Kernels;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>
/// The cuBLAS/cuBLASLt baseline bindings without a GPU: the library probe, status names, the row-major to
/// column-major mapping (checked by running it through a CPU column-major GEMM) and the FP8 shape rules.
/// </summary>
[TestClass]
public sealed class CublasBindingTests
{
    [TestMethod]
    public void WithoutCublasTheProbeThrowsNamingEveryLibraryTried()
    {
        if (NativeLibraries.TryCublas(out _, out _))
        {
            Assert.Inconclusive($"cuBLAS is installed here ({NativeLibraries.CublasPath}); this test is about machines without it");
        }

        var e = Assert.ThrowsExactly<CublasUnavailableException>(() => NativeLibraries.RequireCublas());
        Assert.AreEqual("cublas", e.Library);
        foreach (var file in new[] { "libcublas.so.13", "libcublas.so.12", "libcublas.so.11" })
        {
            StringAssert.Contains(e.Message, file);
        }

        // The handle probes before it touches the device, so it fails the same way.
        var fromHandle = Assert.ThrowsExactly<CublasUnavailableException>(() => new CublasHandle(null!));
        Assert.AreEqual(e.Message, fromHandle.Message);
        Assert.IsNull(NativeLibraries.CublasPath);
    }

    [TestMethod]
    public void WithoutCublasLtTheProbeThrowsNamingEveryLibraryTried()
    {
        if (NativeLibraries.TryCublasLt(out _, out _))
        {
            Assert.Inconclusive($"cuBLASLt is installed here ({NativeLibraries.CublasLtPath}); this test is about machines without it");
        }

        var e = Assert.ThrowsExactly<CublasUnavailableException>(() => NativeLibraries.RequireCublasLt());
        Assert.AreEqual("cublasLt", e.Library);
        foreach (var file in new[] { "libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so.11" })
        {
            StringAssert.Contains(e.Message, file);
        }

        Assert.ThrowsExactly<CublasUnavailableException>(() => new CublasLtHandle(null!));
    }

    [TestMethod]
    [DataRow(0, "CUBLAS_STATUS_SUCCESS")]
    [DataRow(1, "CUBLAS_STATUS_NOT_INITIALIZED")]
    [DataRow(3, "CUBLAS_STATUS_ALLOC_FAILED")]
    [DataRow(7, "CUBLAS_STATUS_INVALID_VALUE")]
    [DataRow(8, "CUBLAS_STATUS_ARCH_MISMATCH")]
    [DataRow(11, "CUBLAS_STATUS_MAPPING_ERROR")]
    [DataRow(13, "CUBLAS_STATUS_EXECUTION_FAILED")]
    [DataRow(14, "CUBLAS_STATUS_INTERNAL_ERROR")]
    [DataRow(15, "CUBLAS_STATUS_NOT_SUPPORTED")]
    [DataRow(16, "CUBLAS_STATUS_LICENSE_ERROR")]
    [DataRow(42, "cublasStatus_t 42")]
    public void StatusNamesAreTheHeaderNames(int code, string name) => Assert.AreEqual(name, CublasCheck.Name((CublasStatus)code));

    [TestMethod]
    public void CheckThrowsATypedExceptionWithNameCodeCallAndDevice()
    {
        CublasCheck.Check(CublasStatus.Success);
        var e = Assert.ThrowsExactly<CublasException>(() => CublasCheck.Check(CublasStatus.NotSupported, "cublasLt", 2));
        Assert.IsInstanceOfType<CudaException>(e, "callers catching CudaException see cuBLAS failures too");
        Assert.AreEqual(CublasStatus.NotSupported, e.Status);
        Assert.AreEqual("CUBLAS_STATUS_NOT_SUPPORTED", e.ErrorName);
        Assert.AreEqual(15, e.Code);
        Assert.AreEqual("cublasLt", e.Api);
        Assert.AreEqual(2, e.Device);
        Assert.AreEqual("CublasStatus.NotSupported", e.Call, "the call text comes from CallerArgumentExpression");
        StringAssert.StartsWith(e.Message, "CUBLAS_STATUS_NOT_SUPPORTED (15): ");
        StringAssert.EndsWith(e.Message, "in cublasLt call `CublasStatus.NotSupported` on device 2");
    }

    [TestMethod]
    public void ReleaseToleratesALibraryThatIsGoneButNotOtherErrors()
    {
        CublasCheck.Release(CublasStatus.Success);
        CublasCheck.Release(CublasStatus.NotInitialized);
        Assert.ThrowsExactly<CublasException>(() => CublasCheck.Release(CublasStatus.InvalidValue));
    }

    [TestMethod]
    public void HeuristicResultHasTheHeaderLayout()
    {
        // uint64 algo[8] (64) + size_t workspaceSize (8) + status (4) + float waves (4) + int reserved[4] (16).
        Assert.AreEqual(96, Unsafe.SizeOf<CublasLtHeuristicResult>());
    }

    [TestMethod]
    public void LinearMapsToTheTnCallWithRowLengthsAsLeadingDimensions()
    {
        var g = ColumnMajorGemm.ForLinear(m: 3, n: 5, k: 7);
        Assert.AreEqual(new ColumnMajorGemm(CublasOperation.T, CublasOperation.N, M: 5, N: 3, K: 7, Lda: 7, Ldb: 7, Ldc: 5), g);
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => ColumnMajorGemm.ForLinear(0, 5, 7));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => ColumnMajorGemm.ForLinear(3, -1, 7));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => ColumnMajorGemm.ForLinear(3, 5, 0));
    }

    [TestMethod]
    [DataRow(1, 1, 1)]
    [DataRow(1, 9, 4)]
    [DataRow(3, 5, 7)]
    [DataRow(8, 3, 16)]
    [DataRow(17, 12, 33)]
    public void LinearMappingComputesXWtOnRowMajorBuffers(int m, int n, int k)
    {
        // Small integers keep every sum exact in float, so the comparison is exact.
        var r = new Random(m * 100 + n * 10 + k);
        var x = Enumerable.Range(0, m * k).Select(_ => (float)r.Next(-4, 5)).ToArray(); // row-major [m,k]
        var w = Enumerable.Range(0, n * k).Select(_ => (float)r.Next(-4, 5)).ToArray(); // row-major [n,k]
        var expected = new float[m * n];
        for (var t = 0; t < m; t++)
        {
            for (var o = 0; o < n; o++)
            {
                for (var c = 0; c < k; c++)
                {
                    expected[t * n + o] += x[t * k + c] * w[o * k + c];
                }
            }
        }

        var g = ColumnMajorGemm.ForLinear(m, n, k);
        var y = Enumerable.Repeat(float.NaN, m * n).ToArray();
        ColumnMajorReference(g, a: w, b: x, c: y); // A is the weight, B the activations
        CollectionAssert.AreEqual(expected, y);
    }

    [TestMethod]
    public void Fp8ShapeRules()
    {
        foreach (var (n, k) in Fp8GemmKernel.DeepSeekV3Shapes)
        {
            foreach (var scaling in new[] { Fp8Scaling.Block, Fp8Scaling.Tensor })
            {
                Assert.IsNull(CublasLtHandle.Fp8Unsupported(1, n, k, scaling), $"N={n} K={k} {scaling}");
            }
        }

        Assert.IsNull(CublasLtHandle.Fp8Unsupported(1, 129280, 7168, Fp8Scaling.Block), "lm_head shape");
        StringAssert.Contains(CublasLtHandle.Fp8Unsupported(1, 304, 200, Fp8Scaling.Tensor), "K=200 is not a multiple of 16");
        StringAssert.Contains(CublasLtHandle.Fp8Unsupported(1, 300, 208, Fp8Scaling.Tensor), "N=300 is not a multiple of 8");
        StringAssert.Contains(CublasLtHandle.Fp8Unsupported(1, 2048, 640, Fp8Scaling.Block), "ceil(K/128)=5 is not a multiple of 4");
        Assert.IsNull(CublasLtHandle.Fp8Unsupported(1, 2048, 640, Fp8Scaling.Tensor), "per-tensor scales have no block layout");
        StringAssert.Contains(CublasLtHandle.Fp8Unsupported(0, 2048, 512, Fp8Scaling.Tensor), "empty shape");
    }

    [TestMethod]
    [DataRow(120900L, nameof(Fp8Scaling.Block), "cublaslt_fp8_block")]
    [DataRow(120903L, nameof(Fp8Scaling.Block), "cublaslt_fp8_block")]
    [DataRow(130100L, nameof(Fp8Scaling.Block), "cublaslt_fp8_block")]
    [DataRow(120805L, nameof(Fp8Scaling.Tensor), "cublaslt_fp8_tensor")]
    [DataRow(110000L, nameof(Fp8Scaling.Tensor), "cublaslt_fp8_tensor")]
    public void BlockScalingFromCublasLt129(long version, string scalingName, string baseline)
    {
        var scaling = Enum.Parse<Fp8Scaling>(scalingName);
        Assert.AreEqual(scaling, CublasLtHandle.ScalingFor(version));
        Assert.AreEqual(baseline, CublasLtHandle.BaselineName(CublasLtHandle.ScalingFor(version)));
    }

    [TestMethod]
    public void ActivationScalesGoTokenMajor()
    {
        const int m = 3, kb = 4;
        var scales = Enumerable.Range(0, m * kb).Select(i => (float)i).ToArray(); // [t, b] = t*kb + b
        var tokenMajor = new float[m * kb];
        CublasLtHandle.ToTokenMajor(scales, m, kb, tokenMajor);
        for (var t = 0; t < m; t++)
        {
            for (var b = 0; b < kb; b++)
            {
                Assert.AreEqual(t * kb + b, tokenMajor[b * m + t], $"t={t} b={b}");
            }
        }

        Assert.ThrowsExactly<ArgumentException>(() => CublasLtHandle.ToTokenMajor(scales, m, kb + 1, new float[m * (kb + 1)]));
    }

    /// <summary>BLAS semantics, written from the definition: C(i,j) = Σ_l op(A)(i,l)·op(B)(l,j), column-major.</summary>
    private static void ColumnMajorReference(ColumnMajorGemm g, float[] a, float[] b, float[] c)
    {
        float OpA(int i, int l) => g.TransA == CublasOperation.N ? a[i + l * g.Lda] : a[l + i * g.Lda];
        float OpB(int l, int j) => g.TransB == CublasOperation.N ? b[l + j * g.Ldb] : b[j + l * g.Ldb];
        for (var i = 0; i < g.M; i++)
        {
            for (var j = 0; j < g.N; j++)
            {
                float sum = 0;
                for (var l = 0; l < g.K; l++)
                {
                    sum += OpA(i, l) * OpB(l, j);
                }

                c[i + j * g.Ldc] = sum;
            }
        }
    }
}
