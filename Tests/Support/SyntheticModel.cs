using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Synthetic;
using DeepSeekCuda.Model;

namespace DeepSeekCuda.Tests.Support;

/// <summary>
/// A test class's synthetic model: a checkpoint written to a temporary folder and loaded on a CPU backend of its own.
/// Disposing it frees the model, the checkpoint and the backend and deletes the folder.
/// </summary>
internal sealed class SyntheticModel : IDisposable
{
    private readonly string _root;

    private SyntheticModel(string root, Checkpoint checkpoint, CpuBackend backend, int maxSequenceLength)
    {
        (_root, Checkpoint, Backend, MaxSequenceLength) = (root, checkpoint, backend, maxSequenceLength);
        Model = Load(backend);
    }

    public Checkpoint Checkpoint { get; }

    public CpuBackend Backend { get; }

    public int MaxSequenceLength { get; }

    /// <summary>The model on <see cref="Backend"/>.</summary>
    public DeepSeekModel Model { get; }

    /// <summary><see cref="ModelPresets.Tiny"/> of weights drawn from <paramref name="seed"/>, in a folder named after <paramref name="prefix"/>.</summary>
    public static SyntheticModel Tiny(string prefix, int seed, int maxSequenceLength)
    {
        var root = TempFolder.NewPath(prefix);
        SyntheticCheckpoint.Write(root, ModelPresets.Tiny, seed: seed);
        var checkpoint = Checkpoint.Open(root);
        var backend = new CpuBackend();
        try
        {
            return new SyntheticModel(root, checkpoint, backend, maxSequenceLength);
        }
        catch
        {
            checkpoint.Dispose();
            backend.Dispose();
            TempFolder.DeleteBestEffort(root);
            throw;
        }
    }

    /// <summary>The checkpoint loaded again on <paramref name="backend"/> (the caller disposes it), its options changed by <paramref name="options"/>.</summary>
    public DeepSeekModel Load(IBackend backend, Func<ModelOptions, ModelOptions>? options = null)
    {
        var o = new ModelOptions { MaxSequenceLength = MaxSequenceLength };
        return DeepSeekModel.Load(Checkpoint, backend, options?.Invoke(o) ?? o);
    }

    public void Dispose()
    {
        Model.Dispose();
        Checkpoint.Dispose();
        Backend.Dispose();
        TempFolder.DeleteBestEffort(_root);
    }
}
