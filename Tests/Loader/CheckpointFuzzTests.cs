using System.Diagnostics;
using System.Text.Json.Nodes;
using DeepSeekCuda.Backends.Cpu;
using DeepSeekCuda.Inference;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Loader.Synthetic;
using DeepSeekCuda.Model;

namespace DeepSeekCuda.Tests.Loader;

/// <summary>
/// Seeded mutations of a whole checkpoint (config, index, shard headers and data, the files themselves),
/// each taken through open, model load on the CPU backend and one forward with sampling. Every outcome is
/// classified: a typed error (<see cref="CheckpointException"/> and its kinds, <see cref="NonFiniteLogitsException"/>)
/// or accepted with finite logits and a token. A hang, any other exception, NaN output or an allocation
/// over budget fails. <c>DSCUDA_FUZZ_CASES</c> sets the number of cases (default 1200).
/// </summary>
[TestClass]
public sealed class CheckpointFuzzTests
{
    private const long AllocationBudget = 512L << 20;
    private static readonly TimeSpan CaseLimit = TimeSpan.FromSeconds(30);

    public TestContext TestContext { get; set; } = null!;

    private static int Cases => int.TryParse(Environment.GetEnvironmentVariable("DSCUDA_FUZZ_CASES"), out var n) && n > 0 ? n : 1200;

    private enum Outcome
    {
        Accepted,
        Refused,
    }

    [TestMethod]
    public void MutatedCheckpoints_AreRefusedByName_OrRunToAFiniteToken()
    {
        using var source = new TempDir();
        SyntheticCheckpoint.Write(source.Path, ModelPresets.Tiny, seed: 11, shards: 2);
        var files = Directory.GetFiles(source.Path).Select(Path.GetFileName).Order(StringComparer.Ordinal).ToArray();
        var shards = files.Where(f => f!.EndsWith(".safetensors", StringComparison.Ordinal)).ToArray();
        var rng = new Random(2026);
        var counts = new Dictionary<string, int>(StringComparer.Ordinal);
        var watch = Stopwatch.StartNew();
        for (var n = 0; n < Cases; n++)
        {
            using var dir = new TempDir();
            foreach (var f in files)
            {
                File.Copy(Path.Combine(source.Path, f!), dir.File(f!));
            }

            var what = $"#{n}: " + Mutate(dir, shards!, rng);
            var allocated = GC.GetTotalAllocatedBytes(precise: false);
            var run = Task.Run(() => Classify(dir.Path, what));
            Assert.IsTrue(run.Wait(CaseLimit), $"{what}: hung");
            var used = GC.GetTotalAllocatedBytes(precise: false) - allocated;
            Assert.IsLessThan(AllocationBudget, used, $"{what}: allocated {used >> 20} MiB");
            var key = $"{run.Result.Outcome} {run.Result.Kind}";
            counts[key] = counts.GetValueOrDefault(key) + 1;
        }

        foreach (var (key, count) in counts.OrderBy(kv => kv.Key, StringComparer.Ordinal))
        {
            TestContext.WriteLine($"{count,6}  {key}");
        }

        TestContext.WriteLine($"{Cases} cases in {watch.Elapsed.TotalSeconds:F1} s");
        Assert.IsTrue(counts.Keys.Any(k => k.StartsWith("Accepted", StringComparison.Ordinal)), "some mutations leave a valid checkpoint");
        Assert.IsTrue(counts.Keys.Any(k => k.StartsWith("Refused", StringComparison.Ordinal)), "most do not");
    }

    private static (Outcome Outcome, string Kind) Classify(string dir, string what)
    {
        try
        {
            using var checkpoint = Checkpoint.Open(dir);
            using var backend = new CpuBackend();
            using var model = DeepSeekModel.Load(checkpoint, backend);
            using var session = model.CreateSession();
            var logits = new float[model.VocabSize];
            // The caller's side stays valid whatever the config says: ids inside the vocabulary, a prompt that fits.
            int[] prompt = [.. new[] { 0, 5, 17, 3 }.Take(model.MaxSequenceLength).Select(t => t % model.VocabSize)];
            session.Forward(prompt, logits);
            var token = new Sampler(new SamplingOptions { Seed = 1 }).SampleModelRow(logits, model.VocabSize);
            Assert.IsTrue(logits.All(float.IsFinite), $"{what}: accepted, so its logits must be finite");
            Assert.IsTrue(token >= 0 && token < model.VocabSize, what);
            return (Outcome.Accepted, "");
        }
        catch (Exception e) when (e is CheckpointException or NonFiniteLogitsException)
        {
            Assert.IsFalse(string.IsNullOrWhiteSpace(e.Message), what);
            return (Outcome.Refused, e.GetType().Name);
        }
        catch (Exception e) when (e is not AssertFailedException)
        {
            Assert.Fail($"{what}: {e.GetType().Name}: {e.Message}\n{e.StackTrace}");
            throw;
        }
    }

    /// <summary>One seeded change to the checkpoint in <paramref name="dir"/>; returns what it did.</summary>
    private static string Mutate(TempDir dir, string[] shards, Random rng)
    {
        var shard = dir.File(shards[rng.Next(shards.Length)]);
        switch (rng.Next(8))
        {
            case 0:
            case 1:
            {
                // A config value: extreme, mistyped, or a string with a lone surrogate.
                var path = dir.File(Checkpoint.ConfigFileName);
                var root = JsonNode.Parse(File.ReadAllText(path))!.AsObject();
                var keys = root.Select(p => p.Key).ToList();
                var key = keys[rng.Next(keys.Count)];
                JsonNode? value = rng.Next(9) switch
                {
                    0 => 1 << rng.Next(20, 31),
                    1 => JsonValue.Create(Math.Pow(10, rng.Next(-320, 309))),
                    2 => -rng.Next(1, 100),
                    3 => 0,
                    4 => "\ud800",
                    5 => null,
                    6 => rng.Next(0, 4),
                    7 => JsonValue.Create(rng.NextDouble() * 8),
                    _ => new JsonArray(1, 2),
                };
                root[key] = value;
                File.WriteAllText(path, root.ToJsonString().Replace("\\uD800", "\\ud800", StringComparison.Ordinal));
                return $"config {key} = {value?.ToJsonString() ?? "null"}";
            }

            case 2:
            {
                // Bytes of the data section: finite changes, or NaN/inf patterns.
                var bytes = File.ReadAllBytes(shard);
                var start = 8 + (long)BitConverter.ToUInt64(bytes);
                var flips = rng.Next(1, 8);
                for (var i = 0; i < flips; i++)
                {
                    var at = start + rng.NextInt64(bytes.Length - start);
                    bytes[at] = rng.Next(3) == 0 ? (byte)0x7F : (byte)rng.Next(256);
                }

                File.WriteAllBytes(shard, bytes);
                return $"{flips} data bytes of {Path.GetFileName(shard)}";
            }

            case 3:
            {
                // Bytes of the header and its length prefix.
                var bytes = File.ReadAllBytes(shard);
                var end = 8 + (int)BitConverter.ToUInt64(bytes);
                var at = rng.Next(2) == 0 ? rng.Next(8) : rng.Next(8, end);
                bytes[at] ^= (byte)(1 << rng.Next(8));
                File.WriteAllBytes(shard, bytes);
                return $"header byte {at} of {Path.GetFileName(shard)}";
            }

            case 4:
            {
                var length = new FileInfo(shard).Length;
                var cut = rng.NextInt64(length);
                using (var f = new FileStream(shard, FileMode.Open, FileAccess.Write))
                {
                    f.SetLength(rng.Next(2) == 0 ? cut : length + rng.Next(1, 9));
                }

                return $"{Path.GetFileName(shard)} resized";
            }

            case 5:
            {
                var path = dir.File(Checkpoint.IndexFileName);
                var root = JsonNode.Parse(File.ReadAllText(path))!.AsObject();
                var map = root["weight_map"]!.AsObject();
                var names = map.Select(p => p.Key).ToList();
                var name = names[rng.Next(names.Count)];
                switch (rng.Next(3))
                {
                    case 0:
                        map.Remove(name);
                        break;
                    case 1:
                        map[name] = shards[rng.Next(shards.Length)];
                        break;
                    default:
                        map[name] = rng.Next(2) == 0 ? "../config.json" : "/etc/passwd";
                        break;
                }

                File.WriteAllText(path, root.ToJsonString());
                return $"index entry {name}";
            }

            case 6:
            {
                // A special file or a link where a model file goes.
                var victim = rng.Next(3) switch
                {
                    0 => dir.File(Checkpoint.ConfigFileName),
                    1 => dir.File(Checkpoint.IndexFileName),
                    _ => shard,
                };
                File.Delete(victim);
                var target = new[] { "/dev/zero", "/dev/urandom", "/etc/passwd", "/proc/self/mem", "." }[rng.Next(5)];
                File.CreateSymbolicLink(victim, target);
                return $"{Path.GetFileName(victim)} -> {target}";
            }

            default:
            {
                // A number in the config made huge: layer, expert and vocabulary counts drive every size.
                var path = dir.File(Checkpoint.ConfigFileName);
                var root = JsonNode.Parse(File.ReadAllText(path))!.AsObject();
                var key = new[] { "num_hidden_layers", "n_routed_experts", "num_nextn_predict_layers", "vocab_size", "hidden_size", "max_position_embeddings", "kv_lora_rank" }[rng.Next(7)];
                root[key] = rng.Next(2) == 0 ? int.MaxValue : 1 << rng.Next(16, 30);
                File.WriteAllText(path, root.ToJsonString());
                return $"config {key} = {root[key]}";
            }
        }
    }
}
