using System.Collections.Immutable;
using System.IO.MemoryMappedFiles;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;

namespace DeepSeekCuda.Loader;

/// <summary>
/// A safetensors file, memory-mapped read-only: tensor bytes are spans over the mapping, never copied.
/// Opening validates the whole header (length, UTF-8 JSON, dtypes, shapes against byte ranges, ranges
/// that tile the data section exactly: no overlap, hole or trailing byte) and throws <see cref="SafetensorsFormatException"/> naming the
/// file and tensor on the first violation.
/// </summary>
/// <remarks>
/// Layout: an unsigned 64-bit little-endian header length N, N bytes of JSON
/// <c>{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {..}}</c>, then the data
/// section, to which the offsets are relative.
/// </remarks>
public sealed unsafe class SafetensorsFile : IDisposable
{
    /// <summary>Headers beyond this are refused (the format's reference implementation uses 100 MB).</summary>
    public const long MaxHeaderBytes = 100_000_000;

    private readonly FileStream _file;
    private readonly MemoryMappedFile? _map;
    private readonly MemoryMappedViewAccessor? _view;
    private byte* _base;
    private readonly long _dataStart;

    private SafetensorsFile(string path, FileStream file, long fileLength, long dataStart, ImmutableDictionary<string, TensorInfo> tensors,
        ImmutableDictionary<string, string> metadata, MemoryMappedFile? map, MemoryMappedViewAccessor? view, byte* basePointer)
    {
        FilePath = path;
        _file = file;
        FileLength = fileLength;
        _dataStart = dataStart;
        Tensors = tensors;
        Metadata = metadata;
        _map = map;
        _view = view;
        _base = basePointer;
    }

    /// <summary>The file's path.</summary>
    public string FilePath { get; }

    /// <summary>The file's length in bytes.</summary>
    public long FileLength { get; }

    /// <summary>Bytes of the data section.</summary>
    public long DataLength => FileLength - _dataStart;

    /// <summary>Tensors by name.</summary>
    public ImmutableDictionary<string, TensorInfo> Tensors { get; }

    /// <summary>The optional <c>__metadata__</c> string map.</summary>
    public ImmutableDictionary<string, string> Metadata { get; }

    /// <summary>Opens and validates <paramref name="path"/>.</summary>
    /// <param name="path">The file.</param>
    /// <param name="modelFolder">The folder a symbolic link may point into (<see cref="ModelFiles"/>); null: the file's own folder.</param>
    /// <exception cref="SafetensorsFormatException">The file breaks the format.</exception>
    /// <exception cref="CheckpointException">The file cannot be read, or is not a regular file of the model folder.</exception>
    public static SafetensorsFile Open(string path, string? modelFolder = null)
    {
        path = Path.GetFullPath(path);
        var file = ModelFiles.OpenRead(path, modelFolder ?? Path.GetDirectoryName(path)!, long.MaxValue);
        MemoryMappedFile? map = null;
        MemoryMappedViewAccessor? view = null;
        try
        {
            var length = file.Length;
            var header = ReadHeaderBytes(path, file, length);
            var dataStart = 8 + header.LongLength;
            var (tensors, metadata) = ParseHeader(path, header, length - dataStart);
            if (length == dataStart)
            {
                // Nothing to map (only empty tensors); a zero-length mapping is not allowed.
                return new SafetensorsFile(path, file, length, dataStart, tensors, metadata, null, null, null);
            }

            // The mapping shares the open handle, so a later size check sees this very file (not a replacement).
            map = MemoryMappedFile.CreateFromFile(file, null, 0, MemoryMappedFileAccess.Read, HandleInheritability.None, leaveOpen: true);
            view = map.CreateViewAccessor(0, 0, MemoryMappedFileAccess.Read);
            byte* p = null;
            view.SafeMemoryMappedViewHandle.AcquirePointer(ref p);
            return new SafetensorsFile(path, file, length, dataStart, tensors, metadata, map, view, p + view.PointerOffset);
        }
        catch (Exception e)
        {
            view?.Dispose();
            map?.Dispose();
            file.Dispose();
            if (e is IOException or UnauthorizedAccessException)
            {
                throw new CheckpointException($"{path}: cannot read: {e.Message}", path, null, e);
            }

            throw;
        }
    }

    private static byte[] ReadHeaderBytes(string path, FileStream stream, long length)
    {
        if (length < 8)
        {
            throw new SafetensorsFormatException(path, null, $"file is {length} bytes, shorter than the 8-byte header length");
        }

        Span<byte> prefix = stackalloc byte[8];
        stream.ReadExactly(prefix);
        var n = BitConverter.ToUInt64(prefix);

        // The value is not quoted when implausible: for a file that is not safetensors at all, it would be
        // the file's first 8 bytes, shown to whoever reads the error.
        if (n > (ulong)(length - 8))
        {
            throw new SafetensorsFormatException(path, null, $"the header length runs past the end of the file ({length} bytes): not a safetensors file, or a truncated one");
        }

        if (n > MaxHeaderBytes)
        {
            throw new SafetensorsFormatException(path, null, $"the header length exceeds the limit of {MaxHeaderBytes} bytes");
        }

        if (n < 2)
        {
            throw new SafetensorsFormatException(path, null, $"header length {n} is too short for a JSON object");
        }

        var header = new byte[(int)n];
        stream.ReadExactly(header);
        return header;
    }

    /// <summary>The tensor named <paramref name="name"/>.</summary>
    /// <exception cref="CheckpointException">No such tensor in this file.</exception>
    public TensorInfo Get(string name) =>
        Tensors.TryGetValue(name, out var info)
            ? info
            : throw new CheckpointException($"{FilePath}: no tensor '{name}'", FilePath, name);

    /// <summary>The raw bytes of <paramref name="tensor"/> (a span over the mapping: valid until disposal).</summary>
    /// <exception cref="CheckpointException">The tensor exceeds 2 GiB, more than a span can address.</exception>
    public ReadOnlySpan<byte> GetBytes(TensorInfo tensor)
    {
        if (!string.Equals(tensor.FilePath, FilePath, StringComparison.Ordinal))
        {
            throw new ArgumentException($"tensor '{tensor.Name}' belongs to {tensor.FilePath}, not {FilePath}", nameof(tensor));
        }

        if (tensor.ByteLength == 0)
        {
            return ReadOnlySpan<byte>.Empty;
        }

        ObjectDisposedException.ThrowIf(_base is null, this);
        CheckNotTruncated(tensor);
        if (tensor.ByteLength > int.MaxValue)
        {
            throw new CheckpointException(
                $"{FilePath}: tensor '{tensor.Name}' has {tensor.ByteLength} bytes; a span holds at most {int.MaxValue}", FilePath, tensor.Name);
        }

        return new ReadOnlySpan<byte>(_base + _dataStart + tensor.Begin, (int)tensor.ByteLength);
    }

    /// <summary>The raw bytes of the tensor named <paramref name="name"/>.</summary>
    public ReadOnlySpan<byte> GetBytes(string name) => GetBytes(Get(name));

    /// <summary>
    /// Bytes <c>[start, start + length)</c> of <paramref name="tensor"/>, a span over the mapping: the way to
    /// read a tensor in pieces (tensors of any size, chunked uploads).
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException">The range is not inside the tensor.</exception>
    public ReadOnlySpan<byte> GetBytes(TensorInfo tensor, long start, int length)
    {
        if (!string.Equals(tensor.FilePath, FilePath, StringComparison.Ordinal))
        {
            throw new ArgumentException($"tensor '{tensor.Name}' belongs to {tensor.FilePath}, not {FilePath}", nameof(tensor));
        }

        if (start < 0 || length < 0 || start + length > tensor.ByteLength)
        {
            throw new ArgumentOutOfRangeException(nameof(start), $"[{start}, {start + length}) outside tensor '{tensor.Name}' of {tensor.ByteLength} bytes");
        }

        if (length == 0)
        {
            return ReadOnlySpan<byte>.Empty;
        }

        ObjectDisposedException.ThrowIf(_base is null, this);
        CheckNotTruncated(tensor);
        return new ReadOnlySpan<byte>(_base + _dataStart + tensor.Begin + start, length);
    }

    /// <summary>
    /// Touching a mapped page past the end of a file truncated while open kills the process (SIGBUS), so
    /// every read first asks the open file its size (one fstat). A truncation after this check, while the
    /// span is in use, cannot be caught: shards must not be rewritten while a model is loaded.
    /// </summary>
    private void CheckNotTruncated(TensorInfo tensor)
    {
        var now = RandomAccess.GetLength(_file.SafeFileHandle);
        if (now < _dataStart + tensor.End)
        {
            throw new CheckpointException(
                $"{FilePath}: the file was truncated while open ({now} bytes now, {FileLength} at open); tensor '{tensor.Name}' is gone", FilePath, tensor.Name);
        }
    }

    /// <summary>
    /// The bytes of <paramref name="tensor"/> as elements of <typeparamref name="T"/>; its size must equal
    /// the dtype's. x86-64 and ARM64 allow the unaligned reads this can imply.
    /// </summary>
    public ReadOnlySpan<T> GetSpan<T>(TensorInfo tensor) where T : unmanaged
    {
        if (sizeof(T) != DTypes.SizeOf(tensor.DType))
        {
            throw new ArgumentException($"tensor '{tensor.Name}' is {tensor.DType}; {typeof(T).Name} has {sizeof(T)} bytes", nameof(T));
        }

        return MemoryMarshal.Cast<byte, T>(GetBytes(tensor));
    }

    /// <inheritdoc />
    public void Dispose()
    {
        if (_view is not null && _base is not null)
        {
            _base = null;
            _view.SafeMemoryMappedViewHandle.ReleasePointer();
        }

        _view?.Dispose();
        _map?.Dispose();
        _file.Dispose();
    }

    /// <summary>Parses and validates a header; exposed for the fuzz tests.</summary>
    internal static (ImmutableDictionary<string, TensorInfo> Tensors, ImmutableDictionary<string, string> Metadata) ParseHeader(
        string path, byte[] header, long dataLength)
    {
        string text;
        try
        {
            text = new UTF8Encoding(false, true).GetString(header);
        }
        catch (DecoderFallbackException e)
        {
            throw new SafetensorsFormatException(path, null, $"header is not valid UTF-8 (at byte {e.Index})", e);
        }

        JsonDocument doc;
        try
        {
            doc = JsonDocument.Parse(text, new JsonDocumentOptions { MaxDepth = 16 });
        }
        catch (JsonException e)
        {
            throw new SafetensorsFormatException(path, null, $"header is not valid JSON: {e.Message}", e);
        }

        using (doc)
        {
            try
            {
                return ParseRoot(path, doc.RootElement, dataLength);
            }
            catch (InvalidOperationException e)
            {
                // JsonElement refuses to unescape a lone surrogate ("\ud800") in a name or string value.
                throw new SafetensorsFormatException(path, null, $"header holds a JSON string that is not valid UTF-16: {e.Message}", e);
            }
        }
    }

    private static (ImmutableDictionary<string, TensorInfo> Tensors, ImmutableDictionary<string, string> Metadata) ParseRoot(
        string path, JsonElement root, long dataLength)
    {
        if (root.ValueKind != JsonValueKind.Object)
        {
            throw new SafetensorsFormatException(path, null, $"header is a JSON {root.ValueKind}, not an object");
        }

        var tensors = ImmutableDictionary.CreateBuilder<string, TensorInfo>(StringComparer.Ordinal);
        var metadata = ImmutableDictionary<string, string>.Empty;
        var seenMetadata = false;
        foreach (var property in root.EnumerateObject())
        {
            if (property.Name == "__metadata__")
            {
                if (seenMetadata)
                {
                    throw new SafetensorsFormatException(path, null, "'__metadata__' appears twice");
                }

                seenMetadata = true;
                metadata = ParseMetadata(path, property.Value);
                continue;
            }

            if (tensors.ContainsKey(property.Name))
            {
                throw new SafetensorsFormatException(path, property.Name, "appears twice in the header");
            }

            tensors.Add(property.Name, ParseTensor(path, property.Name, property.Value, dataLength));
        }

        var result = tensors.ToImmutable();
        CheckCoverage(path, result.Values, dataLength);
        return (result, metadata);
    }

    private static ImmutableDictionary<string, string> ParseMetadata(string path, JsonElement element)
    {
        if (element.ValueKind != JsonValueKind.Object)
        {
            throw new SafetensorsFormatException(path, null, $"'__metadata__' is a JSON {element.ValueKind}, not an object of strings");
        }

        var builder = ImmutableDictionary.CreateBuilder<string, string>(StringComparer.Ordinal);
        foreach (var entry in element.EnumerateObject())
        {
            if (entry.Value.ValueKind != JsonValueKind.String)
            {
                throw new SafetensorsFormatException(path, null, $"'__metadata__.{entry.Name}' is a JSON {entry.Value.ValueKind}, not a string");
            }

            builder[entry.Name] = entry.Value.GetString()!;
        }

        return builder.ToImmutable();
    }

    private static TensorInfo ParseTensor(string path, string name, JsonElement element, long dataLength)
    {
        if (element.ValueKind != JsonValueKind.Object)
        {
            throw new SafetensorsFormatException(path, name, $"entry is a JSON {element.ValueKind}, not an object");
        }

        JsonElement? dtypeEl = null, shapeEl = null, offsetsEl = null;
        foreach (var field in element.EnumerateObject())
        {
            switch (field.Name)
            {
                case "dtype": dtypeEl = field.Value; break;
                case "shape": shapeEl = field.Value; break;
                case "data_offsets": offsetsEl = field.Value; break;
                default: throw new SafetensorsFormatException(path, name, $"unknown field '{field.Name}'");
            }
        }

        if (dtypeEl is not { ValueKind: JsonValueKind.String } d)
        {
            throw new SafetensorsFormatException(path, name, "'dtype' is missing or not a string");
        }

        var dtypeText = d.GetString()!;
        if (!DTypes.TryParse(dtypeText, out var dtype))
        {
            throw new SafetensorsFormatException(path, name, $"unknown dtype '{dtypeText}'");
        }

        if (shapeEl is not { ValueKind: JsonValueKind.Array } s)
        {
            throw new SafetensorsFormatException(path, name, "'shape' is missing or not an array");
        }

        var shape = ImmutableArray.CreateBuilder<long>(s.GetArrayLength());
        long elements = 1;
        foreach (var dim in s.EnumerateArray())
        {
            if (dim.ValueKind != JsonValueKind.Number || !dim.TryGetInt64(out var v) || v < 0)
            {
                throw new SafetensorsFormatException(path, name, $"shape entry {dim.GetRawText()} is not a non-negative integer");
            }

            shape.Add(v);
            try
            {
                elements = checked(elements * v);
            }
            catch (OverflowException e)
            {
                throw new SafetensorsFormatException(path, name, $"shape {TensorInfo.FormatShape(shape)} overflows 64-bit element count", e);
            }
        }

        if (offsetsEl is not { ValueKind: JsonValueKind.Array } o || o.GetArrayLength() != 2)
        {
            throw new SafetensorsFormatException(path, name, "'data_offsets' is missing or not an array of two integers");
        }

        var begin = ReadOffset(path, name, o[0]);
        var end = ReadOffset(path, name, o[1]);
        if (end < begin)
        {
            throw new SafetensorsFormatException(path, name, $"data_offsets [{begin}, {end}] end before they begin");
        }

        if (end > dataLength)
        {
            throw new SafetensorsFormatException(path, name, $"data_offsets [{begin}, {end}] run past the data section ({dataLength} bytes)");
        }

        long expected;
        try
        {
            expected = checked(elements * DTypes.SizeOf(dtype));
        }
        catch (OverflowException e)
        {
            throw new SafetensorsFormatException(path, name, $"shape {TensorInfo.FormatShape(shape)} of {dtype} overflows 64-bit byte count", e);
        }

        if (expected != end - begin)
        {
            throw new SafetensorsFormatException(path, name,
                $"shape {TensorInfo.FormatShape(shape)} of {dtype} needs {expected} bytes but data_offsets [{begin}, {end}] hold {end - begin}");
        }

        return new TensorInfo(name, dtype, shape.ToImmutable(), begin, end, path);
    }

    private static long ReadOffset(string path, string name, JsonElement element) =>
        element.ValueKind == JsonValueKind.Number && element.TryGetInt64(out var v) && v >= 0
            ? v
            : throw new SafetensorsFormatException(path, name, $"data offset {element.GetRawText()} is not a non-negative integer");

    /// <summary>
    /// The tensors must tile the data section exactly, as the format's reference reader requires: no
    /// overlap, no hole, no trailing bytes. A header length off by a few bytes then fails here instead of
    /// shifting every tensor.
    /// </summary>
    private static void CheckCoverage(string path, IEnumerable<TensorInfo> tensors, long dataLength)
    {
        TensorInfo? previous = null;
        long offset = 0;
        foreach (var t in tensors.OrderBy(t => t.Begin).ThenBy(t => t.End).ThenBy(t => t.Name, StringComparer.Ordinal))
        {
            if (t.Begin < offset)
            {
                throw new SafetensorsFormatException(path, t.Name,
                    $"data_offsets [{t.Begin}, {t.End}] overlap tensor '{previous!.Name}' at [{previous.Begin}, {previous.End}]");
            }

            if (t.Begin > offset)
            {
                throw new SafetensorsFormatException(path, t.Name,
                    $"data_offsets [{t.Begin}, {t.End}] leave a hole of {t.Begin - offset} bytes after {(previous is null ? "the start of the data section" : $"tensor '{previous.Name}'")}");
            }

            offset = t.End;
            previous = t;
        }

        if (offset != dataLength)
        {
            throw new SafetensorsFormatException(path, previous?.Name,
                $"the tensors end at byte {offset} of a {dataLength}-byte data section: {dataLength - offset} bytes belong to no tensor (or the header length is wrong)");
        }
    }
}
