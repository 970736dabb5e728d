namespace DeepSeekCuda.Backends;

/// <summary>The argument checks every backend applies before an operation, so that all of them refuse the same inputs with the same messages.</summary>
internal static class ShapeCheck
{
    /// <summary>Throws <see cref="ArgumentException"/> "shape mismatch: <paramref name="what"/>" unless <paramref name="ok"/>.</summary>
    public static void Require(bool ok, string what)
    {
        if (!ok)
        {
            throw new ArgumentException($"shape mismatch: {what}");
        }
    }

    /// <summary>The MLA attention contract of <see cref="IBackend.MlaAttentionNaive"/> and <see cref="IBackend.MlaAttentionAbsorbed"/>.</summary>
    public static void Attention(Tensor q, LatentCache cache, LinearWeight kvB, MlaDims dims, int startPosition, Tensor output)
    {
        Heads(q, kvB, dims, output, cache.LatentDim, cache.RopeDim, "cache");
        if (startPosition < 0 || startPosition + q.Rows > cache.Capacity)
        {
            throw new ArgumentOutOfRangeException(nameof(startPosition), $"positions {startPosition}..{startPosition + q.Rows - 1} exceed the cache capacity {cache.Capacity}");
        }
    }

    /// <summary>The shapes of <see cref="IBackend.MlaAttentionRows"/> (its rows: <see cref="StepRows(Backends.StepRows, int, BlockTable?, RopeTable?)"/>).</summary>
    public static void AttentionRows(Tensor q, LatentPool pool, LinearWeight kvB, MlaDims dims, Tensor output) =>
        Heads(q, kvB, dims, output, pool.LatentDim, pool.RopeDim, "pool");

    private static void Heads(Tensor q, LinearWeight kvB, MlaDims dims, Tensor output, int latentDim, int ropeDim, string cache)
    {
        Require(q.Cols == dims.Heads * dims.QkHead, $"q {q} is not [T, {dims.Heads}·{dims.QkHead}]");
        Require(output.Rows == q.Rows && output.Cols == dims.Heads * dims.V, $"attention output {output} is not [{q.Rows}, {dims.Heads}·{dims.V}]");
        Require(kvB.Out == dims.Heads * dims.KvBHead && kvB.In == dims.KvLora, "kv_b shape");
        Require(latentDim == dims.KvLora && ropeDim == dims.QkRope, $"{cache} widths");
    }

    /// <summary>
    /// The contract of the row operations (<see cref="IBackend.ApplyRopeRows"/>, <see cref="IBackend.AppendLatentRows"/>,
    /// <see cref="IBackend.MlaAttentionRows"/>): <paramref name="count"/> rows uploaded, every uploaded slot a row of
    /// <paramref name="table"/> and every position inside it and inside <paramref name="rope"/> (when given).
    /// </summary>
    public static void StepRows(StepRows rows, int count, BlockTable? table, RopeTable? rope)
    {
        ArgumentNullException.ThrowIfNull(rows);
        if (count > rows.Count)
        {
            throw new ArgumentOutOfRangeException(nameof(rows), count, $"{count} rows, and the step rows' last upload has {rows.Count}");
        }

        if (table is not null)
        {
            if (rows.MaxSlot >= table.Requests)
            {
                throw new ArgumentOutOfRangeException(nameof(rows), rows.MaxSlot, $"slot {rows.MaxSlot} is not a row of the block table (0..{table.Requests - 1})");
            }

            if (rows.MaxPosition >= table.Positions)
            {
                throw new ArgumentOutOfRangeException(nameof(rows), rows.MaxPosition, $"position {rows.MaxPosition} exceeds the cache capacity {table.Positions}");
            }
        }

        if (rope is not null && rows.MaxPosition >= rope.Positions)
        {
            throw new ArgumentOutOfRangeException(nameof(rows), rows.MaxPosition, $"position {rows.MaxPosition} exceeds the rotary table (0..{rope.Positions - 1})");
        }
    }

    /// <summary>The contract of <see cref="IBackend.Embedding"/>: output [ids, width], and every id a row of the table.</summary>
    public static void Embedding(EmbeddingWeight table, ReadOnlySpan<int> ids, Tensor output)
    {
        Require(output.Rows == ids.Length && output.Cols == table.Width, "embedding output shape");
        foreach (var id in ids)
        {
            if ((uint)id >= (uint)table.Rows)
            {
                throw new ArgumentOutOfRangeException(nameof(ids), id, $"token id outside 0..{table.Rows - 1}");
            }
        }
    }

    /// <summary>The contract of <see cref="IBackend.EmbeddingRows"/>: the output's rows uploaded, [rows, width], and every uploaded token a row of the table.</summary>
    public static void EmbeddingRows(EmbeddingWeight table, StepRows rows, Tensor output)
    {
        EmbeddedRows(table, rows, output);
        if (rows.MaxToken >= table.Rows)
        {
            throw new ArgumentOutOfRangeException(nameof(rows), rows.MaxToken, $"token id {rows.MaxToken} is not a row of the embedding table (0..{table.Rows - 1})");
        }
    }

    /// <summary>What both step-row embeddings need: the output's rows uploaded, and the output [rows, width].</summary>
    private static void EmbeddedRows(EmbeddingWeight table, StepRows rows, Tensor output)
    {
        StepRows(rows, output.Rows, null, null);
        Require(output.Cols == table.Width, $"embedding output {output} is not [T, {table.Width}]");
    }

    /// <summary>The contract of <see cref="IBackend.EmbeddingChosenRows"/>: <see cref="EmbeddingRows"/>'s, the tokens rows of <paramref name="chosen"/> whose ids are rows of the table.</summary>
    public static void EmbeddingChosenRows(EmbeddingWeight table, StepRows rows, TokenChoiceBuffer chosen, Tensor output)
    {
        EmbeddedRows(table, rows, output);
        if (rows.MaxToken >= chosen.Rows)
        {
            throw new ArgumentOutOfRangeException(nameof(rows), rows.MaxToken, $"token {rows.MaxToken} names no row of the token choice buffer (0..{chosen.Rows - 1})");
        }

        if (chosen.Vocab > table.Rows)
        {
            throw new ArgumentOutOfRangeException(nameof(chosen), chosen.Vocab, $"the token choice buffer chooses ids below {chosen.Vocab}; the embedding table has {table.Rows} rows");
        }
    }

    /// <summary>The contract of <see cref="TokenChoices.ChooseTokens"/>: <paramref name="rows"/> choices over the first rows of <paramref name="logits"/>, a token slot for each.</summary>
    public static void Choices(Tensor logits, int rows, int tokens)
    {
        Kind(logits, TensorKind.Logits, "the rows tokens are chosen from");
        Require(rows <= logits.Rows, $"{rows} choices for the {logits.Rows} rows of logits {logits}");
        Require(tokens >= rows, $"{tokens} token slots for {rows} rows");
    }

    /// <summary>The contract of <see cref="IBackend.SetTokenChoices"/>.</summary>
    public static void SetChoices(ReadOnlySpan<TokenChoice> choices, TokenChoiceBuffer buffer)
    {
        if (choices.Length > buffer.Rows)
        {
            throw new ArgumentOutOfRangeException(nameof(choices), choices.Length, $"the token choice buffer holds {buffer.Rows} rows");
        }

        for (var r = 0; r < choices.Length; r++)
        {
            var c = choices[r];
            if (c.VocabLimit < 0 || c.VocabLimit > buffer.Vocab || float.IsNaN(c.Temperature) || float.IsNaN(c.TopP))
            {
                throw new ArgumentOutOfRangeException(nameof(choices), c, $"row {r}: the vocabulary limit must be 0..{buffer.Vocab} (the token choice buffer's), temperature and top-p numbers");
            }

            if (c.Allowed is not null && c.OnDevice && c.MaskProblem() is { } problem)
            {
                throw new ArgumentException($"row {r}: {problem}", nameof(choices));
            }
        }
    }

    /// <summary>The contract of <see cref="IBackend.ChooseTokenRows"/>: logits the buffer's rows and vocabulary fit.</summary>
    public static void ChooseRows(Tensor logits, TokenChoiceBuffer buffer)
    {
        Kind(logits, TensorKind.Logits, "the rows tokens are chosen from");
        if (logits.Rows > buffer.Rows)
        {
            throw new ArgumentOutOfRangeException(nameof(logits), logits.Rows, $"{logits.Rows} rows of logits; the token choice buffer holds {buffer.Rows}");
        }

        Require(logits.Cols >= buffer.Vocab, $"logits {logits} are narrower than the token choice buffer's vocabulary limit {buffer.Vocab}");
    }

    /// <summary>The contract of <see cref="IBackend.ReadTokenChoices"/>.</summary>
    public static void ReadChoices(TokenChoiceBuffer buffer, Span<int> tokens)
    {
        if (tokens.Length > buffer.Rows)
        {
            throw new ArgumentOutOfRangeException(nameof(tokens), tokens.Length, $"{tokens.Length} ids asked for; the token choice buffer holds {buffer.Rows}");
        }
    }

    /// <summary>Throws unless <paramref name="tensor"/> is of <paramref name="kind"/> (<paramref name="role"/> says what it is for).</summary>
    public static void Kind(Tensor tensor, TensorKind kind, string role)
    {
        if (tensor.Kind != kind)
        {
            throw new ArgumentException($"{role} must be {Described(kind)}; {tensor} is {Described(tensor.Kind)}");
        }

        static string Described(TensorKind k) => k == TensorKind.Activation ? "an activation" : $"a {k.ToString().ToLowerInvariant()} tensor";
    }

    /// <summary>The contract of <see cref="IBackend.Logits"/>: x [T, In] of an activation, logits [T, Out] of <see cref="TensorKind.Logits"/>.</summary>
    public static void Logits(Tensor x, LinearWeight head, Tensor logits)
    {
        Require(x.Cols == head.In && logits.Cols == head.Out && x.Rows == logits.Rows, $"logits {x} · [{head.Out}, {head.In}]ᵀ → {logits}");
        Kind(logits, TensorKind.Logits, "the output of the head");
    }

    /// <summary>The contract of <see cref="IBackend.CopyRows"/>.</summary>
    public static void CopyRows(Tensor source, int sourceRow, Tensor destination, int destinationRow, int count)
    {
        if (source.Cols != destination.Cols || sourceRow < 0 || destinationRow < 0 || count < 0 || (long)sourceRow + count > source.Rows ||
            (long)destinationRow + count > destination.Rows)
        {
            throw new ArgumentException($"cannot copy {count} rows from {source} at {sourceRow} to {destination} at {destinationRow}");
        }

        Kind(destination, source.Kind, $"a copy of {source}");
    }

    /// <summary>The contract of <see cref="IBackend.View"/>.</summary>
    public static void View(Tensor tensor, int firstRow, int rows)
    {
        if (firstRow < 0 || rows < 0 || (long)firstRow + rows > tensor.Rows)
        {
            throw new ArgumentOutOfRangeException(nameof(rows), $"rows {firstRow}..{firstRow + rows - 1} are not rows of {tensor}");
        }
    }

    /// <summary>
    /// The contract of <see cref="IBackend.GatherRows"/> and <see cref="IBackend.ScatterRows"/>: <paramref name="other"/>.Rows rows of
    /// the last upload, every uploaded slot's <paramref name="ringRows"/> rows inside <paramref name="ring"/>, as wide as <paramref name="other"/>.
    /// </summary>
    public static void Ring(Tensor ring, int ringRows, StepRows rows, Tensor other)
    {
        StepRows(rows, other.Rows, null, null);
        if (ringRows < 1)
        {
            throw new ArgumentOutOfRangeException(nameof(ringRows), ringRows, "a ring holds at least one row per slot");
        }

        if ((long)(rows.MaxSlot + 1) * ringRows > ring.Rows)
        {
            throw new ArgumentOutOfRangeException(nameof(rows), rows.MaxSlot, $"slot {rows.MaxSlot} has no rows in {ring}, {ringRows} rows per slot");
        }

        Require(ring.Cols == other.Cols, $"ring {ring} and rows {other}");
    }

    /// <summary>The contract of <see cref="IBackend.PagedCache"/>.</summary>
    public static void PagedCache(LatentPool pool, BlockTable table, int request)
    {
        ArgumentNullException.ThrowIfNull(pool);
        ArgumentNullException.ThrowIfNull(table);
        if ((uint)request >= (uint)table.Requests)
        {
            throw new ArgumentOutOfRangeException(nameof(request), request, $"the block table has rows 0..{table.Requests - 1}");
        }
    }

    /// <summary>The contract of <see cref="IBackend.CopyLatentCache"/>.</summary>
    public static void CopyLatentCache(LatentCache source, LatentCache destination, int positions)
    {
        ArgumentNullException.ThrowIfNull(source);
        ArgumentNullException.ThrowIfNull(destination);
        if (source.IsView || destination.IsView)
        {
            throw new ArgumentException("a paged view of a shared pool is neither copied nor copied into: both caches must be caches of their own",
                source.IsView ? nameof(source) : nameof(destination));
        }

        Require(source.LatentDim == destination.LatentDim && source.RopeDim == destination.RopeDim,
            $"a cache of widths {source.LatentDim} + {source.RopeDim} copied into one of {destination.LatentDim} + {destination.RopeDim}");
        if (positions < 0 || positions > Math.Min(source.Capacity, destination.Capacity))
        {
            throw new ArgumentOutOfRangeException(nameof(positions), positions,
                $"{positions} positions copied from a cache of {source.Capacity} into one of {destination.Capacity}");
        }
    }

    /// <summary>The routing contract of <see cref="IBackend.MoeGate"/> and <see cref="IBackend.MoeExperts"/>: room for the T tokens, the layer's E and k.</summary>
    public static void Routing(Routing routing, int tokens, int experts, int topK) =>
        Require(routing.Tokens >= tokens && routing.Experts == experts && routing.TopK == topK,
            $"routing [{routing.Tokens} tokens, {routing.Experts} experts, top {routing.TopK}] for {tokens} tokens of {experts} experts, top {topK}");
}
