using System.Collections.Immutable;
using System.Runtime.InteropServices;
using System.Text.Json;
using DeepSeekCuda.Loader.Numerics;

namespace DeepSeekCuda.Loader;

/// <summary>
/// A Hugging Face DeepSeek-V3 checkpoint folder: <c>config.json</c> plus either
/// <c>model.safetensors.index.json</c> with its shards or a single <c>model.safetensors</c>. Opening
/// maps every shard, checks the index against the shards and (by default) every tensor against the
/// config, reporting all problems at once before any weight is read or allocated. Tensors are found
/// through the index, never by assuming a weight and its scale share a shard.
/// </summary>
public sealed class Checkpoint : IDisposable
{
    /// <summary>Name of the shard index file.</summary>
    public const string IndexFileName = "model.safetensors.index.json";

    /// <summary>Name of a single-file checkpoint.</summary>
    public const string SingleFileName = "model.safetensors";

    /// <summary>Name of the config file.</summary>
    public const string ConfigFileName = "config.json";

    /// <summary>How many more tensors than the checkpoint holds a config may imply before the comparison stops at once.</summary>
    public const int MaxMissingListed = 10_000;

    /// <summary>The largest shard index read (DeepSeek-V3's is about 9 MB).</summary>
    public const long MaxIndexBytes = 256L << 20;

    private readonly ImmutableArray<SafetensorsFile> _shards;
    private readonly Dictionary<string, SafetensorsFile> _shardByPath;

    private Checkpoint(string directory, ModelConfig config, ImmutableArray<SafetensorsFile> shards,
        ImmutableDictionary<string, TensorInfo> tensors)
    {
        Directory = directory;
        Config = config;
        _shards = shards;
        _shardByPath = shards.ToDictionary(x => x.FilePath, StringComparer.Ordinal);
        Tensors = tensors;
    }

    /// <summary>The checkpoint folder.</summary>
    public string Directory { get; }

    /// <summary>The validated config.</summary>
    public ModelConfig Config { get; }

    /// <summary>Every tensor of every shard, by name.</summary>
    public ImmutableDictionary<string, TensorInfo> Tensors { get; }

    /// <summary>Shard file paths, in index order.</summary>
    public IEnumerable<string> ShardFiles => _shards.Select(s => s.FilePath);

    /// <summary>
    /// Test instrumentation: called with the tensor and the byte range (start, length within the tensor)
    /// each time a read method hands out or decodes tensor bytes (an FP8 weight's scale grid counts as a
    /// read of the scale tensor). Null in production.
    /// </summary>
    internal Action<TensorInfo, long, long>? ReadObserver { get; set; }

    /// <summary>Total bytes of tensor data.</summary>
    public long TotalTensorBytes => Tensors.Values.Sum(t => t.ByteLength);

    /// <summary>Opens <paramref name="directory"/>.</summary>
    /// <param name="directory">The checkpoint folder.</param>
    /// <param name="validateAgainstConfig">Check names, dtypes and shapes of every tensor against the config.</param>
    /// <exception cref="CheckpointException">Missing files, a bad index (typed subclasses for format, config and mismatch errors).</exception>
    public static Checkpoint Open(string directory, bool validateAgainstConfig = true)
    {
        directory = Path.GetFullPath(directory);
        if (!System.IO.Directory.Exists(directory))
        {
            throw new CheckpointException($"{directory}: checkpoint folder not found", directory);
        }

        var configPath = Path.Combine(directory, ConfigFileName);
        if (!File.Exists(configPath))
        {
            throw new CheckpointException($"{configPath}: not found (a checkpoint folder needs config.json)", configPath);
        }

        var config = ModelConfig.Load(configPath);
        var indexPath = Path.Combine(directory, IndexFileName);
        var singlePath = Path.Combine(directory, SingleFileName);
        ImmutableDictionary<string, string>? weightMap = null;
        List<string> shardNames;
        if (File.Exists(indexPath))
        {
            weightMap = ReadIndex(indexPath);
            shardNames = weightMap.Values.Distinct(StringComparer.Ordinal).Order(StringComparer.Ordinal).ToList();
            foreach (var shard in shardNames)
            {
                var shardPath = Path.Combine(directory, shard);
                if (!File.Exists(shardPath))
                {
                    var example = weightMap.First(kv => kv.Value == shard).Key;
                    throw new CheckpointException(
                        $"{shardPath}: shard not found; {IndexFileName} maps {weightMap.Count(kv => kv.Value == shard)} tensors to it (e.g. '{example}')",
                        shardPath, example);
                }
            }
        }
        else if (File.Exists(singlePath))
        {
            shardNames = [SingleFileName];
        }
        else
        {
            throw new CheckpointException($"{directory}: neither {IndexFileName} nor {SingleFileName} found", directory);
        }

        var shards = ImmutableArray.CreateBuilder<SafetensorsFile>(shardNames.Count);
        try
        {
            foreach (var shard in shardNames)
            {
                shards.Add(SafetensorsFile.Open(Path.Combine(directory, shard), directory));
            }

            var problems = new List<string>();
            var reported = new HashSet<string>(StringComparer.Ordinal);
            var tensors = ImmutableDictionary.CreateBuilder<string, TensorInfo>(StringComparer.Ordinal);
            foreach (var file in shards)
            {
                var shardName = Path.GetFileName(file.FilePath);
                foreach (var (name, info) in file.Tensors)
                {
                    if (weightMap is not null && (!weightMap.TryGetValue(name, out var mapped) || mapped != shardName))
                    {
                        problems.Add(weightMap.TryGetValue(name, out var other)
                            ? $"{name}: stored in {shardName} but the index maps it to {other}"
                            : $"{name}: stored in {shardName} but missing from {IndexFileName}");
                        reported.Add(name);
                        continue;
                    }

                    if (!tensors.TryAdd(name, info))
                    {
                        problems.Add($"{name}: stored in both {Path.GetFileName(tensors[name].FilePath)} and {shardName}");
                    }
                }
            }

            if (weightMap is not null)
            {
                foreach (var (name, shard) in weightMap)
                {
                    if (!tensors.ContainsKey(name) && !reported.Contains(name))
                    {
                        problems.Add($"{name}: the index maps it to {shard}, which does not hold it");
                    }
                }
            }

            var result = tensors.ToImmutable();
            if (validateAgainstConfig)
            {
                problems.AddRange(Validate(config, result));
            }

            if (problems.Count > 0)
            {
                throw new CheckpointMismatchException(directory, problems);
            }

            return new Checkpoint(directory, config, shards.ToImmutable(), result);
        }
        catch
        {
            foreach (var s in shards)
            {
                s.Dispose();
            }

            throw;
        }
    }

    /// <summary>Every missing, extra, mis-typed or mis-shaped tensor with respect to <paramref name="config"/>.</summary>
    public static List<string> Validate(ModelConfig config, IReadOnlyDictionary<string, TensorInfo> tensors)
    {
        var problems = new List<string>();

        // Bounded by what the checkpoint holds: a config that implies far more tensors is refused in one
        // line instead of listing (and building) billions of missing names.
        var expected = CheckpointLayout.Expected(config, tensors.Count + MaxMissingListed);
        if (expected is null)
        {
            problems.Add($"config.json implies more than {tensors.Count + MaxMissingListed} tensors ({config.NumHiddenLayers} layers, "
                + $"{config.NumNextNPredictLayers} MTP layers, {config.NRoutedExperts} routed experts each) but the checkpoint holds {tensors.Count}: "
                + "the config does not describe this checkpoint");
            return problems;
        }

        var expectedNames = new HashSet<string>(StringComparer.Ordinal);
        foreach (var e in expected)
        {
            expectedNames.Add(e.Name);
            if (!tensors.TryGetValue(e.Name, out var actual))
            {
                problems.Add($"{e.Name}: missing (expected {e.DType} {TensorInfo.FormatShape(e.Shape)})");
                continue;
            }

            if (actual.DType != e.DType)
            {
                problems.Add($"{e.Name}: dtype {actual.DType}, expected {e.DType} (in {Path.GetFileName(actual.FilePath)})");
            }

            if (!actual.Shape.SequenceEqual(e.Shape))
            {
                problems.Add($"{e.Name}: shape {actual.ShapeText}, expected {TensorInfo.FormatShape(e.Shape)} (in {Path.GetFileName(actual.FilePath)})");
            }
        }

        foreach (var name in tensors.Keys.Where(n => !expectedNames.Contains(n)).Order(StringComparer.Ordinal))
        {
            problems.Add($"{name}: unexpected tensor (not implied by the config) in {Path.GetFileName(tensors[name].FilePath)}");
        }

        return problems;
    }

    /// <summary>Whether the checkpoint holds <paramref name="name"/>.</summary>
    public bool Contains(string name) => Tensors.ContainsKey(name);

    /// <summary>The tensor <paramref name="name"/>.</summary>
    /// <exception cref="CheckpointException">No such tensor.</exception>
    public TensorInfo Get(string name) =>
        Tensors.TryGetValue(name, out var info)
            ? info
            : throw new CheckpointException($"{Directory}: tensor '{name}' not found in the checkpoint", Directory, name);

    /// <summary>Raw bytes of <paramref name="name"/>, a span over the mapped shard.</summary>
    public ReadOnlySpan<byte> GetBytes(string name)
    {
        var info = Get(name);
        ReadObserver?.Invoke(info, 0, info.ByteLength);
        return Finite(info, 0, ShardOf(info).GetBytes(info));
    }

    /// <summary>Bytes <c>[start, start + length)</c> of <paramref name="tensor"/>, a span over its mapped shard (each shard is mapped once, at open).</summary>
    /// <exception cref="NonFiniteWeightException">A float element in the range is NaN or infinite.</exception>
    public ReadOnlySpan<byte> GetBytes(TensorInfo tensor, long start, int length)
    {
        ReadObserver?.Invoke(tensor, start, length);
        return Finite(tensor, start, ShardOf(tensor).GetBytes(tensor, start, length));
    }

    /// <summary>
    /// Every read hands out only finite weights: a NaN or infinity in a weight, scale or norm would make
    /// every logit NaN, so it is found here, while the bytes pass anyway, and named.
    /// </summary>
    private static ReadOnlySpan<byte> Finite(TensorInfo tensor, long start, ReadOnlySpan<byte> bytes)
    {
        var size = DTypes.SizeOf(tensor.DType);
        var skip = (int)((size - start % size) % size); // a chunk may start inside an element
        if (skip < bytes.Length && NonFinite.IndexOf(bytes[skip..], tensor.DType) is var i and >= 0)
        {
            throw new NonFiniteWeightException(tensor, (start + skip) / size + i);
        }

        return bytes;
    }

    /// <summary>
    /// Reads <paramref name="name"/> as float32: BF16/F16/F32/F64 widened; an F8_E4M3 weight dequantized
    /// with its <c>weight_scale_inv</c> block grid (looked up by name, possibly in another shard).
    /// </summary>
    public float[] ReadFloat32(string name)
    {
        var info = Get(name);
        if (info.ElementCount > Array.MaxLength)
        {
            throw new CheckpointException($"{info.FilePath}: tensor '{name}' has {info.ElementCount} elements, more than one array holds; read it in parts", info.FilePath, name);
        }

        var result = new float[info.ElementCount];
        ReadFloat32(name, result);
        return result;
    }

    /// <summary>Reads <paramref name="name"/> as float32 into <paramref name="destination"/>.</summary>
    public void ReadFloat32(string name, Span<float> destination)
    {
        var info = Get(name);
        if (destination.Length < info.ElementCount)
        {
            throw new ArgumentException($"destination holds {destination.Length} floats; '{name}' has {info.ElementCount}", nameof(destination));
        }

        ReadObserver?.Invoke(info, 0, info.ByteLength);
        var bytes = Finite(info, 0, ShardOf(info).GetBytes(info));
        var n = (int)info.ElementCount;
        switch (info.DType)
        {
            case DType.F32:
                MemoryMarshal.Cast<byte, float>(bytes).CopyTo(destination);
                break;
            case DType.BF16:
                BFloat16.Decode(MemoryMarshal.Cast<byte, ushort>(bytes), destination);
                break;
            case DType.F16:
                var halves = MemoryMarshal.Cast<byte, Half>(bytes);
                for (var i = 0; i < n; i++)
                {
                    destination[i] = (float)halves[i];
                }

                break;
            case DType.F64:
                var doubles = MemoryMarshal.Cast<byte, double>(bytes);
                for (var i = 0; i < n; i++)
                {
                    destination[i] = (float)doubles[i];
                }

                break;
            case DType.F8_E4M3:
                DequantizeFp8(info, bytes, destination);
                break;
            case DType.F8_E5M2:
                for (var i = 0; i < n; i++)
                {
                    destination[i] = Fp8E5M2.ToFloat(bytes[i]);
                }

                break;
            default:
                throw new CheckpointException($"{info.FilePath}: tensor '{name}' is {info.DType}, not a floating-point type", info.FilePath, name);
        }
    }

    private void DequantizeFp8(TensorInfo info, ReadOnlySpan<byte> codes, Span<float> destination)
    {
        var scaleName = LinearSpec.ScaleName(info.Name);
        if (info.Shape.Length != 2)
        {
            throw new CheckpointException($"{info.FilePath}: FP8 tensor '{info.Name}' has shape {info.ShapeText}; block scales need 2 dimensions", info.FilePath, info.Name);
        }

        if (!Tensors.TryGetValue(scaleName, out var scale))
        {
            throw new CheckpointException($"{Directory}: FP8 tensor '{info.Name}' has no '{scaleName}'", Directory, scaleName);
        }

        var (rows, cols) = ((int)info.Shape[0], (int)info.Shape[1]);
        var block = Config.Quantization ?? Fp8Quantization.Default;
        var gridRows = CheckpointLayout.CeilDiv(rows, block.BlockRows);
        var gridCols = CheckpointLayout.CeilDiv(cols, block.BlockCols);
        if (scale.DType != DType.F32 || scale.Shape.Length != 2 || scale.Shape[0] != gridRows || scale.Shape[1] != gridCols)
        {
            throw new CheckpointException(
                $"{scale.FilePath}: '{scaleName}' is {scale.DType} {scale.ShapeText}; [{rows}, {cols}] in {block.BlockRows}x{block.BlockCols} blocks needs F32 [{gridRows}, {gridCols}]",
                scale.FilePath, scaleName);
        }

        ReadObserver?.Invoke(scale, 0, scale.ByteLength);
        var scales = MemoryMarshal.Cast<byte, float>(Finite(scale, 0, ShardOf(scale).GetBytes(scale)));
        Dequantize.Fp8Blocks(codes, scales, rows, cols, block.BlockRows, block.BlockCols, destination);
    }

    private SafetensorsFile ShardOf(TensorInfo info) =>
        _shardByPath.TryGetValue(info.FilePath, out var shard)
            ? shard
            : throw new InvalidOperationException($"tensor '{info.Name}' refers to {info.FilePath}, which this checkpoint did not open");

    private static ImmutableDictionary<string, string> ReadIndex(string indexPath)
    {
        try
        {
            using var doc = JsonDocument.Parse(ModelFiles.ReadAllBytes(indexPath, Path.GetDirectoryName(indexPath)!, MaxIndexBytes));
            if (doc.RootElement.ValueKind != JsonValueKind.Object
                || !doc.RootElement.TryGetProperty("weight_map", out var map) || map.ValueKind != JsonValueKind.Object)
            {
                throw new CheckpointException($"{indexPath}: no 'weight_map' object", indexPath);
            }

            var builder = ImmutableDictionary.CreateBuilder<string, string>(StringComparer.Ordinal);
            foreach (var entry in map.EnumerateObject())
            {
                var shard = entry.Value.ValueKind == JsonValueKind.String ? entry.Value.GetString()! : null;
                if (string.IsNullOrEmpty(shard) || shard != Path.GetFileName(shard) || shard is "." or "..")
                {
                    throw new CheckpointException($"{indexPath}: weight_map entry '{entry.Name}' is {entry.Value.GetRawText()}, not a file name in the folder", indexPath, entry.Name);
                }

                if (!builder.TryAdd(entry.Name, shard))
                {
                    throw new CheckpointException($"{indexPath}: weight_map lists '{entry.Name}' twice", indexPath, entry.Name);
                }
            }

            return builder.ToImmutable();
        }
        catch (JsonException e)
        {
            throw new CheckpointException($"{indexPath}: not valid JSON: {e.Message}", indexPath, null, e);
        }
        catch (InvalidOperationException e)
        {
            // JsonElement throws this for invalid UTF-8 or a lone surrogate escape inside a string it decodes.
            throw new CheckpointException($"{indexPath}: holds a JSON string that is not valid text: {e.Message}", indexPath, null, e);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new CheckpointException($"{indexPath}: cannot read: {e.Message}", indexPath, null, e);
        }
    }

    /// <inheritdoc />
    public void Dispose()
    {
        foreach (var shard in _shards)
        {
            shard.Dispose();
        }
    }
}
