using System.Diagnostics.Metrics;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;

namespace DeepSeekCuda.Hosting;

/// <summary>Registration of DeepSeekCuda in a service container.</summary>
public static class ServiceCollectionExtensions
{
    /// <summary>
    /// Registers <see cref="DeepSeekChatClient"/> and <see cref="IChatClient"/> (the same singleton) and
    /// the configured <see cref="DeepSeekCudaOptions"/>. The model is loaded on the first resolution and
    /// disposed with the container. A logger comes from <see cref="ILoggerFactory"/> and the meter from
    /// <see cref="IMeterFactory"/> when the container has them.
    /// </summary>
    /// <exception cref="ArgumentException">Neither a model path nor a model factory was configured.</exception>
    public static IServiceCollection AddDeepSeekCuda(this IServiceCollection services, Action<DeepSeekCudaOptions> configure)
    {
        ArgumentNullException.ThrowIfNull(services);
        ArgumentNullException.ThrowIfNull(configure);
        var options = new DeepSeekCudaOptions();
        configure(options);
        if (options.ModelFactory is null && string.IsNullOrEmpty(options.ModelPath))
        {
            throw new ArgumentException("DeepSeekCuda: set ModelPath (a checkpoint folder) or ModelFactory", nameof(configure));
        }

        options.Chat.Validate();
        services.AddSingleton(options);
        services.AddSingleton(sp =>
        {
            var (model, tokenizer) = options.Load(sp);
            return new DeepSeekChatClient(
                model,
                tokenizer,
                options.Chat,
                sp.GetService<ILoggerFactory>()?.CreateLogger<DeepSeekChatClient>(),
                sp.GetService<IMeterFactory>(),
                disposeModel: true,
                stepRunner: model is LocalModel local ? local.CreateStepRunner() : null);
        });
        services.AddSingleton<IChatClient>(sp => sp.GetRequiredService<DeepSeekChatClient>());
        return services;
    }
}
