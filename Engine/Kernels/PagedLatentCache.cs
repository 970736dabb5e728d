namespace DeepSeekCuda.Kernels;

/// <summary>
/// The widths of one cached token row: <see cref="Latent"/> normalized latent values (kv_lora_rank) followed by
/// <see cref="Rope"/> rotated shared-key values (qk_rope_head_dim).
/// </summary>
internal readonly record struct LatentShape(int Latent, int Rope)
{
    /// <summary>DeepSeek-V3/R1: 512 + 64 = 576.</summary>
    public static LatentShape V3 => new(512, 64);

    /// <summary>The tiny-a fixture: 128 + 64.</summary>
    public static LatentShape TinyA => new(128, 64);

    /// <summary>The Tiny synthetic preset: 80 + 16.</summary>
    public static LatentShape TinyPreset => new(80, 16);

    /// <summary>The shapes whose kernels <c>AllInstances()</c> lists (any valid shape compiles on demand).</summary>
    public static IReadOnlyList<LatentShape> Known => [V3, TinyA, TinyPreset];

    /// <summary>Elements per cached token: latent + rope.</summary>
    public int RowWidth => Latent + Rope;

    /// <summary>The shape of a model's cache.</summary>
    public static LatentShape Of(Loader.ModelConfig config) => new(config.KvLoraRank, config.QkRopeHeadDim);

    /// <summary>
    /// Throws unless the kernels can take the shape: both widths multiples of 16 (the decode kernel's
    /// tensor-core k-steps run over whole 16-element slices of a row, and rows move in 16-byte pieces).
    /// </summary>
    public LatentShape Validate()
    {
        if (Latent <= 0 || Rope <= 0 || Latent % 16 != 0 || Rope % 16 != 0 || Latent > 1024 || Rope > 256)
        {
            throw new ArgumentException($"unsupported latent cache row {Latent} + {Rope}: both must be positive multiples of 16 (latent <= 1024, rope <= 256)");
        }

        return this;
    }
}

/// <summary>
/// The paged latent KV cache layout shared by cache append, MLA decode and MLA prefill (fixed):
/// one BF16 array per layer <c>[numBlocks, 64, latent + rope]</c>; per token row the
/// kv_a_layernorm-normalized latent, then the YaRN-rotated k_pe (interleaved pairs, as
/// <c>CpuBackend.AppendLatent</c>). A block table int32 <c>[requests, maxBlocksPerRequest]</c> maps request r's
/// position p to physical block <c>blockTable[r·maxBlocks + p/64]</c>, row <c>p % 64</c>; per-request lengths are
/// int32 <c>[requests]</c>. The functions here are the host-side statement of that layout.
/// </summary>
internal static class PagedLatentCache
{
    /// <summary>Tokens per block.</summary>
    public const int BlockSize = 64;

    /// <summary>DeepSeek-V3's row width in elements (512 + 64).</summary>
    public const int V3RowWidth = 576;

    /// <summary>Bytes of one layer's cache of <paramref name="numBlocks"/> blocks.</summary>
    public static long Bytes(int numBlocks, LatentShape shape) => (long)numBlocks * BlockSize * shape.RowWidth * 2;

    /// <summary>Blocks a request of <paramref name="length"/> tokens occupies.</summary>
    public static int BlocksFor(int length) => (length + BlockSize - 1) / BlockSize;

    /// <summary>The flat row (slot) index of request <paramref name="request"/>'s token at <paramref name="position"/>.</summary>
    public static long Slot(ReadOnlySpan<int> blockTable, int maxBlocksPerRequest, int request, int position)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(position);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(position, maxBlocksPerRequest * BlockSize);
        var block = blockTable[request * maxBlocksPerRequest + position / BlockSize];
        ArgumentOutOfRangeException.ThrowIfNegative(block);
        return (long)block * BlockSize + position % BlockSize;
    }

    /// <summary>Element offset of that token's row in the layer's cache array.</summary>
    public static long RowOffset(ReadOnlySpan<int> blockTable, int maxBlocksPerRequest, int request, int position, int rowWidth) =>
        Slot(blockTable, maxBlocksPerRequest, request, position) * rowWidth;

    /// <summary>
    /// Copies request <paramref name="request"/>'s first <paramref name="length"/> rows out of a host copy of the paged
    /// cache (BF16 bits) into the contiguous form <c>[length, latent + rope]</c> (float), the bridge to the CPU
    /// reference's contiguous <c>LatentCache</c>.
    /// </summary>
    public static void Gather(ReadOnlySpan<ushort> paged, ReadOnlySpan<int> blockTable, int maxBlocksPerRequest, int request, int length,
        LatentShape shape, Span<float> destination)
    {
        var w = shape.RowWidth;
        if (destination.Length < (long)length * w)
        {
            throw new ArgumentException($"destination holds {destination.Length} values, {length} rows of {w} need more", nameof(destination));
        }

        for (var p = 0; p < length; p++)
        {
            var src = paged.Slice(checked((int)RowOffset(blockTable, maxBlocksPerRequest, request, p, w)), w);
            Loader.Numerics.BFloat16.Decode(src, destination.Slice(p * w, w));
        }
    }

    /// <summary>The inverse of <see cref="Gather"/>: writes contiguous rows (rounded to BF16) into the paged host copy.</summary>
    public static void Scatter(ReadOnlySpan<float> rows, ReadOnlySpan<int> blockTable, int maxBlocksPerRequest, int request, int length,
        LatentShape shape, Span<ushort> paged)
    {
        var w = shape.RowWidth;
        for (var p = 0; p < length; p++)
        {
            var dst = paged.Slice(checked((int)RowOffset(blockTable, maxBlocksPerRequest, request, p, w)), w);
            for (var i = 0; i < w; i++)
            {
                dst[i] = Loader.Numerics.BFloat16.FromFloat(rows[p * w + i]);
            }
        }
    }
}
