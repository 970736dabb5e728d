using DeepSeekCuda.Cuda;

namespace DeepSeekCuda.Kernels;

/// <summary>The shared expert's SwiGLU MLP: gate and up [Is, H], down [H, Is] (Is = n_shared_experts · moe_intermediate_size).</summary>
/// <param name="Gate">gate_proj.</param>
/// <param name="Up">up_proj.</param>
/// <param name="Down">down_proj.</param>
internal sealed record MoeSharedExpert(Fp8Linear Gate, Fp8Linear Up, Fp8Linear Down);

/// <summary>
/// A DeepSeek-V3 MoE layer on the GPU, composed from the kernel launchers: gate → dispatch → act quant → grouped gate/up
/// (SiLU·up fused) → act quant → grouped down → combine (+ shared expert through <see cref="Fp8GemmKernel"/>, + residual).
/// Owns every intermediate buffer, sized once for <see cref="MaxTokens"/> tokens, so a forward pass allocates nothing and
/// synchronizes nothing (capturable for a fixed token count). Numerics follow CpuBackend.MoeExperts in GpuEmulation: x
/// quantized once per token per 128 (the routed and shared experts read the same codes), gate/up/h/expert outputs
/// bf16, combine in fp32. One instance per stream.
/// </summary>
internal sealed class MoeLayer : IDisposable
{
    /// <summary>Token counts up to which <see cref="MoeGroupedLayout.Masked"/> is the automatic choice (capacity = tokens).</summary>
    public const int MaskedMaxTokens = 16;

    private readonly MoeGateKernel _gate;
    private readonly MoeDispatchKernel _dispatch;
    private readonly ActQuantKernel _quant;
    private readonly MoeGroupedGemmKernel _grouped;
    private readonly MoeCombineKernel _combine;
    private readonly Fp8GemmKernel _gemm;
    private readonly SiluMulKernel _siluMul;
    private readonly List<IDisposable> _buffers = [];
    private readonly DeviceBuffer<int> _counts, _offsets, _perm, _inv, _hist, _maskedGather, _maskedInv, _localIdx;
    private readonly DeviceBuffer<byte> _xCodes, _hCodes;
    private readonly DeviceBuffer<float> _xScales, _hScales;
    private readonly DeviceBuffer<ushort> _h, _expertOut;
    private readonly DeviceBuffer<ushort>? _sGate, _sUp, _sH, _sOut;
    private readonly DeviceBuffer<byte>? _sHCodes;
    private readonly DeviceBuffer<float>? _sHScales;

    /// <summary>Creates the layer's launchers and buffers on <paramref name="device"/>.</summary>
    /// <param name="device">The device.</param>
    /// <param name="compiler">The NVRTC compiler (and cache).</param>
    /// <param name="gate">Routing shape: E, H, groups, groups kept, top-k.</param>
    /// <param name="inter">Each routed expert's intermediate width I.</param>
    /// <param name="sharedInter">The shared expert's intermediate width, 0 for none.</param>
    /// <param name="maxTokens">Most tokens one call handles.</param>
    /// <param name="hopperGemm">Run the expert GEMMs (grouped and shared) on the Hopper wgmma kernels where they can run;
    /// not yet confirmed on a GPU, so off by default (<see cref="Backends.Cuda.CudaBackendOptions.HopperFp8Gemm"/>).</param>
    /// <param name="slots">Expert slots of the stacks this layer runs: under expert parallelism the experts the device holds
    /// (<see cref="MoeExpertStack.ExpertMap"/>); null for all of the gate's E.</param>
    public MoeLayer(CudaDevice device, NvrtcCompiler compiler, MoeGateShape gate, int inter, int sharedInter, int maxTokens, bool hopperGemm = false,
        int? slots = null)
    {
        gate.Validate();
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(inter);
        ArgumentOutOfRangeException.ThrowIfNegative(sharedInter);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(maxTokens);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(slots ?? gate.Experts, nameof(slots));
        ArgumentOutOfRangeException.ThrowIfGreaterThan(slots ?? gate.Experts, gate.Experts, nameof(slots));
        Device = device;
        Shape = gate;
        Inter = inter;
        SharedInter = sharedInter;
        MaxTokens = maxTokens;
        Slots = slots ?? gate.Experts;
        _gate = new MoeGateKernel(device, compiler);
        _dispatch = new MoeDispatchKernel(device, compiler);
        _quant = new ActQuantKernel(device, compiler);
        _grouped = new MoeGroupedGemmKernel(device, compiler, hopperGemm);
        _combine = new MoeCombineKernel(device, compiler);
        _gemm = new Fp8GemmKernel(device, compiler, hopperGemm);
        _siluMul = new SiluMulKernel(device, compiler);

        int e = Slots, k = gate.TopK, h = gate.Width, t = maxTokens;
        var rows = Math.Max(MoeGroupedGemmKernel.RowsBound(t, k, e), checked(e * Math.Min(t, MaskedMaxTokens)));
        TopkIdx = Own(DeviceBuffer<int>.Allocate(device, (long)t * k));
        TopkWeight = Own(DeviceBuffer<float>.Allocate(device, (long)t * k));
        _counts = Own(DeviceBuffer<int>.Allocate(device, e));
        _offsets = Own(DeviceBuffer<int>.Allocate(device, e + 1));
        _perm = Own(DeviceBuffer<int>.Allocate(device, MoeDispatch.RowsMax(t, k, e, MoeGroupedGemmKernel.Tile)));
        _inv = Own(DeviceBuffer<int>.Allocate(device, (long)t * k));
        _hist = Own(DeviceBuffer<int>.Allocate(device, MoeDispatchKernel.WorkspaceInts(t, k, e)));
        _maskedGather = Own(DeviceBuffer<int>.Allocate(device, (long)e * Math.Min(t, MaskedMaxTokens)));
        _maskedInv = Own(DeviceBuffer<int>.Allocate(device, (long)t * k));
        _localIdx = Own(DeviceBuffer<int>.Allocate(device, (long)t * k));
        _xCodes = Own(DeviceBuffer<byte>.Allocate(device, (long)t * h));
        _xScales = Own(DeviceBuffer<float>.Allocate(device, (long)t * ActQuantKernel.GroupsFor(h)));
        _h = Own(DeviceBuffer<ushort>.Allocate(device, (long)rows * inter));
        _hCodes = Own(DeviceBuffer<byte>.Allocate(device, (long)rows * inter));
        _hScales = Own(DeviceBuffer<float>.Allocate(device, (long)rows * ActQuantKernel.GroupsFor(inter)));
        _expertOut = Own(DeviceBuffer<ushort>.Allocate(device, (long)rows * h));
        if (sharedInter > 0)
        {
            _sGate = Own(DeviceBuffer<ushort>.Allocate(device, (long)t * sharedInter));
            _sUp = Own(DeviceBuffer<ushort>.Allocate(device, (long)t * sharedInter));
            _sH = Own(DeviceBuffer<ushort>.Allocate(device, (long)t * sharedInter));
            _sHCodes = Own(DeviceBuffer<byte>.Allocate(device, (long)t * sharedInter));
            _sHScales = Own(DeviceBuffer<float>.Allocate(device, (long)t * ActQuantKernel.GroupsFor(sharedInter)));
            _sOut = Own(DeviceBuffer<ushort>.Allocate(device, (long)t * h));
        }
    }

    /// <summary>The device.</summary>
    public CudaDevice Device { get; }

    /// <summary>Routing shape.</summary>
    public MoeGateShape Shape { get; }

    /// <summary>Routed expert intermediate width.</summary>
    public int Inter { get; }

    /// <summary>Shared expert intermediate width (0: none).</summary>
    public int SharedInter { get; }

    /// <summary>Most tokens per call.</summary>
    public int MaxTokens { get; }

    /// <summary>Expert slots of the stacks this layer runs (the gate's E unless the device holds a part of them).</summary>
    public int Slots { get; }

    /// <summary>The routing of the last <see cref="Forward"/>: expert ids [tokens, k] (int32, best first).</summary>
    public DeviceBuffer<int> TopkIdx { get; }

    /// <summary>The routing weights of the last <see cref="Forward"/> [tokens, k] (f32).</summary>
    public DeviceBuffer<float> TopkWeight { get; }

    /// <summary>The layout <paramref name="layout"/> resolves to for <paramref name="tokens"/> tokens (null: automatic).</summary>
    public static MoeGroupedLayout Choose(int tokens, MoeGroupedLayout? layout) =>
        layout ?? (tokens <= MaskedMaxTokens ? MoeGroupedLayout.Masked : MoeGroupedLayout.Contiguous);

    /// <summary>The routing <see cref="Forward"/> writes for <paramref name="tokens"/> tokens: <see cref="TopkIdx"/> and <see cref="TopkWeight"/>.</summary>
    public DeviceRouting RoutingOf(int tokens) => new(TopkIdx.Pointer, TopkWeight.Pointer, tokens, Shape.TopK);

    /// <summary>
    /// The whole layer for every row of x [tokens, H] (bf16 or f32): routes with the gate (weight bf16 [E, H], bias f32
    /// [1, E]) into <see cref="RoutingOf"/>, then <see cref="Experts"/>.
    /// </summary>
    public void Forward(CudaStream stream, DeviceRows x, DeviceRows gateWeight, DeviceRows gateBias, bool normalize, float scaling,
        MoeExpertStack experts, MoeSharedExpert? shared, DeviceRows y, DeviceRows? residual = null, MoeGroupedLayout? layout = null)
    {
        var routing = RoutingOf(x.Rows);
        var mode = Check(x, routing, experts, shared, y, layout);
        _gate.Launch(stream, Shape, x, gateWeight, gateBias, routing, normalize, scaling);
        Run(stream, x, routing, experts, shared, y, residual, mode);
    }

    /// <summary>
    /// The experts for a given routing: y [tokens, H] = Σ_j w·expert_j(x) (+ shared(x)) (+ residual), bf16 or f32; residual
    /// has y's shape and type and may be y itself. With an expert map on <paramref name="experts"/> the sum runs over the
    /// routed experts this device holds; the others' share comes from their devices (the all-reduce after the layer).
    /// </summary>
    public void Experts(CudaStream stream, DeviceRows x, DeviceRouting routing, MoeExpertStack experts, MoeSharedExpert? shared, DeviceRows y,
        DeviceRows? residual = null, MoeGroupedLayout? layout = null) =>
        Run(stream, x, routing, experts, shared, y, residual, Check(x, routing, experts, shared, y, layout));

    /// <summary><see cref="Experts"/> once <see cref="Check"/> has passed the call and chosen its layout.</summary>
    private void Run(CudaStream stream, DeviceRows x, DeviceRouting routing, MoeExpertStack experts, MoeSharedExpert? shared, DeviceRows y,
        DeviceRows? residual, MoeGroupedLayout mode)
    {
        var tokens = x.Rows;
        if (tokens == 0)
        {
            return;
        }

        int e = Slots, k = Shape.TopK, h = Shape.Width;

        var dispatch = new MoeDispatchBuffers(_counts.Pointer, _offsets.Pointer, _perm.Pointer, _inv.Pointer, _hist.Pointer, MaxTokens, k, e, MoeGroupedGemmKernel.Tile);
        var ids = new DeviceInts(routing.Indices, tokens * k);
        var localIdx = new DeviceInts(_localIdx.Pointer, MaxTokens * k);
        _dispatch.Launch(stream, ids, tokens, dispatch, map: experts.ExpertMap != 0 ? new DeviceExpertMap(experts.ExpertMap, experts.MapExperts, localIdx) : null);
        var xq = new Fp8Rows(_xCodes.Pointer, _xScales.Pointer, tokens, h);
        _quant.Launch(stream, x, xq);

        GroupedRows grouped;
        ulong inv;
        if (mode == MoeGroupedLayout.Masked)
        {
            var gather = new DeviceInts(_maskedGather.Pointer, e * tokens);
            _grouped.MaskedLayout(stream, experts.ExpertMap != 0 ? localIdx : ids, dispatch, tokens, gather, new DeviceInts(_maskedInv.Pointer, MaxTokens * k));
            grouped = new GroupedRows(mode, _counts.Pointer, _offsets.Pointer, gather.Pointer, k, e * tokens, tokens);
            inv = _maskedInv.Pointer;
        }
        else
        {
            grouped = new GroupedRows(mode, _counts.Pointer, _offsets.Pointer, _perm.Pointer, k, MoeGroupedGemmKernel.RowsBound(tokens, k, e), 0);
            inv = _inv.Pointer;
        }

        var rows = grouped.Rows;
        var hidden = new DeviceRows(_h.Pointer, ElementType.BF16, rows, Inter);
        var hiddenQ = new Fp8Rows(_hCodes.Pointer, _hScales.Pointer, rows, Inter);
        _grouped.GateUp(stream, experts, grouped, xq, hidden);
        _quant.Launch(stream, hidden, hiddenQ);
        _grouped.Down(stream, experts, grouped, hiddenQ, new DeviceRows(_expertOut.Pointer, ElementType.BF16, rows, h));

        DeviceRows? sharedOut = null;
        if (shared is not null)
        {
            var si = SharedInter;
            DeviceRows gate = new(_sGate!.Pointer, ElementType.BF16, tokens, si), up = new(_sUp!.Pointer, ElementType.BF16, tokens, si),
                act = new(_sH!.Pointer, ElementType.BF16, tokens, si);
            var actQ = new Fp8Rows(_sHCodes!.Pointer, _sHScales!.Pointer, tokens, si);
            _gemm.Launch(stream, xq, shared.Gate, gate);
            _gemm.Launch(stream, xq, shared.Up, up);
            _siluMul.Launch(stream, gate, up, act);
            _quant.Launch(stream, act, actQ);
            sharedOut = new DeviceRows(_sOut!.Pointer, ElementType.BF16, tokens, h);
            _gemm.Launch(stream, actQ, shared.Down, sharedOut.Value);
        }

        _combine.Launch(stream, new DeviceRows(_expertOut.Pointer, ElementType.BF16, rows, h), new DeviceInts(inv, tokens * k), routing, sharedOut, residual, y);
    }

    /// <summary>
    /// The layout <paramref name="layout"/> resolves to for the call, after throwing unless its views, stacks and token count
    /// fit the layer and that layout's buffers (before anything is launched).
    /// </summary>
    private MoeGroupedLayout Check(DeviceRows x, DeviceRouting routing, MoeExpertStack experts, MoeSharedExpert? shared, DeviceRows y,
        MoeGroupedLayout? layout)
    {
        const string what = "MoE layer";
        int e = Slots, h = Shape.Width;
        if (x.Rows > MaxTokens)
        {
            throw new ArgumentOutOfRangeException(nameof(x), x.Rows, $"the layer's buffers hold at most {MaxTokens} tokens (maxTokens)");
        }

        ViewCheck.Is(x, x.Rows, h, what, nameof(x));
        ViewCheck.Is(y, x.Rows, h, what, nameof(y));
        ViewCheck.Routing(routing, x.Rows, Shape.TopK, what);

        if (experts.Experts != e || experts.Hidden != h || experts.Inter != Inter)
        {
            throw new ArgumentException($"expert stack [{experts.Experts} x ({experts.Hidden}, {experts.Inter})] does not match the layer [{e} x ({h}, {Inter})]", nameof(experts));
        }

        if (experts.RoutedExperts != Shape.Experts)
        {
            throw new ArgumentException(experts.ExpertMap != 0
                ? $"the stack's expert map covers {experts.MapExperts} experts; the layer routes over {Shape.Experts}"
                : $"a stack of {e} of the layer's {Shape.Experts} experts needs an expert map", nameof(experts));
        }

        if ((shared is null) != (SharedInter == 0) || (shared is not null && (shared.Gate.Out != SharedInter || shared.Gate.In != h || shared.Up.Out != SharedInter
            || shared.Up.In != h || shared.Down.Out != h || shared.Down.In != SharedInter)))
        {
            throw new ArgumentException($"shared expert does not match the layer's width {SharedInter}", nameof(shared));
        }

        var mode = Choose(x.Rows, layout);
        if (mode == MoeGroupedLayout.Masked && x.Rows > Math.Min(MaxTokens, MaskedMaxTokens))
        {
            throw new ArgumentOutOfRangeException(nameof(x), x.Rows, $"the masked layout's buffers hold at most {Math.Min(MaxTokens, MaskedMaxTokens)} tokens (capacity = tokens)");
        }

        return mode;
    }

    private DeviceBuffer<T> Own<T>(DeviceBuffer<T> b)
        where T : unmanaged
    {
        _buffers.Add(b);
        return b;
    }

    /// <inheritdoc />
    public void Dispose()
    {
        _gate.Dispose();
        _dispatch.Dispose();
        _quant.Dispose();
        _grouped.Dispose();
        _combine.Dispose();
        _gemm.Dispose();
        _siluMul.Dispose();
        foreach (var b in _buffers)
        {
            b.Dispose();
        }

        _buffers.Clear();
    }
}
