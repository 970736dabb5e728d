namespace DeepSeekCuda.Loader;

/// <summary>
/// Base of every error about a checkpoint: its files, config or tensors. Messages name the file and,
/// where one is involved, the tensor or field.
/// </summary>
public class CheckpointException : Exception
{
    /// <summary>Creates the exception.</summary>
    public CheckpointException(string message, string? filePath = null, string? tensorName = null, Exception? inner = null)
        : base(message, inner)
    {
        FilePath = filePath;
        TensorName = tensorName;
    }

    /// <summary>The file at fault, if any.</summary>
    public string? FilePath { get; }

    /// <summary>The tensor at fault, if any.</summary>
    public string? TensorName { get; }
}

/// <summary>A safetensors file that breaks the format: header, JSON, dtype, shape or offsets.</summary>
public sealed class SafetensorsFormatException : CheckpointException
{
    /// <summary>Creates the exception; the message is prefixed with the file and tensor.</summary>
    public SafetensorsFormatException(string filePath, string? tensorName, string problem, Exception? inner = null)
        : base(Format(filePath, tensorName, problem), filePath, tensorName, inner)
    {
        Problem = problem;
    }

    /// <summary>What is wrong, without the file and tensor prefix.</summary>
    public string Problem { get; }

    private static string Format(string filePath, string? tensorName, string problem) =>
        tensorName is null ? $"{filePath}: {problem}" : $"{filePath}: tensor '{tensorName}': {problem}";
}

/// <summary>An invalid or unsupported value in config.json.</summary>
public sealed class ModelConfigException : CheckpointException
{
    /// <summary>Creates the exception for <paramref name="field"/>.</summary>
    public ModelConfigException(string? filePath, string field, string problem, Exception? inner = null)
        : base($"{filePath ?? "config.json"}: field '{field}': {problem}", filePath, null, inner)
    {
        Field = field;
    }

    /// <summary>The config field at fault (JSON name, dotted for nested fields).</summary>
    public string Field { get; }
}

/// <summary>
/// The checkpoint's tensors disagree with its config or its index: every missing, extra, mis-typed or
/// mis-shaped tensor, all listed at once.
/// </summary>
public sealed class CheckpointMismatchException : CheckpointException
{
    /// <summary>Creates the exception from the full list of problems.</summary>
    public CheckpointMismatchException(string directory, IReadOnlyList<string> problems)
        : base(Format(directory, problems), directory)
    {
        Problems = problems;
    }

    /// <summary>One line per problem, each naming the tensor.</summary>
    public IReadOnlyList<string> Problems { get; }

    private static string Format(string directory, IReadOnlyList<string> problems)
    {
        const int shown = 50;
        var head = $"{directory}: checkpoint does not match its config ({problems.Count} problem{(problems.Count == 1 ? "" : "s")}):";
        var lines = problems.Take(shown).Select(p => "  " + p);
        var tail = problems.Count > shown ? [$"  ... and {problems.Count - shown} more"] : Array.Empty<string>();
        return string.Join(Environment.NewLine, [head, .. lines, .. tail]);
    }
}

/// <summary>A weight tensor holds a NaN or infinity: the checkpoint is corrupt, and would give NaN logits.</summary>
public sealed class NonFiniteWeightException : CheckpointException
{
    /// <summary>Creates the exception for element <paramref name="index"/> of <paramref name="tensor"/>.</summary>
    public NonFiniteWeightException(TensorInfo tensor, long index)
        : base($"{tensor.FilePath}: tensor '{tensor.Name}' ({tensor.DType} {tensor.ShapeText}): element {index} is NaN or infinite; the checkpoint is corrupt",
            tensor.FilePath, tensor.Name)
    {
        ElementIndex = index;
    }

    /// <summary>The first non-finite element (flat index).</summary>
    public long ElementIndex { get; }
}
