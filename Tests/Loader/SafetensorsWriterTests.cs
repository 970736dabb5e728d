using System.Buffers.Binary;
using System.Text;
using DeepSeekCuda.Loader;

namespace DeepSeekCuda.Tests.Loader;

[TestClass]
public sealed class SafetensorsWriterTests
{
    private static byte[] Pattern(int length, int salt) => [.. Enumerable.Range(0, length).Select(i => (byte)(i * 31 + salt))];

    [TestMethod]
    public void RoundTripsNamesDtypesShapesAndBytes()
    {
        using var dir = new TempDir();
        var path = dir.File("x.safetensors");
        var tensors = new (string Name, DType DType, long[] Shape, byte[] Data)[]
        {
            ("b.fp8", DType.F8_E4M3, [3, 5], Pattern(15, 1)),
            ("a.bf16", DType.BF16, [7], Pattern(14, 2)),
            ("c.f32", DType.F32, [2, 3], Pattern(24, 3)),
            ("d.i64", DType.I64, [1], Pattern(8, 4)),
            ("e.empty", DType.F32, [0, 4], []),
            ("z.scalar", DType.F32, [], Pattern(4, 5)),
        };
        SafetensorsWriter.WriteFile(path, tensors, new Dictionary<string, string> { ["note"] = "unit test" });

        using var file = SafetensorsFile.Open(path);
        Assert.HasCount(tensors.Length, file.Tensors);
        foreach (var (name, dtype, shape, data) in tensors)
        {
            var info = file.Get(name);
            Assert.AreEqual(dtype, info.DType, name);
            CollectionAssert.AreEqual(shape, info.Shape.ToArray(), name);
            CollectionAssert.AreEqual(data, file.GetBytes(info).ToArray(), name);
        }

        Assert.AreEqual("pt", file.Metadata["format"]);
        Assert.AreEqual("unit test", file.Metadata["note"]);
        Assert.AreEqual(new FileInfo(path).Length, file.FileLength);
        Assert.HasCount(1, Directory.GetFiles(dir.Path), "no temporary file is left behind");
    }

    [TestMethod]
    public void LayoutIsTheReleasesPaddedAlignedAndBackToBack()
    {
        using var dir = new TempDir();
        var path = dir.File("x.safetensors");
        SafetensorsWriter.WriteFile(path, new (string Name, DType DType, long[] Shape, byte[] Data)[]
        {
            ("w", DType.F8_E4M3, [3], Pattern(3, 0)),
            ("n", DType.BF16, [3], Pattern(6, 0)),
            ("s", DType.F32, [1], Pattern(4, 0)),
            ("m", DType.BF16, [1], Pattern(2, 0)),
            ("i", DType.I64, [1], Pattern(8, 0)),
        });

        var bytes = File.ReadAllBytes(path);
        var headerLength = (long)BinaryPrimitives.ReadUInt64LittleEndian(bytes);
        Assert.AreEqual(0, headerLength % 8, "header length is a multiple of 8");
        var header = Encoding.UTF8.GetString(bytes, 8, (int)headerLength);
        Assert.StartsWith("{\"__metadata__\":{\"format\":\"pt\"},", header);
        Assert.AreEqual(header.TrimEnd(' ').Length, header.LastIndexOf('}') + 1, "padding is spaces after the JSON");
        Assert.AreEqual(3 + 6 + 4 + 2 + 8, bytes.Length - 8 - headerLength, "no holes in the data");

        using var file = SafetensorsFile.Open(path);
        var order = file.Tensors.Values.OrderBy(t => t.Begin).Select(t => t.Name).ToArray();
        CollectionAssert.AreEqual(new[] { "i", "s", "m", "n", "w" }, order, "element size descending, then name");
        foreach (var t in file.Tensors.Values)
        {
            Assert.AreEqual(0, (8 + headerLength + t.Begin) % DTypes.SizeOf(t.DType), $"{t.Name} is naturally aligned in the file");
        }
    }

    [TestMethod]
    public void StreamsTensorsInPiecesAndInAnyOrder()
    {
        using var dir = new TempDir();
        var path = dir.File("s.safetensors");
        var big = Pattern(1000, 9);
        using (var writer = new SafetensorsWriter(path, [("big", DType.U8, [1000]), ("f", DType.F32, [2])]))
        {
            writer.Write<float>("f", [1.5f, -2f]);
            writer.Write("big", big.AsSpan(0, 300));
            Assert.IsFalse(writer.IsComplete("big"));
            writer.Write("big", big.AsSpan(300));
            Assert.IsTrue(writer.IsComplete("big"));
            writer.Commit();
        }

        using var file = SafetensorsFile.Open(path);
        CollectionAssert.AreEqual(big, file.GetBytes("big").ToArray());
        CollectionAssert.AreEqual(new[] { 1.5f, -2f }, file.GetSpan<float>(file.Get("f")).ToArray());
    }

    [TestMethod]
    public void RefusesTooManyBytesAndLeavesNothingWhenNotCommitted()
    {
        using var dir = new TempDir();
        var path = dir.File("t.safetensors");
        using (var writer = new SafetensorsWriter(path, [("a", DType.F32, [2]), ("b", DType.F32, [1])]))
        {
            var tooMany = Assert.ThrowsExactly<ArgumentException>(() => writer.Write("a", new byte[12]));
            Assert.Contains("'a'", tooMany.Message);
            Assert.Contains("8 bytes", tooMany.Message);
            Assert.Contains("'nope'", Assert.ThrowsExactly<ArgumentException>(() => writer.Write("nope", new byte[1])).Message);
            writer.Write("a", new byte[8]);
            var incomplete = Assert.ThrowsExactly<InvalidOperationException>(writer.Commit);
            Assert.Contains("'b'", incomplete.Message);
        }

        Assert.IsEmpty(Directory.GetFileSystemEntries(dir.Path), "an uncommitted write leaves no file, temporary or final");
    }

    [TestMethod]
    public void RejectsDuplicateAndReservedNames()
    {
        using var dir = new TempDir();
        var path = dir.File("d.safetensors");
        Assert.Contains("'a' is declared twice",
            Assert.ThrowsExactly<ArgumentException>(() => new SafetensorsWriter(path, [("a", DType.F32, [1]), ("a", DType.BF16, [1])])).Message);
        Assert.Contains("reserved",
            Assert.ThrowsExactly<ArgumentException>(() => new SafetensorsWriter(path, [("__metadata__", DType.F32, [1])])).Message);
        Assert.IsEmpty(Directory.GetFileSystemEntries(dir.Path));
    }

    [TestMethod]
    public void WritesFloatTensorsAsF32AndBf16()
    {
        using var dir = new TempDir();
        var path = dir.File("logits.safetensors");
        SafetensorsWriter.WriteFile(path, [("logits", new long[] { 2, 2 }, new[] { 1f, -0.5f, 3.25f, 1e-3f })]);
        SafetensorsWriter.WriteFile(dir.File("h.safetensors"), new (string Name, DType DType, long[] Shape, float[] Data)[]
        {
            ("h", DType.BF16, [2], [1.00390625f, -3f]),
        });

        using var f = SafetensorsFile.Open(path);
        Assert.AreEqual(DType.F32, f.Get("logits").DType);
        CollectionAssert.AreEqual(new[] { 1f, -0.5f, 3.25f, 1e-3f }, f.GetSpan<float>(f.Get("logits")).ToArray());
        using var h = SafetensorsFile.Open(dir.File("h.safetensors"));
        // 1 + 2^-8 is the tie between 1 and 1 + 2^-7: round to even gives 1 (0x3F80); -3 is 0xC040.
        CollectionAssert.AreEqual(new ushort[] { 0x3F80, 0xC040 }, h.GetSpan<ushort>(h.Get("h")).ToArray());
    }
}
