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

/// <summary>What one device runs of the MTP layer (<see cref="LayerSteps.Mtp"/>, <see cref="LayerSteps.MtpAppend"/>).</summary>
/// <param name="X">The device's context (its heads: the MTP layer is sharded as the main layers are).</param>
/// <param name="Mtp">The module's weights on the device (the layer or its shard; the input side on one device).</param>
/// <param name="Rows">How the stream's rows reach the device's MTP cache.</param>
/// <param name="Ws">Where the device's intermediates come from.</param>
/// <param name="Normed">Receives the head-normed output [T, D] (<see cref="LayerSteps.Mtp"/>; null for <see cref="LayerSteps.MtpAppend"/>).</param>
internal readonly record struct MtpPart(LayerContext X, MtpWeights Mtp, LayerRows Rows, Activations Ws, Tensor? Normed);

/// <summary>What one device runs of a decoder layer (<see cref="LayerSteps.Layer(ReadOnlySpan{LayerPart}, Action{IReadOnlyList{Tensor}}?, Action{Intermediate}?, string)"/>).</summary>
/// <param name="X">The device's context.</param>
/// <param name="Layer">The layer's weights on the device (the whole layer, or its shard).</param>
/// <param name="H">The residual stream [T, D] on the device.</param>
/// <param name="A">input_layernorm(h) [T, D].</param>
/// <param name="Rows">How the stream's rows reach the device's cache of the layer.</param>
/// <param name="Ws">Where the device's intermediates come from.</param>
/// <param name="NextNorm">The norm after the layer (the next layer's input norm, or the final norm).</param>
/// <param name="NextNormed">Receives nextNorm(h) [T, D].</param>
internal readonly record struct LayerPart(LayerContext X, DecoderLayer Layer, Tensor H, Tensor A, LayerRows Rows, Activations Ws,
    NormWeight NextNorm, Tensor NextNormed);

/// <summary>
/// A decoder layer's steps, shared by every forward pass (<see cref="ModelPass"/>, the MTP module): its two halves
/// each return the layer's contribution to the residual stream. On a device holding a <see cref="LayerShard"/>
/// the contribution is a partial sum (its heads' columns of o_proj; its experts and MLP columns), which the
/// caller completes with an all-reduce before the residual add.
/// </summary>
internal static class LayerSteps
{
    /// <summary>Most rows of one sequence that <see cref="AttentionForm.Auto"/> attends in the absorbed form (a decode token and its MTP draft).</summary>
    public const int AbsorbedRows = 2;

    /// <summary>
    /// How many of <paramref name="rows"/> rows fed from <paramref name="position"/> attend in the naive form under
    /// <see cref="AttentionForm.Auto"/> (the leading ones; the rest absorbed). With the request's prompt length known
    /// (<paramref name="promptLength"/> ≥ 0), a row's form depends on its position alone, so every cut of a request into steps
    /// gives the same numbers, and the same as a session fed the prompt at once and then one token at a time: the prompt's rows
    /// naive when the prompt has more than <see cref="AbsorbedRows"/> tokens, the tokens after it absorbed. Without it (−1),
    /// the rows attend as one forward call over them: naive when there are more than <see cref="AbsorbedRows"/>.
    /// </summary>
    public static int NaiveRows(int position, int rows, int promptLength) => promptLength < 0
        ? (rows > AbsorbedRows ? rows : 0)
        : promptLength > AbsorbedRows ? Math.Clamp(promptLength - position, 0, rows) : 0;

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
    /// One decoder layer over a token stream on one device: h += MLA(a); h += FFN(post_norm(h)); then nextNormed = nextNorm(h).
    /// <paramref name="a"/> is input_layernorm(h), computed by the previous fused residual step; each sequence's rows
    /// attend over its own cache.
    /// </summary>
    public static void Layer(LayerContext x, DecoderLayer layer, Tensor h, Tensor a, LayerRows rows, Activations ws,
        NormWeight nextNorm, Tensor nextNormed, Action<Intermediate>? observer, string prefix) =>
        Layer([new LayerPart(x, layer, h, a, rows, ws, nextNorm, nextNormed)], null, observer, prefix);

    /// <summary>
    /// One decoder layer on every device that runs it (<see cref="Layer(LayerContext, DecoderLayer, Tensor, Tensor, LayerRows, Activations, NormWeight, Tensor, Action{Intermediate}?, string)"/>
    /// on each part): where several devices each hold a shard of the layer, their attention outputs and then their FFN
    /// outputs are partial sums that <paramref name="allReduceSum"/> completes before each device's residual add, so every
    /// device carries the same residual stream. <paramref name="observer"/> sees the first part's (completed) tensors.
    /// </summary>
    public static void Layer(ReadOnlySpan<LayerPart> parts, Action<IReadOnlyList<Tensor>>? allReduceSum, Action<Intermediate>? observer, string prefix)
    {
        var n = parts.Length;
        if (n > 1 && allReduceSum is null)
        {
            throw new ArgumentException($"{n} devices run the layer and there is no all-reduce", nameof(allReduceSum));
        }

        var first = parts[0];
        var name = $"{prefix}layer{first.Layer.Index}.";
        var attnOut = new Tensor[n];
        var f = new Tensor[n];
        var y = new Tensor[n];
        try
        {
            for (var k = 0; k < n; k++)
            {
                var p = parts[k];
                attnOut[k] = Attention(p.X, p.Layer, p.A, p.Rows, p.Ws);
            }

            Reduce(allReduceSum, attnOut);
            Observe(first.X.Backend, observer, name + "attn_out", attnOut[0]);
            for (var k = 0; k < n; k++)
            {
                var p = parts[k];
                f[k] = p.Ws.Take(Activation.FfnInput, p.H.Rows, p.X.Config.HiddenSize); // post_attention_layernorm(h)
                p.X.Backend.AddRmsNorm(p.H, attnOut[k], p.Layer.PostAttentionNorm, f[k]);
                y[k] = Ffn(p.X, p.Layer, f[k], p.Ws, k == 0 ? observer : null, name);
            }

            Reduce(allReduceSum, y);
            Observe(first.X.Backend, observer, name + "ffn_out", y[0]);
            for (var k = 0; k < n; k++)
            {
                var p = parts[k];
                p.X.Backend.AddRmsNorm(p.H, y[k], p.NextNorm, p.NextNormed);
            }

            Observe(first.X.Backend, observer, name + "out", first.H);
        }
        finally
        {
            for (var k = n - 1; k >= 0; k--)
            {
                y[k]?.Dispose();
                f[k]?.Dispose();
                attnOut[k]?.Dispose();
            }
        }
    }

    private static void Reduce(Action<IReadOnlyList<Tensor>>? allReduceSum, Tensor[] partials)
    {
        if (partials.Length > 1)
        {
            allReduceSum!(partials);
        }
    }

    /// <summary>
    /// MLA of <paramref name="a"/> = input_layernorm(h): the projections over every row at once, RoPE at each row's position,
    /// the append to each sequence's cache and attention over it; returns o_proj's output [T, D]. In a paged step RoPE and the
    /// append run once over the stream and the leading decode rows attend in one call; other sequences attend one by one.
    /// </summary>
    public static Tensor Attention(LayerContext x, DecoderLayer layer, Tensor a, LayerRows rows, Activations ws)
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

        if (rows.Paged is { } paged)
        {
            b.ApplyRopeRows(q, x.Rope, paged.Rows, dims.QkHead, dims.QkNope);
        }
        else
        {
            foreach (var s in rows.Segments.Span)
            {
                using var qs = b.View(q, s.FirstRow, s.Rows);
                b.ApplyRope(qs, x.Rope, s.Start, dims.QkHead, dims.QkNope);
            }
        }

        AppendLatents(x, layer, a, rows, ws);

        using var attn = ws.Take(Activation.AttentionOutput, t, dims.Heads * dims.V); // [T, H·v]
        var batched = 0;
        if (rows.Paged is { DecodeRows: > 0 } p && x.Attention != AttentionForm.Naive)
        {
            batched = p.DecodeRows;
            using var qs = b.View(q, 0, batched);
            using var os = b.View(attn, 0, batched);
            b.MlaAttentionRows(qs, p.Pool, p.Table, p.Rows, layer.KvB, dims, x.Scale, os);
        }

        foreach (var s in rows.Segments.Span)
        {
            if (s.FirstRow < batched)
            {
                continue;
            }

            using var qs = b.View(q, s.FirstRow, s.Rows);
            using var os = b.View(attn, s.FirstRow, s.Rows);
            var form = (x.Attention, s.Form) switch
            {
                (AttentionForm.Auto, AttentionForm.Auto) => NaiveRows(s.Start, s.Rows, -1) > 0 ? AttentionForm.Naive : AttentionForm.Absorbed,
                (AttentionForm.Auto, var decided) => decided,
                (var chosen, _) => chosen,
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

    /// <summary>
    /// The embedding of a pass's tokens into <paramref name="output"/>: in a paged pass read from its step rows where the
    /// backend runs (the host passes no ids), or where they were chosen (<see cref="PagedRows.Chosen"/>), else from <paramref name="tokens"/>.
    /// </summary>
    public static void Embed(IBackend b, EmbeddingWeight table, ReadOnlySpan<int> tokens, PagedRows? paged, Tensor output)
    {
        if (paged is { Chosen: { } chosen } c)
        {
            b.EmbeddingChosenRows(table, c.Rows, chosen, output);
        }
        else if (paged is { } p)
        {
            b.EmbeddingRows(table, p.Rows, output);
        }
        else
        {
            b.Embedding(table, tokens, output);
        }
    }

    /// <summary>kv_a of every row of <paramref name="a"/>, each row appended to its sequence's cache (normalized latent, rotated key).</summary>
    public static void AppendLatents(LayerContext x, DecoderLayer layer, Tensor a, LayerRows rows, Activations ws)
    {
        var b = x.Backend;
        using var kv = ws.Take(Activation.KeyValue, a.Rows, x.Config.KvCacheDim); // [T, kv_lora_rank + rope]
        b.Linear(a, layer.KvA, kv);
        if (rows.Paged is { } paged)
        {
            b.AppendLatentRows(kv, layer.KvANorm, x.Rope, paged.Pool, paged.Table, paged.Rows);
            return;
        }

        foreach (var s in rows.Segments.Span)
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
    /// The MTP module (MODEL.md §6) over a token stream, on every device that runs its layer: for each row the main model's
    /// hidden after the final norm (<paramref name="hiddens"/> [T, D], on the device that holds the module's input side) and
    /// the token that follows it; writes the head-normed output [T, D] to each part's <see cref="MtpPart.Normed"/>, each
    /// sequence's rows running at their positions over its MTP cache. Where several devices each hold a shard of the layer,
    /// the input device's layer input is broadcast to them first (<see cref="MtpLayerInputs"/>) and the layer runs as a
    /// main layer does (<see cref="Layer(ReadOnlySpan{LayerPart}, Action{IReadOnlyList{Tensor}}?, Action{Intermediate}?, string)"/>).
    /// </summary>
    public static void Mtp(ReadOnlySpan<MtpPart> parts, EmbeddingWeight embed, Tensor hiddens, ReadOnlySpan<int> nextTokens,
        Action<IReadOnlyList<Tensor>>? allReduceSum, Action<Intermediate>? observer)
    {
        var (z, a) = MtpLayerInputs(parts, embed, hiddens, nextTokens, allReduceSum);
        try
        {
            var layer = new LayerPart[parts.Length];
            for (var k = 0; k < parts.Length; k++)
            {
                var p = parts[k];
                layer[k] = new LayerPart(p.X, p.Mtp.Layer, z[k], a[k], p.Rows, p.Ws, p.Mtp.HeadNorm,
                    p.Normed ?? throw new ArgumentException($"MTP part {k} has no output", nameof(parts)));
            }

            Layer(layer, allReduceSum, observer, "mtp.");
        }
        finally
        {
            Release(z, a);
        }
    }

    /// <summary>
    /// Only the MTP layer's cache rows of <see cref="Mtp"/>'s inputs, on every device that runs the layer: what later
    /// positions attend over, for positions whose own draft is never asked for (the layer's attention, MoE and head are skipped).
    /// </summary>
    public static void MtpAppend(ReadOnlySpan<MtpPart> parts, EmbeddingWeight embed, Tensor hiddens, ReadOnlySpan<int> nextTokens,
        Action<IReadOnlyList<Tensor>>? allReduceSum)
    {
        var (z, a) = MtpLayerInputs(parts, embed, hiddens, nextTokens, allReduceSum);
        try
        {
            for (var k = 0; k < parts.Length; k++)
            {
                var p = parts[k];
                AppendLatents(p.X, p.Mtp.Layer, a[k], p.Rows, p.Ws);
            }
        }
        finally
        {
            Release(z, a);
        }
    }

    /// <summary>
    /// The MTP layer's residual input z = eh_proj([norm(embed(next)) ; norm(hidden)]) and its input norm a on each part's
    /// device: computed where the module's input side is (one part), and over several devices broadcast from there by an
    /// all-reduce in which the others contribute zeros (exact: z + 0 + … = z), each of them then norming its copy.
    /// </summary>
    private static (Tensor[] Z, Tensor[] A) MtpLayerInputs(ReadOnlySpan<MtpPart> parts, EmbeddingWeight embed, Tensor hiddens,
        ReadOnlySpan<int> nextTokens, Action<IReadOnlyList<Tensor>>? allReduceSum)
    {
        var count = parts.Length;
        if (count > 1 && allReduceSum is null)
        {
            throw new ArgumentException($"{count} devices run the MTP layer and there is no all-reduce", nameof(allReduceSum));
        }

        // The one part that holds the input side (DeviceLayout checks there is exactly one: the head device's).
        var source = 0;
        while (!parts[source].Mtp.HasInput)
        {
            source++;
        }

        var n = nextTokens.Length;
        var z = new Tensor[count];
        var a = new Tensor[count];
        try
        {
            for (var k = 0; k < count; k++)
            {
                var p = parts[k];
                var d = p.X.Config.HiddenSize;
                if (k == source)
                {
                    (z[k], a[k]) = MtpLayerInput(p.X, p.Mtp, embed, hiddens, nextTokens, p.Rows.Paged, p.Ws);
                }
                else
                {
                    z[k] = p.Ws.Take(Activation.MtpResidual, n, d);
                    a[k] = p.Ws.Take(Activation.MtpNormed, n, d);
                    p.X.Backend.Zero(z[k]);
                }
            }

            if (count > 1)
            {
                allReduceSum!(z);
                for (var k = 0; k < count; k++)
                {
                    if (k != source)
                    {
                        parts[k].X.Backend.RmsNorm(z[k], parts[k].Mtp.Layer.InputNorm, a[k]);
                    }
                }
            }

            return (z, a);
        }
        catch
        {
            Release(z, a);
            throw;
        }
    }

    private static void Release(Tensor?[] z, Tensor?[] a)
    {
        for (var k = z.Length - 1; k >= 0; k--)
        {
            a[k]?.Dispose();
            z[k]?.Dispose();
        }
    }

    /// <summary>The MTP layer's residual input z = eh_proj([norm(embed(next)) ; norm(hidden)]) and its input norm a, on the device that holds the input side.</summary>
    private static (Tensor Z, Tensor A) MtpLayerInput(LayerContext x, MtpWeights mtp, EmbeddingWeight embed, Tensor hiddens, ReadOnlySpan<int> nextTokens,
        PagedRows? paged, Activations ws)
    {
        var b = x.Backend;
        var n = nextTokens.Length;
        var d = x.Config.HiddenSize;
        using var e = ws.Take(Activation.MtpEmbedding, n, d);
        Embed(b, embed, nextTokens, paged, e);
        b.RmsNorm(e, mtp.ENorm!, e);
        using var h = ws.Take(Activation.MtpHidden, n, d);
        b.RmsNorm(hiddens, mtp.HNorm!, h);
        using var eh = ws.Take(Activation.MtpConcat, n, 2 * d);
        b.ConcatColumns(e, h, eh);
        var z = ws.Take(Activation.MtpResidual, n, d);
        b.Linear(eh, mtp.EhProj!, z);
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
