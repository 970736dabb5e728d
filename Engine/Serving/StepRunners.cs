using DeepSeekCuda.Inference;
using DeepSeekCuda.Model;

namespace DeepSeekCuda.Serving;

/// <summary>Chooses the step runner for a model.</summary>
public static class StepRunners
{
    /// <summary>
    /// A <see cref="PagedStepRunner"/> for a <see cref="DeepSeekModel"/> (one device of any backend, or several); a
    /// <see cref="SessionStepRunner"/> for any other model (test models). The model is not owned.
    /// </summary>
    public static IStepRunner For(ILanguageModel model)
    {
        ArgumentNullException.ThrowIfNull(model);
        return model is IPagedModel paged ? new PagedStepRunner(paged.Layout) : new SessionStepRunner(model);
    }
}
