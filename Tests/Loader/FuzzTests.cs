using System.Text;
using System.Text.Json.Nodes;
using DeepSeekCuda.Loader;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Loader;

/// <summary>
/// Seeded random mutations of real headers and files: opening either succeeds with every tensor inside
/// the data section at its declared size, or throws a <see cref="CheckpointException"/> (format errors
/// included); never another exception type.
/// </summary>
[TestClass]
public sealed class FuzzTests
{
    private static readonly string[] DTypeStrings = ["F32", "BF16", "F8_E4M3", "F8_E5M2", "I64", "U8", "BOOL", "F16", "F64", "f32", "F33", "", "F8_E4M3FN", "bf16"];

    private static (byte[] Header, long DataLength) ReadHeader(string path)
    {
        var bytes = File.ReadAllBytes(path);
        var n = (int)BitConverter.ToUInt64(bytes);
        return (bytes[8..(8 + n)], bytes.Length - 8 - n);
    }

    private static JsonNode RandomNumberish(Random rng) => rng.Next(12) switch
    {
        0 => -1 - rng.Next(100),
        1 => long.MaxValue,
        2 => JsonValue.Create(1e30),
        3 => JsonValue.Create(2.5),
        4 => "12",
        5 => JsonValue.Create(ulong.MaxValue),
        6 => 0,
        7 => JsonValue.Create(int.MaxValue + 1L),
        8 => new JsonArray(1, 2),
        _ => rng.Next(0, 1 << rng.Next(1, 24)),
    };

    /// <summary>One JSON-aware edit of a header object; returns what it did.</summary>
    private static string MutateJson(JsonObject root, Random rng)
    {
        var names = root.Select(p => p.Key).ToList();
        var name = names[rng.Next(names.Count)];
        if (root[name] is not JsonObject entry)
        {
            root[name] = RandomNumberish(rng);
            return $"replaced {name}";
        }

        switch (rng.Next(10))
        {
            case 0:
                if (entry["data_offsets"] is JsonArray offsets && offsets.Count > 0)
                {
                    var i = rng.Next(offsets.Count);
                    offsets[i] = rng.Next(3) == 0 ? RandomNumberish(rng) : offsets[i]!.GetValue<long>() + rng.Next(-64, 65);
                }

                return $"offset of {name}";
            case 1:
                if (entry["shape"] is JsonArray shape && shape.Count > 0)
                {
                    var i = rng.Next(shape.Count);
                    shape[i] = rng.Next(2) == 0 ? RandomNumberish(rng) : Math.Max(0, shape[i]!.GetValue<long>() + rng.Next(-3, 4));
                }

                return $"shape of {name}";
            case 2:
                entry["dtype"] = DTypeStrings[rng.Next(DTypeStrings.Length)];
                return $"dtype of {name}";
            case 3:
                entry.Remove(new[] { "dtype", "shape", "data_offsets" }[rng.Next(3)]);
                return $"deleted a field of {name}";
            case 4:
                root.Remove(name);
                return $"deleted {name}";
            case 5:
                entry["data_offsets"] = new JsonArray(0, entry["data_offsets"] is JsonArray o2 && o2.Count == 2 ? o2[1]!.GetValue<long>() - o2[0]!.GetValue<long>() : 4);
                return $"{name} moved to offset 0";
            case 6:
                entry["shape"] = new JsonArray();
                return $"{name} made scalar";
            case 7:
                entry["extra"] = 1;
                return $"extra field in {name}";
            case 8:
                if (entry["shape"] is JsonArray s2)
                {
                    s2.Add(rng.Next(0, 3));
                }

                return $"dimension added to {name}";
            default:
                root[name + "x"] = entry.DeepClone();
                return $"copy of {name}";
        }
    }

    /// <summary>Whether the header parsed; fails the test on any exception but a checkpoint error.</summary>
    private static bool CheckHeader(string path, byte[] header, long dataLength, string what)
    {
        try
        {
            var (tensors, _) = SafetensorsFile.ParseHeader(path, header, dataLength);
            foreach (var t in tensors.Values)
            {
                Assert.IsTrue(t.Begin >= 0 && t.Begin <= t.End && t.End <= dataLength, $"{what}: {t.Name} [{t.Begin}, {t.End}] outside {dataLength}");
                Assert.AreEqual(t.ElementCount * DTypes.SizeOf(t.DType), t.ByteLength, $"{what}: {t.Name}");
            }

            return true;
        }
        catch (CheckpointException)
        {
            return false;
        }
        catch (Exception e) when (e is not AssertFailedException)
        {
            Assert.Fail($"{what}: {e.GetType().Name}: {e.Message}\n{e.StackTrace}");
            return false;
        }
    }

    [TestMethod]
    public void MutatedHeadersOnlyEverFailWithFormatErrors()
    {
        var rng = new Random(20240501);
        var sources = Directory.GetFiles(SharedData.TinyAModel, "*.safetensors").Order(StringComparer.Ordinal).Select(ReadHeader).ToList();
        Assert.HasCount(2, sources);
        var failures = 0;
        for (var n = 0; n < 2400; n++)
        {
            var (header, dataLength) = sources[n % sources.Count];
            byte[] mutated;
            string what;
            switch (rng.Next(4))
            {
                case 0:
                {
                    mutated = (byte[])header.Clone();
                    var flips = rng.Next(1, 5);
                    for (var i = 0; i < flips; i++)
                    {
                        mutated[rng.Next(mutated.Length)] ^= (byte)(1 << rng.Next(8));
                    }

                    what = $"#{n}: {flips} bit flips";
                    break;
                }

                case 1:
                {
                    var cut = rng.Next(header.Length);
                    mutated = header[..cut];
                    what = $"#{n}: header cut at {cut}";
                    break;
                }

                default:
                {
                    var root = JsonNode.Parse(header)!.AsObject();
                    var edits = Enumerable.Range(0, rng.Next(1, 4)).Select(_ => MutateJson(root, rng)).ToList();
                    mutated = Encoding.UTF8.GetBytes(root.ToJsonString());
                    what = $"#{n}: {string.Join("; ", edits)}";
                    break;
                }
            }

            if (!CheckHeader("fuzz.safetensors", mutated, dataLength, what))
            {
                failures++;
            }
        }

        Assert.IsGreaterThan(1000, failures, "most mutations break the header");
    }

    [TestMethod]
    public void MutatedFilesOnlyEverFailWithFormatErrors()
    {
        using var dir = new TempDir();
        var source = dir.File("small.safetensors");
        SafetensorsWriter.WriteFile(source, new (string Name, DType DType, long[] Shape, byte[] Data)[]
        {
            ("w", DType.F8_E4M3, [3, 5], new byte[15]),
            ("w_scale_inv", DType.F32, [1, 1], new byte[4]),
            ("n", DType.BF16, [5], new byte[10]),
            ("e", DType.F32, [0], []),
        });
        var original = File.ReadAllBytes(source);
        var rng = new Random(77);
        var opened = 0;
        for (var n = 0; n < 600; n++)
        {
            var bytes = (byte[])original.Clone();
            string what;
            switch (rng.Next(3))
            {
                case 0:
                    var flips = rng.Next(1, 4);
                    for (var i = 0; i < flips; i++)
                    {
                        // Half the flips hit the 8-byte length prefix.
                        bytes[rng.Next(2) == 0 ? rng.Next(8) : rng.Next(bytes.Length)] ^= (byte)(1 << rng.Next(8));
                    }

                    what = $"#{n}: {flips} flips";
                    break;
                case 1:
                    var cut = rng.Next(bytes.Length);
                    bytes = bytes[..cut];
                    what = $"#{n}: cut at {cut}";
                    break;
                default:
                    var extra = rng.Next(1, 64);
                    bytes = [.. bytes, .. new byte[extra]];
                    BitConverter.TryWriteBytes(bytes.AsSpan(0, 8), BitConverter.ToUInt64(bytes) + (ulong)rng.Next(-16, 17));
                    what = $"#{n}: {extra} bytes appended, length prefix moved";
                    break;
            }

            var path = dir.File($"m{n}.safetensors");
            File.WriteAllBytes(path, bytes);
            try
            {
                using var file = SafetensorsFile.Open(path);
                foreach (var t in file.Tensors.Values)
                {
                    Assert.AreEqual(t.ByteLength, file.GetBytes(t).Length, what);
                    Assert.IsTrue(t.End <= file.DataLength, what);
                }

                opened++;
            }
            catch (CheckpointException)
            {
                // The one acceptable failure.
            }
            catch (Exception e) when (e is not AssertFailedException)
            {
                Assert.Fail($"{what}: {e.GetType().Name}: {e.Message}\n{e.StackTrace}");
            }
            finally
            {
                File.Delete(path);
            }
        }

        Assert.IsGreaterThan(0, opened, "some mutations (e.g. flips inside the data) leave a valid file");
    }

    [TestMethod]
    public void MutatedConfigsOnlyEverFailWithConfigErrors()
    {
        var text = File.ReadAllText(Path.Combine(SharedData.TinyAModel, "config.json"));
        var rng = new Random(3);
        var keys = JsonNode.Parse(text)!.AsObject().Select(p => p.Key).ToList();
        for (var n = 0; n < 600; n++)
        {
            var root = JsonNode.Parse(text)!.AsObject();
            var key = keys[rng.Next(keys.Count)];
            root[key] = rng.Next(6) switch
            {
                0 => null,
                1 => "x",
                2 => new JsonObject(),
                3 => JsonValue.Create(rng.NextDouble() * 1e12 - 5e11),
                4 => rng.Next(-3, 5000),
                _ => RandomNumberish(rng),
            };
            var json = root.ToJsonString();
            if (rng.Next(5) == 0)
            {
                json = json[..rng.Next(json.Length)];
            }

            try
            {
                var config = ModelConfig.Parse(json, "fuzz/config.json");
                // Listing the tensors of a config with millions of layers or experts is slow, not wrong.
                if ((long)config.StoredLayerCount * (config.NRoutedExperts + 8) < 100_000)
                {
                    Assert.IsNotEmpty(CheckpointLayout.Expected(config));
                }
            }
            catch (CheckpointException)
            {
                // ModelConfigException is one.
            }
            catch (Exception e)
            {
                Assert.Fail($"#{n} {key}: {e.GetType().Name}: {e.Message}\n{e.StackTrace}");
            }
        }
    }
}
