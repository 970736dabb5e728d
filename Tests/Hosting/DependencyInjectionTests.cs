using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Hosting;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Model;
using DeepSeekCuda.Tests.Distributed;
using DeepSeekCuda.Tests.Support;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Options;

namespace DeepSeekCuda.Tests.Hosting;

/// <summary><c>AddDeepSeekCuda</c> as a Microsoft.Extensions.AI registration: builder, options validation, logging, eager and cancellable loading.</summary>
[TestClass]
public sealed class DependencyInjectionTests
{
    private static string s_dir = null!;

    [ClassInitialize]
    public static void Init(TestContext _)
    {
        s_dir = Path.Combine(Path.GetTempPath(), "dscuda-di-" + Guid.NewGuid().ToString("N"));
        DemoModel.WriteTo(s_dir);
    }

    [ClassCleanup]
    public static void Cleanup() => Directory.Delete(s_dir, true);

    private static readonly ChatOptions Greedy4 = new() { Temperature = 0, MaxOutputTokens = 4 };

    [TestMethod]
    public async Task TheBuilderComposesMiddlewareOntoTheOneChatClient()
    {
        var seen = new List<string>();
        var services = new ServiceCollection();
        services.AddLogging();
        // The first middleware added is the outermost, as in Microsoft.Extensions.AI.
        services.AddDeepSeekCuda(o => o.ModelPath = s_dir)
            .Use(inner => new RecordingClient(inner, seen))
            .UseLogging()
            .UseOpenTelemetry();
        await using var provider = services.BuildServiceProvider();
        var client = provider.GetRequiredService<IChatClient>();
        var deepSeek = provider.GetRequiredService<DeepSeekChatClient>();
        Assert.IsInstanceOfType<RecordingClient>(client, "the outermost middleware is what IChatClient resolves to");
        Assert.AreSame(deepSeek, client.GetService<DeepSeekChatClient>(), "the pipeline ends at the registered DeepSeekChatClient");

        var response = await client.GetResponseAsync("Hi", Greedy4);
        var direct = await deepSeek.GetResponseAsync("Hi", Greedy4);
        CollectionAssert.AreEqual(new[] { "Hi" }, seen, "the middleware saw the call through the builder");
        Assert.AreEqual(direct.Text, response.Text);
        Assert.AreEqual(4, response.Usage!.OutputTokenCount);
    }

    [TestMethod]
    [DataRow("MaxBatch", "DeepSeekCudaOptions.Chat.MaxBatch")]
    [DataRow("ModelPath", "DeepSeekCudaOptions.ModelPath: set a checkpoint folder")]
    [DataRow("AutoRate", "DeepSeekCudaOptions.Chat.SpeculativeAutoMinAcceptanceRate")]
    [DataRow("Gpus", "DeepSeekCudaOptions.LoadOptions.Gpus: [0, 0] names GPU 0 twice")]
    public async Task BadOptionsFailAtHostStartNamingTheField(string broken, string expected)
    {
        using var host = new HostBuilder().ConfigureServices(services => services.AddDeepSeekCuda(o =>
        {
            o.ModelPath = broken == "ModelPath" ? null : s_dir;
            o.LoadOnStart = true;
            if (broken == "MaxBatch")
            {
                o.Chat.MaxBatch = 0;
            }
            else if (broken == "AutoRate")
            {
                o.Chat.SpeculativeAutoMinAcceptanceRate = 1.5;
            }
            else if (broken == "Gpus")
            {
                o.LoadOptions = new LocalModelOptions { Gpus = [0, 0] };
            }
        })).Build();
        var e = await Assert.ThrowsExactlyAsync<OptionsValidationException>(() => host.StartAsync());
        StringAssert.Contains(e.Message, expected);
        Assert.IsFalse(host.Services.GetRequiredService<DeepSeekCudaModel>().IsLoaded, "validation comes before the load");
    }

    [TestMethod]
    public void TheContainersLoggerReceivesTheLoadersLines()
    {
        var log = new ListLogger();
        var services = new ServiceCollection();
        services.AddLogging(b => b.SetMinimumLevel(LogLevel.Information).AddProvider(new ListLoggerProvider(log)));
        services.AddDeepSeekCuda(o =>
        {
            o.ModelPath = s_dir;
            o.LoadOptions = new LocalModelOptions { Device = ComputeDevice.Cpu };
        });
        using var provider = services.BuildServiceProvider();
        _ = provider.GetRequiredService<IChatClient>();
        var full = Path.GetFullPath(s_dir);
        Assert.IsTrue(log.Entries.Any(e => e.Level == LogLevel.Information && e.Message.StartsWith($"Loaded {full}: ", StringComparison.Ordinal)),
            string.Join("\n", log.Entries));
        Assert.IsTrue(log.Entries.Any(e => e.Message.StartsWith("Backend cpu (Float32) (requested)", StringComparison.Ordinal)));
        // ConcurrentSessions follows Chat.MaxBatch (16): the context reason says so.
        Assert.IsTrue(log.Entries.Any(e => e.Message.StartsWith("Context length 1024 tokens per request", StringComparison.Ordinal) && e.Message.Contains("16 concurrent session(s)", StringComparison.Ordinal)));
    }

    [TestMethod]
    public async Task LoadOnStartLoadsWhileTheHostStarts_OtherwiseOnFirstUse()
    {
        foreach (var eager in new[] { true, false })
        {
            using var host = new HostBuilder().ConfigureServices(services => services.AddDeepSeekCuda(o =>
            {
                o.ModelPath = s_dir;
                o.LoadOnStart = eager;
            })).Build();
            var model = host.Services.GetRequiredService<DeepSeekCudaModel>();
            Assert.IsFalse(model.IsLoaded);
            await host.StartAsync();
            Assert.AreEqual(eager, model.IsLoaded, $"eager {eager}");
            var response = await host.Services.GetRequiredService<IChatClient>().GetResponseAsync("Hi", Greedy4);
            Assert.IsTrue(model.IsLoaded);
            Assert.AreEqual(4, response.Usage!.OutputTokenCount);
            await host.StopAsync();
        }
    }

    [TestMethod]
    public async Task ACancelledStartLoadsNothing_AndALaterUseLoads()
    {
        using var host = new HostBuilder().ConfigureServices(services => services.AddDeepSeekCuda(o =>
        {
            o.ModelPath = s_dir;
            o.LoadOnStart = true;
        })).Build();
        using var cancelled = new CancellationTokenSource();
        await cancelled.CancelAsync();
        await Assert.ThrowsAsync<OperationCanceledException>(() => host.StartAsync(cancelled.Token));
        var model = host.Services.GetRequiredService<DeepSeekCudaModel>();
        Assert.IsFalse(model.IsLoaded);
        // The loader itself, past the host's own check of the token: the load is refused, nothing is kept.
        Assert.ThrowsExactly<OperationCanceledException>(() => model.Get(cancelled.Token));
        Assert.IsFalse(model.IsLoaded);
        var response = await host.Services.GetRequiredService<IChatClient>().GetResponseAsync("Hi", Greedy4);
        Assert.IsTrue(model.IsLoaded);
        Assert.AreEqual(4, response.Usage!.OutputTokenCount);
    }

    /// <summary>
    /// Cancelled after the first upload reports progress: every weight uploaded so far is disposed, and LocalModel disposes its
    /// backend.
    /// </summary>
    [TestMethod]
    public void ACancelledLoadDisposesEverythingItUploadedAndTheBackend()
    {
        using var checkpoint = Checkpoint.Open(s_dir);
        using var cts = new CancellationTokenSource();
        using var device = new RecordingBackend(new CpuBackend());
        Assert.ThrowsExactly<OperationCanceledException>(() =>
            DeepSeekModel.Load(checkpoint, device, new ModelOptions(), new SyncProgress(_ => cts.Cancel()), cts.Token));
        // The rotary table and the first unit in file order were uploaded before the token was checked again.
        Assert.IsGreaterThanOrEqualTo(2, device.Weights.Count, string.Join(", ", device.WeightNames));
        var left = device.Weights.Zip(device.WeightNames).Where(w => !w.First.IsDisposed).Select(w => w.Second).ToList();
        Assert.IsEmpty(left, "left uploaded: " + string.Join(", ", left));

        using var cts2 = new CancellationTokenSource();
        var backend = new CpuBackend();
        Assert.ThrowsExactly<OperationCanceledException>(() =>
            LocalModel.Load(s_dir, new LocalModelOptions { BackendFactory = () => backend }, new SyncProgress(_ => cts2.Cancel()), cancellationToken: cts2.Token));
        Assert.IsTrue(backend.IsDisposed);

        // Not cancelled: the same path loads and keeps its backend.
        var kept = new CpuBackend();
        using (LocalModel.Load(s_dir, new LocalModelOptions { BackendFactory = () => kept }))
        {
            Assert.IsFalse(kept.IsDisposed);
        }

        Assert.IsTrue(kept.IsDisposed);
    }

    private sealed class RecordingClient(IChatClient inner, List<string> seen) : DelegatingChatClient(inner)
    {
        public override Task<ChatResponse> GetResponseAsync(IEnumerable<ChatMessage> messages, ChatOptions? options = null, CancellationToken cancellationToken = default)
        {
            seen.Add(messages.Last().Text);
            return base.GetResponseAsync(messages, options, cancellationToken);
        }
    }

    private sealed class ListLoggerProvider(ListLogger log) : ILoggerProvider
    {
        public ILogger CreateLogger(string categoryName) => log;

        public void Dispose()
        {
        }
    }
}
