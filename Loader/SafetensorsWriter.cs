using System.Buffers;
using System.Collections.Immutable;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Encodings.Web;
using System.Text.Json;
using Microsoft.Win32.SafeHandles;

namespace DeepSeekCuda.Loader;

/// <summary>
/// Writes a safetensors file without holding its tensor data in memory: declare every tensor (name,
/// dtype, shape) up front, then hand over each tensor's bytes in one or more pieces, in any tensor
/// order, and <see cref="Commit"/>. The layout matches the release: <c>__metadata__</c> first, tensors
/// ordered by element size (largest first) then name so each is naturally aligned, back to back, the
/// compact JSON header space-padded so the data starts at a multiple of 8.
/// </summary>
/// <remarks>
/// The bytes go to a temporary file beside the destination, renamed into place by <see cref="Commit"/>
/// once every tensor is complete; disposing an uncommitted writer deletes it, so a failed write never
/// leaves a half-written file under the destination name.
/// </remarks>
internal sealed class SafetensorsWriter : IDisposable
{
    private readonly Dictionary<string, int> _index;
    private readonly long[] _written;
    private readonly string _tempPath;
    private SafeFileHandle? _handle;
    private bool _committed;

    /// <summary>Declares the tensors of <paramref name="path"/> and writes its header to a temporary file.</summary>
    /// <param name="path">Destination file; replaced on <see cref="Commit"/> if it exists.</param>
    /// <param name="tensors">Every tensor the file will hold.</param>
    /// <param name="metadata">Extra <c>__metadata__</c> entries besides <c>"format": "pt"</c>.</param>
    /// <exception cref="ArgumentException">A name is empty, reserved or repeated, or a shape is negative or too large.</exception>
    public SafetensorsWriter(string path, IEnumerable<(string Name, DType DType, long[] Shape)> tensors,
        IReadOnlyDictionary<string, string>? metadata = null)
    {
        ArgumentNullException.ThrowIfNull(tensors);
        FilePath = Path.GetFullPath(path);
        var declared = new List<(string Name, DType DType, ImmutableArray<long> Shape, long Bytes)>();
        var names = new HashSet<string>(StringComparer.Ordinal);
        foreach (var (name, dtype, shape) in tensors)
        {
            if (string.IsNullOrEmpty(name) || name == "__metadata__")
            {
                throw new ArgumentException($"tensor name '{name}' is empty or reserved", nameof(tensors));
            }

            if (!names.Add(name))
            {
                throw new ArgumentException($"tensor '{name}' is declared twice", nameof(tensors));
            }

            ArgumentNullException.ThrowIfNull(shape);
            long bytes = DTypes.SizeOf(dtype);
            foreach (var d in shape)
            {
                if (d < 0)
                {
                    throw new ArgumentException($"tensor '{name}' has negative dimension in shape {TensorInfo.FormatShape(shape)}", nameof(tensors));
                }

                bytes = checked(bytes * d);
            }

            declared.Add((name, dtype, [.. shape], bytes));
        }

        // The release's order: every tensor starts at a multiple of its element size because all
        // larger elements come first and every size divides the previous ones.
        declared.Sort((a, b) =>
        {
            var bySize = DTypes.SizeOf(b.DType).CompareTo(DTypes.SizeOf(a.DType));
            return bySize != 0 ? bySize : string.CompareOrdinal(a.Name, b.Name);
        });

        var layout = ImmutableArray.CreateBuilder<TensorInfo>(declared.Count);
        long offset = 0;
        foreach (var (name, dtype, shape, bytes) in declared)
        {
            layout.Add(new TensorInfo(name, dtype, shape, offset, checked(offset + bytes), FilePath));
            offset += bytes;
        }

        Layout = layout.ToImmutable();
        DataLength = offset;
        _index = new Dictionary<string, int>(StringComparer.Ordinal);
        for (var i = 0; i < Layout.Length; i++)
        {
            _index.Add(Layout[i].Name, i);
        }

        _written = new long[Layout.Length];
        var header = BuildHeader(Layout, metadata);
        HeaderLength = header.Length;
        FileLength = checked(8 + header.Length + DataLength);

        var directory = Path.GetDirectoryName(FilePath)!;
        Directory.CreateDirectory(directory);
        _tempPath = Path.Combine(directory, $".{Path.GetFileName(FilePath)}.{Guid.NewGuid():N}.tmp");
        _handle = File.OpenHandle(_tempPath, FileMode.CreateNew, FileAccess.ReadWrite, FileShare.None, FileOptions.None, FileLength);
        try
        {
            Span<byte> prefix = stackalloc byte[8];
            BitConverter.TryWriteBytes(prefix, (ulong)header.Length);
            RandomAccess.Write(_handle, prefix, 0);
            RandomAccess.Write(_handle, header, 8);
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    /// <summary>The destination path.</summary>
    public string FilePath { get; }

    /// <summary>Every tensor in file order, with its data offsets.</summary>
    public ImmutableArray<TensorInfo> Layout { get; }

    /// <summary>Bytes of the JSON header, padding included (a multiple of 8).</summary>
    public int HeaderLength { get; }

    /// <summary>Bytes of the data section.</summary>
    public long DataLength { get; }

    /// <summary>Bytes of the finished file.</summary>
    public long FileLength { get; }

    /// <summary>Whether every byte of <paramref name="name"/> has been written.</summary>
    public bool IsComplete(string name) => _written[IndexOf(name)] == Layout[IndexOf(name)].ByteLength;

    /// <summary>
    /// Appends <paramref name="data"/> to tensor <paramref name="name"/>: a tensor may be written in
    /// pieces (in order), and tensors in any order.
    /// </summary>
    /// <exception cref="ArgumentException">Unknown tensor, or more bytes than its shape holds.</exception>
    /// <exception cref="ObjectDisposedException">The writer was committed or disposed.</exception>
    public void Write(string name, ReadOnlySpan<byte> data)
    {
        ObjectDisposedException.ThrowIf(_handle is null, this);
        var i = IndexOf(name);
        var info = Layout[i];
        if (data.Length > info.ByteLength - _written[i])
        {
            throw new ArgumentException(
                $"tensor '{name}' ({info.DType} {info.ShapeText}) holds {info.ByteLength} bytes; {_written[i]} written, {data.Length} more do not fit",
                nameof(data));
        }

        RandomAccess.Write(_handle, data, 8 + HeaderLength + info.Begin + _written[i]);
        _written[i] += data.Length;
    }

    /// <summary>Appends elements of an unmanaged type (e.g. <see cref="float"/> for F32) to <paramref name="name"/>.</summary>
    public void Write<T>(string name, ReadOnlySpan<T> data) where T : unmanaged =>
        Write(name, MemoryMarshal.AsBytes(data));

    /// <summary>Flushes the file and renames it into place once every tensor is complete.</summary>
    /// <exception cref="InvalidOperationException">Some tensor is incomplete (the file is not written).</exception>
    public void Commit()
    {
        ObjectDisposedException.ThrowIf(_handle is null, this);
        var incomplete = Layout.Where((t, i) => _written[i] != t.ByteLength).Select(t => t.Name).ToList();
        if (incomplete.Count > 0)
        {
            throw new InvalidOperationException(
                $"{FilePath}: {incomplete.Count} tensor(s) incomplete, e.g. '{incomplete[0]}' ({_written[_index[incomplete[0]]]} of {Layout[_index[incomplete[0]]].ByteLength} bytes)");
        }

        RandomAccess.FlushToDisk(_handle);
        _handle.Dispose();
        _handle = null;
        File.Move(_tempPath, FilePath, overwrite: true);
        _committed = true;
    }

    /// <summary>Closes the writer; an uncommitted file is deleted.</summary>
    public void Dispose()
    {
        _handle?.Dispose();
        _handle = null;
        if (!_committed)
        {
            try
            {
                File.Delete(_tempPath);
            }
            catch (IOException)
            {
                // Best effort: the temporary name never shadows the destination.
            }
        }
    }

    /// <summary>Writes a small file whose tensor bytes are all in memory.</summary>
    public static void WriteFile(string path, IEnumerable<(string Name, DType DType, long[] Shape, byte[] Data)> tensors,
        IReadOnlyDictionary<string, string>? metadata = null)
    {
        var list = tensors.ToList();
        using var writer = new SafetensorsWriter(path, list.Select(t => (t.Name, t.DType, t.Shape)), metadata);
        foreach (var t in list)
        {
            writer.Write(t.Name, t.Data);
        }

        writer.Commit();
    }

    /// <summary>
    /// Writes a small file of float data, each tensor stored as <paramref name="tensors"/> says: F32 as
    /// is, BF16 and F16 rounded to nearest even, F64 widened.
    /// </summary>
    /// <exception cref="ArgumentException">A dtype that is not floating point (FP8 needs block scales: encode it yourself).</exception>
    public static void WriteFile(string path, IEnumerable<(string Name, DType DType, long[] Shape, float[] Data)> tensors,
        IReadOnlyDictionary<string, string>? metadata = null) =>
        WriteFile(path, tensors.Select(t => (t.Name, t.DType, t.Shape, Encode(t.Name, t.DType, t.Data))), metadata);

    /// <summary>Writes a small file of F32 tensors (e.g. logits).</summary>
    public static void WriteFile(string path, IEnumerable<(string Name, long[] Shape, float[] Data)> tensors,
        IReadOnlyDictionary<string, string>? metadata = null) =>
        WriteFile(path, tensors.Select(t => (t.Name, DType.F32, t.Shape, t.Data)), metadata);

    private static byte[] Encode(string name, DType dtype, float[] data)
    {
        switch (dtype)
        {
            case DType.F32:
                return MemoryMarshal.AsBytes(data.AsSpan()).ToArray();
            case DType.BF16:
                return MemoryMarshal.AsBytes(data.Select(Numerics.BFloat16.FromFloat).ToArray().AsSpan()).ToArray();
            case DType.F16:
                return MemoryMarshal.AsBytes(data.Select(v => (Half)v).ToArray().AsSpan()).ToArray();
            case DType.F64:
                return MemoryMarshal.AsBytes(data.Select(v => (double)v).ToArray().AsSpan()).ToArray();
            default:
                throw new ArgumentException($"tensor '{name}': cannot store float data as {dtype}", nameof(dtype));
        }
    }

    private int IndexOf(string name) =>
        _index.TryGetValue(name, out var i) ? i : throw new ArgumentException($"{FilePath}: tensor '{name}' was not declared", nameof(name));

    private static byte[] BuildHeader(ImmutableArray<TensorInfo> layout, IReadOnlyDictionary<string, string>? metadata)
    {
        var buffer = new ArrayBufferWriter<byte>();
        // Relaxed escaping keeps names readable ('+' and non-ASCII stay literal), as serde_json writes them.
        using (var json = new Utf8JsonWriter(buffer, new JsonWriterOptions { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping }))
        {
            json.WriteStartObject();
            json.WriteStartObject("__metadata__");
            json.WriteString("format", "pt");
            if (metadata is not null)
            {
                foreach (var (key, value) in metadata.OrderBy(kv => kv.Key, StringComparer.Ordinal))
                {
                    if (key != "format")
                    {
                        json.WriteString(key, value);
                    }
                }
            }

            json.WriteEndObject();
            foreach (var t in layout)
            {
                json.WriteStartObject(t.Name);
                json.WriteString("dtype", DTypes.Name(t.DType));
                json.WriteStartArray("shape");
                foreach (var d in t.Shape)
                {
                    json.WriteNumberValue(d);
                }

                json.WriteEndArray();
                json.WriteStartArray("data_offsets");
                json.WriteNumberValue(t.Begin);
                json.WriteNumberValue(t.End);
                json.WriteEndArray();
                json.WriteEndObject();
            }

            json.WriteEndObject();
        }

        var length = buffer.WrittenCount;
        // The data starts at 8 + header length; padding the header to a multiple of 8 aligns it.
        var padded = (length + 7) / 8 * 8;
        var header = new byte[padded];
        buffer.WrittenSpan.CopyTo(header);
        header.AsSpan(length).Fill((byte)' ');
        return header;
    }
}
