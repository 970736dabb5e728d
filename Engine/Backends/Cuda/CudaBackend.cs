using System.Globalization;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using DeepSeekCuda.Cuda;
using DeepSeekCuda.Kernels;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Numerics;
using DeepSeekCuda.Loading;
using CudaRt = DeepSeekCuda.Cuda.Cuda;

namespace DeepSeekCuda.Backends.Cuda;

/// <summary>Options of <see cref="CudaBackend"/>.</summary>
public sealed record CudaBackendOptions
{
    /// <summary>The CUDA device ordinal.</summary>
    public int Device { get; init; }

    /// <summary>Tokens per MoE launch: longer calls run in chunks of this many (rows are independent; sizes the MoE buffers).</summary>
    public int MaxMoeTokens { get; init; } = 512;

    /// <summary>The compiled-kernel cache folder; null for <see cref="KernelCache.DefaultDirectory"/>.</summary>
    public string? KernelCacheDirectory { get; init; }

    /// <summary>
    /// On Hopper (sm_90a), run the FP8 linears and the MoE experts on the wgmma + TMA kernels (Kernels/fp8_gemm_wgmma.cu:
    /// decode variant up to 64 rows, prefill above; Kernels/moe_grouped_gemm_wgmma.cu) instead of the gemv and mma.sync
    /// kernels. Off by default: no GPU has yet confirmed them against the CPU reference. Ignored on other GPUs and for
    /// shapes they cannot run (K not a multiple of 16).
    /// </summary>
    public bool HopperFp8Gemm { get; init; }

    /// <summary>
    /// Run the BF16 products on the mma.sync tensor-core GEMM (Kernels/bf16_gemm_mma.cu, sm_80 and later): lm_head for
    /// more than 4 rows, the router logits (then routed from them), and MLA's fold and unfold as one GEMM per head,
    /// instead of the CUDA-core kernels that read their weights once per 1-8 rows. Off by default: no GPU has yet
    /// confirmed the kernel against the CPU reference. Shapes it cannot run (K not a multiple of 8) stay on the
    /// CUDA-core kernels.
    /// </summary>
    public bool TensorCoreBf16Gemm { get; init; }

    /// <summary>
    /// Store activations as BF16, as DESIGN.md says, instead of f32 storage holding BF16 values: half the activation traffic,
    /// and no rounding passes (every kernel writes its BF16 output itself, and the MLA prefill kernel reads and writes the
    /// activations in place of converted copies). The values are the same either way. Logits stay f32. Off by default: no
    /// GPU has yet confirmed it against the CPU reference.
    /// </summary>
    public bool Bf16Activations { get; init; }
}

/// <summary>
/// <see cref="IBackend"/> on one CUDA device and one stream, composed from the kernel launchers of
/// <c>Engine/Kernels</c>. Numerics are those of <see cref="Cpu.CpuBackend"/> in
/// <see cref="Cpu.CpuNumerics.GpuEmulation"/>, its tight reference:
/// <list type="bullet">
/// <item><b>Activations</b> hold BF16 values: in <b>BF16 storage</b> with <see cref="CudaBackendOptions.Bf16Activations"/>,
/// else in <b>f32 storage</b>, where every operation rounds its output to BF16 values exactly where the CPU emulation does
/// (its <c>Store</c>: embedding, norms, linears, SiLU·up, RoPE, attention outputs, MoE output, the residual). Either way
/// <see cref="Upload"/> rounds an activation's values to BF16 (as the emulation's upload), and logits
/// (<see cref="TensorKind.Logits"/>) and routing stay fp32 and are never rounded. Internal operands of the MLA kernels
/// (q_abs, the gathered latents, decompressed k/v, the paged cache; in f32 storage also q and the attention output of
/// the prefill kernel) are BF16 scratch.</item>
/// <item><b>Weights</b>: FP8 linears stay e4m3 codes + fp32 128x128 block scales (raw checkpoint bytes); their
/// GEMM quantizes the activation per token per 128 channels (<see cref="ActQuantKernel"/>, fp32 scales) as the
/// emulation does. BF16 linears (lm_head, BF16 checkpoints) run through <see cref="Bf16GemmKernel"/> (fp32
/// accumulation; with <see cref="CudaBackendOptions.TensorCoreBf16Gemm"/>, on tensor cores above 4 rows) and are never
/// converted to FP8. Norm, embedding and gate weights are BF16 on the device: a
/// checkpoint tensor whose values are not exactly BF16 is refused (<see cref="NotSupportedException"/>) rather
/// than silently rounded.</item>
/// <item><b>MLA</b>: <see cref="MlaAttentionAbsorbed"/> uses the decode kernel (fold, split-KV decode, unfold) for
/// T ≤ 2 query rows, and the prefill kernel (naive form, the same result in exact arithmetic) above; its kv_b is a
/// BF16 dequantized copy (e4m3 × scale rounded to BF16) where the emulation keeps it fp32, and the absorbed path's
/// latent sum reaches the unfold unrounded (fp32) where the emulation rounds it: both are small, documented
/// differences inside the end-to-end bound. <see cref="MlaAttentionNaive"/> always uses the prefill kernel.</item>
/// <item><b>MoE</b>: routed experts must be FP8 (the grouped GEMM's format); they are stacked at upload. Under expert
/// parallelism the stack holds only this device's experts, with an expert map from the routing's global ids
/// (<see cref="MoeExpertStack.ExpertMap"/>).</item>
/// </list>
/// Calls are asynchronous on the stream; <see cref="Download"/> and <see cref="DownloadRouting"/> wait. Calls from several
/// threads are serialized (one lock): the backend is safe to share, not parallel.
/// </summary>
public sealed class CudaBackend : IBackend
{
    private readonly CudaDevice _device;
    private readonly CudaStream _stream;
    private readonly NvrtcCompiler _compiler;
    private readonly CudaBackendOptions _options;
    private readonly EmbeddingKernel _embedding;
    private readonly RmsNormKernel _norm;
    private readonly ActQuantKernel _quant;
    private readonly Fp8GemmKernel _fp8;
    private readonly Bf16GemmKernel _bf16;
    private readonly Bf16MmaKernel? _mma;
    private readonly SiluMulKernel _siluMul;
    private readonly RopeKernel _rope;
    private readonly BackendGlueKernel _glue;
    private readonly MoeGateKernel _gate;
    private readonly MlaCacheKernel _cache;
    private readonly MlaDecodeKernel _decode;
    private readonly MlaPrefillKernel _prefill;
    private readonly SamplingKernel _sampling;
    private readonly Dictionary<(int E, int Slots, int H, int I, int S, int K), MoeLayer> _moe = [];
    private CudaStagingCopier? _staging;
    private readonly Scratch _ints, _codes, _scales, _qAbs, _outLatent, _lse, _workspace, _latent, _kv, _qBf16, _outBf16, _kvCodes, _kvScales, _logits;
    private readonly Scratch[] _scratch;
    private readonly Lock _sync = new();
    private readonly bool _ownsStream;
    private bool _disposed;
    private bool _capturing;   // a graph is being captured (by the thread holding the lock)
    private int _recorded;     // operations recorded so far in the capture
    private int _liveGraphs;   // graphs captured and not yet disposed

    /// <summary>
    /// Opens the device, creates the stream and the NVRTC compiler (kernels compile on first use, through the disk cache).
    /// </summary>
    /// <exception cref="CudaUnavailableException">No usable CUDA device or driver, or NVRTC cannot be loaded (the reason says which).</exception>
    public CudaBackend(CudaBackendOptions? options = null)
        : this(options, null)
    {
    }

    /// <summary>
    /// A backend that queues its work on <paramref name="stream"/> (borrowed, not disposed: a <see cref="Distributed.DeviceMesh"/>
    /// rank's stream, so the rank's collectives follow its compute in one queue), or on a stream of its own when null.
    /// </summary>
    internal CudaBackend(CudaBackendOptions? options, CudaStream? stream)
    {
        _options = options ?? new CudaBackendOptions();
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(_options.MaxMoeTokens);
        if (!IsSupported(out var reason))
        {
            throw new CudaUnavailableException(reason);
        }

        _device = CudaDevice.Open(_options.Device);
        try
        {
            if (stream is not null && stream.Device.Handle != _device.Handle)
            {
                throw new ArgumentException($"the stream belongs to device {stream.Device.Ordinal}, the backend to device {_device.Ordinal}", nameof(stream));
            }

            _ownsStream = stream is null;
            _stream = stream ?? new CudaStream(_device);
        }
        catch
        {
            _device.Dispose();
            throw;
        }

        _compiler = new NvrtcCompiler(cache: new KernelCache(_options.KernelCacheDirectory ?? KernelCache.DefaultDirectory));
        _embedding = new EmbeddingKernel(_device, _compiler);
        _norm = new RmsNormKernel(_device, _compiler);
        _quant = new ActQuantKernel(_device, _compiler);
        _fp8 = new Fp8GemmKernel(_device, _compiler, _options.HopperFp8Gemm);
        _mma = _options.TensorCoreBf16Gemm ? new Bf16MmaKernel(_device, _compiler) : null;
        _bf16 = new Bf16GemmKernel(_device, _compiler, _mma);
        _siluMul = new SiluMulKernel(_device, _compiler);
        _rope = new RopeKernel(_device, _compiler);
        _glue = new BackendGlueKernel(_device, _compiler);
        _gate = new MoeGateKernel(_device, _compiler, _mma);
        _cache = new MlaCacheKernel(_device, _compiler);
        _decode = new MlaDecodeKernel(_device, _compiler, _mma);
        _prefill = new MlaPrefillKernel(_device, _compiler);
        _sampling = new SamplingKernel(_device, _compiler);
        _scratch =
        [
            _ints = new Scratch(this), _codes = new Scratch(this), _scales = new Scratch(this), _qAbs = new Scratch(this),
            _outLatent = new Scratch(this), _lse = new Scratch(this), _workspace = new Scratch(this), _latent = new Scratch(this),
            _kv = new Scratch(this), _qBf16 = new Scratch(this), _outBf16 = new Scratch(this), _kvCodes = new Scratch(this), _kvScales = new Scratch(this),
            _logits = new Scratch(this),
        ];
    }

    /// <summary>
    /// Whether a CUDA backend can be created here: the driver reports a device and NVRTC loads. Asked without
    /// throwing; <paramref name="reason"/> says why not.
    /// </summary>
    public static bool IsSupported(out string reason)
    {
        if (!CudaRt.IsAvailable)
        {
            reason = $"CUDA unavailable: {CudaRt.UnavailableReason}";
            return false;
        }

        if (!NvrtcCompiler.IsAvailable(out var nvrtc))
        {
            reason = $"NVRTC unavailable: {nvrtc}";
            return false;
        }

        reason = "";
        return true;
    }

    /// <inheritdoc />
    public string Name =>
        $"cuda:{_device.Ordinal} {_device.Name} ({(_options.Bf16Activations ? "bf16 activations" : "f32 storage of bf16 values")}, fp8 activations)";

    /// <summary>The device.</summary>
    internal CudaDevice Device => _device;

    /// <summary>The stream every operation is queued on.</summary>
    internal CudaStream Stream => _stream;

    /// <summary>Whether <paramref name="tensor"/> is a tensor of this backend (allocated on its device).</summary>
    internal bool Holds(Tensor tensor) => tensor is CudaTensor t && t.Buffer.Device == _device;

    /// <summary>The device address of a tensor's storage and its element type (for collectives on the tensor's own device).</summary>
    internal static (ulong Pointer, ElementType Type) StorageOf(Tensor tensor)
    {
        var t = T(tensor);
        return (t.Pointer, t.Type);
    }

    /// <summary>
    /// Rounds an activation in f32 storage to BF16 values after work that wrote it unrounded (a collective's f32 sum), queued on
    /// the stream; nothing for BF16 storage or logits.
    /// </summary>
    internal void RoundActivation(Tensor tensor)
    {
        using var scope = Enter(recordable: true);
        RoundStored(T(tensor));
    }

    /// <summary>Waits for the queued work.</summary>
    public void Synchronize()
    {
        using var scope = Enter();
        _stream.Synchronize();
    }

    /// <summary>Frees the backend's scratch and MoE buffers and its weight staging (they come back on demand).</summary>
    public void Trim()
    {
        using var scope = Enter();
        if (_liveGraphs > 0)
        {
            throw new InvalidOperationException($"{_liveGraphs} step graphs still point into the scratch memory: dispose them before trimming");
        }

        TrimCore();
    }

    private void TrimCore()
    {
        _stream.Synchronize();
        foreach (var s in _scratch)
        {
            s.Free();
        }

        foreach (var m in _moe.Values)
        {
            m.Dispose();
        }

        _moe.Clear();
        _staging?.Dispose();
        _staging = null;
    }

    /// <inheritdoc />
    public void Dispose()
    {
        using var scope = _sync.EnterScope();
        if (_disposed)
        {
            return;
        }

        _disposed = true;
        _device.MakeCurrent();
        try
        {
            TrimCore();
        }
        catch (CudaException)
        {
            // A failed launch leaves a sticky error: free what can be freed anyway.
            foreach (var s in _scratch)
            {
                s.Free();
            }

            _staging?.Dispose();
        }

        foreach (var l in new IDisposable?[] { _embedding, _norm, _quant, _fp8, _bf16, _mma, _siluMul, _rope, _glue, _gate, _cache, _decode, _prefill, _sampling })
        {
            l?.Dispose();
        }

        if (_ownsStream)
        {
            _stream.Dispose();
        }

        _device.Dispose();
    }

    // ---------------------------------------------------------------- memory

    /// <inheritdoc />
    public Tensor Allocate(int rows, int cols, TensorKind kind = TensorKind.Activation)
    {
        using var scope = Enter();
        var t = NewTensor(rows, cols, kind);
        try
        {
            if (t.Length > 0)
            {
                t.Buffer.Fill8(0, _stream);
            }
        }
        catch
        {
            t.Dispose();
            throw;
        }

        return t;
    }

    /// <inheritdoc />
    public Tensor Upload(ReadOnlySpan<float> values, int rows, int cols, TensorKind kind = TensorKind.Activation)
    {
        using var scope = Enter();
        if (values.Length != (long)rows * cols)
        {
            throw new ArgumentException($"{values.Length} values for a [{rows}, {cols}] tensor", nameof(values));
        }

        var t = NewTensor(rows, cols, kind);
        try
        {
            if (t.Type == ElementType.BF16)
            {
                var bits = new ushort[values.Length];
                BFloat16.Encode(values, bits);
                t.Buffer.Upload(MemoryMarshal.AsBytes(bits.AsSpan()), _stream);
            }
            else if (kind == TensorKind.Activation)
            {
                var rounded = values.ToArray();
                BFloat16.Round(rounded);
                t.Buffer.Upload(MemoryMarshal.AsBytes(rounded.AsSpan()), _stream);
            }
            else
            {
                t.Buffer.Upload(MemoryMarshal.AsBytes(values), _stream);
            }
        }
        catch
        {
            t.Dispose();
            throw;
        }

        return t;
    }

    /// <inheritdoc />
    public void Download(Tensor tensor, Span<float> destination)
    {
        using var scope = Enter();
        var t = T(tensor);
        if (destination.Length < t.Length)
        {
            throw new ArgumentException($"destination holds {destination.Length} values; {t} has {t.Length}", nameof(destination));
        }

        if (t.Type == ElementType.BF16)
        {
            var bits = new ushort[t.Length];
            t.Buffer.Download(MemoryMarshal.AsBytes(bits.AsSpan()), _stream);
            BFloat16.Decode(bits, destination);
        }
        else
        {
            t.Buffer.Download(MemoryMarshal.AsBytes(destination[..(int)t.Length]), _stream);
        }
    }

    /// <summary>A tensor of <paramref name="kind"/> in its storage type: logits f32; activations BF16 or f32 as the options say.</summary>
    private CudaTensor NewTensor(int rows, int cols, TensorKind kind) =>
        new(_device, rows, cols, kind, kind == TensorKind.Activation && _options.Bf16Activations ? ElementType.BF16 : ElementType.F32);

    /// <inheritdoc />
    public void CopyRows(Tensor source, int sourceRow, Tensor destination, int destinationRow, int count)
    {
        using var scope = Enter(recordable: true);
        CudaTensor s = T(source), d = T(destination);
        ShapeCheck.CopyRows(s, sourceRow, d, destinationRow, count);
        _glue.Copy(_stream, s.Matrix.Slice(sourceRow, count), d.Matrix.Slice(destinationRow, count));
    }

    /// <inheritdoc />
    /// <remarks>cuMemGetInfo on the backend's device: what every allocation on it so far, of this process or another, left free.</remarks>
    public DeviceMemory? Memory()
    {
        using var scope = Enter();
        var (free, total) = _device.MemoryInfo();
        return new DeviceMemory(free, total, "cuda:" + _device.Ordinal.ToString(CultureInfo.InvariantCulture));
    }

    /// <inheritdoc />
    public void Zero(Tensor tensor)
    {
        using var scope = Enter(recordable: true);
        T(tensor).Buffer.Fill8(0, _stream);
    }

    /// <inheritdoc />
    public void GatherRows(Tensor ring, int ringRows, StepRows rows, Tensor output) => Ring(scatter: false, ring, ringRows, rows, output);

    /// <inheritdoc />
    public void ScatterRows(Tensor source, StepRows rows, int ringRows, Tensor ring) => Ring(scatter: true, ring, ringRows, rows, source);

    /// <summary>The rows of <paramref name="other"/> read from (gathered) or written to (scattered) <paramref name="ring"/>.</summary>
    private void Ring(bool scatter, Tensor ring, int ringRows, StepRows rows, Tensor other, [CallerMemberName] string call = "")
    {
        using var scope = Enter(recordable: true, call);
        ShapeCheck.Ring(ring, ringRows, rows, other);
        var s = (CudaStepRows)rows;
        CudaTensor g = T(ring), x = T(other);
        _glue.Ring(_stream, scatter, g.Matrix, ringRows, x.Matrix, s.DeviceSlots(x.Rows), s.DevicePositions(x.Rows));
    }

    /// <inheritdoc />
    public Tensor View(Tensor tensor, int firstRow, int rows)
    {
        var t = T(tensor);
        ShapeCheck.View(t, firstRow, rows);
        return t.View(firstRow, rows);
    }

    // ---------------------------------------------------------------- weights

    /// <inheritdoc />
    public LinearWeight UploadLinear(Checkpoint checkpoint, LinearSpec spec)
    {
        using var scope = Enter();
        if (checkpoint.Get(spec.Weight).DType != DType.F8_E4M3)
        {
            var (rows, cols) = spec.StoredShape;
            var w = new CudaLinearWeight(spec.Out, spec.In, fp8: false);
            w.Bf16 = w.Owned.Own(Upload<ushort>(checkpoint, WeightReader.Bf16(checkpoint, spec.Weight, spec.Slice, Bf16User, rows, cols)));
            return w;
        }

        var view = ReadFp8(checkpoint, spec, "the FP8 GEMM kernels");
        var weight = new CudaLinearWeight(spec.Out, spec.In, fp8: true);
        try
        {
            weight.Codes = weight.Owned.Own(DeviceBuffer<byte>.Allocate(_device, view.Codes.Length));
            weight.Scales = weight.Owned.Own(DeviceBuffer<float>.Allocate(_device, view.Scales.Length / sizeof(float)));
            Write(checkpoint, [(view.Codes, weight.Codes.Pointer), (view.Scales, weight.Scales.Pointer)]);
        }
        catch
        {
            weight.Dispose();
            throw;
        }

        return weight;
    }

    private const string Bf16User = "the CUDA kernels";

    /// <summary>An FP8 weight's codes and block scales as the kernels take them (<see cref="WeightReader.Fp8"/>), on the 128x128 grid they need.</summary>
    private static Fp8View ReadFp8(Checkpoint checkpoint, LinearSpec spec, string user)
    {
        var view = WeightReader.Fp8(checkpoint, spec, user);
        if (view.BlockRows != Fp8GemmKernel.Block || view.BlockCols != Fp8GemmKernel.Block)
        {
            throw new NotSupportedException($"weight_block_size [{view.BlockRows}, {view.BlockCols}]: {user} take {Fp8GemmKernel.Block}x{Fp8GemmKernel.Block} blocks");
        }

        return view;
    }

    /// <inheritdoc />
    public NormWeight UploadNorm(Checkpoint checkpoint, string name, int width, float epsilon)
    {
        using var scope = Enter();
        return new CudaNormWeight(width, epsilon, Upload<ushort>(checkpoint, WeightReader.Bf16(checkpoint, name, null, Bf16User, width)));
    }

    /// <inheritdoc />
    public EmbeddingWeight UploadEmbedding(Checkpoint checkpoint, string name, int rows, int width)
    {
        using var scope = Enter();
        return new CudaEmbeddingWeight(rows, width, Upload<ushort>(checkpoint, WeightReader.Bf16(checkpoint, name, null, Bf16User, rows, width)));
    }

    /// <inheritdoc />
    public LinearWeight UploadHead(Checkpoint checkpoint, string name, int vocab, int width)
    {
        using var scope = Enter();
        var view = WeightReader.Bf16(checkpoint, name, null, Bf16User, vocab, width);
        var w = new CudaLinearWeight(vocab, width, fp8: false);
        w.Bf16 = w.Owned.Own(Upload<ushort>(checkpoint, view));
        return w;
    }

    /// <inheritdoc />
    public GateWeight UploadGate(Checkpoint checkpoint, string weight, string bias, int width, GateOptions options)
    {
        using var scope = Enter();
        var shape = new MoeGateShape(options.Experts, width, options.Groups, options.GroupsKept, options.TopK);
        try
        {
            shape.Validate();
        }
        catch (ArgumentException e)
        {
            throw new ArgumentException($"unsupported routing {options} over width {width}: {e.Message}", nameof(options), e);
        }

        var weights = WeightReader.Bf16(checkpoint, weight, null, Bf16User, options.Experts, width);
        var biases = WeightReader.F32(checkpoint, bias, options.Experts);
        var w = Upload<ushort>(checkpoint, weights);
        try
        {
            return new CudaGateWeight(width, options, shape, w, Upload<float>(checkpoint, biases));
        }
        catch
        {
            w.Dispose();
            throw;
        }
    }

    /// <inheritdoc />
    public ExpertWeights UploadExperts(Checkpoint checkpoint, IReadOnlyList<LinearSpec[]> experts, LinearSpec[]? shared)
    {
        using var scope = Enter();
        if (experts.Count == 0)
        {
            throw new NotSupportedException("a MoE layer without routed experts");
        }

        // An empty entry is an expert another device holds (expert parallelism). The stack holds only this device's
        // experts, in ascending order, and the expert map sends the routing's global ids to their slots (-1: not here), so
        // a token routed to an expert held elsewhere gets no contribution here; that device's all-reduce share adds it.
        foreach (var mlp in experts.Where(m => m.Length != 0).Concat(shared is null ? [] : [shared]))
        {
            if (mlp.Length != 3)
            {
                throw new ArgumentException("an MLP is [gate, up, down]", nameof(experts));
            }
        }

        int[] held = [.. Enumerable.Range(0, experts.Count).Where(i => experts[i].Length != 0)];
        if (held.Length == 0)
        {
            throw new ArgumentException("none of the routed experts is held here", nameof(experts));
        }

        int h = experts[held[0]][0].In, inter = experts[held[0]][0].Out, e = experts.Count;
        var parts = new ExpertParts[held.Length];
        for (var slot = 0; slot < held.Length; slot++)
        {
            var i = held[slot];
            var (gate, up, down) = (experts[i][0], experts[i][1], experts[i][2]);
            if (gate.Out != inter || gate.In != h || up.Out != inter || up.In != h || down.Out != h || down.In != inter)
            {
                throw new ArgumentException($"expert {i} is not [{inter}, {h}] / [{h}, {inter}] like the first held expert", nameof(experts));
            }

            parts[slot] = new ExpertParts(ReadExpert(gate), ReadExpert(up), ReadExpert(down));
        }

        ExpertParts? sharedParts = shared is null ? null : new ExpertParts(ReadExpert(shared[0]), ReadExpert(shared[1]), ReadExpert(shared[2]));
        var layout = new ExpertStackLayout(held.Length, h, inter);
        var result = new CudaExpertWeights(e, h, inter, shared?[0].Out ?? 0);
        List<(HostView Source, ulong Destination)> writes = [];
        try
        {
            var w13 = result.Owned.Own(DeviceBuffer<byte>.Allocate(_device, layout.W13Length));
            var w13s = result.Owned.Own(DeviceBuffer<float>.Allocate(_device, layout.W13ScaleLength));
            var w2 = result.Owned.Own(DeviceBuffer<byte>.Allocate(_device, layout.W2Length));
            var w2s = result.Owned.Own(DeviceBuffer<float>.Allocate(_device, layout.W2ScaleLength));
            writes.AddRange(CudaBackendLayout.ExpertStackWrites(layout, parts, w13.Pointer, w13s.Pointer, w2.Pointer, w2s.Pointer));
            result.Stack = new MoeExpertStack(w13.Pointer, w13s.Pointer, w2.Pointer, w2s.Pointer, held.Length, h, inter);
            if (held.Length < e)
            {
                var map = result.Owned.Own(DeviceBuffer<int>.From(_device, MoeDispatch.ExpertMap(e, held), _stream));
                result.Stack = result.Stack with { ExpertMap = map.Pointer, MapExperts = e };
            }

            if (sharedParts is { } sp)
            {
                result.Shared = new MoeSharedExpert(SharedPart(sp.Gate), SharedPart(sp.Up), SharedPart(sp.Down));
            }

            // One upload for the layer's experts: every shard they live in is read once, in file order.
            Write(checkpoint, writes);
            return result;
        }
        catch
        {
            result.Dispose();
            throw;
        }

        Fp8View ReadExpert(LinearSpec spec) => ReadFp8(checkpoint, spec, "the grouped expert GEMM and the shared expert");

        Fp8Linear SharedPart(Fp8View view)
        {
            var codes = result.Owned.Own(DeviceBuffer<byte>.Allocate(_device, view.Codes.Length));
            var scales = result.Owned.Own(DeviceBuffer<float>.Allocate(_device, view.Scales.Length / sizeof(float)));
            writes.Add((view.Codes, codes.Pointer));
            writes.Add((view.Scales, scales.Pointer));
            return new Fp8Linear(codes.Pointer, scales.Pointer, view.Rows, view.Cols);
        }
    }

    /// <inheritdoc />
    public RopeTable UploadRope(ReadOnlySpan<float> cos, ReadOnlySpan<float> sin, int positions, int pairs)
    {
        using var scope = Enter();
        if (cos.Length != positions * pairs || sin.Length != positions * pairs)
        {
            throw new ArgumentException($"cos/sin must be [{positions}, {pairs}]");
        }

        var c = DeviceBuffer<float>.From(_device, cos, _stream);
        return new CudaRopeTable(positions, pairs, c, DeviceBuffer<float>.From(_device, sin, _stream));
    }

    /// <inheritdoc />
    public LatentCache AllocateLatentCache(int capacity, int latentDim, int ropeDim)
    {
        using var scope = Enter();
        return new CudaLatentCache(_device, _stream, capacity, latentDim, ropeDim);
    }

    /// <inheritdoc />
    /// <remarks>A cache of its own holds positions in order (block b of its pool holds positions 64·b ..), so the copy is one
    /// device-to-device copy of the source pool's first ⌈positions / 64⌉ blocks.</remarks>
    public void CopyLatentCache(LatentCache source, LatentCache destination, int positions)
    {
        ShapeCheck.CopyLatentCache(source, destination, positions);
        using var scope = Enter();
        var from = ((CudaLatentCache)source).Pool!;
        var to = ((CudaLatentCache)destination).Pool!;
        to.Cache.CopyFrom(from.Cache, _stream, PagedLatentCache.Bytes(PagedLatentCache.BlocksFor(positions), from.Shape) / sizeof(ushort));
    }

    /// <inheritdoc />
    public LatentPool AllocateLatentPool(int blocks, int latentDim, int ropeDim)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(blocks);
        using var scope = Enter();
        return new CudaLatentPool(_device, _stream, blocks, latentDim, ropeDim);
    }

    /// <inheritdoc />
    public BlockTable AllocateBlockTable(int requests, int maxBlocksPerRequest)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(requests, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(maxBlocksPerRequest, 1);
        using var scope = Enter();
        return new CudaBlockTable(_device, _stream, requests, maxBlocksPerRequest);
    }

    /// <inheritdoc />
    public void UploadBlockTable(ReadOnlySpan<int> entries, BlockTable table)
    {
        using var scope = Enter();
        var t = (CudaBlockTable)table;
        if (entries.Length != t.Entries.Length)
        {
            throw new ArgumentException($"{entries.Length} entries for a [{t.Requests}, {t.MaxBlocksPerRequest}] block table", nameof(entries));
        }

        t.Entries.Upload(entries, _stream);
    }

    /// <inheritdoc />
    public LatentCache PagedCache(LatentPool pool, BlockTable table, int request)
    {
        ShapeCheck.PagedCache(pool, table, request);
        return new CudaLatentCache((CudaLatentPool)pool, (CudaBlockTable)table, request);
    }

    /// <inheritdoc />
    public StepRows AllocateStepRows(int capacity)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(capacity);
        using var scope = Enter();
        return new CudaStepRows(_device, capacity);
    }

    /// <inheritdoc />
    public void UploadStepRows(ReadOnlySpan<int> tokens, ReadOnlySpan<int> slots, ReadOnlySpan<int> positions, StepRows rows)
    {
        using var scope = Enter();
        ((CudaStepRows)rows).Upload(tokens, slots, positions, _stream);
    }

    /// <inheritdoc />
    public Routing AllocateRouting(int tokens, int experts, int topK)
    {
        using var scope = Enter();
        return new CudaRouting(_device, tokens, experts, topK);
    }

    /// <inheritdoc />
    public void DownloadRouting(Routing routing, Span<float> scores, Span<int> indices, Span<float> weights)
    {
        using var scope = Enter();
        var r = (CudaRouting)routing;
        if (!scores.IsEmpty)
        {
            r.Scores.Download(scores[..(int)r.Scores.Length], _stream);
        }

        if (!indices.IsEmpty)
        {
            r.Indices.Download(indices[..(int)r.Indices.Length], _stream);
        }

        if (!weights.IsEmpty)
        {
            r.Weights.Download(weights[..(int)r.Weights.Length], _stream);
        }
    }

    /// <inheritdoc />
    /// <remarks>
    /// The settings and the masks of the rows that have one go out and the ids come back through the buffer's pinned ends: one
    /// kernel, one synchronization. The masks take rows · ⌈vocab / 64⌉ · 8 bytes each side (16 KB a row at 129,280 ids).
    /// </remarks>
    public TokenChoiceBuffer AllocateTokenChoices(int rows, int vocab)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(rows, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(vocab, 1);
        using var scope = Enter();
        return new CudaTokenChoices(_device, rows, vocab);
    }

    /// <inheritdoc />
    /// <remarks>
    /// The settings of the rows, and of the rows a previous call set past them (now not chosen), go out through the buffer's
    /// pinned end in one copy, and the masks of the rows that have one, packed in row order, in another. The pinned end is
    /// written once the previous set's copies have run (a step that reads no ids does not wait for its work).
    /// </remarks>
    public void SetTokenChoices(ReadOnlySpan<TokenChoice> choices, TokenChoiceBuffer buffer)
    {
        ShapeCheck.SetChoices(choices, buffer);
        using var scope = Enter();
        var b = (CudaTokenChoices)buffer;
        b.Sent.Synchronize();
        var n = choices.Length;
        var rows = b.HostChoices.Span;
        var hostMasks = b.HostAllowed.Span;
        var masks = 0;
        for (var r = 0; r < n; r++)
        {
            var c = choices[r];
            rows[r] = KernelRow(c);
            if (c.Allowed is { } allowed && c.OnDevice)
            {
                var words = TokenChoice.MaskWords(c.VocabLimit);
                allowed.AsSpan(0, words).CopyTo(hostMasks.Slice(masks * b.MaskWords, words));
                rows[r].AllowedRow = masks++;
            }
        }

        var copied = Math.Max(n, b.SetRows);
        rows[n..copied].Fill(KernelRow(default)); // not chosen
        if (copied > 0)
        {
            b.HostChoices.CopyTo(b.Choices, _stream, count: copied);
        }

        if (masks > 0)
        {
            b.HostAllowed.CopyTo(b.Allowed, _stream, count: (long)masks * b.MaskWords);
        }

        b.Sent.Record(_stream);
        b.SetRows = n;
    }

    /// <inheritdoc />
    /// <remarks>One kernel, then the ids' copy to the buffer's pinned end (a memcpy node in a graph).</remarks>
    public void ChooseTokenRows(Tensor logits, TokenChoiceBuffer buffer)
    {
        ShapeCheck.ChooseRows(logits, buffer);
        using var scope = Enter(recordable: true);
        var b = (CudaTokenChoices)buffer;
        var n = logits.Rows;
        _sampling.Launch(_stream, T(logits).Matrix, b.Choices.Pointer, new DeviceInts(b.Ids.Pointer, n), b.Allowed.Pointer, b.MaskWords);
        if (n > 0)
        {
            b.HostIds.CopyFrom(b.Ids, _stream, count: n);
        }
    }

    /// <inheritdoc />
    public void ReadTokenChoices(TokenChoiceBuffer buffer, Span<int> tokens)
    {
        ShapeCheck.ReadChoices(buffer, tokens);
        using var scope = Enter();
        _stream.Synchronize();
        ((CudaTokenChoices)buffer).HostIds.Span[..tokens.Length].CopyTo(tokens);
    }

    /// <summary>A row's settings as the sampling kernel reads them.</summary>
    /// <remarks>Its allowed ids, if any, are the caller's to place: <see cref="TokenChoiceRow.AllowedRow"/> is −1 (every id) here.</remarks>
    internal static TokenChoiceRow KernelRow(in TokenChoice c) =>
        new() { VocabLimit = c.VocabLimit, Temperature = c.Temperature, TopK = c.TopK, TopP = c.TopP, Seed = c.Seed, Draw = c.Draw, AllowedRow = -1 };

    /// <summary>
    /// Copies each view to its device address through the weight uploader: the shards read once each, in file order,
    /// through pinned staging slots (double buffered) the backend keeps for its loads (<see cref="Trim"/> frees them).
    /// Returns when every copy has completed.
    /// </summary>
    private void Write(Checkpoint checkpoint, IEnumerable<(HostView Source, ulong Destination)> writes)
    {
        var options = new WeightUploadOptions();
        _staging ??= new CudaStagingCopier(_device, options.Slots, options.ChunkBytes);
        WeightUploader.Upload(checkpoint, UploadPlan.Create([.. checkpoint.ShardFiles], writes, _staging.SlotBytes, _staging.Slots), _staging, options);
    }

    /// <summary>A new device buffer holding <paramref name="view"/> (<typeparamref name="T"/> elements).</summary>
    private DeviceBuffer<T> Upload<T>(Checkpoint checkpoint, HostView view)
        where T : unmanaged
    {
        var buffer = DeviceBuffer<T>.Allocate(_device, view.Length / Unsafe.SizeOf<T>());
        try
        {
            Write(checkpoint, [(view, buffer.Pointer)]);
            return buffer;
        }
        catch
        {
            buffer.Dispose();
            throw;
        }
    }

    // ---------------------------------------------------------------- graphs

    /// <inheritdoc />
    /// <remarks>
    /// Stream capture (thread-local mode) under the backend's lock, so no other thread's work enters the graph. While
    /// graphs live, scratch memory that must grow keeps its old block (a graph may point into it) until the last graph is
    /// disposed, and <see cref="Trim"/> is refused.
    /// </remarks>
    public StepGraph CaptureGraph(Action record)
    {
        ArgumentNullException.ThrowIfNull(record);
        using var scope = Enter();
        _capturing = true;
        try
        {
            var graph = CudaGraph.Capture(_stream, _ => record());
            _liveGraphs++;
            return new CudaStepGraph(this, graph, _recorded);
        }
        finally
        {
            _capturing = false;
            _recorded = 0;
        }
    }

    /// <inheritdoc />
    public void ReplayGraph(StepGraph graph)
    {
        using var scope = Enter();
        var g = graph as CudaStepGraph is { } cuda && cuda.Owner == this ? cuda : throw new ArgumentException("the graph does not belong to this backend", nameof(graph));
        ObjectDisposedException.ThrowIf(g.IsDisposed, g);
        g.Graph.Launch(_stream);
    }

    /// <summary>Destroys a graph of this backend after its queued replays; once none lives, frees the scratch blocks kept for graphs.</summary>
    internal void Release(CudaGraph graph)
    {
        using var scope = _sync.EnterScope();
        if (!_disposed)
        {
            _device.MakeCurrent();
            _stream.Synchronize();
        }

        graph.Dispose();
        if (--_liveGraphs == 0)
        {
            foreach (var s in _scratch)
            {
                s.FreeRetired();
            }
        }
    }

    // ---------------------------------------------------------------- elementwise and norms

    /// <inheritdoc />
    public void Embedding(EmbeddingWeight table, ReadOnlySpan<int> ids, Tensor output)
    {
        using var scope = Enter();
        var w = (CudaEmbeddingWeight)table;
        var o = T(output);
        ShapeCheck.Embedding(w, ids, o);
        _embedding.Launch(_stream, new DeviceInts(UploadInts(ids), ids.Length), w.Table, o.Matrix);
    }

    /// <inheritdoc />
    public void EmbeddingRows(EmbeddingWeight table, StepRows rows, Tensor output)
    {
        using var scope = Enter(recordable: true);
        var w = (CudaEmbeddingWeight)table;
        var o = T(output);
        ShapeCheck.EmbeddingRows(w, rows, o);
        _embedding.Launch(_stream, ((CudaStepRows)rows).DeviceTokens(o.Rows), w.Table, o.Matrix);
    }

    /// <inheritdoc />
    public void EmbeddingChosenRows(EmbeddingWeight table, StepRows rows, TokenChoiceBuffer chosen, Tensor output)
    {
        using var scope = Enter(recordable: true);
        var w = (CudaEmbeddingWeight)table;
        var o = T(output);
        ShapeCheck.EmbeddingChosenRows(w, rows, chosen, o);
        var c = (CudaTokenChoices)chosen;
        _embedding.Launch(_stream, ((CudaStepRows)rows).DeviceTokens(o.Rows), w.Table, o.Matrix, new DeviceInts(c.Ids.Pointer, c.Rows));
    }

    /// <inheritdoc />
    public void RmsNorm(Tensor x, NormWeight weight, Tensor output)
    {
        using var scope = Enter(recordable: true);
        CudaTensor a = T(x), o = T(output);
        var w = (CudaNormWeight)weight;
        ShapeCheck.Require(a.Cols == w.Width && o.Cols == w.Width && a.Rows == o.Rows, "rmsnorm shapes");
        Norm(a, w, o);
    }

    private void Norm(CudaTensor a, CudaNormWeight w, CudaTensor o) =>
        _norm.Launch(_stream, a.Matrix, w.Vector, o.Matrix, w.Epsilon, round: NeedsRounding(o));

    /// <inheritdoc />
    public void AddRmsNorm(Tensor residual, Tensor delta, NormWeight weight, Tensor normed)
    {
        using var scope = Enter(recordable: true);
        CudaTensor r = T(residual), d = T(delta), o = T(normed);
        var w = (CudaNormWeight)weight;
        ShapeCheck.Require(r.Rows == d.Rows && r.Cols == d.Cols, "residual and delta shapes");
        ShapeCheck.Require(r.Cols == w.Width && o.Cols == w.Width && r.Rows == o.Rows, "rmsnorm shapes");
        // The fused form: residual = bf16(residual + delta) (stored bf16, or rounded in f32 storage), then its norm, in one pass over each row.
        _norm.LaunchFused(_stream, r.Matrix, d.Matrix, w.Vector, o.Matrix, w.Epsilon, round: NeedsRounding(o));
    }

    /// <inheritdoc />
    public void SiluMul(Tensor gate, Tensor up, Tensor output)
    {
        using var scope = Enter(recordable: true);
        CudaTensor g = T(gate), u = T(up), o = T(output);
        ShapeCheck.Require(g.Length == u.Length && g.Length == o.Length, "silu-mul shapes");
        if (o.Length == 0)
        {
            return;
        }

        // As one row of all elements in slices (the kernel's grid.x), so any shape and row count fits.
        const int slice = 1 << 24;
        for (long first = 0; first < o.Length; first += slice)
        {
            var n = (int)Math.Min(slice, o.Length - first);
            _siluMul.Launch(_stream, new DeviceRows(g.At(first), g.Type, 1, n), new DeviceRows(u.At(first), u.Type, 1, n), new DeviceRows(o.At(first), o.Type, 1, n),
                round: NeedsRounding(o));
        }
    }

    /// <inheritdoc />
    public void ConcatColumns(Tensor a, Tensor b, Tensor output)
    {
        using var scope = Enter(recordable: true);
        CudaTensor x = T(a), y = T(b), o = T(output);
        ShapeCheck.Require(x.Rows == y.Rows && o.Rows == x.Rows && o.Cols == x.Cols + y.Cols, "concat shapes");
        SameType(x, o, "a concatenation's first part and output");
        SameType(y, o, "a concatenation's second part and output");
        _glue.Copy(_stream, x.Matrix, o.Matrix.Columns(0, x.Cols));
        _glue.Copy(_stream, y.Matrix, o.Matrix.Columns(x.Cols, y.Cols));
    }

    // ---------------------------------------------------------------- GEMM

    /// <inheritdoc />
    public void Linear(Tensor x, LinearWeight weight, Tensor y)
    {
        using var scope = Enter(recordable: true);
        CudaTensor a = T(x), o = T(y);
        var w = (CudaLinearWeight)weight;
        ShapeCheck.Require(a.Cols == w.In && o.Cols == w.Out && a.Rows == o.Rows, $"linear {a} · [{w.Out}, {w.In}]ᵀ → {o}");
        Gemm(a.Matrix, w, o.Matrix);
        RoundStored(o);
    }

    /// <inheritdoc />
    public void Logits(Tensor x, LinearWeight head, Tensor logits)
    {
        using var scope = Enter(recordable: true);
        CudaTensor a = T(x), o = T(logits);
        var w = (CudaLinearWeight)head;
        ShapeCheck.Logits(a, w, o);
        if (w.Fp8)
        {
            // The CPU backend multiplies an FP8 head unquantized; the FP8 GEMM would quantize the activation.
            throw new NotSupportedException("an FP8 output head (lm_head is BF16 in every supported checkpoint)");
        }

        _bf16.Launch(_stream, a.Matrix, w.Bf16Matrix, o.Matrix);
    }

    /// <summary>y = x·Wᵀ for every row of x: FP8 weights through act quant + the FP8 GEMM, BF16 weights through the BF16 GEMM.</summary>
    private void Gemm(DeviceRows x, CudaLinearWeight w, DeviceRows y, Scratch? codes = null, Scratch? scales = null)
    {
        if (x.Rows == 0)
        {
            return;
        }

        if (!w.Fp8)
        {
            _bf16.Launch(_stream, x, w.Bf16Matrix, y);
            return;
        }

        long m = x.Rows;
        var q = new Fp8Rows((codes ?? _codes).Get(m * w.In), (scales ?? _scales).Get(m * ActQuantKernel.GroupsFor(w.In) * sizeof(float)), x.Rows, w.In);
        _quant.Launch(_stream, x, q);
        _fp8.Launch(_stream, q, w.Fp8Linear, y);
    }

    // ---------------------------------------------------------------- RoPE and the latent cache

    /// <inheritdoc />
    public void ApplyRope(Tensor x, RopeTable rope, int startPosition, int headStride, int ropeOffset)
    {
        using var scope = Enter();
        Rope(T(x), (CudaRopeTable)rope, headStride, ropeOffset, startPosition, null); // the launcher checks the positions against the table
    }

    /// <inheritdoc />
    public void ApplyRopeRows(Tensor x, RopeTable rope, StepRows rows, int headStride, int ropeOffset)
    {
        using var scope = Enter(recordable: true);
        ShapeCheck.StepRows(rows, x.Rows, null, rope);
        Rope(T(x), (CudaRopeTable)rope, headStride, ropeOffset, 0, ((CudaStepRows)rows).DevicePositions(x.Rows));
    }

    /// <summary>The rotation of rows at start + t, or at positions[t] (a device array) when given, to bf16 values.</summary>
    private void Rope(CudaTensor a, CudaRopeTable r, int headStride, int ropeOffset, int start, DeviceInts? positions)
    {
        ShapeCheck.Require(headStride > 0 && a.Cols % headStride == 0 && ropeOffset + 2 * r.Pairs <= headStride, "rope layout");
        _rope.Launch(_stream, a.Matrix, round: NeedsRounding(a), new RopeLayout(a.Cols / headStride, headStride, ropeOffset), r.View, positions, start);
    }

    /// <inheritdoc />
    public void AppendLatent(Tensor kv, NormWeight latentNorm, RopeTable rope, LatentCache cache, int startPosition)
    {
        using var scope = Enter();
        var a = T(kv);
        var c = (CudaLatentCache)cache;
        var r = (CudaRopeTable)rope;
        if (startPosition < 0 || startPosition + a.Rows > c.Capacity)
        {
            throw new ArgumentOutOfRangeException(nameof(startPosition), $"positions {startPosition}..{startPosition + a.Rows - 1} exceed the cache capacity {c.Capacity}");
        }

        CheckPositions(r, startPosition, a.Rows);
        var args = a.Rows > 0 ? UploadInts(CudaBackendLayout.AppendArguments(startPosition, a.Rows)) : 0;
        Append(a, (CudaNormWeight)latentNorm, r, c.Shape, new DeviceInts(args, a.Rows), new DeviceInts(args + (ulong)(4 * a.Rows), a.Rows), c.Pages);
    }

    /// <inheritdoc />
    public void AppendLatentRows(Tensor kv, NormWeight latentNorm, RopeTable rope, LatentPool pool, BlockTable table, StepRows rows)
    {
        using var scope = Enter(recordable: true);
        ShapeCheck.StepRows(rows, kv.Rows, table, rope);
        var (p, t, s) = ((CudaLatentPool)pool, (CudaBlockTable)table, (CudaStepRows)rows);
        Append(T(kv), (CudaNormWeight)latentNorm, (CudaRopeTable)rope, p.Shape, s.DeviceSlots(kv.Rows), s.DevicePositions(kv.Rows), t.Over(p));
    }

    /// <summary>Row t of kv to position positions[t] of block-table row requests[t] (device arrays).</summary>
    private void Append(CudaTensor a, CudaNormWeight norm, CudaRopeTable r, LatentShape shape, DeviceInts requests, DeviceInts positions, LatentPages pages)
    {
        ShapeCheck.Require(a.Cols == shape.RowWidth && norm.Width == shape.Latent && shape.Rope == 2 * r.Pairs, "latent append shapes");
        _cache.Append(_stream, shape, a.Matrix, norm.Vector, norm.Epsilon, r.View, requests, positions, pages);
    }

    private static void CheckPositions(CudaRopeTable r, int start, int count)
    {
        if (start < 0 || start + count > r.Positions)
        {
            throw new ArgumentOutOfRangeException(nameof(start), $"positions {start}..{start + count - 1} exceed the rotary table (0..{r.Positions - 1})");
        }
    }

    // ---------------------------------------------------------------- MLA

    /// <inheritdoc />
    public void MlaAttentionNaive(Tensor q, LatentCache cache, LinearWeight kvB, MlaDims dims, int startPosition, float scale, Tensor output)
    {
        using var scope = Enter();
        var (qt, c, w, o) = CheckAttention(q, cache, kvB, dims, startPosition, output);
        Prefill(qt, c, w, dims, startPosition, scale, o);
    }

    /// <inheritdoc />
    public void MlaAttentionAbsorbed(Tensor q, LatentCache cache, LinearWeight kvB, MlaDims dims, int startPosition, float scale, Tensor output)
    {
        using var scope = Enter();
        var (qt, c, w, o) = CheckAttention(q, cache, kvB, dims, startPosition, output);
        if (qt.Rows > 2)
        {
            // The decode kernel takes s_q ≤ 2; longer chunks take the prefill kernel (the naive form, equal in exact arithmetic).
            Prefill(qt, c, w, dims, startPosition, scale, o);
            return;
        }

        if (qt.Rows > 0)
        {
            var context = startPosition + qt.Rows;
            Absorbed(qt, c.Shape, c.Pages, new DeviceInts(UploadInts([context]), 1), null, context, w, dims, scale, o);
        }
    }

    /// <inheritdoc />
    /// <remarks>
    /// One fold, one decode launch (each row a request of one query: its slot's block-table row, length position + 1), one
    /// unfold. The KV splits are sized for the longest row the block table addresses, not this call's rows, so the launch
    /// depends on the row count only and a captured graph serves every context (empty splits end at once).
    /// </remarks>
    public void MlaAttentionRows(Tensor q, LatentPool pool, BlockTable table, StepRows rows, LinearWeight kvB, MlaDims dims, float scale, Tensor output)
    {
        using var scope = Enter(recordable: true);
        ShapeCheck.AttentionRows(q, pool, kvB, dims, output);
        ShapeCheck.StepRows(rows, q.Rows, table, null);
        var (p, t, s) = ((CudaLatentPool)pool, (CudaBlockTable)table, (CudaStepRows)rows);
        if (q.Rows > 0)
        {
            Absorbed(T(q), p.Shape, t.Over(p), s.DeviceLengths(q.Rows), s.DeviceSlots(q.Rows), t.Positions, (CudaLinearWeight)kvB, dims, scale, T(output));
        }
    }

    /// <summary>
    /// The absorbed form through the decode kernels: fold, attention of one request per device length, qt.Rows / requests
    /// queries each (block-table rows from <paramref name="requests"/>, or row r), unfold, BF16 rounding.
    /// <paramref name="context"/>, the longest request, sizes the KV splits.
    /// </summary>
    private void Absorbed(CudaTensor qt, LatentShape shape, LatentPages pages, DeviceInts lengths, DeviceInts? requests, int context, CudaLinearWeight w,
        MlaDims dims, float scale, CudaTensor o)
    {
        int tokens = qt.Rows, batch = lengths.Length, heads = dims.Heads, qTokens = tokens / batch;
        var projections = new MlaHeadDims(heads, dims.QkNope, dims.V);
        var kvB16 = Bf16Of(w);
        var qAbs = new DeviceRows(_qAbs.Get((long)tokens * heads * shape.RowWidth * 2), ElementType.BF16, tokens, heads * shape.RowWidth);
        _decode.Fold(_stream, shape, projections, qt.Matrix, kvB16, qAbs);
        var splits = _decode.DefaultSplits(shape, batch, heads, qTokens, context);
        var bytes = MlaDecodeKernel.WorkspaceBytes(shape, batch, heads, qTokens, splits);
        var workspace = bytes > 0 ? _workspace.Get(bytes) : 0;
        var latent = new DeviceRows(_outLatent.Get((long)tokens * heads * shape.Latent * 4), ElementType.F32, tokens, heads * shape.Latent);
        var lse = new DeviceRows(_lse.Get((long)tokens * heads * 4), ElementType.F32, tokens, heads);
        _decode.Decode(_stream, shape, heads, qAbs, pages, lengths, requests, scale, latent, lse, splits, workspace);
        _decode.Unfold(_stream, shape, projections, latent, kvB16, o.Matrix);
        RoundStored(o);
    }

    /// <summary>The naive form through the prefill kernels: gather latents, kv_b GEMM to BF16 k_nope|v, causal flash attention.</summary>
    private void Prefill(CudaTensor qt, CudaLatentCache c, CudaLinearWeight w, MlaDims dims, int startPosition, float scale, CudaTensor o)
    {
        int tokens = qt.Rows, context = startPosition + tokens;
        if (tokens == 0)
        {
            return;
        }

        var shape = CudaBackendLayout.PrefillShape(dims);
        var cu = UploadInts([0, tokens, 0, context]);
        DeviceInts cuQ = new(cu, 2), cuKv = new(cu + 8, 2);
        var latent = new DeviceRows(_latent.Get((long)context * dims.KvLora * 2), ElementType.BF16, context, dims.KvLora);
        _prefill.Gather(_stream, shape, c.Pages, cuKv, context, latent);
        var kv = new DeviceRows(_kv.Get((long)context * w.Out * 2), ElementType.BF16, context, w.Out);
        Gemm(latent, w, kv, _kvCodes, _kvScales);
        // The kernel reads q and writes its output in BF16: f32 storage goes through BF16 copies.
        var q16 = qt.Type == ElementType.BF16 ? qt.Matrix : new DeviceRows(_qBf16.Get(qt.Length * 2), ElementType.BF16, qt.Rows, qt.Cols);
        if (qt.Type != ElementType.BF16)
        {
            _glue.Convert(_stream, qt.Matrix, q16);
        }

        var out16 = o.Type == ElementType.BF16 ? o.Matrix : new DeviceRows(_outBf16.Get(o.Length * 2), ElementType.BF16, o.Rows, o.Cols);
        _prefill.Attention(_stream, shape, dims.Heads, q16, c.Pages, cuQ, cuKv, kv, tokens, scale, out16);
        if (o.Type != ElementType.BF16)
        {
            _glue.Convert(_stream, out16, o.Matrix);
        }
    }

    /// <summary>kv_b as BF16 [H·(nope + v), latent]: the weight itself, or (once) its FP8 codes dequantized.</summary>
    private DeviceRows Bf16Of(CudaLinearWeight w)
    {
        if (w.Bf16 is null)
        {
            FirstRunNotCaptured("absorbed attention with this kv_b");
            var b = w.Owned.Own(DeviceBuffer<ushort>.Allocate(_device, (long)w.Out * w.In));
            _glue.Dequantize(_stream, w.Fp8Linear, new DeviceRows(b.Pointer, ElementType.BF16, w.Out, w.In));
            w.Bf16 = b;
        }

        return w.Bf16Matrix;
    }

    private static (CudaTensor Q, CudaLatentCache Cache, CudaLinearWeight KvB, CudaTensor Output) CheckAttention(
        Tensor q, LatentCache cache, LinearWeight kvB, MlaDims dims, int startPosition, Tensor output)
    {
        ShapeCheck.Attention(q, cache, kvB, dims, startPosition, output);
        CudaTensor qt = T(q), o = T(output);
        var c = (CudaLatentCache)cache;
        var w = (CudaLinearWeight)kvB;
        return (qt, c, w, o);
    }

    // ---------------------------------------------------------------- MoE

    /// <inheritdoc />
    public void MoeGate(Tensor x, GateWeight gate, Routing routing)
    {
        using var scope = Enter(recordable: true);
        var a = T(x);
        var g = (CudaGateWeight)gate;
        var r = (CudaRouting)routing;
        var opt = g.Options;
        ShapeCheck.Require(a.Cols == g.Width, "gate input width");
        ShapeCheck.Routing(r, a.Rows, opt.Experts, opt.TopK);
        var bytes = _gate.WorkspaceBytes(g.Shape, a.Rows);
        _gate.Launch(_stream, g.Shape, a.Matrix, g.WeightMatrix, g.BiasRow, r.View.Slice(0, a.Rows), opt.Normalize, opt.ScalingFactor, r.Scores.Pointer,
            workspace: bytes > 0 ? _logits.Get(bytes) : 0);
    }

    /// <inheritdoc />
    public void MoeExperts(Tensor x, Routing routing, ExpertWeights experts, Tensor y)
    {
        using var scope = Enter(recordable: true);
        CudaTensor a = T(x), o = T(y);
        var r = (CudaRouting)routing;
        var ew = (CudaExpertWeights)experts;
        int tokens = a.Rows, width = a.Cols, k = r.TopK;
        ShapeCheck.Require(o.Rows == tokens && o.Cols == width && ew.Width == width, "MoE shapes");
        ShapeCheck.Routing(r, tokens, ew.Experts, k);
        var key = (ew.Experts, ew.Stack.Experts, width, ew.ExpertWidth, ew.SharedWidth, k);
        if (!_moe.TryGetValue(key, out var layer))
        {
            FirstRunNotCaptured("MoE experts of this shape");
            // Only the experts half of MoeLayer is used: its gate shape needs E, H and k; groups do not matter here.
            layer = new MoeLayer(_device, _compiler, new MoeGateShape(ew.Experts, width, 1, 1, k), ew.ExpertWidth, ew.SharedWidth, _options.MaxMoeTokens,
                _options.HopperFp8Gemm, slots: ew.Stack.Experts);
            _moe[key] = layer;
        }

        for (var first = 0; first < tokens; first += layer.MaxTokens)
        {
            var n = Math.Min(layer.MaxTokens, tokens - first);
            layer.Experts(_stream, a.Matrix.Slice(first, n), r.View.Slice(first, n), ew.Stack, ew.Shared, o.Matrix.Slice(first, n));
        }

        RoundStored(o);
    }

    // ---------------------------------------------------------------- helpers

    /// <summary>
    /// Whether what is written to <paramref name="output"/> must be rounded to BF16 values (by the kernel itself, or after it):
    /// an activation in f32 storage. BF16 storage rounds as it stores; logits are never rounded.
    /// </summary>
    private static bool NeedsRounding(CudaTensor output) => output.Type == ElementType.F32 && output.Kind == TensorKind.Activation;

    /// <summary>Rounds <paramref name="output"/> to BF16 values after a kernel that writes f32 unrounded, where its storage needs it.</summary>
    private void RoundStored(CudaTensor output)
    {
        if (NeedsRounding(output))
        {
            _glue.Round(_stream, output.Matrix);
        }
    }

    /// <summary>Throws unless two tensors an operation reads and writes together share their storage type.</summary>
    private static void SameType(CudaTensor a, CudaTensor b, string what)
    {
        if (a.Type != b.Type)
        {
            throw new ArgumentException($"{what} must share a storage type: {a} is {a.Type}, {b} is {b.Type}");
        }
    }

    /// <summary>
    /// Serializes callers (the scratch buffers and staged arguments are shared; the stream orders the device work) and
    /// makes the device current on the calling thread. While a graph is captured (the capturing thread holds the lock),
    /// only a <paramref name="recordable"/> operation gets in.
    /// </summary>
    private Lock.Scope Enter(bool recordable = false, [CallerMemberName] string call = "")
    {
        var scope = _sync.EnterScope();
        try
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            if (_capturing)
            {
                if (!recordable)
                {
                    throw NotRecordable(call);
                }

                _recorded++;
            }

            _device.MakeCurrent();
        }
        catch
        {
            scope.Dispose();
            throw;
        }

        return scope;
    }

    /// <summary>Refuses, while capturing, work that allocates on its first run.</summary>
    private void FirstRunNotCaptured(string what)
    {
        if (_capturing)
        {
            throw new InvalidOperationException($"{what} has not run before the graph capture (its first run allocates): run the captured work once before capturing it");
        }
    }

    private static InvalidOperationException NotRecordable(string call) =>
        new($"{call} cannot be part of a graph (a graph holds only operations over backend memory: IBackend.CaptureGraph)");

    /// <summary>Stages small int32 arguments on the stream (ordered after the work that read the previous ones).</summary>
    private ulong UploadInts(ReadOnlySpan<int> values, [CallerMemberName] string call = "")
    {
        if (_capturing)
        {
            throw NotRecordable(call);
        }

        var p = _ints.Get(Math.Max(4, values.Length * 4L));
        DeviceBuffer<int>.View(_device, p, values.Length).Upload(values, _stream);
        return p;
    }

    private static CudaTensor T(Tensor t) =>
        t as CudaTensor ?? throw new ArgumentException($"tensor {t} does not belong to the CUDA backend", nameof(t));


    /// <summary>A growable device scratch buffer (256-byte aligned); growing waits for the queued work that may still read the old one.</summary>
    private sealed class Scratch(CudaBackend owner)
    {
        private DeviceBuffer<byte>? _buffer;

        private readonly List<DeviceBuffer<byte>> _retired = [];

        public ulong Get(long bytes)
        {
            if (_buffer is null || _buffer.Length < bytes)
            {
                if (owner._capturing)
                {
                    throw new InvalidOperationException($"scratch memory would grow to {bytes} bytes during a graph capture: run the captured work once before capturing it");
                }

                owner._stream.Synchronize();
                if (owner._liveGraphs > 0 && _buffer is not null)
                {
                    _retired.Add(_buffer); // a live graph may point into it
                }
                else
                {
                    _buffer?.Dispose();
                }

                _buffer = DeviceBuffer<byte>.Allocate(owner._device, Math.Max(bytes, 2 * (_buffer?.Length ?? 0)));
            }

            return _buffer.Pointer;
        }

        /// <summary>Frees the blocks kept for graphs that are gone (the caller has waited for the stream).</summary>
        public void FreeRetired()
        {
            foreach (var b in _retired)
            {
                b.Dispose();
            }

            _retired.Clear();
        }

        public void Free()
        {
            FreeRetired();
            _buffer?.Dispose();
            _buffer = null;
        }
    }
}
