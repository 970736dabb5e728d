namespace DeepSeekCuda.Backends.Cpu;

internal sealed class CpuTensor(int rows, int cols) : Tensor(rows, cols)
{
    public float[] Data { get; } = new float[checked(rows * cols)];

    public Span<float> Row(int row) => Data.AsSpan(row * Cols, Cols);
}

internal sealed class CpuLinearWeight(int outFeatures, int inFeatures, bool fp8, float[] data) : LinearWeight(outFeatures, inFeatures, fp8)
{
    /// <summary>W [Out, In] in float32 (FP8 dequantized).</summary>
    public float[] Data { get; } = data;

    public ReadOnlySpan<float> Row(int row) => Data.AsSpan(row * In, In);
}

internal sealed class CpuNormWeight(int width, float epsilon, float[] data) : NormWeight(width, epsilon)
{
    public float[] Data { get; } = data;
}

internal sealed class CpuEmbeddingWeight(int rows, int width, float[] data) : EmbeddingWeight(rows, width)
{
    public float[] Data { get; } = data;
}

internal sealed class CpuGateWeight(int width, GateOptions options, float[] weight, float[] bias) : GateWeight(width, options)
{
    /// <summary>[E, D].</summary>
    public float[] Weight { get; } = weight;

    /// <summary>[E].</summary>
    public float[] Bias { get; } = bias;
}

/// <summary>One SwiGLU MLP: gate [W, D], up [W, D], down [D, W].</summary>
internal sealed record CpuMlp(CpuLinearWeight Gate, CpuLinearWeight Up, CpuLinearWeight Down);

internal sealed class CpuExpertWeights(CpuMlp?[] experts, CpuMlp? shared, int width, int expertWidth)
    : ExpertWeights(experts.Length, width, expertWidth, shared?.Gate.Out ?? 0)
{
    /// <summary>Routed experts by index; null where another device holds the expert.</summary>
    public CpuMlp?[] Routed { get; } = experts;

    public CpuMlp? Shared { get; } = shared;
}

internal sealed class CpuRouting(int tokens, int experts, int topK) : Routing(tokens, experts, topK)
{
    /// <summary>[T, E].</summary>
    public float[] Scores { get; } = new float[tokens * experts];

    /// <summary>[T, k].</summary>
    public int[] Indices { get; } = new int[tokens * topK];

    /// <summary>[T, k].</summary>
    public float[] Weights { get; } = new float[tokens * topK];
}

internal sealed class CpuRopeTable(int positions, int pairs, float[] cos, float[] sin) : RopeTable(positions, pairs)
{
    /// <summary>[positions, pairs].</summary>
    public float[] Cos { get; } = cos;

    /// <summary>[positions, pairs].</summary>
    public float[] Sin { get; } = sin;
}

internal sealed class CpuLatentCache(int capacity, int latentDim, int ropeDim) : LatentCache(capacity, latentDim, ropeDim)
{
    /// <summary>[capacity, latent]: normalized latents.</summary>
    public float[] Latent { get; } = new float[checked(capacity * latentDim)];

    /// <summary>[capacity, rope]: rotated shared keys.</summary>
    public float[] Rope { get; } = new float[checked(capacity * ropeDim)];
}
