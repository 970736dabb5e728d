using DeepSeekCuda.Backends;
using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Distributed;
using DeepSeekCuda.Hosting;
using DeepSeekCuda.Model;
using DeepSeekCuda.Serving;
using DeepSeekCuda.Tests.Distributed;
using DeepSeekCuda.Tests.Support;
using Microsoft.Extensions.AI;

namespace DeepSeekCuda.Tests.Hosting;

/// <summary>
/// <see cref="LocalModel.Load"/> over several devices (<see cref="LocalModelOptions.Gpus"/>): the demo checkpoint spread over
/// simulated CPU devices (the internal devices factory stands in for the CUDA ranks), against the same checkpoint on one
/// CPU backend. A pipeline performs the single device's float operations in the same order and tensor/expert parallelism
/// regroups a few sums (<see cref="ParallelModelTests"/>), so greedy answers are identical. Also the automatic placement, the
/// log lines, a cancelled load and bad GPU lists leaving nothing allocated.
/// </summary>
[TestClass]
public sealed class LocalModelDevicesTests
{
    private const long FreeBytes = 2L << 30;
    private static string s_dir = null!;
    private static string s_single = null!;

    [ClassInitialize]
    public static void Init(TestContext _)
    {
        s_dir = Path.Combine(Path.GetTempPath(), "dscuda-devices-" + Guid.NewGuid().ToString("N"));
        DemoModel.WriteTo(s_dir);
        using var single = LocalModel.Load(s_dir, new LocalModelOptions { Device = ComputeDevice.Cpu, MaxSequenceLength = 256 });
        s_single = Answer(single);
    }

    [ClassCleanup]
    public static void Cleanup() => Directory.Delete(s_dir, true);

    /// <summary>
    /// The greedy answer of <paramref name="local"/> to one question, reasoning and answer parts marked (the demo is R1-style:
    /// most of a short answer is reasoning), and the tokens generated.
    /// </summary>
    internal static (string Text, int Tokens) Answer(LocalModel local, int maxTokens)
    {
        using var client = local.CreateChatClient();
        var response = client.GetResponseAsync([new ChatMessage(ChatRole.User, "Why is the sky blue?")],
            new ChatOptions { Temperature = 0, MaxOutputTokens = maxTokens }).GetAwaiter().GetResult();
        var text = ChatText.Marked(response.Messages.SelectMany(m => m.Contents));
        return (text, (int)(response.Usage?.OutputTokenCount ?? 0));
    }

    private static string Answer(LocalModel local) => Answer(local, 20).Text;

    /// <summary>N recording CPU devices and their host communicator, each declaring <paramref name="free"/> bytes free.</summary>
    private sealed class Simulated(long free = FreeBytes)
    {
        public List<RecordingBackend[]> Made { get; } = [];
        public List<Owner> Owners { get; } = [];

        public DeviceGroup Create(int n)
        {
            var devices = Enumerable.Range(0, n).Select(_ => new RecordingBackend(new CpuBackend(maxDegreeOfParallelism: 2))).ToArray();
            var communicator = new HostCommunicator(devices);
            var owner = new Owner(devices, communicator);
            Made.Add(devices);
            Owners.Add(owner);
            return new DeviceGroup(communicator, owner, Enumerable.Repeat(free, n).ToArray(), $"{n} simulated CPU devices");
        }
    }

    private sealed class Owner(IBackend[] devices, ICommunicator communicator) : IDisposable
    {
        public bool IsDisposed { get; private set; }

        public void Dispose()
        {
            IsDisposed = true;
            communicator.Dispose();
            foreach (var d in devices)
            {
                d.Dispose();
            }
        }
    }

    [TestMethod]
    [DataRow(PlacementKind.Pipeline, 2)]
    [DataRow(PlacementKind.Pipeline, 3)]
    [DataRow(PlacementKind.TensorExpertParallel, 3)]
    public void SpreadOverDevicesAnswersAsOneDevice(PlacementKind kind, int n)
    {
        var devices = new Simulated();
        var log = new ListLogger();
        var progress = new List<double>();
        using (var local = LocalModel.Load(s_dir, new LocalModelOptions { Gpus = [.. Enumerable.Range(0, n)], Placement = kind, DevicesFactory = devices.Create },
            new Recorded(progress), log))
        {
            // Progress is the share of the placed bytes uploaded: it rises with every upload (embedding, layers, norm, head per device) to exactly 1.
            Assert.IsGreaterThan(n, progress.Count);
            CollectionAssert.AreEqual(progress.Order().ToList(), progress);
            Assert.IsTrue(progress[0] is > 0 and < 0.5, string.Join(", ", progress));
            Assert.AreEqual(1.0, progress[^1]);

            var model = Assert.IsInstanceOfType<DeepSeekModel>(local.Model);
            Assert.AreSame(local.Placement, model.Plan, "the model is loaded as the placement says");
            Assert.AreEqual(n, model.Communicator!.DeviceCount);
            Assert.AreEqual(kind, local.Placement!.Kind);
            // The demo has an MTP layer: placed and loaded on the head device, so the chat client drafts as on one device.
            Assert.IsTrue(local.Placement.IncludesMtp);
            Assert.IsTrue(model.HasMtp);
            using (var runner = local.CreateStepRunner())
            {
                Assert.IsTrue(runner.CanDraft);
            }

            // The chat client's pool is what the tightest device holds after the load (one block index addresses a block of every
            // pool on every device): device d is given room for 30 + 7·((d + 1) mod n) blocks, so the last one bounds it at 30.
            var made = devices.Made[0];
            var blockBytes = Enumerable.Range(0, n).Select(d => SimulatedGpu.BlockBytes(local.Placement.Config,
                local.Placement.Stages[d].Count + (local.Placement.MtpDevices.Contains(d) ? 1 : 0))).ToArray();
            var reserve = SimulatedGpu.Reserve();
            var steps = SimulatedGpu.StepBytes(made, blockBytes, () => local.CreateChatClient(new DeepSeekChatClientOptions { KvCacheBlocks = 1 }));
            for (var d = 0; d < n; d++)
            {
                made[d].Gpu = SimulatedGpu.Holding($"gpu:{d}", 30 + 7 * ((d + 1) % n), blockBytes[d], steps[d]);
            }

            using (var client = local.CreateChatClient())
            {
                Assert.AreEqual(30, client.Scheduler.Blocks.TotalBlocks);
                Assert.IsTrue(made.All(d => d.Memory()!.Value.FreeBytes >= reserve), "every device keeps its reserve");
                Assert.IsLessThan(reserve + blockBytes[n - 1], made[n - 1].Memory()!.Value.FreeBytes, "the last device holds no block more");
            }

            // Logical ranks on one GPU share its memory: the pool is what it holds over all their pools.
            var one = SimulatedGpu.Holding("gpu:0", 40, blockBytes.Sum(), steps.Sum());
            foreach (var d in made)
            {
                d.Gpu = one;
            }

            using (var client = local.CreateChatClient())
            {
                Assert.AreEqual(40, client.Scheduler.Blocks.TotalBlocks);
            }

            foreach (var d in made)
            {
                d.Gpu = null;
            }

            Assert.AreEqual(n, local.Placement.DeviceCount);
            Assert.IsGreaterThan(20, s_single.Length, "the one-device answer: 20 tokens of text");
            Assert.AreEqual(s_single, Answer(local));

            // Each device received what the plan placed on it, and only that.
            for (var d = 0; d < n; d++)
            {
                CollectionAssert.AreEquivalent(local.Placement.On(d).Where(p => !p.Tensor.EndsWith("_scale_inv", StringComparison.Ordinal)).Select(p => p.Tensor).ToList(),
                    devices.Made[0][d].Received.Select(r => r.Tensor).Distinct().ToList(), $"device {d}");
            }

            var placement = ContextSize.PlacementName(kind);
            StringAssert.Contains(Text(log), $"Devices: {n} ({n} simulated CPU devices)");
            StringAssert.Contains(Text(log), $"Placement {placement} over {n} devices (requested): ");
            StringAssert.Contains(Text(log), $"fits on each of {n} devices ({placement})");
        }

        Assert.IsTrue(devices.Owners.Single().IsDisposed, "disposing the LocalModel disposes its devices");
        Assert.IsTrue(devices.Made[0].SelectMany(d => d.Weights).All(w => w.IsDisposed), "and every weight on them");
    }

    [TestMethod]
    public void AutomaticPlacementIsTensorParallelWhereTheHeadsDivideElseAPipeline()
    {
        // The demo has 3 attention heads: 3 devices split them; 2 cannot, so the planner falls back to a pipeline.
        using (var three = LocalModel.Load(s_dir, new LocalModelOptions { Gpus = [0, 1, 2], DevicesFactory = new Simulated().Create, MaxSequenceLength = 256 }))
        {
            Assert.AreEqual(PlacementKind.TensorExpertParallel, three.Placement!.Kind);
        }

        var log = new ListLogger();
        using (var two = LocalModel.Load(s_dir, new LocalModelOptions { Gpus = [0, 1], DevicesFactory = new Simulated().Create, MaxSequenceLength = 256 }, logger: log))
        {
            Assert.AreEqual(PlacementKind.Pipeline, two.Placement!.Kind);
            StringAssert.Contains(Text(log), "Placement pipeline over 2 devices (auto): ");
        }

        // Asked for explicitly, the split that cannot be made is refused before anything is uploaded, and the devices go.
        var devices = new Simulated();
        var e = Assert.ThrowsExactly<PlacementException>(() => LocalModel.Load(s_dir,
            new LocalModelOptions { Gpus = [0, 1], Placement = PlacementKind.TensorExpertParallel, DevicesFactory = devices.Create }));
        StringAssert.Contains(e.Message, "3 attention heads do not divide across 2 devices");
        Assert.IsTrue(devices.Owners.Single().IsDisposed);
        Assert.IsEmpty(devices.Made[0].SelectMany(d => d.Weights));
    }

    [TestMethod]
    public void DevicesTooSmallAreRefusedBeforeLoadingWithWhatEachNeeds()
    {
        var devices = new Simulated(free: 64L << 20);
        var e = Assert.ThrowsExactly<InsufficientDeviceMemoryException>(() => LocalModel.Load(s_dir,
            new LocalModelOptions { Gpus = [0, 1], Placement = PlacementKind.Pipeline, DevicesFactory = devices.Create }));
        Assert.HasCount(2, e.Shortfalls);
        Assert.IsTrue(e.Shortfalls.All(s => s.FreeBytes == 64L << 20));
        Assert.IsTrue(devices.Owners.Single().IsDisposed);
        Assert.IsEmpty(devices.Made[0].SelectMany(d => d.Weights));
    }

    [TestMethod]
    public void CancelledLoadDisposesEveryUploadedWeightAndTheDevices()
    {
        using var cts = new CancellationTokenSource();
        var devices = new Simulated();
        Assert.ThrowsExactly<OperationCanceledException>(() => LocalModel.Load(s_dir,
            new LocalModelOptions { Gpus = [0, 1, 2], Placement = PlacementKind.TensorExpertParallel, DevicesFactory = devices.Create },
            new CancelOnFirstReport(cts), cancellationToken: cts.Token));
        var uploaded = devices.Made[0].SelectMany(d => d.Weights).ToList();
        Assert.IsNotEmpty(uploaded, "the first upload happened before the token fired");
        Assert.IsTrue(uploaded.All(w => w.IsDisposed));
        Assert.IsTrue(devices.Owners.Single().IsDisposed);
    }

    [TestMethod]
    [DataRow(new int[0], "[] lists no GPU")]
    [DataRow(new[] { 0, 1, 0 }, "[0, 1, 0] names GPU 0 twice")]
    [DataRow(new[] { 0, -1 }, "[0, -1] names GPU -1, which is not a device ordinal")]
    [DataRow(new[] { 0, 1, 2, 3, 4, 5, 6, 7, 8 }, "lists 9 GPUs; at most 8 run one model")]
    public void BadGpuListsAreRefusedBeforeAnythingOpens(int[] gpus, string reason)
    {
        var devices = new Simulated();
        var e = Assert.ThrowsExactly<ArgumentException>(() => LocalModel.Load(s_dir, new LocalModelOptions { Gpus = gpus, DevicesFactory = devices.Create }));
        Assert.AreEqual(nameof(LocalModelOptions.Gpus), e.ParamName);
        StringAssert.Contains(e.Message, reason);
        Assert.IsEmpty(devices.Made);

        var cpu = Assert.ThrowsExactly<ArgumentException>(() => LocalModel.Load(s_dir, new LocalModelOptions { Gpus = [0, 1], Device = ComputeDevice.Cpu }));
        StringAssert.Contains(cpu.Message, "[0, 1] needs the CUDA backend, and Device is Cpu");
    }

    private static string Text(ListLogger log) => string.Join("\n", log.Entries.Select(e => e.Message));

    private sealed class Recorded(List<double> values) : IProgress<double>
    {
        public void Report(double value) => values.Add(value);
    }

    private sealed class CancelOnFirstReport(CancellationTokenSource cts) : IProgress<double>
    {
        public void Report(double value) => cts.Cancel();
    }
}
