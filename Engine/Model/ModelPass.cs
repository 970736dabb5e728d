using DeepSeekCuda.Backends;

namespace DeepSeekCuda.Model;

/// <summary>How the stream's rows reach the caches of layer <paramref name="layer"/> on device <paramref name="device"/>.</summary>
internal delegate LayerRows LayerRowsOf(int device, int layer);

/// <summary>
/// One forward pass of a model's main layers over a token stream, on the devices of its <see cref="DeviceLayout"/>: the
/// embedding and first input norm on the devices that run the first layer, each layer on the devices that run it
/// (<see cref="LayerSteps.Layer(ReadOnlySpan{LayerPart}, Action{IReadOnlyList{Tensor}}?, Action{Intermediate}?, string)"/>,
/// all-reduced where sharded), the stream and its normed copy handed from one pipeline stage to the next, and the final
/// norm. The one skeleton of <see cref="DeepSeekSession"/>, <c>ParallelSession</c> and <c>PagedStepRunner</c>, which differ
/// only in where intermediates come from (fresh tensors, or a step's arena) and which caches the rows attend over.
/// </summary>
internal static class ModelPass
{
    /// <summary>
    /// Runs <paramref name="tokens"/> through every layer; returns the head device's final-normed stream [T, D] (the caller
    /// disposes it). <paramref name="ws"/>[r] gives device r's intermediates; <paramref name="observer"/>, when given, hears
    /// embed, each layer's attn_out, ffn_out and out (see <see cref="LayerSteps"/>), and final_norm.
    /// </summary>
    public static Tensor Run(DeviceLayout layout, ReadOnlySpan<int> tokens, IReadOnlyList<Activations> ws, LayerRowsOf rows, Action<Intermediate>? observer)
    {
        var c = layout.Config;
        var devices = layout.Devices;
        var (t, d) = (tokens.Length, c.HiddenSize);
        var h = new Tensor?[devices.Count];      // [T, D] the residual stream, on the devices running the current layer
        var normed = new Tensor?[devices.Count]; // [T, D] the current layer's input_layernorm(h)
        var all = new LayerPart[devices.Count];   // each layer's parts: its first run.Length
        try
        {
            var active = layout.Runners[0];
            foreach (var r in active)
            {
                var w = devices[r];
                h[r] = ws[r].Take(Activation.Residual, t, d);
                LayerSteps.Embed(w.Backend, w.Embed!, tokens, rows(r, 0).Paged, h[r]!);
                normed[r] = ws[r].Take(Activation.NormedEven, t, d);
                w.Backend.RmsNorm(h[r]!, w.Layers[0]!.InputNorm, normed[r]!);
            }

            LayerSteps.Observe(devices[active[0]].Backend, observer, "embed", h[active[0]]!);
            for (var i = 0; i < c.NumHiddenLayers; i++)
            {
                var run = layout.Runners[i];
                if (!run.AsSpan().SequenceEqual(active))
                {
                    HandOver(layout, ws, i, active, run, h, normed);
                    active = run;
                }

                var parts = all.AsSpan(0, run.Length);
                for (var k = 0; k < run.Length; k++)
                {
                    var r = run[k];
                    var w = devices[r];
                    var next = ws[r].Take(i % 2 == 0 ? Activation.NormedOdd : Activation.NormedEven, t, d);
                    parts[k] = new LayerPart(w.Context, w.Layers[i]!, h[r]!, normed[r]!, rows(r, i), ws[r], w.NormAfter(i), next);
                }

                try
                {
                    LayerSteps.Layer(parts, layout.Collectives?.AllReduceSum, observer, "");
                }
                finally
                {
                    for (var k = 0; k < run.Length; k++)
                    {
                        var r = run[k];
                        normed[r]!.Dispose();
                        normed[r] = parts[k].NextNormed;
                    }
                }
            }

            var head = layout.HeadDevice;
            var result = normed[head] ?? throw new InvalidOperationException($"the head device {head} does not run the last layer");
            normed[head] = null;
            LayerSteps.Observe(devices[head].Backend, observer, "final_norm", result);
            return result;
        }
        finally
        {
            for (var r = 0; r < devices.Count; r++)
            {
                Release(h, normed, r);
            }
        }
    }

    /// <summary>A pipeline boundary before layer <paramref name="i"/>: one stage hands the residual stream and its normed copy to the next.</summary>
    private static void HandOver(DeviceLayout layout, IReadOnlyList<Activations> ws, int i, int[] active, int[] run, Tensor?[] h, Tensor?[] normed)
    {
        if (active.Length != 1 || run.Length != 1)
        {
            throw new InvalidOperationException($"layer {i} changes from devices [{string.Join(",", active)}] to [{string.Join(",", run)}]");
        }

        int from = active[0], to = run[0];
        var source = h[from]!;
        h[to] = ws[to].Take(Activation.Residual, source.Rows, source.Cols);
        normed[to] = ws[to].Take(i % 2 == 0 ? Activation.NormedEven : Activation.NormedOdd, source.Rows, source.Cols);
        var copy = layout.Collectives!.Copy;
        copy(source, from, h[to]!, to);
        copy(normed[from]!, from, normed[to]!, to);
        Release(h, normed, from);
    }

    private static void Release(Tensor?[] h, Tensor?[] normed, int r)
    {
        h[r]?.Dispose();
        normed[r]?.Dispose();
        h[r] = null;
        normed[r] = null;
    }
}
