using System.Runtime.InteropServices;
using DeepSeekCuda.Cuda;

namespace DeepSeekCuda.Kernels;

/// <summary>Mirror of <c>MoeGateParams</c> in Kernels/moe_gate.cu.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct MoeGateParams
{
    public ulong X;
    public ulong Weight;
    public ulong Bias;
    public ulong TopkIdx;
    public ulong TopkWeight;
    public ulong Scores;
    public long XStride;
    public int Tokens;
    public int Normalize;
    public float Scaling;
    public int LogitSplits;
}

/// <summary>The compile-time shape of a gate: experts E, width D, groups, groups kept, experts per token k.</summary>
internal readonly record struct MoeGateShape(int Experts, int Width, int Groups, int GroupsKept, int TopK)
{
    /// <summary>DeepSeek-V3/R1: 256 experts over 7168, top-8 in 4 of 8 groups.</summary>
    public static MoeGateShape V3 => new(256, 7168, 8, 4, 8);

    /// <summary>The tiny-a fixture: 16 experts over 256, top-4 in 2 of 4 groups.</summary>
    public static MoeGateShape TinyA => new(16, 256, 4, 2, 4);

    /// <summary>The Tiny synthetic preset: 12 experts over 192, top-3 in 2 of 3 groups.</summary>
    public static MoeGateShape TinyPreset => new(12, 192, 3, 2, 3);

    /// <summary>The shapes <see cref="MoeGateKernel.AllInstances"/> lists (any valid shape compiles on demand).</summary>
    public static IReadOnlyList<MoeGateShape> Known => [V3, TinyA, TinyPreset];

    /// <summary>Throws unless the kernel's static_asserts will hold.</summary>
    public void Validate()
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(Experts);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(Experts, 1024);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(Width);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(Width, 8192, nameof(Width)); // fp32 copy of x in 48 KiB static shared memory with the scores
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(Groups);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(Groups, 32);
        if (Experts % Groups != 0 || GroupsKept < 1 || GroupsKept > Groups || TopK < 1 || TopK > Experts / Groups * GroupsKept)
        {
            throw new ArgumentException($"invalid gate shape {this}");
        }
    }
}

/// <summary>
/// DeepSeek-V3 noaux_tc gating on the GPU (MODEL.md §5), the same decisions as the CPU <c>Router</c>:
/// fp32 logits against the bf16 gate weight, sigmoid, bias-corrected group-limited top-k with ties to the
/// lower index, weights from the unbiased scores, normalized and scaled. One block per token; E, D, groups,
/// groups kept and k are template constants. Feed it the fp32 gate input (a bf16 input is accepted but
/// loses exactness against the reference).
/// Given a <paramref name="tensorCores"/> launcher (not owned) and a workspace of <see cref="WorkspaceBytes"/>, the logits
/// come instead from the tensor-core GEMM (split over K to fill the SMs; the f32 input kept to 2⁻¹⁷ by its hi + lo
/// terms) and <c>moe_route_kernel</c> adds the splits in order and makes the same decisions: the weight is read once
/// per 64 tokens rather than once per token.
/// </summary>
internal sealed class MoeGateKernel(CudaDevice device, NvrtcCompiler compiler, Bf16MmaKernel? tensorCores = null)
    : KernelLauncher(device, compiler, FamilyName)
{
    /// <summary>Kernels/moe_gate.cu.</summary>
    public const string FamilyName = "moe_gate";

    /// <summary>CUDA name of the params struct.</summary>
    public const string ParamsType = "MoeGateParams";

    /// <summary>Threads per block: 32 warps for the full-width gate (3.7 MB of weight per token), 8 otherwise.</summary>
    public static int BlockFor(MoeGateShape s) => (long)s.Experts * s.Width >= 1 << 20 ? 1024 : 256;

    /// <summary>The specialization for a shape and input type.</summary>
    public static KernelInstance Instance(MoeGateShape s, ElementType input) =>
        new($"moe_gate_kernel<{s.Experts}, {s.Width}, {s.Groups}, {s.GroupsKept}, {s.TopK}, {BlockFor(s)}, {Flag(input)}>", ParamsType);

    /// <summary>Tokens per block of the route kernel (kMoeRouteWarps: one warp each).</summary>
    public const int RouteWarps = 4;

    /// <summary>The route kernel (decisions from GEMM logits) for a shape.</summary>
    public static KernelInstance RouteInstance(MoeGateShape s) =>
        new($"moe_route_kernel<{s.Experts}, {s.Groups}, {s.GroupsKept}, {s.TopK}>", ParamsType);

    /// <summary>Every specialization of the known shapes.</summary>
    public static IReadOnlyList<KernelInstance> AllInstances() =>
        [.. from s in MoeGateShape.Known from t in Enum.GetValues<ElementType>() select Instance(s, t), .. MoeGateShape.Known.Select(RouteInstance)];

    /// <summary>K splits of the tensor-core logits for <paramref name="tokens"/> tokens on this device.</summary>
    public int LogitSplits(MoeGateShape shape, int tokens) =>
        Bf16MmaKernel.SplitsFor(tokens, shape.Experts, shape.Width, 1, Device.MultiprocessorCount);

    /// <summary>Workspace bytes <see cref="Launch"/> needs for <paramref name="tokens"/>: the partial logits on tensor cores, else 0.</summary>
    public long WorkspaceBytes(MoeGateShape shape, int tokens) =>
        tensorCores is null || tokens <= 0 ? 0 : (long)LogitSplits(shape, tokens) * tokens * shape.Experts * 4;

    /// <summary>
    /// Routes every row of x into <paramref name="routing"/> (expert ids best first, weights) with the gate's
    /// <paramref name="weight"/> (bf16 [E, D]) and <paramref name="bias"/> (f32 [1, E]), and, when <paramref name="scores"/>
    /// is not 0, writes the unbiased sigmoid scores [tokens, E] f32. With tensor cores and a <paramref name="workspace"/> of
    /// <see cref="WorkspaceBytes"/>, the logits come from the tensor-core GEMM when it can run the operands (else, and
    /// without a workspace, from the one-block-per-token kernel).
    /// </summary>
    public void Launch(CudaStream stream, MoeGateShape shape, DeviceRows x, DeviceRows weight, DeviceRows bias, DeviceRouting routing, bool normalize,
        float scaling, ulong scores = 0, ulong workspace = 0)
    {
        var p = Params(shape, x, weight, bias, routing, normalize, scaling, scores);
        int tokens = p.Tokens;
        if (tokens == 0)
        {
            return;
        }

        if (tensorCores is not null && workspace != 0)
        {
            var splits = LogitSplits(shape, tokens);
            var logits = new Bf16MmaProblem(x.Pointer, x.Type, x.Stride, weight.Pointer, false, shape.Width, workspace, ElementType.F32, shape.Experts,
                tokens, shape.Experts, shape.Width) { Splits = splits, YSplit = (long)tokens * shape.Experts };
            if (tensorCores.TryLaunch(stream, logits))
            {
                var route = p with { X = workspace, Weight = 0, XStride = logits.YSplit, LogitSplits = splits };
                Get(RouteInstance(shape)).Launch(new Dim3(Blocks(tokens, RouteWarps)), RouteWarps * 32, 0, stream, in route);
                return;
            }
        }

        var block = BlockFor(shape);
        Get(Instance(shape, x.Type)).Launch(new Dim3((uint)tokens), block, 0, stream, in p);
    }

    /// <summary>The one-block-per-token kernel's arguments for one call, the views checked against the gate's shape.</summary>
    public static MoeGateParams Params(MoeGateShape shape, DeviceRows x, DeviceRows weight, DeviceRows bias, DeviceRouting routing, bool normalize,
        float scaling, ulong scores)
    {
        const string what = "MoE gate";
        shape.Validate();
        ViewCheck.Is(x, x.Rows, shape.Width, what, nameof(x));
        ViewCheck.Bf16Weight(weight, shape.Experts, shape.Width, what, nameof(weight));
        if (shape.Width % 8 == 0 && weight.Pointer % 16 != 0)
        {
            throw new ArgumentException($"{what}: the weight at 0x{weight.Pointer:x} must be 16-byte aligned", nameof(weight));
        }

        ViewCheck.Is(bias, 1, shape.Experts, what, nameof(bias), ElementType.F32);
        ViewCheck.Routing(routing, x.Rows, shape.TopK, what);

        return new MoeGateParams
        {
            X = x.Pointer, Weight = weight.Pointer, Bias = bias.Pointer, TopkIdx = routing.Indices, TopkWeight = routing.Weights, Scores = scores,
            XStride = x.Stride, Tokens = x.Rows, Normalize = normalize ? 1 : 0, Scaling = scaling,
        };
    }
}
