using System.Diagnostics.Metrics;
using DeepSeekCuda.Inference;
using DeepSeekCuda.Text;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.DependencyInjection.Extensions;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Options;

namespace DeepSeekCuda.Hosting;

/// <summary>Registration of DeepSeekCuda in a service container, in the Microsoft.Extensions.AI style.</summary>
public static class ServiceCollectionExtensions
{
    /// <summary>
    /// Registers one <see cref="IChatClient"/> over a <see cref="DeepSeekChatClient"/> (itself resolvable) and
    /// returns its <see cref="ChatClientBuilder"/>, so middleware composes onto it:
    /// <c>services.AddDeepSeekCuda(o => o.ModelPath = dir).UseLogging().UseOpenTelemetry();</c>.
    /// </summary>
    /// <remarks>
    /// <see cref="DeepSeekCudaOptions"/> go through the options system: validated when the host starts
    /// (<c>ValidateOnStart</c>; an <see cref="OptionsValidationException"/> naming the field) and on first use
    /// without a host. The model is loaded once: on the first resolution of the chat client, or while the host
    /// starts with <see cref="DeepSeekCudaOptions.LoadOnStart"/> (cancellable: a cancelled load leaves nothing
    /// loaded). It is disposed with the container. The loader logs through the container's
    /// <see cref="ILoggerFactory"/>, the meter comes from <see cref="IMeterFactory"/>, when the container has them.
    /// </remarks>
    public static ChatClientBuilder AddDeepSeekCuda(this IServiceCollection services, Action<DeepSeekCudaOptions> configure)
    {
        ArgumentNullException.ThrowIfNull(services);
        ArgumentNullException.ThrowIfNull(configure);
        services.AddOptions<DeepSeekCudaOptions>()
            .Configure(configure)
            .Validate(o => o.ModelFactory is not null || !string.IsNullOrEmpty(o.ModelPath),
                "DeepSeekCudaOptions.ModelPath: set a checkpoint folder (or DeepSeekCudaOptions.ModelFactory)")
            .ValidateOnStart();
        services.TryAddEnumerable(ServiceDescriptor.Singleton<IValidateOptions<DeepSeekCudaOptions>, DeepSeekCudaOptionsValidator>());
        services.TryAddSingleton(sp => sp.GetRequiredService<IOptions<DeepSeekCudaOptions>>().Value);
        services.TryAddSingleton<DeepSeekCudaModel>();
        services.TryAddEnumerable(ServiceDescriptor.Singleton<IHostedService, DeepSeekCudaLoadOnStart>());
        services.TryAddSingleton(sp =>
        {
            var options = sp.GetRequiredService<DeepSeekCudaOptions>();
            var (model, tokenizer) = sp.GetRequiredService<DeepSeekCudaModel>().Get(CancellationToken.None);
            return new DeepSeekChatClient(
                model,
                tokenizer,
                options.Chat,
                sp.GetService<ILoggerFactory>()?.CreateLogger<DeepSeekChatClient>(),
                sp.GetService<IMeterFactory>(),
                disposeModel: false, // DeepSeekCudaModel owns it
                stepRunner: model is LocalModel local ? local.CreateStepRunner() : null);
        });
        return services.AddChatClient(sp => sp.GetRequiredService<DeepSeekChatClient>());
    }

    private sealed class DeepSeekCudaOptionsValidator : IValidateOptions<DeepSeekCudaOptions>
    {
        public ValidateOptionsResult Validate(string? name, DeepSeekCudaOptions options) =>
            options.Problem() is { } problem ? ValidateOptionsResult.Fail(problem) : ValidateOptionsResult.Success;
    }

    /// <summary>Loads <see cref="DeepSeekCudaOptions.ModelPath"/> at host start when <see cref="DeepSeekCudaOptions.LoadOnStart"/> is set.</summary>
    private sealed class DeepSeekCudaLoadOnStart(IOptions<DeepSeekCudaOptions> options, DeepSeekCudaModel model) : IHostedService
    {
        public Task StartAsync(CancellationToken cancellationToken) =>
            options.Value.LoadOnStart
                ? Task.Run(() => model.Get(cancellationToken), cancellationToken) // off the host's thread: loading takes minutes
                : Task.CompletedTask;

        public Task StopAsync(CancellationToken cancellationToken) => Task.CompletedTask;
    }
}

/// <summary>
/// The container's model: loaded once, on first need, from <see cref="DeepSeekCudaOptions"/>; disposed with
/// the container. A failed or cancelled load keeps nothing and is tried again on the next need.
/// </summary>
internal sealed class DeepSeekCudaModel(IServiceProvider services, IOptions<DeepSeekCudaOptions> options, ILoggerFactory? loggerFactory = null) : IDisposable
{
    private readonly Lock _lock = new();
    private (ILanguageModel Model, ITokenizer Tokenizer)? _loaded;
    private bool _disposed;

    /// <summary>Whether the model is loaded.</summary>
    public bool IsLoaded
    {
        get
        {
            lock (_lock)
            {
                return _loaded is not null;
            }
        }
    }

    /// <summary>The model and tokenizer, loading them first if needed.</summary>
    /// <exception cref="OperationCanceledException"><paramref name="cancellationToken"/> fired during the load; nothing stays loaded.</exception>
    public (ILanguageModel Model, ITokenizer Tokenizer) Get(CancellationToken cancellationToken)
    {
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            _loaded ??= options.Value.Load(services, loggerFactory?.CreateLogger<LocalModel>(), cancellationToken);
            return _loaded.Value;
        }
    }

    /// <summary>Disposes the model.</summary>
    public void Dispose()
    {
        lock (_lock)
        {
            _disposed = true;
            _loaded?.Model.Dispose();
            _loaded = null;
        }
    }
}
