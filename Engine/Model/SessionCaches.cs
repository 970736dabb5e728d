using DeepSeekCuda.Backends;
using DeepSeekCuda.Loader;

namespace DeepSeekCuda.Model;

/// <summary>
/// The latent caches of one session's layers (or of its MTP layer) on the devices that run them, [device][layer], holding what
/// the session has used rather than its longest possible length: none until the first call, then whole 64-position blocks
/// for what that call needs; a call that needs more replaces every cache with one at least twice as long (at most the model's
/// length) and copies the positions held so far into it (<see cref="IBackend.CopyLatentCache"/>), so a session of n positions
/// holds fewer than 2n + 64 per layer and has copied fewer than 2n.
/// </summary>
internal sealed class SessionCaches : IDisposable
{
    private readonly IReadOnlyList<DeviceWeights> _devices;
    private readonly bool[][] _runs;            // [device][layer]: whether the device holds the layer's cache
    private LatentCache?[][] _caches;           // [device][layer]; null where the device does not run the layer or before the first call
    private readonly int _latentDim, _ropeDim, _maxPositions;

    /// <summary>Caches for layer i on each device d where <paramref name="runs"/>[d][i] (it holds the layer's weights), of the config's latent and rope widths.</summary>
    public SessionCaches(IReadOnlyList<DeviceWeights> devices, bool[][] runs, ModelConfig config, int maxPositions)
    {
        _devices = devices;
        _runs = runs;
        _caches = [.. runs.Select(r => new LatentCache?[r.Length])];
        _latentDim = config.KvLoraRank;
        _ropeDim = config.QkRopeHeadDim;
        _maxPositions = maxPositions;
    }

    /// <summary>Positions each cache holds now (0 before the first call).</summary>
    public int Capacity { get; private set; }

    /// <summary>Layer <paramref name="layer"/>'s cache on device <paramref name="device"/> (which runs it; after <see cref="Reserve"/>).</summary>
    public LatentCache this[int device, int layer] => _caches[device][layer]
        ?? throw new InvalidOperationException($"device {device} holds no cache of layer {layer}");

    /// <summary>
    /// Makes every cache hold positions 0 .. <paramref name="positions"/> − 1, keeping the first <paramref name="kept"/>
    /// (written before). A failed allocation or copy leaves the caches as they were, with nothing new left allocated.
    /// </summary>
    public void Reserve(int positions, int kept)
    {
        ArgumentOutOfRangeException.ThrowIfGreaterThan(positions, _maxPositions);
        if (positions <= Capacity)
        {
            return;
        }

        var capacity = Grown(Capacity, positions, _maxPositions);
        var grown = _caches.Select(c => new LatentCache?[c.Length]).ToArray();
        try
        {
            for (var d = 0; d < _runs.Length; d++)
            {
                for (var i = 0; i < _runs[d].Length; i++)
                {
                    if (_runs[d][i])
                    {
                        var b = _devices[d].Backend;
                        grown[d][i] = b.AllocateLatentCache(capacity, _latentDim, _ropeDim);
                        if (kept > 0)
                        {
                            b.CopyLatentCache(_caches[d][i]!, grown[d][i]!, kept);
                        }
                    }
                }
            }
        }
        catch
        {
            Release(grown);
            throw;
        }

        Release(_caches);
        _caches = grown;
        Capacity = capacity;
    }

    /// <summary>
    /// The capacity a cache of <paramref name="capacity"/> positions grows to when <paramref name="positions"/> are needed: whole
    /// 64-position blocks, at least twice the old capacity, at most <paramref name="maxPositions"/>.
    /// </summary>
    internal static int Grown(int capacity, int positions, int maxPositions)
    {
        var blocks = Kernels.PagedLatentCache.BlocksFor(positions);
        var block = Kernels.PagedLatentCache.BlockSize;
        return (int)Math.Min(maxPositions, Math.Max((long)blocks * block, 2L * capacity));
    }

    private static void Release(LatentCache?[][] caches)
    {
        foreach (var cache in caches.SelectMany(c => c))
        {
            cache?.Dispose();
        }
    }

    /// <summary>Releases every cache.</summary>
    public void Dispose() => Release(_caches);
}
