using DeepSeekCuda.Inference;
using DeepSeekCuda.Model;

namespace DeepSeekCuda.Serving;

/// <summary>Chooses the step runner for a model.</summary>
public static class StepRunners
{
    /// <summary>
    /// A <see cref="PagedStepRunner"/> for a <see cref="DeepSeekModel"/> (one device, any backend); a
    /// <see cref="SessionStepRunner"/> for any other model (the multi-device model, test models). The model is not owned.
    /// </summary>
    public static IStepRunner For(ILanguageModel model)
    {
        ArgumentNullException.ThrowIfNull(model);
        return model is DeepSeekModel deepSeek ? new PagedStepRunner(deepSeek) : new SessionStepRunner(model);
    }
}
