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

    /// <summary>
    /// One decoder layer over a token stream: h += MLA(a); h += FFN(post_norm(h)); then nextNormed = nextNorm(h).
    /// <paramref name="a"/> is input_layernorm(h), computed by the previous fused residual step; each segment's rows
    /// attend over its own cache.
    /// </summary>
    public static void Layer(LayerContext x, DecoderLayer layer, Tensor h, Tensor a, ReadOnlySpan<Segment> segments, Activations ws,
        NormWeight nextNorm, Tensor nextNormed, Action<Intermediate>? observer, string prefix)
    {
        var b = x.Backend;
        var name = $"{prefix}layer{layer.Index}.";
        using var attnOut = Attention(x, layer, a, segments, ws);
        Observe(b, observer, name + "attn_out", attnOut);

        using var f = ws.Take(Activation.FfnInput, h.Rows, x.Config.HiddenSize); // post_attention_layernorm(h)
        b.AddRmsNorm(h, attnOut, layer.PostAttentionNorm, f);

        using var y = Ffn(x, layer, f, ws, observer, name);
        Observe(b, observer, name + "ffn_out", y);
        b.AddRmsNorm(h, y, nextNorm, nextNormed);
        Observe(b, observer, name + "out", h);
    }

    /// <summary>
    /// MLA of <paramref name="a"/> = input_layernorm(h): the projections over every row at once, then per segment
    /// RoPE at its positions, the append to its cache and attention over it; returns o_proj's output [T, D].
    /// </summary>
    public static Tensor Attention(LayerContext x, DecoderLayer layer, Tensor a, ReadOnlySpan<Segment> segments, Activations ws)
    {
        var b = x.Backend;
        var dims = x.Dims;
        var t = a.Rows;
        using var q = ws.Take(Activation.Query, t, dims.Heads * dims.QkHead); // [T, H·(nope + rope)]
        if (layer.QA is { } qa)
        {
            using var cq = ws.Take(Activation.QueryLatent, t, qa.Out); // [T, q_lora_rank]
            b.Linear(a, qa, cq);
            b.RmsNorm(cq, layer.QANorm!, cq);
            b.Linear(cq, layer.QB, q);
        }
        else
        {
            b.Linear(a, layer.QB, q);
        }

        foreach (var s in segments)
        {
            using var qs = b.View(q, s.FirstRow, s.Rows);
            b.ApplyRope(qs, x.Rope, s.Start, dims.QkHead, dims.QkNope);
        }

        AppendLatents(x, layer, a, segments, ws);

        using var attn = ws.Take(Activation.AttentionOutput, t, dims.Heads * dims.V); // [T, H·v]
        foreach (var s in segments)
        {
            using var qs = b.View(q, s.FirstRow, s.Rows);
            using var os = b.View(attn, s.FirstRow, s.Rows);
            var form = x.Attention switch
            {
                AttentionForm.Auto => s.Rows > 1 ? AttentionForm.Naive : AttentionForm.Absorbed,
                var chosen => chosen,
            };
            if (form == AttentionForm.Naive)
            {
                b.MlaAttentionNaive(qs, s.Cache, layer.KvB, dims, s.Start, x.Scale, os);
            }
            else
            {
                b.MlaAttentionAbsorbed(qs, s.Cache, layer.KvB, dims, s.Start, x.Scale, os);
            }
        }

        var attnOut = ws.Take(Activation.AttentionProjection, t, x.Config.HiddenSize);
        b.Linear(attn, layer.O, attnOut);
        return attnOut;
    }

    /// <summary>kv_a of every row of <paramref name="a"/>, each segment's rows appended to its cache (normalized latent, rotated key).</summary>
    public static void AppendLatents(LayerContext x, DecoderLayer layer, Tensor a, ReadOnlySpan<Segment> segments, Activations ws)
    {
        var b = x.Backend;
        using var kv = ws.Take(Activation.KeyValue, a.Rows, x.Config.KvCacheDim); // [T, kv_lora_rank + rope]
        b.Linear(a, layer.KvA, kv);
        foreach (var s in segments)
        {
            using var kvs = b.View(kv, s.FirstRow, s.Rows);
            b.AppendLatent(kvs, layer.KvANorm, x.Rope, s.Cache, s.Start);
        }
    }

    /// <summary>The dense MLP or the MoE of <paramref name="f"/> = post_attention_layernorm(h); returns [T, D].</summary>
    public static Tensor Ffn(LayerContext x, DecoderLayer layer, Tensor f, Activations ws, Action<Intermediate>? observer, string name)
    {
        var b = x.Backend;
        var t = f.Rows;
        var y = ws.Take(Activation.FfnOutput, t, x.Config.HiddenSize);
        if (layer.Dense is { } mlp)
        {
            using var g = ws.Take(Activation.MlpGate, t, mlp[0].Out);
            using var u = ws.Take(Activation.MlpUp, t, mlp[1].Out);
            b.Linear(f, mlp[0], g);
            b.Linear(f, mlp[1], u);
            b.SiluMul(g, u, g);
            b.Linear(g, mlp[2], y);
            return y;
        }

        var gate = layer.Gate!;
        using var routing = ws.TakeRouting(t, gate.Options.Experts, gate.Options.TopK);
        b.MoeGate(f, gate, routing.Value);
        if (observer is not null)
        {
            Observe(b, observer, name + "gate_in", f);
            var o = gate.Options;
            var scores = new float[routing.Value.Tokens * o.Experts];
            var idx = new int[routing.Value.Tokens * o.TopK];
            var w = new float[routing.Value.Tokens * o.TopK];
            b.DownloadRouting(routing.Value, scores, idx, w);
            observer(new Intermediate(name + "gate_scores", t, o.Experts, scores[..(t * o.Experts)], null));
            observer(new Intermediate(name + "topk_idx", t, o.TopK, null, idx[..(t * o.TopK)]));
            observer(new Intermediate(name + "topk_weight", t, o.TopK, w[..(t * o.TopK)], null));
        }

        b.MoeExperts(f, routing.Value, layer.Experts!, y);
        return y;
    }

    /// <summary>
    /// The MTP module (MODEL.md §6) over a token stream: for each row the main model's hidden after the final norm
    /// (<paramref name="hiddens"/> [T, D]) and the token that follows it; writes the head-normed output [T, D] to
    /// <paramref name="normed"/>, each segment's rows running at its positions over its MTP cache.
    /// </summary>
    public static void Mtp(LayerContext x, MtpWeights mtp, EmbeddingWeight embed, Tensor hiddens, ReadOnlySpan<int> nextTokens,
        ReadOnlySpan<Segment> segments, Activations ws, Tensor normed, Action<Intermediate>? observer)
    {
        var (z, a) = MtpLayerInput(x, mtp, embed, hiddens, nextTokens, ws);
        using (z)
        using (a)
        {
            Layer(x, mtp.Layer, z, a, segments, ws, mtp.HeadNorm, normed, observer, "mtp.");
        }
    }

    /// <summary>
    /// Only the MTP layer's cache rows of <see cref="Mtp"/>'s inputs: what later positions attend over, for positions
    /// whose own draft is never asked for (the layer's attention, MoE and head are skipped).
    /// </summary>
    public static void MtpAppend(LayerContext x, MtpWeights mtp, EmbeddingWeight embed, Tensor hiddens, ReadOnlySpan<int> nextTokens,
        ReadOnlySpan<Segment> segments, Activations ws)
    {
        var (z, a) = MtpLayerInput(x, mtp, embed, hiddens, nextTokens, ws);
        using (z)
        using (a)
        {
            AppendLatents(x, mtp.Layer, a, segments, ws);
        }
    }

    /// <summary>The MTP layer's residual input z = eh_proj([norm(embed(next)) ; norm(hidden)]) and its input norm a.</summary>
    private static (Tensor Z, Tensor A) MtpLayerInput(LayerContext x, MtpWeights mtp, EmbeddingWeight embed, Tensor hiddens, ReadOnlySpan<int> nextTokens,
        Activations ws)
    {
        var b = x.Backend;
        var n = nextTokens.Length;
        var d = x.Config.HiddenSize;
        using var e = ws.Take(Activation.MtpEmbedding, n, d);
        b.Embedding(embed, nextTokens, e);
        b.RmsNorm(e, mtp.ENorm, e);
        using var h = ws.Take(Activation.MtpHidden, n, d);
        b.RmsNorm(hiddens, mtp.HNorm, h);
        using var eh = ws.Take(Activation.MtpConcat, n, 2 * d);
        b.ConcatColumns(e, h, eh);
        var z = ws.Take(Activation.MtpResidual, n, d);
        b.Linear(eh, mtp.EhProj, z);
        var a = ws.Take(Activation.MtpNormed, n, d);
        b.RmsNorm(z, mtp.Layer.InputNorm, a);
        return (z, a);
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
