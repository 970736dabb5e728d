using DeepSeekCuda.Hosting;

namespace DeepSeekCuda.Cli;

/// <summary>Loads a model folder (or the demo) for the generation commands, with a progress bar.</summary>
internal static class ModelLoading
{
    public static LocalModel Load(string? model, TextWriter log, ComputeDevice device = ComputeDevice.Auto)
    {
        var dir = ModelOption.Resolve(model, log);
        LocalModel? local = null;
        Progress.Run($"loading {dir}", log, p => local = LocalModel.Load(dir, new LocalModelOptions { Device = device }, progress: p));
        return local!;
    }
}
