using DeepSeekCuda.Backends;

namespace DeepSeekCuda.Model;

/// <summary>How the stream's rows reach the caches of layer <paramref name="layer"/> on device <paramref name="device"/>.</summary>
internal delegate LayerRows LayerRowsOf(int device, int layer);

/// <summary>
/// One forward pass of a model's main layers over a token stream, on the devices of its <see cref="DeviceLayout"/>: the
/// embedding and first input norm on the devices that run the first layer, each layer on the devices that run it
/// (<see cref="LayerSteps.Layer(ReadOnlySpan{LayerPart}, Action{IReadOnlyList{Tensor}}?, Action{Intermediate}?, string)"/>,
/// all-reduced where sharded), the stream and its normed copy handed from one pipeline stage to the next, and the final
/// norm. The one skeleton of <see cref="DeepSeekSession"/> (one device or several) and <c>PagedStepRunner</c>, which differ
/// only in where intermediates come from (fresh tensors, or a step's arena) and which caches the rows attend over.
/// </summary>
internal static class ModelPass
{
    /// <summary>
    /// Runs <paramref name="tokens"/> through every layer; returns the head device's final-normed stream [T, D] (the caller
    /// disposes it). <paramref name="ws"/>[r] gives device r's intermediates; <paramref name="observer"/>, when given, hears
    /// embed, each layer's attn_out, ffn_out and out (see <see cref="LayerSteps"/>), and final_norm.
    /// </summary>
    public static Tensor Run(DeviceLayout layout, ReadOnlySpan<int> tokens, IReadOnlyList<Activations> ws, LayerRowsOf rows, Action<Intermediate>? observer) =>
        Run(layout, 0, layout.Config.NumHiddenLayers, tokens, ws, rows, observer)!;

    /// <summary>
    /// Runs one stage of the pass (<see cref="DeviceLayout.Stages"/>) on its devices alone, as a graph of that stage can be
    /// captured: from the embedding for the first stage, else from the stream <see cref="HandOver"/> left in the stage's
    /// step buffers; returns the final-normed stream for the last stage, else null (the stream stays in the step buffers
    /// for the next stage's hand-over). <paramref name="ws"/> must be step arenas: a take gives the same buffer each time.
    /// </summary>
    public static Tensor? RunStage(DeviceLayout layout, PassStage stage, ReadOnlySpan<int> tokens, IReadOnlyList<Activations> ws, LayerRowsOf rows) =>
        Run(layout, stage.First, stage.End, tokens, ws, rows, null);

    /// <summary>
    /// The pipeline boundary before layer <paramref name="layer"/> between stages run apart (<see cref="RunStage"/>): the
    /// stream of <paramref name="rows"/> rows and its normed copy, from the step buffers of the device that ran the layer
    /// before into those of the device that runs it.
    /// </summary>
    public static void HandOver(DeviceLayout layout, int layer, int rows, IReadOnlyList<Activations> ws)
    {
        var from = layout.Runners[layer - 1][0];
        var (h, normed) = Stream(ws[from], layer, rows, layout.Config.HiddenSize);
        using (h)
        using (normed)
        {
            var (to, toNormed) = Receive(layout, layer, ws, h, normed);
            to.Dispose();
            toNormed.Dispose();
        }
    }

    /// <summary>Layers <paramref name="first"/> .. <paramref name="end"/> − 1 (see <see cref="Run(DeviceLayout, ReadOnlySpan{int}, IReadOnlyList{Activations}, LayerRowsOf, Action{Intermediate}?)"/>, <see cref="RunStage"/>).</summary>
    private static Tensor? Run(DeviceLayout layout, int first, int end, ReadOnlySpan<int> tokens, IReadOnlyList<Activations> ws, LayerRowsOf rows,
        Action<Intermediate>? observer)
    {
        var c = layout.Config;
        var devices = layout.Devices;
        var (t, d) = (tokens.Length, c.HiddenSize);
        var h = new Tensor?[devices.Count];      // [T, D] the residual stream, on the devices running the current layer
        var normed = new Tensor?[devices.Count]; // [T, D] the current layer's input_layernorm(h)
        var all = new LayerPart[devices.Count];   // each layer's parts: its first run.Length
        try
        {
            var active = layout.Runners[first];
            foreach (var r in active)
            {
                (h[r], normed[r]) = Stream(ws[r], first, t, d);
                if (first == 0)
                {
                    var w = devices[r];
                    LayerSteps.Embed(w.Backend, w.Embed!, tokens, rows(r, 0).Paged, h[r]!);
                    w.Backend.RmsNorm(h[r]!, w.Layers[0]!.InputNorm, normed[r]!);
                }
            }

            if (first == 0)
            {
                LayerSteps.Observe(devices[active[0]].Backend, observer, "embed", h[active[0]]!);
            }

            for (var i = first; i < end; i++)
            {
                var run = layout.Runners[i];
                if (!run.AsSpan().SequenceEqual(active))
                {
                    int from = active[0], to = run[0];
                    (h[to], normed[to]) = Receive(layout, i, ws, h[from]!, normed[from]!);
                    Release(h, normed, from);
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
                    LayerSteps.Layer(parts, layout.AllReduce, observer, "");
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

            if (end < c.NumHiddenLayers)
            {
                return null;
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

    /// <summary>Where layer <paramref name="layer"/>'s input is on a device: the residual stream and its input_layernorm (the two normed buffers alternate by layer).</summary>
    private static (Tensor H, Tensor Normed) Stream(Activations ws, int layer, int rows, int cols) =>
        (ws.Take(Activation.Residual, rows, cols), ws.Take(layer % 2 == 0 ? Activation.NormedEven : Activation.NormedOdd, rows, cols));

    /// <summary>A pipeline boundary before layer <paramref name="layer"/>: copies the stream <paramref name="h"/> and its normed copy into the next stage's device; returns them there.</summary>
    private static (Tensor H, Tensor Normed) Receive(DeviceLayout layout, int layer, IReadOnlyList<Activations> ws, Tensor h, Tensor normed)
    {
        int from = layout.Runners[layer - 1][0], to = layout.Runners[layer][0];
        var received = Stream(ws[to], layer, h.Rows, h.Cols);
        var communicator = layout.Communicator!;
        communicator.Copy(h, from, received.H, to);
        communicator.Copy(normed, from, received.Normed, to);
        return received;
    }

    private static void Release(Tensor?[] h, Tensor?[] normed, int r)
    {
        h[r]?.Dispose();
        normed[r]?.Dispose();
        h[r] = null;
        normed[r] = null;
    }
}
