using System.Reflection;
using System.Runtime.InteropServices;
using System.Text;
using DeepSeekCuda.Cuda;

namespace DeepSeekCuda.Tests.Cuda;

/// <summary>
/// The C# params structs and their CUDA mirrors agree field by field. The CUDA side is checked by
/// compiling static_asserts generated from Marshal.OffsetOf under NVRTC, so no GPU is needed.
/// </summary>
[TestClass]
[TestCategory("Nvrtc")]
public sealed class ParamsLayoutTests
{
    public static IEnumerable<object[]> Structs => NvrtcSupport.ParamStructs.Select(s => new object[] { s.Type.Name });

    private static string Asserts(Type type, string cudaName, int delta = 0)
    {
        var sb = new StringBuilder();
        var fields = type.GetFields(BindingFlags.Public | BindingFlags.Instance);
        foreach (var f in fields)
        {
            var offset = (int)Marshal.OffsetOf(type, f.Name) + delta;
            sb.Append($"DSC_STATIC_ASSERT_OFFSET({cudaName}, {NvrtcSupport.SnakeCase(f.Name)}, {offset});\n");
        }

        sb.Append($"static_assert(sizeof({cudaName}) == {Marshal.SizeOf(type)}, \"{cudaName} size differs from C#\");\n");
        return sb.ToString();
    }

    [TestMethod]
    [DynamicData(nameof(Structs))]
    public void OffsetsAgreeWithCuda(string typeName)
    {
        NvrtcSupport.RequireNvrtc();
        var (type, cudaName, family) = NvrtcSupport.ParamStructs.Single(s => s.Type.Name == typeName);
        Assert.IsTrue(type.IsLayoutSequential, $"{type.Name} must be [StructLayout(Sequential)]");
        var source = $"#include \"{family}.cu\"\n" + Asserts(type, cudaName);
        var compiled = new NvrtcCompiler().CompileSource(family, source, [], new KernelTarget("compute_80"));
        Assert.IsNotEmpty(compiled.Image);
    }

    [TestMethod]
    public void AWrongOffsetFailsToCompile()
    {
        NvrtcSupport.RequireNvrtc();
        var source = "#include \"rmsnorm.cu\"\n" + Asserts(typeof(Kernels.RmsNormParams), "RmsNormParams", delta: 8);
        var e = Assert.ThrowsExactly<KernelCompileException>(() =>
            new NvrtcCompiler().CompileSource("rmsnorm", source, [], new KernelTarget("compute_80")));
        StringAssert.Contains(e.Log, "offset differs from C#");
    }

    [TestMethod]
    public void SnakeCaseMapsFieldNames()
    {
        Assert.AreEqual("x_stride", NvrtcSupport.SnakeCase("XStride"));
        Assert.AreEqual("out_ids", NvrtcSupport.SnakeCase("OutIds"));
        Assert.AreEqual("pad0", NvrtcSupport.SnakeCase("Pad0"));
        Assert.AreEqual("top_k", NvrtcSupport.SnakeCase("TopK"));
    }
}
