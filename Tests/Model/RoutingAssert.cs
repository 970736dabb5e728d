using System.Globalization;

namespace DeepSeekCuda.Tests.Model;

/// <summary>Routing comparisons: expert sets exact per token, weights matched by expert id.</summary>
internal static class RoutingAssert
{
    public static void SameExpertsAndWeights(ReadOnlySpan<int> indices, ReadOnlySpan<float> weights, ReadOnlySpan<long> refIndices,
        ReadOnlySpan<float> refWeights, int k, double atol, string what)
    {
        Assert.AreEqual(refIndices.Length, indices.Length, $"{what}: topk_idx length");
        var tokens = indices.Length / k;
        for (var t = 0; t < tokens; t++)
        {
            var expected = new Dictionary<long, float>();
            for (var j = 0; j < k; j++)
            {
                expected[refIndices[t * k + j]] = refWeights[t * k + j];
            }

            for (var j = 0; j < k; j++)
            {
                var e = indices[t * k + j];
                if (!expected.TryGetValue(e, out var w))
                {
                    Assert.Fail(string.Create(CultureInfo.InvariantCulture,
                        $"{what}: token {t} chose expert {e}; the reference chose {{{string.Join(", ", expected.Keys)}}}"));
                }

                if (Math.Abs(weights[t * k + j] - w) > atol)
                {
                    Assert.Fail(string.Create(CultureInfo.InvariantCulture,
                        $"{what}: token {t} expert {e} weight {weights[t * k + j]:g9} vs reference {w:g9} (atol {atol:g3})"));
                }
            }
        }
    }
}
