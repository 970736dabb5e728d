using DeepSeekCuda.Loader;

namespace DeepSeekCuda.Model;

/// <summary>
/// The part of a decoder layer one device holds under tensor/expert parallelism: a contiguous range of
/// attention heads (their rows of q_b and kv_b, their columns of o_proj), a subset of the routed experts,
/// and a contiguous column range of the dense MLP and of the shared experts (gate/up rows, down columns).
/// Everything else of the layer (norms, q_a, kv_a, the router) is replicated. With these slices the
/// layer's attention output and FFN output are partial sums that an all-reduce completes.
/// </summary>
/// <param name="HeadStart">First head held.</param>
/// <param name="Heads">Heads held.</param>
/// <param name="Experts">Routed experts held, ascending.</param>
/// <param name="Dense">Columns of the dense MLP's hidden width held (start, count).</param>
/// <param name="Shared">Columns of the shared experts' hidden width held (start, count); count 0 when there are none.</param>
public sealed record LayerShard(int HeadStart, int Heads, IReadOnlyList<int> Experts, (int Start, int Count) Dense, (int Start, int Count) Shared)
{
    /// <summary>Whether the device holds routed expert <paramref name="expert"/>.</summary>
    public bool HoldsExpert(int expert) => BinarySearch(expert);

    private bool BinarySearch(int expert)
    {
        int lo = 0, hi = Experts.Count - 1;
        while (lo <= hi)
        {
            var mid = (lo + hi) >> 1;
            if (Experts[mid] == expert)
            {
                return true;
            }

            if (Experts[mid] < expert)
            {
                lo = mid + 1;
            }
            else
            {
                hi = mid - 1;
            }
        }

        return false;
    }

    /// <summary>The weights of layer <paramref name="n"/> this shard loads: q_b and kv_b row slices, o_proj column slice.</summary>
    internal (LinearSpec QB, LinearSpec KvB, LinearSpec O) Attention(ModelConfig c, CheckpointLayout.LayerNames n)
    {
        var qb = n.QB;
        var kvb = n.KvB;
        var o = n.O;
        int qk = c.QkHeadDim, kvHead = c.QkNopeHeadDim + c.VHeadDim, v = c.VHeadDim;
        return (qb.Sliced(HeadStart * qk, Heads * qk, 0, qb.In),
            kvb.Sliced(HeadStart * kvHead, Heads * kvHead, 0, kvb.In),
            o.Sliced(0, o.Out, HeadStart * v, Heads * v));
    }

    /// <summary>An MLP [gate, up, down] restricted to hidden columns [start, +count): gate/up rows, down columns.</summary>
    internal static LinearSpec[] SliceMlp(LinearSpec[] mlp, (int Start, int Count) range) =>
    [
        mlp[0].Sliced(range.Start, range.Count, 0, mlp[0].In),
        mlp[1].Sliced(range.Start, range.Count, 0, mlp[1].In),
        mlp[2].Sliced(0, mlp[2].Out, range.Start, range.Count),
    ];
}
