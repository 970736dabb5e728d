using System.Diagnostics;
using System.Text;
using System.Text.Json.Nodes;
using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Numerics;
using DeepSeekCuda.Loader.Synthetic;
using DeepSeekCuda.Model;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Loader;

/// <summary>
/// Files that must never make the loader hang, read without bound, follow a link anywhere, crash the
/// process or load wrong numbers "validly": each is refused with a <see cref="CheckpointException"/> that
/// names the file (and tensor or field).
/// </summary>
[TestClass]
public sealed class HostileFileTests
{
    private static readonly TimeSpan Patience = TimeSpan.FromSeconds(30);

    public TestContext TestContext { get; set; } = null!;

    private static TempDir Valid(int shards = 2)
    {
        var dir = new TempDir();
        SyntheticCheckpoint.Write(dir.Path, ModelPresets.Tiny, seed: 3, shards);
        return dir;
    }

    /// <summary>Runs <paramref name="action"/> on the thread pool; a hang fails the test instead of the suite.</summary>
    private static T Throws<T>(Action action) where T : Exception
    {
        var task = Task.Run(() => Assert.ThrowsExactly<T>(action));
        Assert.IsTrue(task.Wait(Patience), "it hung");
        return task.Result;
    }

    private static void Replace(string path, Action<string> make)
    {
        File.Delete(path);
        make(path);
    }

    private static byte[] Tensor(string name, string dtype, int count, int size, long begin) =>
        Encoding.UTF8.GetBytes($"\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":[{count}],\"data_offsets\":[{begin},{begin + count * size}]}}");

    private static byte[] SafetensorsBytes(string header, int dataBytes, int headerLengthDelta = 0)
    {
        var h = Encoding.UTF8.GetBytes(header);
        var bytes = new byte[8 + h.Length + dataBytes];
        BitConverter.GetBytes((ulong)(h.Length + headerLengthDelta)).CopyTo(bytes, 0);
        h.CopyTo(bytes, 8);
        return bytes;
    }

    [TestMethod]
    public void TheTensorsMustTileTheDataSection_NoHoleNoTrailingByte()
    {
        using var dir = new TempDir();
        string A(long b) => Encoding.UTF8.GetString(Tensor("a", "F32", 2, 4, b));
        string B(long b) => Encoding.UTF8.GetString(Tensor("b", "BF16", 4, 2, b));
        void Open(byte[] bytes) => SafetensorsFile.Open(WriteFile(dir, bytes)).Dispose();

        Open(SafetensorsBytes($"{{{A(0)},{B(8)}}}", 16)); // exact: accepted
        var hole = Throws<SafetensorsFormatException>(() => Open(SafetensorsBytes($"{{{A(0)},{B(10)}}}", 18)));
        StringAssert.Contains(hole.Problem, "hole of 2 bytes after tensor 'a'");
        Assert.AreEqual("b", hole.TensorName);
        var trailing = Throws<SafetensorsFormatException>(() => Open(SafetensorsBytes($"{{{A(0)},{B(8)}}}", 17)));
        StringAssert.Contains(trailing.Problem, "1 bytes belong to no tensor");
        var leading = Throws<SafetensorsFormatException>(() => Open(SafetensorsBytes($"{{{B(4)}}}", 12)));
        StringAssert.Contains(leading.Problem, "hole of 4 bytes after the start of the data section");

        // Writers pad the header with spaces; a length one byte short still parses as JSON, and would
        // shift every tensor by one byte.
        var padded = $"{{{A(0)},{B(8)}}}   ";
        Open(SafetensorsBytes(padded, 16));
        var shifted = Throws<SafetensorsFormatException>(() => Open(SafetensorsBytes(padded, 16, headerLengthDelta: -1)));
        StringAssert.Contains(shifted.Problem, "belong to no tensor (or the header length is wrong)");
    }

    private static string WriteFile(TempDir dir, byte[] bytes)
    {
        var path = dir.File($"t-{Guid.NewGuid():N}.safetensors");
        File.WriteAllBytes(path, bytes);
        return path;
    }

    [TestMethod]
    [DataRow(Checkpoint.ConfigFileName)]
    [DataRow(Checkpoint.IndexFileName)]
    [DataRow("model-00002-of-00002.safetensors")]
    public void AFifoInThePlaceOfAModelFile_IsRefusedAtOnce(string name)
    {
        using var dir = Valid();
        Replace(dir.File(name), Fifo.Create);
        var e = Throws<CheckpointException>(() => Checkpoint.Open(dir.Path).Dispose());
        Assert.AreEqual(dir.File(name), e.FilePath);
        StringAssert.Contains(e.Message, "not a regular file (it is a FIFO, socket or device)");
    }

    [TestMethod]
    [DataRow(Checkpoint.ConfigFileName, "/dev/zero")]
    [DataRow(Checkpoint.ConfigFileName, "/dev/urandom")]
    [DataRow("model-00001-of-00002.safetensors", "/dev/zero")]
    [DataRow(Checkpoint.IndexFileName, "/dev/urandom")]
    [DataRow("model-00001-of-00002.safetensors", "/etc/passwd")]
    public void ALinkOutOfTheModelFolder_IsRefused_WithoutReadingIt(string name, string target)
    {
        using var dir = Valid();
        Replace(dir.File(name), p => File.CreateSymbolicLink(p, target));
        var e = Throws<CheckpointException>(() => Checkpoint.Open(dir.Path).Dispose());
        Assert.AreEqual(dir.File(name), e.FilePath);
        StringAssert.Contains(e.Message, $"a symbolic link to {target}, outside the model folder");
        Assert.DoesNotContain("root", e.Message.Replace(dir.Path, "", StringComparison.Ordinal), "nothing of the target is read");
    }

    [TestMethod]
    public void ALinkInsideTheFolder_ToAFifo_IsRefused_ToARegularFile_IsFollowed()
    {
        using var dir = Valid();
        var config = dir.File(Checkpoint.ConfigFileName);
        Directory.CreateDirectory(dir.File("real"));
        File.Move(config, dir.File("real/config.json"));
        File.CreateSymbolicLink(config, "real/config.json");
        using (var c = Checkpoint.Open(dir.Path))
        {
            Assert.AreEqual(ModelPresets.Tiny.HiddenSize, c.Config.HiddenSize);
        }

        Fifo.Create(dir.File("real/pipe"));
        Replace(config, p => File.CreateSymbolicLink(p, "real/pipe"));
        var e = Throws<CheckpointException>(() => Checkpoint.Open(dir.Path).Dispose());
        StringAssert.Contains(e.Message, "not a regular file (it is a FIFO, socket or device)");
    }

    [TestMethod]
    public void AHuggingFaceHubSnapshot_WhoseLinksEndInTheRepositorysBlobs_Opens()
    {
        // REPO/snapshots/REV/NAME -> ../../blobs/HASH, the hub cache's own layout.
        using var source = Valid();
        using var repo = new TempDir();
        var snapshot = Path.Combine(repo.Path, "snapshots", "0123abc");
        Directory.CreateDirectory(snapshot);
        Directory.CreateDirectory(Path.Combine(repo.Path, "blobs"));
        foreach (var file in Directory.GetFiles(source.Path))
        {
            var blob = Path.Combine(repo.Path, "blobs", Guid.NewGuid().ToString("N"));
            File.Copy(file, blob);
            File.CreateSymbolicLink(Path.Combine(snapshot, Path.GetFileName(file)), Path.Combine("..", "..", "blobs", Path.GetFileName(blob)));
        }

        using var c = Checkpoint.Open(snapshot);
        Assert.AreEqual(ModelPresets.Tiny.HiddenSize, c.Config.HiddenSize);
        Assert.AreEqual(ModelPresets.Tiny.VocabSize, c.ReadFloat32(CheckpointLayout.Embedding).Length / ModelPresets.Tiny.HiddenSize);
    }

    [TestMethod]
    public void AnOversizedConfig_IsRefusedByItsLimit_BeforeItIsRead()
    {
        using var dir = Valid();
        using (var f = File.OpenWrite(dir.File(Checkpoint.ConfigFileName)))
        {
            f.SetLength(ModelConfig.MaxFileBytes + 1);
        }

        var e = Throws<CheckpointException>(() => Checkpoint.Open(dir.Path).Dispose());
        StringAssert.Contains(e.Message, $"{ModelConfig.MaxFileBytes + 1} bytes, over the limit of {ModelConfig.MaxFileBytes}");
    }

    [TestMethod]
    public void AShardTruncatedWhileOpen_IsAnError_NotACrash()
    {
        using var dir = Valid(shards: 1);
        using var c = Checkpoint.Open(dir.Path);
        var last = c.Tensors.Values.MaxBy(t => t.End)!;
        var first = c.Tensors.Values.MinBy(t => t.Begin)!;
        using (var f = new FileStream(c.ShardFiles.Single(), FileMode.Open, FileAccess.Write, FileShare.ReadWrite))
        {
            f.SetLength(f.Length - last.ByteLength / 2);
        }

        var e = Assert.ThrowsExactly<CheckpointException>(() => c.GetBytes(last.Name).Length);
        StringAssert.Contains(e.Message, "truncated while open");
        Assert.AreEqual(last.Name, e.TensorName);
        Assert.AreEqual((int)first.ByteLength, c.GetBytes(first.Name).Length, "what is still there reads");
    }

    [TestMethod]
    [DataRow("num_hidden_layers", 1 << 30)]
    [DataRow("n_routed_experts", 1 << 30)]
    [DataRow("num_nextn_predict_layers", 1 << 30)]
    public void AConfigClaimingBillionsOfTensors_IsRefusedAtOnce(string field, int value)
    {
        using var dir = Valid();
        var path = dir.File(Checkpoint.ConfigFileName);
        var json = JsonNode.Parse(File.ReadAllText(path))!.AsObject();
        json[field] = value;
        if (field == "n_routed_experts")
        {
            json["n_group"] = 1;
            json["topk_group"] = 1;
        }

        File.WriteAllText(path, json.ToJsonString());
        var allocated = GC.GetTotalAllocatedBytes(precise: true);
        var watch = Stopwatch.StartNew();
        var e = Throws<CheckpointMismatchException>(() => Checkpoint.Open(dir.Path).Dispose());
        watch.Stop();
        var used = GC.GetTotalAllocatedBytes(precise: true) - allocated;
        StringAssert.Contains(e.Message, "the config does not describe this checkpoint");
        TestContext.WriteLine($"{field} = {value}: refused in {watch.ElapsedMilliseconds} ms, {used >> 20} MiB allocated");
        Assert.IsLessThan(256L << 20, used, "bounded by the checkpoint's own tensor count");
    }

    /// <summary>Overwrites the first element of <paramref name="tensor"/> in its shard with <paramref name="bytes"/>.</summary>
    private static void Poke(TempDir dir, string tensor, params byte[] bytes)
    {
        string file;
        long offset;
        using (var c = Checkpoint.Open(dir.Path))
        {
            var info = c.Tensors[tensor];
            file = info.FilePath;
            using var f = File.OpenRead(file);
            var n = new byte[8];
            f.ReadExactly(n);
            offset = 8 + (long)BitConverter.ToUInt64(n) + info.Begin + info.ByteLength / 2 / bytes.Length * bytes.Length;
        }

        using var w = new FileStream(file, FileMode.Open, FileAccess.Write);
        w.Position = offset;
        w.Write(bytes);
    }

    [TestMethod]
    [DataRow("model.layers.1.self_attn.kv_b_proj.weight", new byte[] { 0x7F })] // e4m3 NaN
    [DataRow("model.layers.1.self_attn.kv_b_proj.weight", new byte[] { 0xFF })] // e4m3 -NaN
    [DataRow("model.layers.1.self_attn.kv_b_proj.weight_scale_inv", new byte[] { 0, 0, 0xC0, 0x7F })] // F32 NaN
    [DataRow("model.layers.0.input_layernorm.weight", new byte[] { 0x80, 0x7F })] // BF16 +inf
    [DataRow("model.norm.weight", new byte[] { 0xC1, 0xFF })] // BF16 NaN
    [DataRow("model.layers.1.mlp.gate.e_score_correction_bias", new byte[] { 0, 0, 0x80, 0xFF })] // F32 -inf
    public void ANonFiniteWeight_FailsTheLoad_NamingTheTensor(string tensor, byte[] bytes)
    {
        using var dir = Valid();
        Poke(dir, tensor, bytes);
        using var c = Checkpoint.Open(dir.Path);
        using var backend = new CpuBackend();
        var e = Assert.ThrowsExactly<NonFiniteWeightException>(() => DeepSeekModel.Load(c, backend).Dispose());
        Assert.AreEqual(tensor, e.TensorName);
        var info = c.Tensors[tensor];
        Assert.AreEqual(info.ByteLength / 2 / bytes.Length * bytes.Length / DTypes.SizeOf(info.DType), e.ElementIndex);
    }

    [TestMethod]
    public void TheNonFiniteScan_AgreesWithDecoding_AndItsCostIsMeasured()
    {
        // Every bit pattern of each 8- and 16-bit type against the decoders' own verdict.
        for (var b = 0; b < 256; b++)
        {
            Assert.AreEqual(!float.IsFinite(Fp8E4M3.ToFloat((byte)b)), NonFinite.IndexOf([(byte)b], DType.F8_E4M3) == 0, $"e4m3 0x{b:x2}");
        }

        for (var u = 0; u < 65536; u++)
        {
            byte[] two = [(byte)u, (byte)(u >> 8)];
            Assert.AreEqual(!float.IsFinite(BFloat16.ToFloat((ushort)u)), NonFinite.IndexOf(two, DType.BF16) == 0, $"bf16 0x{u:x4}");
            Assert.AreEqual(!Half.IsFinite(BitConverter.ToHalf(two)), NonFinite.IndexOf(two, DType.F16) == 0, $"f16 0x{u:x4}");
        }

        // The vector loop hands over to the scalar one at the right element, wherever it lies.
        var rng = new Random(5);
        var bytes = new byte[64 << 20];
        rng.NextBytes(bytes);
        for (var i = 0; i < bytes.Length; i++)
        {
            bytes[i] &= 0x7E; // finite e4m3, and finite bf16 high bytes
        }

        foreach (var at in new[] { 0, 1, 31, 32, 33, 1000, bytes.Length / 2 - 1, bytes.Length / 2 - 2 })
        {
            var copy = bytes.AsSpan(0, bytes.Length / 2).ToArray();
            copy[at] = 0x7F;
            Assert.AreEqual(at, NonFinite.IndexOf(copy, DType.F8_E4M3));
            copy[at | 1] = 0x7F;
            copy[(at | 1) - 1] = 0x80;
            Assert.AreEqual((at | 1) / 2, NonFinite.IndexOf(copy, DType.BF16));
        }

        foreach (var dtype in new[] { DType.F8_E4M3, DType.BF16, DType.F32 })
        {
            Assert.AreEqual(-1L, NonFinite.IndexOf(bytes, dtype));
            var watch = Stopwatch.StartNew();
            for (var r = 0; r < 4; r++)
            {
                NonFinite.IndexOf(bytes, dtype);
            }

            TestContext.WriteLine($"{dtype}: {4.0 * bytes.Length / watch.Elapsed.TotalSeconds / 1e9:F1} GB/s scanned on one core");
        }
    }

    [TestMethod]
    [DataRow("routed_scaling_factor", 1e300)]
    [DataRow("routed_scaling_factor", 1e30)]
    [DataRow("rms_norm_eps", 1e-50)]
    [DataRow("rms_norm_eps", 2.0)]
    [DataRow("rope_theta", 1e39)]
    [DataRow("rope_scaling.factor", 1e300)]
    [DataRow("rope_scaling.mscale_all_dim", 1e300)]
    public void ConfigValuesThatOverflowFloat32_AreRefusedByField(string field, double value)
    {
        using var dir = Valid();
        var path = dir.File(Checkpoint.ConfigFileName);
        var json = JsonNode.Parse(File.ReadAllText(path))!.AsObject();
        var parts = field.Split('.');
        var target = parts.Length == 2 ? json[parts[0]]!.AsObject() : json;
        target[parts[^1]] = value;
        if (field.StartsWith("rope_scaling.mscale", StringComparison.Ordinal))
        {
            json["rope_scaling"]!["factor"] = 40.0;
        }

        File.WriteAllText(path, json.ToJsonString());
        var e = Throws<ModelConfigException>(() => Checkpoint.Open(dir.Path).Dispose());
        Assert.AreEqual(field, e.Field);
    }

    [TestMethod]
    public void RopeValuesThatMeetInNaN_AreRefusedWhenTheModelIsBuilt()
    {
        // Each value is valid alone; together the YaRN correction range divides infinity by infinity.
        using var dir = Valid();
        var path = dir.File(Checkpoint.ConfigFileName);
        var json = JsonNode.Parse(File.ReadAllText(path))!.AsObject();
        json["rope_scaling"]!["factor"] = 40.0;
        json["rope_scaling"]!["beta_fast"] = 1e-320;
        File.WriteAllText(path, json.ToJsonString());
        using var c = Checkpoint.Open(dir.Path);
        using var backend = new CpuBackend();
        var e = Assert.ThrowsExactly<ModelConfigException>(() => DeepSeekModel.Load(c, backend).Dispose());
        Assert.AreEqual("rope_scaling", e.Field);
    }
}
