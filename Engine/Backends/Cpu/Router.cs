using System.Numerics.Tensors;

namespace DeepSeekCuda.Backends.Cpu;

/// <summary>
/// DeepSeek-V3 noaux_tc routing of one token (MODEL.md §5), in fp32. Ties in every top-k (groups and
/// experts) go to the lower index: the order is then independent of the sort algorithm, and a GPU
/// kernel can reproduce it by comparing (value, −index) pairs.
/// </summary>
internal static class Router
{
    public static void Route(ReadOnlySpan<float> x, float[] gateWeight, float[] bias, GateOptions opt,
        Span<float> scores, Span<int> indices, Span<float> weights)
    {
        int experts = opt.Experts, width = x.Length, perGroup = experts / opt.Groups;
        Span<float> biased = experts <= 1024 ? stackalloc float[experts] : new float[experts];
        for (var e = 0; e < experts; e++)
        {
            var logit = TensorPrimitives.Dot(x, gateWeight.AsSpan(e * width, width));
            scores[e] = 1f / (1f + MathF.Exp(-logit));
            // The correction bias steers selection only; weights use the unbiased score.
            biased[e] = scores[e] + bias[e];
        }

        if (opt.Groups > 1 && opt.GroupsKept < opt.Groups)
        {
            // Group score: sum of the two largest biased scores (one when a group has a single expert).
            Span<float> groupScore = stackalloc float[opt.Groups];
            for (var g = 0; g < opt.Groups; g++)
            {
                var group = biased.Slice(g * perGroup, perGroup);
                float first = float.NegativeInfinity, second = float.NegativeInfinity;
                foreach (var v in group)
                {
                    if (v > first)
                    {
                        second = first;
                        first = v;
                    }
                    else if (v > second)
                    {
                        second = v;
                    }
                }

                groupScore[g] = perGroup >= 2 ? first + second : first;
            }

            Span<int> kept = stackalloc int[opt.GroupsKept];
            TopK(groupScore, kept);
            Span<bool> keep = stackalloc bool[opt.Groups];
            foreach (var g in kept)
            {
                keep[g] = true;
            }

            for (var g = 0; g < opt.Groups; g++)
            {
                if (!keep[g])
                {
                    biased.Slice(g * perGroup, perGroup).Fill(float.NegativeInfinity);
                }
            }
        }

        TopK(biased, indices);
        var sum = 0f;
        for (var j = 0; j < indices.Length; j++)
        {
            weights[j] = scores[indices[j]];
            sum += weights[j];
        }

        for (var j = 0; j < indices.Length; j++)
        {
            weights[j] = (opt.Normalize ? weights[j] / sum : weights[j]) * opt.ScalingFactor;
        }
    }

    /// <summary>Indices of the largest values in descending order; equal values: lower index first.</summary>
    public static void TopK(ReadOnlySpan<float> values, Span<int> result)
    {
        Span<bool> taken = values.Length <= 1024 ? stackalloc bool[values.Length] : new bool[values.Length];
        for (var j = 0; j < result.Length; j++)
        {
            var best = -1;
            for (var i = 0; i < values.Length; i++)
            {
                // Strictly greater keeps the first (lowest) index among equals; −∞ entries still count,
                // so k never exceeds what exists.
                if (!taken[i] && (best < 0 || values[i] > values[best]))
                {
                    best = i;
                }
            }

            taken[best] = true;
            result[j] = best;
        }
    }
}
