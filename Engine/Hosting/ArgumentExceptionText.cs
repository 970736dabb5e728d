namespace DeepSeekCuda.Hosting;

/// <summary>The part of an <see cref="ArgumentException"/>'s message a user should read.</summary>
internal static class ArgumentExceptionText
{
    /// <summary>
    /// The first line of the message without .NET's <c>" (Parameter 'x')"</c> tail (and without the
    /// <c>"Actual value was ..."</c> line of <see cref="ArgumentOutOfRangeException"/>): for one-line errors that name the
    /// option, flag or field themselves.
    /// </summary>
    public static string Reason(this ArgumentException e)
    {
        var line = e.Message.Split('\n')[0];
        var cut = line.IndexOf(" (Parameter '", StringComparison.Ordinal);
        return cut >= 0 ? line[..cut] : line;
    }
}
