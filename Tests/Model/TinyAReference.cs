using DeepSeekCuda.Loader;
using DeepSeekCuda.Tests.Support;

namespace DeepSeekCuda.Tests.Model;

/// <summary>The official reference's outputs for tiny-a (reference.safetensors), read once per test class.</summary>
internal sealed class TinyAReference : IDisposable
{
    private readonly SafetensorsFile _file = SafetensorsFile.Open(Path.Combine(SharedData.TinyA, "reference.safetensors"));

    public static readonly string[] Prompts = ["p0", "p1", "p2"];

    public float[] F32(string name) => _file.GetSpan<float>(_file.Get(name)).ToArray();

    public long[] I64(string name) => _file.GetSpan<long>(_file.Get(name)).ToArray();

    public int[] Ids(string prompt) => [.. I64(prompt + ".input_ids").Select(v => (int)v)];

    public int[] Greedy(string prompt) => [.. I64(prompt + ".greedy_ids").Select(v => (int)v)];

    public IReadOnlyList<long> Shape(string name) => _file.Get(name).Shape;

    public void Dispose() => _file.Dispose();

    public static int ArgMax(ReadOnlySpan<float> row)
    {
        var best = 0;
        for (var i = 1; i < row.Length; i++)
        {
            if (row[i] > row[best])
            {
                best = i;
            }
        }

        return best;
    }
}
