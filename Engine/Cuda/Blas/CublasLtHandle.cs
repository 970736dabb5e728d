using DeepSeekCuda.Cuda.Native;

namespace DeepSeekCuda.Cuda.Blas;

/// <summary>How the FP8 inputs of <see cref="CublasLtHandle.MatmulFp8"/> are scaled.</summary>
internal enum Fp8Scaling
{
    /// <summary>One float per tensor (A/B_SCALE_POINTER, every cuBLASLt with FP8): bench name <c>cublaslt_fp8_tensor</c>.</summary>
    Tensor,

    /// <summary>
    /// DeepSeek-V3's scaling: one float per 128 activation channels of each token (VEC128_32F) and one per
    /// 128×128 weight block (BLK128x128_32F), cuBLASLt 12.9+ on Hopper: bench name <c>cublaslt_fp8_block</c>.
    /// </summary>
    Block,
}

/// <summary>
/// A cuBLASLt handle on one device, for the FP8 GEMM baseline of <c>run-bench gemm</c> and tests (the engine
/// never calls it). Owns a workspace and caches one plan (descriptors, layouts, heuristic algorithm) per
/// shape and scaling, so a timed call costs only attribute sets and <c>cublasLtMatmul</c>. Not thread-safe.
/// </summary>
internal sealed unsafe class CublasLtHandle : IDisposable
{
    /// <summary>Workspace offered to cuBLASLt (its recommendation for Hopper).</summary>
    public const long WorkspaceBytes = 32L << 20;

    /// <summary>The first cuBLASLt version with VEC128_32F / BLK128x128_32F scale modes (12.9.0).</summary>
    public const long BlockScalingVersion = 120900;

    private const string Api = "cublasLt";
    private const int Block = 128;

    private readonly Dictionary<(int M, int N, int K, Fp8Scaling Scaling), Plan> _plans = [];
    private readonly DeviceBuffer<byte> _workspace;
    private IntPtr _handle;

    /// <summary>Creates a handle and its workspace on <paramref name="device"/>.</summary>
    public CublasLtHandle(CudaDevice device)
    {
        NativeLibraries.RequireCublasLt();
        Device = device;
        device.MakeCurrent();
        Version = (long)CublasLtApi.cublasLtGetVersion();
        IntPtr h;
        CublasCheck.Check(CublasLtApi.cublasLtCreate(&h), Api, device.Ordinal);
        _handle = h;
        _workspace = DeviceBuffer<byte>.Allocate(device, WorkspaceBytes);
    }

    /// <summary>The owning device.</summary>
    public CudaDevice Device { get; }

    /// <summary>cublasLtGetVersion(): major·10000 + minor·100 + patch, e.g. 120903.</summary>
    public long Version { get; }

    /// <summary>The file cuBLASLt was loaded from.</summary>
    public static string? LibraryPath => NativeLibraries.CublasLtPath;

    /// <summary>The scaling this library offers for DeepSeek-V3's FP8: block scaling from 12.9, else per tensor.</summary>
    public Fp8Scaling PreferredScaling => ScalingFor(Version);

    /// <summary>Block scaling where <paramref name="version"/> (cublasLtGetVersion) is 12.9.0 or newer, else per tensor.</summary>
    public static Fp8Scaling ScalingFor(long version) => version >= BlockScalingVersion ? Fp8Scaling.Block : Fp8Scaling.Tensor;

    /// <summary>The bench's name of a baseline: <c>cublaslt_fp8_block</c> or <c>cublaslt_fp8_tensor</c>.</summary>
    public static string BaselineName(Fp8Scaling scaling) => scaling == Fp8Scaling.Block ? "cublaslt_fp8_block" : "cublaslt_fp8_tensor";

    /// <summary>Scale blocks along <paramref name="n"/> elements.</summary>
    public static int BlocksFor(int n) => (n + Block - 1) / Block;

    /// <summary>
    /// Why <see cref="MatmulFp8"/> cannot take this shape with the layouts it promises, or null when it can.
    /// FP8 cuBLASLt needs 16-byte aligned rows (K a multiple of 16) and a 16-byte aligned BF16 output row
    /// (N a multiple of 8). Block scaling reads the weight scales as a K-block-major matrix whose leading
    /// dimension must be a multiple of 4 floats (PyTorch pads it to that for the same call); the checkpoint's
    /// unpadded [ceil(N/128), ceil(K/128)] layout is accepted only where ceil(K/128) already is (every
    /// DeepSeek-V3 K is). cuBLASLt may still refuse a shape (no algorithm): that surfaces as
    /// <see cref="CublasException"/> with CUBLAS_STATUS_NOT_SUPPORTED.
    /// </summary>
    public static string? Fp8Unsupported(int m, int n, int k, Fp8Scaling scaling)
    {
        if (m <= 0 || n <= 0 || k <= 0)
        {
            return $"empty shape M={m} N={n} K={k}";
        }

        if (k % 16 != 0)
        {
            return $"K={k} is not a multiple of 16 (FP8 rows must be 16-byte aligned)";
        }

        if (n % 8 != 0)
        {
            return $"N={n} is not a multiple of 8 (BF16 output rows must be 16-byte aligned)";
        }

        if (scaling == Fp8Scaling.Block && BlocksFor(k) % 4 != 0)
        {
            return $"ceil(K/128)={BlocksFor(k)} is not a multiple of 4 (leading dimension of the 128x128 weight scales)";
        }

        return null;
    }

    /// <summary>
    /// Rewrites activation scales from ActQuantKernel's layout [m, kb] (row-major, a token's blocks
    /// contiguous) into the [kb, m] layout block scaling reads (a block's tokens contiguous).
    /// </summary>
    public static void ToTokenMajor(ReadOnlySpan<float> scales, int m, int kb, Span<float> destination)
    {
        if (scales.Length < (long)m * kb || destination.Length < (long)m * kb)
        {
            throw new ArgumentException($"need {(long)m * kb} scales for m={m}, kb={kb}");
        }

        for (var t = 0; t < m; t++)
        {
            for (var b = 0; b < kb; b++)
            {
                destination[b * m + t] = scales[t * kb + b];
            }
        }
    }

    /// <summary>
    /// <c>y[m,n] = (x[m,k] · xScale) · (w[n,k] · wScale)ᵀ</c>: e4m3 inputs, FP32 accumulation, BF16 output, all
    /// row-major and dense, queued on <paramref name="stream"/> (column-major mapping:
    /// <see cref="ColumnMajorGemm.ForLinear"/>; cuBLASLt's A is the weight, B the activations).
    /// <para>Scales (float, device memory, each multiplies its dequantized values):</para>
    /// <list type="bullet">
    /// <item><see cref="Fp8Scaling.Tensor"/>: <paramref name="xScales"/> and <paramref name="wScales"/> each point at one float.</item>
    /// <item><see cref="Fp8Scaling.Block"/>: <paramref name="wScales"/> is the checkpoint's weight_scale_inv
    /// [ceil(n/128), ceil(k/128)] row-major; <paramref name="xScales"/> is [ceil(k/128), m] with the tokens
    /// contiguous (entry (t, b) at b·m + t), i.e. the transpose of what ActQuantKernel writes
    /// (<see cref="ToTokenMajor"/>).</item>
    /// </list>
    /// Throws <see cref="ArgumentException"/> for shapes <see cref="Fp8Unsupported"/> names and
    /// <see cref="CublasException"/> when cuBLASLt has no algorithm (CUBLAS_STATUS_NOT_SUPPORTED) or fails.
    /// </summary>
    public void MatmulFp8(CudaStream stream, ulong x, ulong xScales, ulong w, ulong wScales, ulong y, int m, int n, int k, Fp8Scaling scaling)
    {
        if (Fp8Unsupported(m, n, k, scaling) is { } reason)
        {
            throw new ArgumentException($"cuBLASLt FP8 ({scaling}) M={m} N={n} K={k}: {reason}");
        }

        if (((x | w | y) & 15) != 0)
        {
            throw new ArgumentException("cuBLASLt FP8: x, w and y must be 16-byte aligned");
        }

        var h = Handle;
        var plan = PlanFor(m, n, k, scaling, xScales, wScales);
        SetScalePointers(plan.Desc, xScales, wScales);
        float alpha = 1f, beta = 0f;
        var result = plan.Heuristic;
        CublasCheck.Check(CublasLtApi.cublasLtMatmul(h, plan.Desc, &alpha, w, plan.A, x, plan.B, &beta, y, plan.D, y, plan.D,
            result.Algo, _workspace.Pointer, (nuint)WorkspaceBytes, stream.Handle), Api, Device.Ordinal);
    }

    /// <inheritdoc />
    public void Dispose()
    {
        foreach (var plan in _plans.Values)
        {
            plan.Dispose();
        }

        _plans.Clear();
        if (_handle != IntPtr.Zero)
        {
            var h = _handle;
            _handle = IntPtr.Zero;
            CublasCheck.Release(CublasLtApi.cublasLtDestroy(h), Api, Device.Ordinal);
        }

        _workspace.Dispose();
    }

    private IntPtr Handle => _handle != IntPtr.Zero ? _handle : throw new ObjectDisposedException(nameof(CublasLtHandle));

    private static void SetScalePointers(IntPtr desc, ulong xScales, ulong wScales)
    {
        // A is the weight, B the activations (see ColumnMajorGemm.ForLinear).
        CublasCheck.Check(CublasLtApi.cublasLtMatmulDescSetAttribute(desc, CublasLtMatmulDescAttribute.AScalePointer, &wScales, sizeof(ulong)), Api);
        CublasCheck.Check(CublasLtApi.cublasLtMatmulDescSetAttribute(desc, CublasLtMatmulDescAttribute.BScalePointer, &xScales, sizeof(ulong)), Api);
    }

    private Plan PlanFor(int m, int n, int k, Fp8Scaling scaling, ulong xScales, ulong wScales)
    {
        if (_plans.TryGetValue((m, n, k, scaling), out var cached))
        {
            return cached;
        }

        var plan = new Plan();
        try
        {
            var g = ColumnMajorGemm.ForLinear(m, n, k);
            IntPtr desc, a, b, d, pref;
            CublasCheck.Check(CublasLtApi.cublasLtMatmulDescCreate(&desc, CublasComputeType.Compute32F, CudaDataType.R32F), Api, Device.Ordinal);
            plan.Desc = desc;
            int transA = (int)g.TransA, transB = (int)g.TransB;
            CublasCheck.Check(CublasLtApi.cublasLtMatmulDescSetAttribute(desc, CublasLtMatmulDescAttribute.TransA, &transA, sizeof(int)), Api, Device.Ordinal);
            CublasCheck.Check(CublasLtApi.cublasLtMatmulDescSetAttribute(desc, CublasLtMatmulDescAttribute.TransB, &transB, sizeof(int)), Api, Device.Ordinal);
            if (scaling == Fp8Scaling.Block)
            {
                // Only set where asked for: cuBLASLt before 12.8 does not know these attributes.
                int aMode = (int)CublasLtMatrixScale.Blk128x128_32F, bMode = (int)CublasLtMatrixScale.Vec128_32F;
                CublasCheck.Check(CublasLtApi.cublasLtMatmulDescSetAttribute(desc, CublasLtMatmulDescAttribute.AScaleMode, &aMode, sizeof(int)), Api, Device.Ordinal);
                CublasCheck.Check(CublasLtApi.cublasLtMatmulDescSetAttribute(desc, CublasLtMatmulDescAttribute.BScaleMode, &bMode, sizeof(int)), Api, Device.Ordinal);
            }

            SetScalePointers(desc, xScales, wScales);

            // Layouts describe the matrices as stored: A = Wᵀ [k,n] (ld k), B = Xᵀ [k,m] (ld k), D = Yᵀ [n,m] (ld n).
            CublasCheck.Check(CublasLtApi.cublasLtMatrixLayoutCreate(&a, CudaDataType.R8FE4M3, (ulong)g.K, (ulong)g.M, g.Lda), Api, Device.Ordinal);
            plan.A = a;
            CublasCheck.Check(CublasLtApi.cublasLtMatrixLayoutCreate(&b, CudaDataType.R8FE4M3, (ulong)g.K, (ulong)g.N, g.Ldb), Api, Device.Ordinal);
            plan.B = b;
            CublasCheck.Check(CublasLtApi.cublasLtMatrixLayoutCreate(&d, CudaDataType.R16BF, (ulong)g.M, (ulong)g.N, g.Ldc), Api, Device.Ordinal);
            plan.D = d;

            CublasCheck.Check(CublasLtApi.cublasLtMatmulPreferenceCreate(&pref), Api, Device.Ordinal);
            try
            {
                ulong workspace = WorkspaceBytes;
                CublasCheck.Check(CublasLtApi.cublasLtMatmulPreferenceSetAttribute(pref, CublasLtPreferenceAttribute.MaxWorkspaceBytes, &workspace, sizeof(ulong)), Api, Device.Ordinal);
                CublasLtHeuristicResult result;
                int count;
                CublasCheck.Check(CublasLtApi.cublasLtMatmulAlgoGetHeuristic(Handle, desc, a, b, d, d, pref, 1, &result, &count), Api, Device.Ordinal);
                if (count < 1 || result.State != CublasStatus.Success)
                {
                    throw new CublasException(Api, CublasStatus.NotSupported,
                        $"cublasLtMatmulAlgoGetHeuristic: no algorithm for FP8 {scaling} M={m} N={n} K={k} (cuBLASLt {Version})", Device.Ordinal);
                }

                plan.Heuristic = result;
            }
            finally
            {
                CublasCheck.Release(CublasLtApi.cublasLtMatmulPreferenceDestroy(pref), Api, Device.Ordinal);
            }
        }
        catch
        {
            plan.Dispose();
            throw;
        }

        _plans[(m, n, k, scaling)] = plan;
        return plan;
    }

    private sealed class Plan : IDisposable
    {
        public IntPtr Desc;
        public IntPtr A;
        public IntPtr B;
        public IntPtr D;
        public CublasLtHeuristicResult Heuristic;

        public void Dispose()
        {
            // Layouts and descriptors are host objects: destroying them cannot meet a gone context.
            foreach (var layout in new[] { A, B, D })
            {
                if (layout != IntPtr.Zero)
                {
                    CublasCheck.Release(CublasLtApi.cublasLtMatrixLayoutDestroy(layout), Api);
                }
            }

            if (Desc != IntPtr.Zero)
            {
                CublasCheck.Release(CublasLtApi.cublasLtMatmulDescDestroy(Desc), Api);
            }

            A = B = D = Desc = IntPtr.Zero;
        }
    }
}
