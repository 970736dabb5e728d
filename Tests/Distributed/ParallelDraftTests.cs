using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Distributed;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Model;
using DeepSeekCuda.Serving;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Distributed;

/// <summary>
/// MTP drafting on a model spread over devices: the plan places the MTP layer where the last layer runs (whole on a pipeline's
/// last stage, which also gets the embedding; sharded over every device under tensor/expert parallelism, its input side on
/// device 0), and the step runner drafts there. tiny-a (its official MTP layer) on N simulated devices against the same
/// checkpoint on one CPU backend, through the same steps (<see cref="DraftSideBySide"/>). A pipeline gives the single device's
/// logits and drafts bit for bit, with no traffic for the drafts; tensor/expert parallelism its ids and drafts, with logits
/// within the max_rel <see cref="ParallelModelTests"/> holds it to, and the MTP passes' all-reduces.
/// </summary>
[TestClass]
public sealed class ParallelDraftTests
{
    private static Checkpoint s_checkpoint = null!;
    private static CpuBackend s_backend = null!;
    private static DeepSeekModel s_single = null!;

    [ClassInitialize]
    public static void Init(TestContext _)
    {
        s_checkpoint = Checkpoint.Open(SharedData.TinyAModel);
        s_backend = new CpuBackend();
        s_single = DeepSeekModel.Load(s_checkpoint, s_backend, Options);
        Assert.IsTrue(s_single.HasMtp, "tiny-a has an MTP layer");
    }

    [ClassCleanup]
    public static void Cleanup()
    {
        s_single.Dispose();
        s_backend.Dispose();
        s_checkpoint.Dispose();
    }

    public TestContext TestContext { get; set; } = null!;

    private static ModelOptions Options => new() { MaxSequenceLength = DraftSideBySide.MaxLength };

    /// <summary>
    /// The parallel model's runner drafts as the single device's does: each step's logits (prefill rows, drafts apart, the
    /// plain decode step) equal or within tolerance, the ids chosen and the drafts made in each verify step equal,
    /// teacher-forced on the single device's tokens; the communicator makes exactly the main passes' traffic (two copies per
    /// stage boundary or two all-reduces per layer, per pass) and, under tensor/expert parallelism, the MTP passes': three
    /// all-reduces per draft pass (the layer input's broadcast and the sharded layer's two), one per pass that only appends
    /// to the MTP cache (the broadcast). The script drafts 2 + <see cref="DraftSideBySide.VerifySteps"/> times (apart after the
    /// prompts and after the decode step, and in each verify step), and each prefill step appends (every chunk after the
    /// first of a request makes its pending position certain); verify and decode steps leave only pending positions.
    /// </summary>
    [TestMethod]
    [DataRow(PlacementKind.Pipeline, 3)]
    [DataRow(PlacementKind.TensorExpertParallel, 2)]
    [DataRow(PlacementKind.TensorExpertParallel, 4)]
    public void DraftsOverTheDevicesAreTheSingleDevicesDrafts(PlacementKind kind, int n)
    {
        using var run = SimulatedDevices.Load(s_checkpoint, kind, n, Options, mtp: true);
        Assert.IsTrue(run.Model.HasMtp);
        using var parallel = StepRunners.For(run.Model);
        Assert.IsTrue(parallel.CanDraft);
        using var alone = new PagedStepRunner(s_single);
        var expected = DraftSideBySide.Run(alone, oracle: s_single);
        var actual = DraftSideBySide.Run(parallel, follow: expected);
        Compare(expected, actual, kind == PlacementKind.Pipeline, $"{kind} N={n}");
        TestContext.WriteLine($"{kind} N={n}: {expected.Accepted} of {DraftSideBySide.VerifySteps * DraftSideBySide.Requests} drafts accepted");
        Assert.IsGreaterThan(0, expected.Accepted, "drafts kept");
        Assert.IsLessThan(DraftSideBySide.VerifySteps * DraftSideBySide.Requests, expected.Accepted, "drafts rolled back");

        var traffic = run.Communicator.Stats;
        var passes = actual.Passes;
        var layers = s_checkpoint.Config.NumHiddenLayers;
        Assert.AreEqual(kind == PlacementKind.Pipeline ? 2L * (n - 1) * passes : 0, traffic.Copies, "copies: the main passes' hand-overs only");
        var prefills = passes - DraftSideBySide.VerifySteps - 1;
        var mtp = 3L * (2 + DraftSideBySide.VerifySteps) + prefills;
        Assert.AreEqual(kind == PlacementKind.TensorExpertParallel ? 2L * layers * passes + mtp : 0, traffic.AllReduces, "all-reduces: the main and MTP passes'");
    }

    /// <summary>
    /// The same steps with decode graphs over plain CPU devices (a host communicator that records the collectives): the verify
    /// steps replay the main pass's graph (over every device, or a graph per pipeline stage) and the drafts' graph (over every
    /// device, or on the pipeline's last), and give the eager steps' logits, ids and drafts bit for bit.
    /// </summary>
    [TestMethod]
    [DataRow(PlacementKind.Pipeline, 3)]
    [DataRow(PlacementKind.TensorExpertParallel, 2)]
    public void DraftGraphsOverTheDevicesGiveTheEagerDrafts(PlacementKind kind, int n)
    {
        var devices = Enumerable.Range(0, n).Select(_ => new CpuBackend(maxDegreeOfParallelism: 2)).ToArray();
        try
        {
            using var comm = new HostCommunicator(devices);
            using var model = DeepSeekModel.Load(s_checkpoint, SimulatedDevices.PlanOf(s_checkpoint.Config, kind, n, mtp: true), comm, Options);
            DraftSideBySide.Trace eager;
            using (var runner = new PagedStepRunner(model.Layout))
            {
                eager = DraftSideBySide.Run(runner, oracle: s_single);
            }

            using var graphed = new PagedStepRunner(model.Layout) { DecodeGraphs = true };
            var trace = DraftSideBySide.Run(graphed, follow: eager);
            Compare(eager, trace, exact: true, $"{kind} N={n} graphs");
            Assert.IsGreaterThan(0, graphed.CapturedGraphs, "main graphs");
            Assert.IsGreaterThan(0, graphed.CapturedDraftGraphs, "draft graphs");
        }
        finally
        {
            foreach (var d in devices)
            {
                d.Dispose();
            }
        }
    }

    private static void Compare(DraftSideBySide.Trace expected, DraftSideBySide.Trace actual, bool exact, string what) =>
        DraftSideBySide.Compare(expected, actual, (want, got, step) => DistributedModels.AssertLikeOneDevice(exact, got, want, $"{what} {step} logits"));
}
