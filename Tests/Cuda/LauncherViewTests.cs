using DeepSeekCuda.Kernels;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>
/// The launchers' typed device views, without a GPU: the arithmetic of <see cref="DeviceRows"/> (rows, slices, column
/// ranges), the params each launcher packs from its views (what the kernel will read), and the refusals of views that
/// disagree, each naming the argument, before anything is launched. Copies are also run through a host model of the
/// copy kernel's indexing over a host array standing for device memory, so the addresses the views give land where the
/// tensors' elements are.
/// </summary>
[TestClass]
public sealed class LauncherViewTests
{
    private const ulong Base = 0x7f00_0000_0000;

    [TestMethod]
    [DataRow(false, 4)]
    [DataRow(true, 2)]
    public void RowsSlicesAndColumnRangesAddressTheElementsOfTheMatrix(bool bf16, int bytes)
    {
        var type = bf16 ? ElementType.BF16 : ElementType.F32;
        var m = new DeviceRows(Base, type, 10, 6);
        Assert.AreEqual(6L, m.Stride, "dense by default");
        Assert.IsTrue(m.IsDense);
        Assert.AreEqual(Base + (ulong)(3 * 6 * bytes), m.Row(3));

        var s = m.Slice(2, 5);
        Assert.AreEqual((m.Row(2), 5, 6, 6L, type), (s.Pointer, s.Rows, s.Cols, s.Stride, s.Type));

        var c = m.Columns(4, 2);
        Assert.AreEqual((Base + (ulong)(4 * bytes), 10, 2, 6L), (c.Pointer, c.Rows, c.Cols, c.Stride));
        Assert.IsFalse(c.IsDense, "a column range keeps the whole rows' stride");
        Assert.AreEqual(Base + (ulong)((7 * 6 + 4) * bytes), c.Row(7), "row 7, column 4 of the matrix");
        Assert.AreEqual(c.Row(3), c.Slice(3, 2).Pointer, "a slice of a column range starts at its row");
    }

    [TestMethod]
    public void ViewsThatCannotBeAreRefused()
    {
        var overlap = Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => new DeviceRows(Base, ElementType.F32, 2, 8, stride: 7));
        Assert.AreEqual("stride", overlap.ParamName);
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => new DeviceRows(Base, ElementType.F32, -1, 8));
        var m = new DeviceRows(Base, ElementType.F32, 4, 8);
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => m.Slice(2, 3));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => m.Slice(-1, 1));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => m.Columns(6, 3));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => new Fp8Rows(Base, Base, 2, 256, codesStride: 255));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => new Fp8Rows(Base, Base, 2, 256, scalesStride: 1));
        Assert.AreEqual(3, new Fp8Rows(Base, Base, 2, 257).Groups, "one scale per 128 channels, the last group narrower");
    }

    [TestMethod]
    public void RmsNormPacksItsViewsAndRefusesThoseThatDisagree()
    {
        DeviceRows x = new(Base, ElementType.BF16, 5, 300, stride: 1024), w = DeviceRows.Bf16Vector(Base + 0x10000, 300),
            y = new(Base + 0x20000, ElementType.F32, 5, 300), h = new(Base + 0x30000, ElementType.BF16, 5, 300, stride: 512);
        var p = RmsNormKernel.Params(h, x, w, y, 1e-6f, round: false);
        Assert.AreEqual((x.Pointer, h.Pointer, w.Pointer, y.Pointer), (p.X, p.Residual, p.Weight, p.Y));
        Assert.AreEqual((1024L, 512L, 300L, 5, 300, 1e-6f), (p.XStride, p.ResidualStride, p.YStride, p.Rows, p.Dim, p.Eps));
        var plain = RmsNormKernel.Params(null, x, w, y, 1e-6f, round: false);
        Assert.AreEqual((0UL, 0L), (plain.Residual, plain.ResidualStride), "the plain norm has no residual");

        AssertRefused("y", () => RmsNormKernel.Params(null, x, w, y.Slice(0, 4), 1e-6f, false), "[4, 300], expected [5, 300]");
        AssertRefused("weight", () => RmsNormKernel.Params(null, x, DeviceRows.Bf16Vector(w.Pointer, 299), y, 1e-6f, false), "[1, 299]");
        AssertRefused("weight", () => RmsNormKernel.Params(null, x, new DeviceRows(w.Pointer, ElementType.F32, 1, 300), y, 1e-6f, false), "F32, expected BF16");
        AssertRefused("residual", () => RmsNormKernel.Params(new DeviceRows(h.Pointer, ElementType.F32, 5, 300), x, w, y, 1e-6f, false), "F32, expected BF16");
        AssertRefused("round", () => RmsNormKernel.Params(null, x, w, y, 1e-6f, round: true), "reads and writes f32");
    }

    [TestMethod]
    public void SiluMulTakesTheHalvesOfAFusedGateUpTensor()
    {
        const int rows = 3, cols = 1536;
        var gateUp = new DeviceRows(Base, ElementType.BF16, rows, 2 * cols);
        var output = new DeviceRows(Base + 0x100000, ElementType.BF16, rows, cols);
        var p = SiluMulKernel.Params(gateUp.Columns(0, cols), gateUp.Columns(cols, cols), output, round: false);
        Assert.AreEqual((Base, Base + cols * 2UL, output.Pointer), (p.Gate, p.Up, p.Out));
        Assert.AreEqual((2L * cols, 2L * cols, (long)cols, rows, cols), (p.GateStride, p.UpStride, p.OutStride, p.Rows, p.Cols));

        AssertRefused("up", () => SiluMulKernel.Params(gateUp.Columns(0, cols), new DeviceRows(Base, ElementType.F32, rows, cols), output, false), "F32, expected BF16");
        AssertRefused("output", () => SiluMulKernel.Params(gateUp.Columns(0, cols), gateUp.Columns(cols, cols), output.Columns(0, cols - 1), false), "[3, 1535]");
        var tall = new DeviceRows(Base, ElementType.F32, 65536, 8);
        Assert.AreEqual("gate", Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => SiluMulKernel.Params(tall, tall, tall, false)).ParamName);
    }

    [TestMethod]
    public void EmbeddingTakesItsVocabularyAndWidthFromTheTable()
    {
        var table = new DeviceRows(Base, ElementType.BF16, 129280, 7168);
        var output = new DeviceRows(Base + 0x1000_0000, ElementType.F32, 7, 7168);
        var p = EmbeddingKernel.Params(new DeviceInts(Base + 0x2000_0000, 7), table, output);
        Assert.AreEqual((Base + 0x2000_0000, Base, output.Pointer, 7168L, 7, 7168, 129280), (p.Ids, p.Table, p.Out, p.OutStride, p.Tokens, p.Dim, p.Vocab));
        Assert.AreEqual((0UL, 0), (p.Chosen, p.ChosenRows), "ids are tokens");
        var chosen = EmbeddingKernel.Params(new DeviceInts(Base + 0x2000_0000, 7), table, output, new DeviceInts(Base + 0x3000_0000, 16));
        Assert.AreEqual((Base + 0x3000_0000, 16, 7), (chosen.Chosen, chosen.ChosenRows, chosen.Tokens), "ids name rows of the chosen ids");

        AssertRefused("output", () => EmbeddingKernel.Params(new DeviceInts(Base, 6), table, output), "[7, 7168], expected [6, 7168]");
        AssertRefused("table", () => EmbeddingKernel.Params(new DeviceInts(Base, 7), new DeviceRows(Base, ElementType.BF16, 100, 7168, stride: 8192), output), "must be dense");
        AssertRefused("table", () => EmbeddingKernel.Params(new DeviceInts(Base, 7), new DeviceRows(Base, ElementType.F32, 100, 7168), output), "F32, expected BF16");
    }

    [TestMethod]
    public void Bf16GemmTakesMNAndKFromItsViews()
    {
        DeviceRows x = new(Base, ElementType.F32, 17, 7168), w = new(Base + 0x1000_0000, ElementType.BF16, 129280, 7168),
            y = new(Base + 0x4000_0000, ElementType.F32, 17, 129280);
        var p = Bf16GemmKernel.Params(x, w, y);
        Assert.AreEqual((x.Pointer, w.Pointer, y.Pointer, 7168L, 129280L), (p.X, p.W, p.Y, p.XStride, p.YStride));
        Assert.AreEqual((17, 129280, 7168), (p.M, p.N, p.K));

        AssertRefused("w", () => Bf16GemmKernel.Params(x, new DeviceRows(w.Pointer, ElementType.BF16, 129280, 7167), y), "[129280, 7167], expected [129280, 7168]");
        AssertRefused("y", () => Bf16GemmKernel.Params(x, w, new DeviceRows(y.Pointer, ElementType.F32, 16, 129280)), "[16, 129280], expected [17, 129280]");
        AssertRefused("w", () => Bf16GemmKernel.Params(new DeviceRows(Base, ElementType.F32, 1, 0), new DeviceRows(w.Pointer, ElementType.BF16, 4, 0), new DeviceRows(Base, ElementType.F32, 1, 4)), "no columns");
    }

    [TestMethod]
    public void ActQuantWritesCodesAndScalesAtTheirOwnStrides()
    {
        var x = new DeviceRows(Base, ElementType.BF16, 4, 300, stride: 512);
        var q = new Fp8Rows(Base + 0x10000, Base + 0x20000, 4, 300, codesStride: 320, scalesStride: 4);
        var p = ActQuantKernel.Params(x, q);
        Assert.AreEqual((x.Pointer, q.Codes, q.Scales), (p.X, p.Codes, p.Scales));
        Assert.AreEqual((512L, 320L, 4L, 4, 300, 3), (p.XStride, p.CodesStride, p.ScalesStride, p.Rows, p.Cols, p.Groups));
        AssertRefused("output", () => ActQuantKernel.Params(x, new Fp8Rows(q.Codes, q.Scales, 4, 256)), "[4, 256], expected [4, 300]");
    }

    [TestMethod]
    public void Fp8GemmPacksActivationsWeightOutputAndResidual()
    {
        var x = new Fp8Rows(Base, Base + 0x10_0000, 64, 7168);
        var w = new Fp8Linear(Base + 0x100_0000, Base + 0x200_0000, 1536, 7168);
        var y = new DeviceRows(Base + 0x300_0000, ElementType.BF16, 64, 1536, stride: 2048);
        var residual = new DeviceRows(Base + 0x400_0000, ElementType.BF16, 64, 1536);
        var p = Fp8GemmKernel.Params(x, w, y, residual);
        Assert.AreEqual((x.Codes, x.Scales, w.W, w.Scales, y.Pointer, residual.Pointer), (p.XCodes, p.XScales, p.W, p.WScales, p.Y, p.Residual));
        Assert.AreEqual((7168L, 56L, 2048L, 1536L), (p.XStride, p.XScalesStride, p.YStride, p.ResidualStride));
        Assert.AreEqual(y.Pointer, Fp8GemmKernel.Params(x, w, y, residual: y).Residual, "in place: y += X·Wᵀ");
        Assert.AreEqual((64, 1, 1, 0UL), (p.M, p.OutBf16, p.Splits, p.Partial));
        Assert.AreEqual(7168, p.SplitK, "one split of all of K (14 gemv steps of 512)");
        var ragged = Fp8GemmKernel.Params(new Fp8Rows(Base, Base, 3, 1040), w with { In = 1040 }, new DeviceRows(Base, ElementType.F32, 3, 1536), null);
        Assert.AreEqual((1536, 1040L, 9L), (ragged.SplitK, ragged.XStride, ragged.XScalesStride), "K = 1040: one split rounded up to 3 gemv steps");
        var f32 = Fp8GemmKernel.Params(x, w, new DeviceRows(y.Pointer, ElementType.F32, 64, 1536), residual: null);
        Assert.AreEqual((0, 0UL), (f32.OutBf16, f32.Residual));

        AssertRefused("x", () => Fp8GemmKernel.Params(new Fp8Rows(Base, Base, 64, 7040), w, y, null), "x has 7040 channels");
        AssertRefused("w", () => Fp8GemmKernel.Params(x, w with { W = w.W + 8 }, y, null), "not 16-byte aligned");
        AssertRefused("y", () => Fp8GemmKernel.Params(x, w, y.Columns(0, 1535), null), "[64, 1535], expected [64, 1536]");
        AssertRefused("residual", () => Fp8GemmKernel.Params(x, w, y, new DeviceRows(y.Pointer, ElementType.F32, 64, 1536)), "F32, expected BF16");
    }

    [TestMethod]
    [DataRow(false)]
    [DataRow(true)]
    public void ConcatenatedColumnsLandBesideEachOtherInTheOutputRows(bool bf16)
    {
        var type = bf16 ? ElementType.BF16 : ElementType.F32;
        // CudaBackend.ConcatColumns: a [3, 4] and b [3, 2] copied into the column ranges of o [3, 6].
        var memory = new HostMemory(type);
        var a = memory.Matrix(3, 4, (r, c) => 10 * r + c);
        var b = memory.Matrix(3, 2, (r, c) => 100 + 10 * r + c);
        var o = memory.Matrix(3, 6, (_, _) => float.NaN);
        memory.Copy(BackendGlueKernel.CopyParams(a, o.Columns(0, a.Cols)));
        memory.Copy(BackendGlueKernel.CopyParams(b, o.Columns(a.Cols, b.Cols)));
        for (var r = 0; r < 3; r++)
        {
            for (var c = 0; c < 6; c++)
            {
                Assert.AreEqual(c < 4 ? 10 * r + c : 100 + 10 * r + c - 4, memory.At(o, r, c), $"o[{r}, {c}]");
            }
        }

        AssertRefused("output", () => BackendGlueKernel.CopyParams(a, o.Columns(0, 3)), "[3, 3], expected [3, 4]");
        var other = type == ElementType.F32 ? ElementType.BF16 : ElementType.F32;
        AssertRefused("output", () => BackendGlueKernel.CopyParams(a, new DeviceRows(o.Pointer, other, 3, 4)), $"{other}, expected {type}");
    }

    [TestMethod]
    public void CopiedRowsComeFromTheSourceSliceAndLandInTheDestinationSlice()
    {
        // CudaBackend.CopyRows: rows 1..2 of s [4, 5] into rows 3..4 of d [6, 5].
        var memory = new HostMemory(ElementType.F32);
        var s = memory.Matrix(4, 5, (r, c) => 10 * r + c);
        var d = memory.Matrix(6, 5, (_, _) => -1);
        memory.Copy(BackendGlueKernel.CopyParams(s.Slice(1, 2), d.Slice(3, 2)));
        for (var r = 0; r < 6; r++)
        {
            for (var c = 0; c < 5; c++)
            {
                Assert.AreEqual(r is 3 or 4 ? 10 * (r - 2) + c : -1, memory.At(d, r, c), $"d[{r}, {c}]");
            }
        }
    }

    [TestMethod]
    public void RopeRotatesTheRowsOfItsViewFromAStartOrAtDevicePositions()
    {
        var x = new DeviceRows(Base, ElementType.BF16, 5, 3 * 192, stride: 1000);
        var layout = new RopeLayout(3, 192, 128);
        var table = new RopeTableView(Base + 0x10000, Base + 0x20000, 100, 32);
        var fromStart = RopeKernel.Params(x, layout, table, positions: null, start: 7);
        Assert.AreEqual((x.Pointer, table.Cos, table.Sin, 0UL, 1000L, 192L), (fromStart.X, fromStart.Cos, fromStart.Sin, fromStart.Positions, fromStart.TokenStride, fromStart.HeadStride));
        Assert.AreEqual((5, 3, 128, 32, 7, 100), (fromStart.Tokens, fromStart.Heads, fromStart.RopeOffset, fromStart.Pairs, fromStart.Start, fromStart.TablePositions));
        var atPositions = RopeKernel.Params(x, layout, table, new DeviceInts(Base + 0x30000, 5), start: 0);
        Assert.AreEqual((Base + 0x30000, 0), (atPositions.Positions, atPositions.Start));

        AssertRefused("positions", () => RopeKernel.Params(x, layout, table, new DeviceInts(Base, 4), 0), "4 positions for 5 rows");
        AssertRefused("start", () => RopeKernel.Params(x, layout, table, new DeviceInts(Base, 5), 3), "a start (3) with device positions");
        Assert.AreEqual("start", Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => RopeKernel.Params(x, layout, table, null, 96)).ParamName);
        AssertRefused("layout", () => RopeKernel.Params(x.Columns(0, 3 * 192 - 1), layout, table, null, 0), "does not fit rows of 575");
    }

    [TestMethod]
    public void LatentAppendWritesEveryRowOfKvThroughTheBlockTable()
    {
        var shape = LatentShape.V3;
        var kv = new DeviceRows(Base, ElementType.BF16, 6, 576, stride: 2112); // the kv_a columns of a fused q_a|kv_a output
        var norm = DeviceRows.Bf16Vector(Base + 0x10000, 512);
        var rope = new RopeTableView(Base + 0x20000, Base + 0x30000, 4096, 32);
        DeviceInts requests = new(Base + 0x40000, 6), positions = new(Base + 0x50000, 6);
        var pages = new LatentPages(Base + 0x100_0000, Base + 0x60000, 64);
        var p = MlaCacheKernel.Params(shape, kv, norm, 1e-6f, rope, requests, positions, pages);
        Assert.AreEqual((kv.Pointer, norm.Pointer, rope.Cos, rope.Sin, requests.Pointer, positions.Pointer), (p.Kv, p.NormWeight, p.Cos, p.Sin, p.Requests, p.Positions));
        Assert.AreEqual((pages.BlockTable, pages.Cache, 2112L, 1e-6f, 6, 64, 4096), (p.BlockTable, p.Cache, p.KvStride, p.Eps, p.Tokens, p.MaxBlocks, p.TablePositions));

        AssertRefused("kv", () => MlaCacheKernel.Params(shape, kv.Columns(0, 512), norm, 1e-6f, rope, requests, positions, pages), "[6, 512], expected [6, 576]");
        AssertRefused("normWeight", () => MlaCacheKernel.Params(shape, kv, DeviceRows.Bf16Vector(norm.Pointer, 576), 1e-6f, rope, requests, positions, pages), "[1, 576]");
        AssertRefused("requests", () => MlaCacheKernel.Params(shape, kv, norm, 1e-6f, rope, requests, new DeviceInts(positions.Pointer, 5), pages), "5 positions for 6 rows");
        AssertRefused("rope", () => MlaCacheKernel.Params(shape, kv, norm, 1e-6f, rope with { Pairs = 16 }, requests, positions, pages), "16 pairs");
    }

    [TestMethod]
    public void TokenChoiceReadsStridedLogitRowsAndWritesOneIdPerRow()
    {
        var logits = new DeviceRows(Base, ElementType.F32, 8, 129280).Slice(2, 3);
        var p = SamplingKernel.Params(logits, Base + 0x100_0000, new DeviceInts(Base + 0x200_0000, 3), Base + 0x300_0000, 2020);
        Assert.AreEqual((Base + 2 * 129280 * 4UL, Base + 0x100_0000, Base + 0x200_0000, Base + 0x300_0000), (p.Logits, p.Choices, p.OutIds, p.Allowed));
        Assert.AreEqual((129280L, 4040L, 3), (p.LogitsStride, p.AllowedStride, p.Rows), "the mask stride in u32 words: two per u64");

        AssertRefused("ids", () => SamplingKernel.Params(logits, Base, new DeviceInts(Base, 2), 0, 0), "2 ids for 3 rows");
        AssertRefused("logits", () => SamplingKernel.Params(new DeviceRows(Base, ElementType.BF16, 3, 100), Base, new DeviceInts(Base, 3), 0, 0), "BF16, expected F32");
    }

    [TestMethod]
    public void MoeGateRoutesEveryRowIntoARoutingOfItsTopK()
    {
        var shape = MoeGateShape.V3;
        var x = new DeviceRows(Base, ElementType.F32, 7, 7168);
        var weight = new DeviceRows(Base + 0x100_0000, ElementType.BF16, 256, 7168);
        var bias = new DeviceRows(Base + 0x200_0000, ElementType.F32, 1, 256);
        var routing = new DeviceRouting(Base + 0x300_0000, Base + 0x400_0000, 7, 8);
        var p = MoeGateKernel.Params(shape, x, weight, bias, routing, normalize: true, scaling: 2.5f, scores: Base + 0x500_0000);
        Assert.AreEqual((x.Pointer, weight.Pointer, bias.Pointer, routing.Indices, routing.Weights, Base + 0x500_0000), (p.X, p.Weight, p.Bias, p.TopkIdx, p.TopkWeight, p.Scores));
        Assert.AreEqual((7168L, 7, 1, 2.5f, 0), (p.XStride, p.Tokens, p.Normalize, p.Scaling, p.LogitSplits));

        AssertRefused("weight", () => MoeGateKernel.Params(shape, x, new DeviceRows(weight.Pointer + 8, ElementType.BF16, 256, 7168), bias, routing, true, 2.5f, 0), "16-byte aligned");
        AssertRefused("weight", () => MoeGateKernel.Params(shape, x, new DeviceRows(weight.Pointer, ElementType.BF16, 255, 7168), bias, routing, true, 2.5f, 0), "[255, 7168]");
        AssertRefused("bias", () => MoeGateKernel.Params(shape, x, weight, new DeviceRows(bias.Pointer, ElementType.BF16, 1, 256), routing, true, 2.5f, 0), "BF16, expected F32");
        AssertRefused("routing", () => MoeGateKernel.Params(shape, x, weight, bias, routing with { K = 4 }, true, 2.5f, 0), "7 tokens x 4");
        AssertRefused("x", () => MoeGateKernel.Params(shape, x.Columns(0, 7000), weight, bias, routing, true, 2.5f, 0), "[7, 7000], expected [7, 7168]");
    }

    [TestMethod]
    public void MoeCombineSumsTheRoutedRowsSharedExpertAndResidualIntoY()
    {
        var expertOut = new DeviceRows(Base, ElementType.BF16, 64, 7168);
        var routing = new DeviceRouting(Base + 0x100_0000, Base + 0x200_0000, 4, 8);
        var inv = new DeviceInts(Base + 0x300_0000, 32);
        var shared = new DeviceRows(Base + 0x400_0000, ElementType.BF16, 4, 7168);
        var y = new DeviceRows(Base + 0x500_0000, ElementType.F32, 4, 7168, stride: 8192);
        var residual = new DeviceRows(Base + 0x600_0000, ElementType.F32, 4, 7168);
        var p = MoeCombineKernel.Params(expertOut, inv, routing, shared, residual, y);
        Assert.AreEqual((expertOut.Pointer, inv.Pointer, routing.Weights, shared.Pointer, residual.Pointer, y.Pointer), (p.ExpertOut, p.Inv, p.Weights, p.Shared, p.Residual, p.Y));
        Assert.AreEqual((7168L, 7168L, 7168L, 8192L, 4, 8, 7168), (p.ExpertStride, p.SharedStride, p.ResidualStride, p.YStride, p.Tokens, p.K, p.Hidden));
        var bare = MoeCombineKernel.Params(expertOut, inv, routing, null, null, y);
        Assert.AreEqual((0UL, 0UL), (bare.Shared, bare.Residual));

        AssertRefused("routing", () => MoeCombineKernel.Params(expertOut, new DeviceInts(inv.Pointer, 31), routing, shared, residual, y), "31 slots for 4 rows");
        AssertRefused("expertOut", () => MoeCombineKernel.Params(new DeviceRows(Base, ElementType.F32, 64, 7168), inv, routing, shared, residual, y), "F32, expected BF16");
        AssertRefused("residual", () => MoeCombineKernel.Params(expertOut, inv, routing, shared, new DeviceRows(residual.Pointer, ElementType.BF16, 4, 7168), y), "BF16, expected F32");
        AssertRefused("shared", () => MoeCombineKernel.Params(expertOut, inv, routing, shared.Slice(0, 3), residual, y), "[3, 7168], expected [4, 7168]");
    }

    [TestMethod]
    public void RoutingSlicesStartAtTheirFirstToken()
    {
        var routing = new DeviceRouting(Base, Base + 0x10000, 100, 8);
        var s = routing.Slice(10, 5);
        Assert.AreEqual((Base + 10 * 8 * 4, Base + 0x10000 + 10 * 8 * 4, 5, 8), (s.Indices, s.Weights, s.Tokens, s.K));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => routing.Slice(96, 5));
    }

    [TestMethod]
    public void MlaFoldAndUnfoldTakeDenseHeadsOfTheLatentShape()
    {
        var shape = LatentShape.V3;
        var dims = new MlaHeadDims(16, 128, 128);
        var q = new DeviceRows(Base, ElementType.BF16, 3, 16 * 192);
        var kvB = new DeviceRows(Base + 0x100_0000, ElementType.BF16, 16 * 256, 512);
        var qAbs = new DeviceRows(Base + 0x200_0000, ElementType.BF16, 3, 16 * 576);
        var fold = MlaDecodeKernel.FoldParams(shape, dims, q, kvB, qAbs);
        Assert.AreEqual((q.Pointer, kvB.Pointer, qAbs.Pointer, 3, 16, 128, 128), (fold.X, fold.W, fold.Y, fold.Tokens, fold.Heads, fold.Nope, fold.V));
        var latent = new DeviceRows(Base + 0x300_0000, ElementType.F32, 3, 16 * 512);
        var output = new DeviceRows(Base + 0x400_0000, ElementType.BF16, 3, 16 * 128);
        var unfold = MlaDecodeKernel.UnfoldParams(shape, dims, latent, kvB, output);
        Assert.AreEqual((latent.Pointer, kvB.Pointer, output.Pointer, 3), (unfold.X, unfold.W, unfold.Y, unfold.Tokens));

        AssertRefused("q", () => MlaDecodeKernel.FoldParams(shape, dims, new DeviceRows(Base, ElementType.BF16, 3, 16 * 192, stride: 4096), kvB, qAbs), "must be dense");
        AssertRefused("kvB", () => MlaDecodeKernel.FoldParams(shape, dims, q, kvB.Slice(0, 16 * 256 - 1), qAbs), "[4095, 512], expected [4096, 512]");
        AssertRefused("qAbs", () => MlaDecodeKernel.FoldParams(shape, dims, q, kvB, new DeviceRows(qAbs.Pointer, ElementType.F32, 3, 16 * 576)), "F32, expected BF16");
        AssertRefused("latent", () => MlaDecodeKernel.UnfoldParams(shape, dims, new DeviceRows(latent.Pointer, ElementType.BF16, 3, 16 * 512), kvB, output), "BF16, expected F32");
        AssertRefused("output", () => MlaDecodeKernel.UnfoldParams(shape, dims, latent, kvB, output.Slice(0, 2)), "[2, 2048], expected [3, 2048]");
    }

    [TestMethod]
    public void MlaDecodeTakesOneOrTwoQueriesPerRequestAndSplitsItsWorkspace()
    {
        var shape = LatentShape.V3;
        const int heads = 16, batch = 3, qTokens = 2, splits = 4, rows = batch * qTokens;
        var qAbs = new DeviceRows(Base, ElementType.BF16, rows, heads * 576);
        var pages = new LatentPages(Base + 0x100_0000, Base + 0x200_0000, 40);
        var lengths = new DeviceInts(Base + 0x300_0000, batch);
        var requests = new DeviceInts(Base + 0x300_1000, batch);
        var outLatent = new DeviceRows(Base + 0x400_0000, ElementType.F32, rows, heads * 512);
        var lse = new DeviceRows(Base + 0x500_0000, ElementType.F32, rows, heads);
        const ulong workspace = Base + 0x600_0000;
        var p = MlaDecodeKernel.DecodeParams(shape, heads, qAbs, pages, lengths, requests, 0.1f, outLatent, lse, splits, workspace);
        Assert.AreEqual((qAbs.Pointer, pages.Cache, pages.BlockTable, requests.Pointer, lengths.Pointer, outLatent.Pointer, lse.Pointer), (p.Q, p.Cache, p.BlockTable, p.Requests, p.Lengths, p.Out, p.Lse));
        Assert.AreEqual((0.1f, batch, heads, qTokens, 40, splits), (p.Scale, p.Batch, p.Heads, p.QTokens, p.MaxBlocks, p.Splits));
        Assert.AreEqual(workspace, p.OPartial);
        var lsePartials = (long)splits * rows * heads * sizeof(float);
        Assert.AreEqual(MlaDecodeKernel.WorkspaceBytes(shape, batch, heads, qTokens, splits), (long)(p.LsePartial - p.OPartial) + lsePartials,
            "the latent partials, then the lse partials, fill the workspace the launcher asks for");
        var one = MlaDecodeKernel.DecodeParams(shape, heads, qAbs, pages, new DeviceInts(lengths.Pointer, rows), null, 0.1f, outLatent, lse, 1, 0);
        Assert.AreEqual((rows, 1, 0UL, 0UL, 0UL), (one.Batch, one.QTokens, one.Requests, one.OPartial, one.LsePartial));

        AssertRefused("qAbs", () => MlaDecodeKernel.DecodeParams(shape, heads, qAbs, pages, new DeviceInts(lengths.Pointer, 2), null, 0.1f, outLatent, lse, 1, 0), "6 queries for 2 requests");
        AssertRefused("qAbs", () => MlaDecodeKernel.DecodeParams(shape, heads, new DeviceRows(Base + 8, ElementType.BF16, rows, heads * 576), pages, lengths, null, 0.1f, outLatent, lse, 1, 0), "16-byte aligned");
        AssertRefused("requests", () => MlaDecodeKernel.DecodeParams(shape, heads, qAbs, pages, lengths, new DeviceInts(requests.Pointer, 2), 0.1f, outLatent, lse, 1, 0), "2 block-table rows for 3 requests");
        AssertRefused("lse", () => MlaDecodeKernel.DecodeParams(shape, heads, qAbs, pages, lengths, null, 0.1f, outLatent, lse.Columns(0, 15), 1, 0), "[6, 15], expected [6, 16]");
        AssertRefused("workspace", () => MlaDecodeKernel.DecodeParams(shape, heads, qAbs, pages, lengths, null, 0.1f, outLatent, lse, splits, 0), "4 splits need a workspace");
    }

    [TestMethod]
    public void RingRowsAreScatteredToTheirSlotsAndPositionsAndGatheredBack()
    {
        // CudaBackend.ScatterRows / GatherRows: 3 slots of 4 ring rows; row r at slots[r]·4 + positions[r] mod 4.
        var memory = new HostMemory(ElementType.F32);
        var ring = memory.Matrix(12, 2, (_, _) => -1);
        var rows = memory.Matrix(3, 2, (r, c) => 10 * r + c);
        int[] slots = [2, 0, 2], positions = [5, 1, 2];
        DeviceInts slotsView = new(Base + 0x100_0000, 3), positionsView = new(Base + 0x200_0000, 3);
        var scatter = BackendGlueKernel.RingParams(scatter: true, ring, 4, rows, slotsView, positionsView);
        Assert.AreEqual((rows.Pointer, ring.Pointer, slotsView.Pointer, positionsView.Pointer, 3, 2, 4), (scatter.X, scatter.Out, scatter.Slots, scatter.Positions, scatter.Rows, scatter.Cols, scatter.RingRows));
        memory.Ring(scatter, scatter: true, slots, positions);
        for (var g = 0; g < 12; g++)
        {
            var from = g switch { 9 => 0, 1 => 1, 10 => 2, _ => -1 };
            Assert.AreEqual(from < 0 ? -1 : 10 * from, memory.At(ring, g, 0), $"ring row {g}");
            Assert.AreEqual(from < 0 ? -1 : 10 * from + 1, memory.At(ring, g, 1), $"ring row {g}");
        }

        var back = memory.Matrix(3, 2, (_, _) => float.NaN);
        var gather = BackendGlueKernel.RingParams(scatter: false, ring, 4, back, slotsView, positionsView);
        Assert.AreEqual((ring.Pointer, back.Pointer), (gather.X, gather.Out));
        memory.Ring(gather, scatter: false, slots, positions);
        for (var r = 0; r < 3; r++)
        {
            Assert.AreEqual((memory.At(rows, r, 0), memory.At(rows, r, 1)), (memory.At(back, r, 0), memory.At(back, r, 1)), $"row {r} comes back");
        }

        AssertRefused("slots", () => BackendGlueKernel.RingParams(true, ring, 4, rows, new DeviceInts(Base, 2), positionsView), "2 slots and 3 positions for 3 rows");
        AssertRefused("ring", () => BackendGlueKernel.RingParams(true, new DeviceRows(ring.Pointer, ElementType.BF16, 12, 2), 4, rows, slotsView, positionsView), "BF16, expected F32");
        AssertRefused("ring", () => BackendGlueKernel.RingParams(true, new DeviceRows(ring.Pointer, ElementType.F32, 12, 3), 4, rows, slotsView, positionsView), "for rows of 2");
    }

    [TestMethod]
    public void RoundingAndDequantizationTakeWholeDenseViews()
    {
        var round = BackendGlueKernel.RoundParams(new DeviceRows(Base, ElementType.F32, 3, 7168));
        Assert.AreEqual((Base, 3L * 7168), (round.Out, round.N));
        AssertRefused("values", () => BackendGlueKernel.RoundParams(new DeviceRows(Base, ElementType.BF16, 3, 7168)), "BF16, expected F32");
        AssertRefused("values", () => BackendGlueKernel.RoundParams(new DeviceRows(Base, ElementType.F32, 3, 7168).Columns(0, 100)), "must be dense");

        var w = new Fp8Linear(Base, Base + 0x100_0000, 32768, 512);
        var dq = BackendGlueKernel.DequantizeParams(w, new DeviceRows(Base + 0x200_0000, ElementType.BF16, 32768, 512));
        Assert.AreEqual((w.W, w.Scales, Base + 0x200_0000, 32768, 512, 4), (dq.X, dq.Y, dq.Out, dq.Rows, dq.Cols, dq.ScaleCols));
        AssertRefused("output", () => BackendGlueKernel.DequantizeParams(w, new DeviceRows(Base, ElementType.BF16, 512, 32768)), "[512, 32768], expected [32768, 512]");
    }

    [TestMethod]
    public void MlaPrefillTakesVarlenOffsetsAndDenseBf16Heads()
    {
        var shape = MlaPrefillShape.V3;
        var pages = new LatentPages(Base, Base + 0x100_0000, 8);
        DeviceInts cuQ = new(Base + 0x200_0000, 3), cuKv = new(Base + 0x200_1000, 3);
        var latent = new DeviceRows(Base + 0x300_0000, ElementType.BF16, 600, 512);
        var gather = MlaPrefillKernel.GatherParams(shape, pages, cuKv, 500, latent);
        Assert.AreEqual((pages.Cache, pages.BlockTable, cuKv.Pointer, latent.Pointer, 2, 8), (gather.Cache, gather.BlockTable, gather.CuKv, gather.Latent, gather.Requests, gather.MaxBlocks));
        Assert.AreEqual("maxBlocks", Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => MlaPrefillKernel.GatherParams(shape, pages, cuKv, 513, latent.Slice(0, 600))).ParamName,
            "8 blocks of 64 rows hold 512 tokens");
        AssertRefused("latent", () => MlaPrefillKernel.GatherParams(shape, pages, cuKv, 500, new DeviceRows(latent.Pointer, ElementType.BF16, 600, 576)), "[600, 576], expected [600, 512]");

        const int heads = 16, rows = 40;
        DeviceRows q = new(Base + 0x400_0000, ElementType.BF16, rows, heads * 192), kv = new(Base + 0x500_0000, ElementType.BF16, 600, heads * 256),
            output = new(Base + 0x600_0000, ElementType.BF16, rows, heads * 128);
        var p = MlaPrefillKernel.AttentionParams(shape, heads, q, pages, cuQ, cuKv, kv, 30, 0.1f, output);
        Assert.AreEqual((q.Pointer, cuQ.Pointer, cuKv.Pointer, kv.Pointer, output.Pointer), (p.Q, p.CuQ, p.CuKv, p.Kv, p.Out));
        Assert.AreEqual((0.1f, 2, 8, heads), (p.Scale, p.Requests, p.MaxBlocks, p.Heads));

        AssertRefused("cuKv", () => MlaPrefillKernel.AttentionParams(shape, heads, q, pages, cuQ, new DeviceInts(cuKv.Pointer, 2), kv, 30, 0.1f, output), "2 KV offsets for 3 query offsets");
        AssertRefused("kv", () => MlaPrefillKernel.AttentionParams(shape, heads, q, pages, cuQ, cuKv, kv.Columns(0, heads * 192), 30, 0.1f, output), "[600, 3072], expected [600, 4096]");
        AssertRefused("output", () => MlaPrefillKernel.AttentionParams(shape, heads, q, pages, cuQ, cuKv, kv, 30, 0.1f, output.Slice(0, 39)), "[39, 2048], expected [40, 2048]");
        AssertRefused("q", () => MlaPrefillKernel.AttentionParams(shape, heads, new DeviceRows(q.Pointer + 2, ElementType.BF16, rows, heads * 192), pages, cuQ, cuKv, kv, 30, 0.1f, output), "16-byte aligned");
        Assert.AreEqual("scale", Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => MlaPrefillKernel.AttentionParams(shape, heads, q, pages, cuQ, cuKv, kv, 30, float.NaN, output)).ParamName);
    }

    [TestMethod]
    public void MoeDispatchSizesItsArraysFromItsBuffersAndReadsOnlyTheIdsItMay()
    {
        var buffers = new MoeDispatchBuffers(Base, Base + 0x1000, Base + 0x2000, Base + 0x3000, Base + 0x4000, TMax: 10, K: 8, Experts: 32, Tile: 64);
        var ids = new DeviceInts(Base + 0x10000, 80);
        var map = new DeviceExpertMap(Base + 0x20000, 256, new DeviceInts(Base + 0x30000, 80));
        var p = MoeDispatchKernel.Params(ids.Slice(0, 7 * 8), 7, buffers, numTokens: 0, map);
        Assert.AreEqual((ids.Pointer, buffers.Counts, buffers.Offsets, buffers.Perm, buffers.Inv, buffers.Workspace), (p.TopkIdx, p.Counts, p.Offsets, p.Perm, p.Inv, p.Hist));
        Assert.AreEqual((map.Map, map.LocalIdx.Pointer, 256, 0UL), (p.ExpertMap, p.LocalIdx, p.MapExperts, p.NumTokens));
        Assert.AreEqual((7, 10, 8, 64, 10 * 8 + 32 * 63), (p.Tokens, p.TMax, p.K, p.Tile, p.RowsMax));
        var unmapped = MoeDispatchKernel.Params(ids, 0, buffers, numTokens: Base + 0x40000, map: null);
        Assert.AreEqual((0UL, 0UL, 0, Base + 0x40000), (unmapped.ExpertMap, unmapped.LocalIdx, unmapped.MapExperts, unmapped.NumTokens));

        Assert.AreEqual("tokens", Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => MoeDispatchKernel.Params(ids, 11, buffers, 0, null)).ParamName);
        AssertRefused("topkIdx", () => MoeDispatchKernel.Params(ids.Slice(0, 55), 7, buffers, 0, null), "55 expert ids where the dispatch may read 56");
        AssertRefused("topkIdx", () => MoeDispatchKernel.Params(ids.Slice(0, 56), 7, buffers, Base + 0x40000, null), "may read 80", "a count on the device: up to TMax tokens");
        AssertRefused("map", () => MoeDispatchKernel.Params(ids, 7, buffers, 0, map with { LocalIdx = new DeviceInts(Base, 79) }), "79 local ids");
    }

    [TestMethod]
    public void GroupedExpertGemmsReadTheirStacksHalfAndWriteTheGroupedRows()
    {
        var stack = new MoeExpertStack(Base, Base + 0x100_0000, Base + 0x200_0000, Base + 0x300_0000, Experts: 32, Hidden: 7168, Inter: 2048);
        var contiguous = new GroupedRows(MoeGroupedLayout.Contiguous, Base + 0x400_0000, Base + 0x400_1000, Base + 0x400_2000, GatherDiv: 8, Rows: 2176, Capacity: 0);
        var x = new Fp8Rows(Base + 0x500_0000, Base + 0x600_0000, 16, 7168);
        var h = new DeviceRows(Base + 0x700_0000, ElementType.BF16, 2176, 2048);
        var gateUp = MoeGroupedGemmKernel.Params(swiglu: true, stack, contiguous, x, h);
        Assert.AreEqual((x.Codes, x.Scales, stack.W13, stack.W13Scales, h.Pointer), (gateUp.XCodes, gateUp.XScales, gateUp.W, gateUp.WScales, gateUp.Y));
        Assert.AreEqual((contiguous.Counts, contiguous.Offsets, contiguous.Gather, 8), (gateUp.Counts, gateUp.Offsets, gateUp.Gather, gateUp.GatherDiv));
        Assert.AreEqual((7168L, 56L, 2048L, 32, 0), (gateUp.XStride, gateUp.XScalesStride, gateUp.YStride, gateUp.Experts, gateUp.Capacity));

        var masked = new GroupedRows(MoeGroupedLayout.Masked, Base + 0x400_0000, Base + 0x400_1000, 0, GatherDiv: 1, Rows: 32 * 4, Capacity: 4);
        var hq = new Fp8Rows(Base + 0x800_0000, Base + 0x900_0000, 32 * 4, 2048);
        var y = new DeviceRows(Base + 0xA00_0000, ElementType.BF16, 32 * 4, 7168);
        var down = MoeGroupedGemmKernel.Params(swiglu: false, stack, masked, hq, y);
        Assert.AreEqual((stack.W2, stack.W2Scales, 2048L, 16L, 7168L, 4), (down.W, down.WScales, down.XStride, down.XScalesStride, down.YStride, down.Capacity));

        AssertRefused("x", () => MoeGroupedGemmKernel.Params(true, stack, contiguous, hq, h), "x has 2048 channels, the experts take 7168");
        AssertRefused("y", () => MoeGroupedGemmKernel.Params(true, stack, contiguous, x, h.Slice(0, 2175)), "y holds 2175 rows, the grouped rows need 2176");
        AssertRefused("y", () => MoeGroupedGemmKernel.Params(false, stack, masked, hq, y.Slice(0, 127)), "need 128");
        AssertRefused("y", () => MoeGroupedGemmKernel.Params(true, stack, contiguous, x, new DeviceRows(h.Pointer, ElementType.F32, 2176, 2048)), "F32, expected BF16");
        AssertRefused("rows", () => MoeGroupedGemmKernel.Params(true, stack, contiguous with { Offsets = 0 }, x, h), "needs the dispatch offsets");
        AssertRefused("w", () => MoeGroupedGemmKernel.Params(true, stack with { W2 = stack.W2 + 4 }, contiguous, x, h), "16-byte aligned");
    }

    [TestMethod]
    public void TheMaskedLayoutFillsEveryExpertsCapacityFromTheDispatch()
    {
        var dispatch = new MoeDispatchBuffers(Base, Base + 0x1000, Base + 0x2000, Base + 0x3000, Base + 0x4000, TMax: 16, K: 8, Experts: 32, Tile: 64);
        DeviceInts ids = new(Base + 0x10000, 24), gather = new(Base + 0x20000, 32 * 3), minv = new(Base + 0x30000, 128);
        var p = MoeGroupedGemmKernel.MaskedLayoutParams(ids, dispatch, 3, gather, minv);
        Assert.AreEqual((ids.Pointer, dispatch.Counts, dispatch.Offsets, dispatch.Perm, dispatch.Inv, gather.Pointer, minv.Pointer), (p.TopkIdx, p.Counts, p.Offsets, p.Perm, p.Inv, p.Gather, p.Minv));
        Assert.AreEqual((32, 3, 128), (p.Experts, p.Capacity, p.Slots), "every slot of TMax tokens gets its masked row (−1 past the live count)");

        AssertRefused("gather", () => MoeGroupedGemmKernel.MaskedLayoutParams(ids, dispatch, 3, gather.Slice(0, 95), minv), "95 gather rows");
        AssertRefused("gather", () => MoeGroupedGemmKernel.MaskedLayoutParams(ids, dispatch, 3, gather, minv.Slice(0, 127)), "127 inverse slots");
    }

    private static void AssertRefused(string parameter, Action call, string message, string why = "")
    {
        var e = Assert.ThrowsExactly<ArgumentException>(call, why);
        Assert.AreEqual(parameter, e.ParamName, e.Message);
        StringAssert.Contains(e.Message, message, why);
    }

    /// <summary>Device memory stood for by a host array of one element type, matrices laid out one after another from <see cref="Base"/>.</summary>
    private sealed class HostMemory(ElementType type)
    {
        private readonly List<float> _elements = [];

        public DeviceRows Matrix(int rows, int cols, Func<int, int, float> value)
        {
            var view = new DeviceRows(Base + (ulong)(_elements.Count * type.Bytes()), type, rows, cols);
            for (var r = 0; r < rows; r++)
            {
                for (var c = 0; c < cols; c++)
                {
                    _elements.Add(value(r, c));
                }
            }

            return view;
        }

        public float At(DeviceRows m, int row, int col) => _elements[Index(m.Pointer) + (int)(row * m.Stride) + col];

        /// <summary>glue_copy_kernel's indexing: out[r·out_stride + c] = x[r·x_stride + c] for r &lt; rows, c &lt; cols.</summary>
        public void Copy(in BackendGlueParams p)
        {
            int x = Index(p.X), o = Index(p.Out);
            for (var r = 0; r < p.Rows; r++)
            {
                for (var c = 0; c < p.Cols; c++)
                {
                    _elements[o + (int)(r * p.OutStride) + c] = _elements[x + (int)(r * p.XStride) + c];
                }
            }
        }

        /// <summary>glue_ring_kernel's indexing: ring row g = slots[r]·ring_rows + positions[r] mod ring_rows for step row r.</summary>
        public void Ring(in BackendGlueParams p, bool scatter, int[] slots, int[] positions)
        {
            int x = Index(p.X), o = Index(p.Out);
            for (var r = 0; r < p.Rows; r++)
            {
                var g = (slots[r] * p.RingRows) + (positions[r] % p.RingRows);
                for (var c = 0; c < p.Cols; c++)
                {
                    if (scatter)
                    {
                        _elements[o + (g * p.Cols) + c] = _elements[x + (r * p.Cols) + c];
                    }
                    else
                    {
                        _elements[o + (r * p.Cols) + c] = _elements[x + (g * p.Cols) + c];
                    }
                }
            }
        }

        private int Index(ulong address)
        {
            var offset = address - Base;
            Assert.AreEqual(0UL, offset % (ulong)type.Bytes(), $"0x{address:x} is not an element boundary");
            return (int)(offset / (ulong)type.Bytes());
        }
    }
}
