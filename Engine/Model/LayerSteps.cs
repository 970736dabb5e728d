using DeepSeekCuda.Backends;
using DeepSeekCuda.Loader;

namespace DeepSeekCuda.Model;

/// <summary>What a decoder layer's steps need from the model on one device: the backend, rotary table and the head geometry it holds.</summary>
/// <param name="Backend">The device's backend.</param>
/// <param name="Config">The model config.</param>
/// <param name="Rope">The device's rotary table.</param>
/// <param name="Dims">MLA geometry; <see cref="MlaDims.Heads"/> is the heads this device holds.</param>
/// <param name="Scale">Softmax scale.</param>
/// <param name="Attention">Attention form option.</param>
internal sealed record LayerContext(IBackend Backend, ModelConfig Config, RopeTable Rope, MlaDims Dims, float Scale, AttentionForm Attention);

/// <summary>
/// The two halves of a decoder layer, shared by the single-device session and the parallel one: each
/// returns the layer's contribution to the residual stream. On a device holding a <see cref="LayerShard"/>
/// the contribution is a partial sum (its heads' columns of o_proj; its experts and MLP columns), which the
/// caller completes with an all-reduce before the residual add.
/// </summary>
internal static class LayerSteps
{
    /// <summary>
    /// Refuses a forward step before anything runs: no tokens, more than <paramref name="maxSequenceLength"/> positions
    /// after the <paramref name="length"/> already cached, or an id outside the vocabulary.
    /// </summary>
    public static void CheckStep(ReadOnlySpan<int> tokens, int length, int maxSequenceLength, int vocabSize)
    {
        if (tokens.Length == 0)
        {
            throw new ArgumentException("no tokens", nameof(tokens));
        }

        if (length + tokens.Length > maxSequenceLength)
        {
            throw new ArgumentException($"{length} + {tokens.Length} tokens exceed the maximum sequence length {maxSequenceLength}", nameof(tokens));
        }

        CheckIds(tokens, vocabSize);
    }

    /// <summary>Throws when an id of <paramref name="tokens"/> is outside the vocabulary.</summary>
    public static void CheckIds(ReadOnlySpan<int> tokens, int vocabSize)
    {
        foreach (var id in tokens)
        {
            if ((uint)id >= (uint)vocabSize)
            {
                throw new ArgumentException($"token id {id} is outside the vocabulary (0..{vocabSize - 1})", nameof(tokens));
            }
        }
    }

    /// <summary>MLA of <paramref name="a"/> = input_layernorm(h) at positions start..: appends to the latent cache, returns o_proj's output [T, D].</summary>
    public static Tensor Attention(LayerContext x, DecoderLayer layer, Tensor a, LatentCache cache, int start)
    {
        var b = x.Backend;
        var dims = x.Dims;
        var t = a.Rows;
        using var q = b.Allocate(t, dims.Heads * dims.QkHead); // [T, H·(nope + rope)]
        if (layer.QA is { } qa)
        {
            using var cq = b.Allocate(t, qa.Out); // [T, q_lora_rank]
            b.Linear(a, qa, cq);
            b.RmsNorm(cq, layer.QANorm!, cq);
            b.Linear(cq, layer.QB, q);
        }
        else
        {
            b.Linear(a, layer.QB, q);
        }

        b.ApplyRope(q, x.Rope, start, dims.QkHead, dims.QkNope);
        using (var kv = b.Allocate(t, x.Config.KvCacheDim)) // [T, kv_lora_rank + rope]
        {
            b.Linear(a, layer.KvA, kv);
            b.AppendLatent(kv, layer.KvANorm, x.Rope, cache, start);
        }

        using var attn = b.Allocate(t, dims.Heads * dims.V); // [T, H·v]
        var form = x.Attention switch
        {
            AttentionForm.Auto => t > 1 ? AttentionForm.Naive : AttentionForm.Absorbed,
            var chosen => chosen,
        };
        if (form == AttentionForm.Naive)
        {
            b.MlaAttentionNaive(q, cache, layer.KvB, dims, start, x.Scale, attn);
        }
        else
        {
            b.MlaAttentionAbsorbed(q, cache, layer.KvB, dims, start, x.Scale, attn);
        }

        var attnOut = b.Allocate(t, x.Config.HiddenSize);
        b.Linear(attn, layer.O, attnOut);
        return attnOut;
    }

    /// <summary>The dense MLP or the MoE of <paramref name="f"/> = post_attention_layernorm(h); returns [T, D].</summary>
    public static Tensor Ffn(LayerContext x, DecoderLayer layer, Tensor f, Action<Intermediate>? observer, string name)
    {
        var b = x.Backend;
        var t = f.Rows;
        var y = b.Allocate(t, x.Config.HiddenSize);
        if (layer.Dense is { } mlp)
        {
            using var g = b.Allocate(t, mlp[0].Out);
            using var u = b.Allocate(t, mlp[1].Out);
            b.Linear(f, mlp[0], g);
            b.Linear(f, mlp[1], u);
            b.SiluMul(g, u, g);
            b.Linear(g, mlp[2], y);
            return y;
        }

        var gate = layer.Gate!;
        using var routing = b.AllocateRouting(t, gate.Options.Experts, gate.Options.TopK);
        b.MoeGate(f, gate, routing);
        if (observer is not null)
        {
            Observe(b, observer, name + "gate_in", f);
            var o = gate.Options;
            var scores = new float[t * o.Experts];
            var idx = new int[t * o.TopK];
            var w = new float[t * o.TopK];
            b.DownloadRouting(routing, scores, idx, w);
            observer(new Intermediate(name + "gate_scores", t, o.Experts, scores, null));
            observer(new Intermediate(name + "topk_idx", t, o.TopK, null, idx));
            observer(new Intermediate(name + "topk_weight", t, o.TopK, w, null));
        }

        b.MoeExperts(f, routing, layer.Experts!, y);
        return y;
    }

    /// <summary>Hands a copy of <paramref name="tensor"/> to <paramref name="observer"/>, when there is one.</summary>
    public static void Observe(IBackend b, Action<Intermediate>? observer, string name, Tensor tensor)
    {
        if (observer is null)
        {
            return;
        }

        var values = new float[tensor.Length];
        b.Download(tensor, values);
        observer(new Intermediate(name, tensor.Rows, tensor.Cols, values, null));
    }
}
