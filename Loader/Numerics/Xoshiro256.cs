namespace DeepSeekCuda.Loader.Numerics;

/// <summary>
/// xoshiro256** (Blackman and Vigna) seeded through SplitMix64, with Box-Muller normals: a fully specified
/// generator, so a seed gives the same draws on every platform and .NET version (System.Random's
/// algorithm is not a documented contract). Used for synthetic checkpoints and seeded sampling.
/// </summary>
internal sealed class Xoshiro256
{
    private ulong _s0, _s1, _s2, _s3;
    private double _spare;
    private bool _hasSpare;

    /// <summary>A generator whose state is expanded from <paramref name="seed"/> by SplitMix64.</summary>
    public Xoshiro256(ulong seed)
    {
        _s0 = SplitMix(ref seed);
        _s1 = SplitMix(ref seed);
        _s2 = SplitMix(ref seed);
        _s3 = SplitMix(ref seed);
    }

    /// <summary>
    /// A generator for one named stream of a global seed (e.g. one tensor of a synthetic checkpoint):
    /// streams are independent of the order in which they are drawn.
    /// </summary>
    public static Xoshiro256 ForStream(int seed, string stream)
    {
        // FNV-1a of the name.
        var h = 14695981039346656037UL;
        foreach (var c in stream)
        {
            h = (h ^ c) * 1099511628211UL;
        }

        return new Xoshiro256(((ulong)(uint)seed << 32) ^ h);
    }

    /// <summary>The next 64 random bits.</summary>
    public ulong NextUInt64()
    {
        var result = ulong.RotateLeft(_s1 * 5, 7) * 9;
        var t = _s1 << 17;
        _s2 ^= _s0;
        _s3 ^= _s1;
        _s1 ^= _s2;
        _s0 ^= _s3;
        _s2 ^= t;
        _s3 = ulong.RotateLeft(_s3, 45);
        return result;
    }

    /// <summary>Uniform in [0, 1) with 53 random bits.</summary>
    public double NextDouble() => (NextUInt64() >> 11) * (1.0 / (1UL << 53));

    /// <summary>Standard normal (Box-Muller; pairs are used in turn).</summary>
    public double NextNormal()
    {
        if (_hasSpare)
        {
            _hasSpare = false;
            return _spare;
        }

        // 1 - u lies in (0, 1], so the logarithm is finite.
        var r = Math.Sqrt(-2.0 * Math.Log(1.0 - NextDouble()));
        var theta = 2.0 * Math.PI * NextDouble();
        _spare = r * Math.Sin(theta);
        _hasSpare = true;
        return r * Math.Cos(theta);
    }

    private static ulong SplitMix(ref ulong x)
    {
        var z = x += 0x9E3779B97F4A7C15UL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }
}
