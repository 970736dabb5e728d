using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Synthetic;

namespace DeepSeekCuda.Tests.Loader;

[TestClass]
public sealed class BadCheckpointTests
{
    private const string Shard1 = "model-00001-of-00002.safetensors";
    private const string Shard2 = "model-00002-of-00002.safetensors";

    private static TempDir Valid(int shards = 2)
    {
        var dir = new TempDir();
        SyntheticCheckpoint.Write(dir.Path, ModelPresets.Tiny, seed: 7, shards);
        return dir;
    }

    /// <summary>Rewrites one shard: <paramref name="edit"/> maps each tensor to its replacement (null drops it).</summary>
    private static void RewriteShard(string path, Func<(string Name, DType DType, long[] Shape, byte[] Data), (string Name, DType DType, long[] Shape, byte[] Data)?> edit,
        params (string Name, DType DType, long[] Shape, byte[] Data)[] extra)
    {
        List<(string Name, DType DType, long[] Shape, byte[] Data)> tensors;
        using (var file = SafetensorsFile.Open(path))
        {
            tensors = [.. file.Tensors.Values.Select(t => edit((t.Name, t.DType, t.Shape.ToArray(), file.GetBytes(t).ToArray())))
                .Where(t => t is not null).Select(t => t!.Value)];
        }

        SafetensorsWriter.WriteFile(path, tensors.Concat(extra));
    }

    [TestMethod]
    public void MissingShardNamesTheShardAndATensorItHolds()
    {
        using var dir = Valid();
        File.Delete(dir.File(Shard2));
        var e = Assert.ThrowsExactly<CheckpointException>(() => Checkpoint.Open(dir.Path));
        Assert.AreEqual(dir.File(Shard2), e.FilePath);
        Assert.Contains(Shard2, e.Message);
        Assert.IsNotNull(e.TensorName);
        Assert.Contains($"'{e.TensorName}'", e.Message);
        Assert.Contains(Shard2, File.ReadAllText(dir.File(Checkpoint.IndexFileName)).Split('\n').Single(l => l.Contains($"\"{e.TensorName}\"", StringComparison.Ordinal)));
    }

    [TestMethod]
    public void EveryMismatchWithTheConfigIsListedAtOnce()
    {
        using var dir = Valid();
        const string dropped1 = "model.layers.3.mlp.experts.5.up_proj.weight";
        const string dropped2 = "model.norm.weight";
        const string reshaped = "model.layers.3.self_attn.kv_a_layernorm.weight";
        const string retyped = "model.layers.3.mlp.gate.e_score_correction_bias";
        const string extra = "model.layers.3.mlp.experts.99.up_proj.weight";
        var index = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(dir.File(Checkpoint.IndexFileName)))!;
        var map = index["weight_map"]!.AsObject();
        foreach (var name in new[] { dropped1, dropped2, reshaped, retyped })
        {
            Assert.AreEqual(Shard2, map[name]!.GetValue<string>(), $"{name} is expected in shard 2 by this test");
        }

        map.Remove(dropped1);
        map.Remove(dropped2);
        map[extra] = Shard2;
        File.WriteAllText(dir.File(Checkpoint.IndexFileName), index.ToJsonString());
        RewriteShard(dir.File(Shard2), t => t.Name switch
        {
            dropped1 or dropped2 => null,
            reshaped => (t.Name, t.DType, [t.Shape[0] / 2, 2], t.Data),
            retyped => (t.Name, DType.BF16, [t.Shape[0] * 2], t.Data), // wrong dtype, and so also wrong shape
            _ => t,
        }, (extra, DType.BF16, [4], new byte[8]));

        var e = Assert.ThrowsExactly<CheckpointMismatchException>(() => Checkpoint.Open(dir.Path));
        Assert.HasCount(6, e.Problems, string.Join("\n", e.Problems));
        Assert.IsTrue(e.Problems.Any(p => p.StartsWith(dropped1 + ": missing (expected F8_E4M3 [96, 192])", StringComparison.Ordinal)), e.Message);
        Assert.IsTrue(e.Problems.Any(p => p.StartsWith(dropped2 + ": missing (expected BF16 [192])", StringComparison.Ordinal)), e.Message);
        Assert.IsTrue(e.Problems.Any(p => p.StartsWith(reshaped + ": shape [40, 2], expected [80]", StringComparison.Ordinal)), e.Message);
        Assert.IsTrue(e.Problems.Any(p => p.StartsWith(retyped + ": dtype BF16, expected F32", StringComparison.Ordinal)), e.Message);
        Assert.IsTrue(e.Problems.Any(p => p.StartsWith(retyped + ": shape [24], expected [12]", StringComparison.Ordinal)), e.Message);
        Assert.IsTrue(e.Problems.Any(p => p.StartsWith(extra + ": unexpected tensor", StringComparison.Ordinal)), e.Message);
        Assert.Contains(dir.Path, e.Message);
        Assert.Contains("6 problems", e.Message);

        using var unvalidated = Checkpoint.Open(dir.Path, validateAgainstConfig: false);
        Assert.IsFalse(unvalidated.Contains(dropped1));
    }

    [TestMethod]
    public void IndexAndShardsThatDisagreeAreListed()
    {
        using var dir = Valid();
        var index = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(dir.File(Checkpoint.IndexFileName)))!;
        var map = index["weight_map"]!.AsObject();
        map["model.layers.0.input_layernorm.weight"] = Shard2; // it is in shard 1
        map["ghost.weight"] = Shard1;
        File.WriteAllText(dir.File(Checkpoint.IndexFileName), index.ToJsonString());
        var e = Assert.ThrowsExactly<CheckpointMismatchException>(() => Checkpoint.Open(dir.Path));
        Assert.IsTrue(e.Problems.Any(p => p == $"model.layers.0.input_layernorm.weight: stored in {Shard1} but the index maps it to {Shard2}"), e.Message);
        Assert.IsTrue(e.Problems.Any(p => p == $"ghost.weight: the index maps it to {Shard1}, which does not hold it"), e.Message);
    }

    [TestMethod]
    public void MissingConfig()
    {
        using var dir = Valid();
        File.Delete(dir.File("config.json"));
        var e = Assert.ThrowsExactly<CheckpointException>(() => Checkpoint.Open(dir.Path));
        Assert.AreEqual(dir.File("config.json"), e.FilePath);
        Assert.Contains("config.json", e.Message);
        Assert.Contains("not found", e.Message);
    }

    [TestMethod]
    public void NeitherIndexNorSingleFile()
    {
        using var dir = Valid();
        File.Delete(dir.File(Checkpoint.IndexFileName));
        var e = Assert.ThrowsExactly<CheckpointException>(() => Checkpoint.Open(dir.Path));
        Assert.Contains($"neither {Checkpoint.IndexFileName} nor {Checkpoint.SingleFileName} found", e.Message);
        Assert.Contains(dir.Path, e.Message);
    }

    [TestMethod]
    public void MissingFolder()
    {
        using var dir = new TempDir();
        var e = Assert.ThrowsExactly<CheckpointException>(() => Checkpoint.Open(dir.File("nowhere")));
        Assert.Contains("checkpoint folder not found", e.Message);
    }

    [TestMethod]
    public void IndexThatIsNotJsonOrHasNoWeightMap()
    {
        using var dir = Valid();
        var indexPath = dir.File(Checkpoint.IndexFileName);
        File.WriteAllText(indexPath, "{\"weight_map\": {\"a\": ");
        var e = Assert.ThrowsExactly<CheckpointException>(() => Checkpoint.Open(dir.Path));
        Assert.AreEqual(indexPath, e.FilePath);
        Assert.Contains("not valid JSON", e.Message);

        File.WriteAllText(indexPath, "{\"metadata\": {}}");
        Assert.Contains("no 'weight_map' object", Assert.ThrowsExactly<CheckpointException>(() => Checkpoint.Open(dir.Path)).Message);

        File.WriteAllText(indexPath, "{\"weight_map\": {\"a\": \"../etc/passwd\"}}");
        var escape = Assert.ThrowsExactly<CheckpointException>(() => Checkpoint.Open(dir.Path));
        Assert.AreEqual("a", escape.TensorName);
        Assert.Contains("not a file name in the folder", escape.Message);
    }

    [TestMethod]
    public void IndexWithInvalidTextIsACheckpointException()
    {
        // JsonElement.GetString throws InvalidOperationException on invalid UTF-8 and lone surrogates.
        using var dir = Valid();
        var indexPath = dir.File(Checkpoint.IndexFileName);
        File.WriteAllBytes(indexPath, [.. "{\"weight_map\": {\"a\": \""u8, 0xFF, 0xFE, .. "\"}}"u8]);
        var e = Assert.ThrowsExactly<CheckpointException>(() => Checkpoint.Open(dir.Path));
        Assert.AreEqual(indexPath, e.FilePath);
        File.WriteAllText(indexPath, "{\"weight_map\": {\"\\ud800\": \"x.safetensors\"}}");
        Assert.Contains("not valid text", Assert.ThrowsExactly<CheckpointException>(() => Checkpoint.Open(dir.Path)).Message);
    }

    [TestMethod]
    public void BadShardIsAFormatErrorNamingTheShard()
    {
        using var dir = Valid();
        var path = dir.File(Shard1);
        var bytes = File.ReadAllBytes(path);
        File.WriteAllBytes(path, bytes[..(bytes.Length - 1)]);
        var e = Assert.ThrowsExactly<SafetensorsFormatException>(() => Checkpoint.Open(dir.Path));
        Assert.AreEqual(path, e.FilePath);
        Assert.IsNotNull(e.TensorName);
        Assert.Contains("run past the data section", e.Problem);
    }

    [TestMethod]
    public void SingleFileCheckpointOpens()
    {
        using var dir = Valid(shards: 1);
        File.Move(dir.File("model-00001-of-00001.safetensors"), dir.File(Checkpoint.SingleFileName));
        File.Delete(dir.File(Checkpoint.IndexFileName));
        using var checkpoint = Checkpoint.Open(dir.Path);
        Assert.AreEqual(CheckpointLayout.Expected(ModelPresets.Tiny).Count, checkpoint.Tensors.Count);
        Assert.AreEqual(dir.File(Checkpoint.SingleFileName), checkpoint.ShardFiles.Single());
        Assert.HasCount(96 * 192, checkpoint.ReadFloat32("model.layers.0.self_attn.q_a_proj.weight"));
    }

    [TestMethod]
    public void UnknownTensorNameIsACheckpointException()
    {
        using var dir = Valid();
        using var checkpoint = Checkpoint.Open(dir.Path);
        var e = Assert.ThrowsExactly<CheckpointException>(() => checkpoint.Get("model.layers.9.nothing"));
        Assert.AreEqual("model.layers.9.nothing", e.TensorName);
    }
}
