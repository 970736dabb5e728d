using DeepSeekCuda.Loader;

namespace DeepSeekCuda.Model;

/// <summary>
/// The rotary table of MODEL.md §4: static YaRN-corrected frequencies of the interleaved pairs, applied at
/// every position (also below original_max_position_embeddings), amplitude 1 (mscale² lives in the
/// softmax scale). Plain RoPE when the config has no rope_scaling.
/// </summary>
internal static class YarnRope
{
    /// <summary>inv_freq of each of the qk_rope_head_dim/2 pairs, rounded to float32 as the reference stores it.</summary>
    public static float[] InverseFrequencies(ModelConfig config)
    {
        var dim = config.QkRopeHeadDim;
        var pairs = dim / 2;
        var theta = config.RopeTheta;
        var result = new float[pairs];
        for (var i = 0; i < pairs; i++)
        {
            // The reference computes 1 / θ^(2i/dim) in float32 arithmetic.
            var f = 1f / MathF.Pow((float)theta, 2 * i / (float)dim);
            result[i] = f;
        }

        if (config.RopeScaling is { } y && y.Factor > 1)
        {
            var (low, high) = CorrectionRange(y.BetaFast, y.BetaSlow, dim, theta, y.OriginalMaxPositionEmbeddings);
            var factor = (float)y.Factor;
            for (var i = 0; i < pairs; i++)
            {
                var ramp = Math.Clamp((i - (float)low) / (float)(high - low), 0f, 1f);
                var smooth = 1f - ramp;
                result[i] = result[i] / factor * (1f - smooth) + result[i] * smooth;
            }
        }

        // Extreme but individually valid rope_scaling values can meet in 0/0 or inf/inf (the correction range):
        // refuse them at load rather than rotate by NaN.
        for (var i = 0; i < pairs; i++)
        {
            if (!float.IsFinite(result[i]) || result[i] < 0 || result[i] > 1)
            {
                throw new ModelConfigException(null, config.RopeScaling is null ? "rope_theta" : "rope_scaling",
                    $"gives rotary frequency {result[i]} for pair {i} (theta {config.RopeTheta}); it must be a finite number in [0, 1]");
            }
        }

        return result;
    }

    /// <summary>The ramp's [low, high] pair indices (high nudged by 0.001 when equal).</summary>
    public static (double Low, double High) CorrectionRange(double betaFast, double betaSlow, int dim, double theta, int originalLength)
    {
        double Dim(double rotations) => dim * Math.Log(originalLength / (rotations * 2 * Math.PI)) / (2 * Math.Log(theta));
        double low = Math.Max(Math.Floor(Dim(betaFast)), 0);
        double high = Math.Min(Math.Ceiling(Dim(betaSlow)), dim - 1);
        if (low == high)
        {
            high += 0.001;
        }

        return (low, high);
    }

    /// <summary>cos and sin of angle = position·inv_freq (the product in float32), each [positions, pairs].</summary>
    public static (float[] Cos, float[] Sin) Table(ModelConfig config, int positions)
    {
        var inv = InverseFrequencies(config);
        var pairs = inv.Length;
        var cos = new float[positions * pairs];
        var sin = new float[positions * pairs];
        for (var p = 0; p < positions; p++)
        {
            for (var i = 0; i < pairs; i++)
            {
                var angle = (float)p * inv[i];
                cos[p * pairs + i] = (float)Math.Cos(angle);
                sin[p * pairs + i] = (float)Math.Sin(angle);
            }
        }

        return (cos, sin);
    }
}
