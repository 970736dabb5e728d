namespace DeepSeekCuda.Text;

/// <summary>
/// A tokenizer file is malformed or uses a feature this implementation does not support.
/// The message names the file and the offending part, so a user can tell a corrupt download
/// from an unsupported tokenizer family.
/// </summary>
public sealed class TokenizerFormatException : FormatException
{
    /// <summary>Creates the exception.</summary>
    /// <param name="file">The file (or a description of the source) being read.</param>
    /// <param name="problem">What is wrong, e.g. "model.vocab is missing".</param>
    /// <param name="inner">The underlying error, if any.</param>
    public TokenizerFormatException(string file, string problem, Exception? inner = null)
        : base($"{file}: {problem}", inner)
    {
        File = file;
        Problem = problem;
    }

    /// <summary>The file (or source description) that was being read.</summary>
    public string File { get; }

    /// <summary>What is wrong with it.</summary>
    public string Problem { get; }
}
