using System.Numerics.Tensors;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace DeepSeekCuda.Backends.Cpu;

/// <summary>Hand-vectorized inner loops where TensorPrimitives has no fused form.</summary>
internal static class Kernels
{
    /// <summary>
    /// result[r] = x · w[r·n .. (r+1)·n) for r &lt; 4, with n = x.Length: four dot products sharing the loads
    /// of x. fp32 accumulation in vector lanes, then a horizontal sum.
    /// </summary>
    public static void Dot4(ReadOnlySpan<float> x, ReadOnlySpan<float> w, Span<float> result)
    {
        var n = x.Length;
        if (w.Length < 4 * n || result.Length < 4)
        {
            throw new ArgumentException("Dot4 needs four weight rows and four results");
        }

        // Without hardware FMA, Vector256.FusedMultiplyAdd is emulated per element; TensorPrimitives is faster then.
        if (!Vector256.IsHardwareAccelerated || !Fma.IsSupported || n < Vector256<float>.Count)
        {
            for (var r = 0; r < 4; r++)
            {
                result[r] = TensorPrimitives.Dot(x, w.Slice(r * n, n));
            }

            return;
        }

        ref var xr = ref MemoryMarshal.GetReference(x);
        ref var w0 = ref MemoryMarshal.GetReference(w);
        ref var w1 = ref Unsafe.Add(ref w0, n);
        ref var w2 = ref Unsafe.Add(ref w0, 2 * n);
        ref var w3 = ref Unsafe.Add(ref w0, 3 * n);
        Vector256<float> a0 = default, a1 = default, a2 = default, a3 = default;
        var i = 0;
        for (; i <= n - Vector256<float>.Count; i += Vector256<float>.Count)
        {
            var xv = Vector256.LoadUnsafe(ref xr, (nuint)i);
            a0 = Vector256.FusedMultiplyAdd(xv, Vector256.LoadUnsafe(ref w0, (nuint)i), a0);
            a1 = Vector256.FusedMultiplyAdd(xv, Vector256.LoadUnsafe(ref w1, (nuint)i), a1);
            a2 = Vector256.FusedMultiplyAdd(xv, Vector256.LoadUnsafe(ref w2, (nuint)i), a2);
            a3 = Vector256.FusedMultiplyAdd(xv, Vector256.LoadUnsafe(ref w3, (nuint)i), a3);
        }

        float s0 = Vector256.Sum(a0), s1 = Vector256.Sum(a1), s2 = Vector256.Sum(a2), s3 = Vector256.Sum(a3);
        for (; i < n; i++)
        {
            var xi = Unsafe.Add(ref xr, i);
            s0 += xi * Unsafe.Add(ref w0, i);
            s1 += xi * Unsafe.Add(ref w1, i);
            s2 += xi * Unsafe.Add(ref w2, i);
            s3 += xi * Unsafe.Add(ref w3, i);
        }

        result[0] = s0;
        result[1] = s1;
        result[2] = s2;
        result[3] = s3;
    }
}
