using System.Text;
using DeepSeekCuda.Loader;

namespace DeepSeekCuda.Tests.Loader;

/// <summary>Every malformed file gives a <see cref="SafetensorsFormatException"/> naming the file, the tensor and the problem.</summary>
[TestClass]
public sealed class BadSafetensorsTests
{
    // A valid file: "w" F32 [2, 2] at [0, 16], "b" BF16 [3] at [16, 22].
    private const string W = "\"w\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]}";
    private const string B = "\"b\":{\"dtype\":\"BF16\",\"shape\":[3],\"data_offsets\":[16,22]}";
    private const string Meta = "\"__metadata__\":{\"format\":\"pt\"}";
    private static readonly byte[] Data = [.. Enumerable.Range(0, 22).Select(i => (byte)(i + 1))];

    private static byte[] File(byte[] header, byte[] data, ulong? declaredLength = null)
    {
        var bytes = new byte[8 + header.Length + data.Length];
        BitConverter.TryWriteBytes(bytes.AsSpan(0, 8), declaredLength ?? (ulong)header.Length);
        header.CopyTo(bytes, 8);
        data.CopyTo(bytes, 8 + header.Length);
        return bytes;
    }

    private static byte[] File(string header, byte[]? data = null) => File(Encoding.UTF8.GetBytes(header), data ?? Data);

    private static SafetensorsFormatException Fails(TempDir dir, byte[] bytes, string? tensor, string problem)
    {
        var path = dir.File($"bad-{Guid.NewGuid():N}.safetensors");
        System.IO.File.WriteAllBytes(path, bytes);
        var e = Assert.ThrowsExactly<SafetensorsFormatException>(() => SafetensorsFile.Open(path).Dispose());
        Assert.AreEqual(path, e.FilePath);
        Assert.AreEqual(tensor, e.TensorName);
        Assert.Contains(path, e.Message);
        if (tensor is not null)
        {
            Assert.Contains($"tensor '{tensor}'", e.Message);
        }

        Assert.Contains(problem, e.Problem);
        return e;
    }

    [TestMethod]
    public void TheBaseFileIsValid()
    {
        using var dir = new TempDir();
        var path = dir.File("ok.safetensors");
        System.IO.File.WriteAllBytes(path, File($"{{{Meta},{W},{B}}}"));
        using var f = SafetensorsFile.Open(path);
        CollectionAssert.AreEqual(Data[16..22], f.GetBytes("b").ToArray());
    }

    [TestMethod]
    public void TruncatedFiles()
    {
        using var dir = new TempDir();
        Fails(dir, [1, 2, 3, 4, 5], null, "5 bytes, shorter than the 8-byte header length");
        Fails(dir, [], null, "0 bytes");
        var valid = File($"{{{Meta},{W},{B}}}");
        Fails(dir, valid[..^3], "b", "data_offsets [16, 22] run past the data section (19 bytes)");
        Fails(dir, valid[..20], null, "runs past the end of the file");
    }

    [TestMethod]
    public void HeaderLengthPastTheEndOrAbsurd()
    {
        using var dir = new TempDir();
        var header = Encoding.UTF8.GetBytes($"{{{W}}}");
        // The value itself is never quoted: for a file that is not safetensors it is the file's first 8 bytes.
        var e = Fails(dir, File(header, Data[..16], 1_000_000), null, "the header length runs past the end of the file");
        Assert.DoesNotContain("1000000", e.Message);
        e = Fails(dir, File(header, Data[..16], ulong.MaxValue), null, "the header length runs past");
        Assert.DoesNotContain(ulong.MaxValue.ToString(System.Globalization.CultureInfo.InvariantCulture), e.Message);
        Fails(dir, File(header, Data[..16], 1), null, "header length 1 is too short");
    }

    [TestMethod]
    public void InvalidUtf8InTheHeader()
    {
        using var dir = new TempDir();
        var header = Encoding.UTF8.GetBytes($"{{{W}}}");
        header[2] = 0xFF; // inside the name "w"
        Fails(dir, File(header, Data[..16]), null, "header is not valid UTF-8 (at byte 2)");
    }

    [TestMethod]
    public void LoneSurrogateEscapeInANameIsAFormatError()
    {
        // JsonElement throws InvalidOperationException unescaping "\ud800"; the reader must turn it into a format error.
        using var dir = new TempDir();
        Fails(dir, File("{\"\\ud800\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", Data[..16]), null, "not valid UTF-16");
        Fails(dir, File($"{{\"__metadata__\":{{\"format\":\"\\udc00\"}},{W}}}", Data[..16]), null, "not valid UTF-16");
    }

    [TestMethod]
    public void InvalidJsonAndNonObjects()
    {
        using var dir = new TempDir();
        Fails(dir, File($"{{{W},"), null, "header is not valid JSON");
        Fails(dir, File("[1, 2, 3]"), null, "header is a JSON Array, not an object");
        Fails(dir, File("{\"w\": [0, 16]}"), "w", "entry is a JSON Array, not an object");
    }

    [TestMethod]
    public void UnknownDtype()
    {
        using var dir = new TempDir();
        Fails(dir, File($"{{{W.Replace("F32", "F33", StringComparison.Ordinal)},{B}}}"), "w", "unknown dtype 'F33'");
        Fails(dir, File($"{{{W.Replace("\"F32\"", "\"f32\"", StringComparison.Ordinal)},{B}}}"), "w", "unknown dtype 'f32'");
        Fails(dir, File($"{{{W.Replace("\"F32\"", "4", StringComparison.Ordinal)},{B}}}"), "w", "'dtype' is missing or not a string");
    }

    [TestMethod]
    public void NegativeOrNonIntegerShapes()
    {
        using var dir = new TempDir();
        Fails(dir, File($"{{{W.Replace("[2,2]", "[-2,-2]", StringComparison.Ordinal)},{B}}}"), "w", "shape entry -2 is not a non-negative integer");
        Fails(dir, File($"{{{W.Replace("[2,2]", "[2.5,2]", StringComparison.Ordinal)},{B}}}"), "w", "shape entry 2.5 is not a non-negative integer");
        Fails(dir, File($"{{{W.Replace("[2,2]", "[\"2\",2]", StringComparison.Ordinal)},{B}}}"), "w", "shape entry \"2\" is not a non-negative integer");
        Fails(dir, File($"{{{W.Replace("[2,2]", "[4294967296,4294967296]", StringComparison.Ordinal)},{B}}}"), "w", "overflows 64-bit element count");
    }

    [TestMethod]
    public void OffsetProblems()
    {
        using var dir = new TempDir();
        Fails(dir, File($"{{{W},{B.Replace("[16,22]", "[10,16]", StringComparison.Ordinal)}}}"), "b", "overlap tensor 'w' at [0, 16]");
        Fails(dir, File($"{{{W},{B.Replace("[16,22]", "[16,100]", StringComparison.Ordinal)}}}"), "b", "data_offsets [16, 100] run past the data section (22 bytes)");
        Fails(dir, File($"{{{W},{B.Replace("[16,22]", "[22,16]", StringComparison.Ordinal)}}}"), "b", "data_offsets [22, 16] end before they begin");
        Fails(dir, File($"{{{W},{B.Replace("[16,22]", "[-6,0]", StringComparison.Ordinal)}}}"), "b", "data offset -6 is not a non-negative integer");
        Fails(dir, File($"{{{W},{B.Replace("[16,22]", "[16]", StringComparison.Ordinal)}}}"), "b", "'data_offsets' is missing or not an array of two integers");
    }

    [TestMethod]
    public void ShapeDisagreesWithTheByteRange()
    {
        using var dir = new TempDir();
        Fails(dir, File($"{{{W.Replace("[2,2]", "[2,3]", StringComparison.Ordinal)},{B}}}"), "w",
            "shape [2, 3] of F32 needs 24 bytes but data_offsets [0, 16] hold 16");
        Fails(dir, File($"{{{W},{B.Replace("BF16", "F32", StringComparison.Ordinal)}}}"), "b",
            "shape [3] of F32 needs 12 bytes but data_offsets [16, 22] hold 6");
    }

    [TestMethod]
    public void DuplicateTensorName()
    {
        using var dir = new TempDir();
        Fails(dir, File($"{{{W},{B},{B}}}"), "b", "appears twice in the header");
    }

    [TestMethod]
    public void BadMetadata()
    {
        using var dir = new TempDir();
        Fails(dir, File($"{{\"__metadata__\":{{\"format\":1}},{W},{B}}}"), null, "'__metadata__.format' is a JSON Number, not a string");
        Fails(dir, File($"{{\"__metadata__\":[\"pt\"],{W},{B}}}"), null, "'__metadata__' is a JSON Array, not an object of strings");
        Fails(dir, File($"{{{Meta},{W},{Meta},{B}}}"), null, "'__metadata__' appears twice");
    }

    [TestMethod]
    public void UnknownFieldInATensorEntry()
    {
        using var dir = new TempDir();
        Fails(dir, File($"{{{W.Replace("\"dtype\"", "\"layout\":1,\"dtype\"", StringComparison.Ordinal)},{B}}}"), "w", "unknown field 'layout'");
    }

    [TestMethod]
    public void MissingFileIsACheckpointExceptionNamingIt()
    {
        using var dir = new TempDir();
        var path = dir.File("absent.safetensors");
        var e = Assert.ThrowsExactly<CheckpointException>(() => SafetensorsFile.Open(path));
        Assert.AreEqual(path, e.FilePath);
        Assert.Contains("file not found", e.Message);
    }
}
