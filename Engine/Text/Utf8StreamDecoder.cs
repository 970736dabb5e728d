using System.Text;

namespace DeepSeekCuda.Text;

/// <summary>
/// Turns a stream of token ids into text as it arrives. A byte-level token can end in the middle
/// of a UTF-8 character; the incomplete bytes are held back until the character completes, so no
/// partial character is ever emitted. Bytes known to be invalid become U+FFFD immediately.
/// Not thread-safe: one instance per stream.
/// </summary>
public sealed class Utf8StreamDecoder
{
    private readonly ITokenizer _tokenizer;

    // UTF8Encoding's decoder carries an incomplete sequence across calls when flush is false and
    // replaces invalid sequences (maximal subparts) as Encoding.UTF8.GetString does in one go.
    private readonly Decoder _decoder = new UTF8Encoding(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: false).GetDecoder();
    private char[] _chars = new char[64];

    /// <summary>Creates a decoder over <paramref name="tokenizer"/>'s token bytes.</summary>
    public Utf8StreamDecoder(ITokenizer tokenizer)
    {
        ArgumentNullException.ThrowIfNull(tokenizer);
        _tokenizer = tokenizer;
    }

    /// <summary>Adds token <paramref name="id"/>; returns the text it completes (possibly empty).</summary>
    public string Push(int id) => Convert(_tokenizer.GetTokenBytes(id), flush: false);

    /// <summary>Adds raw bytes; returns the text they complete (possibly empty).</summary>
    public string PushBytes(ReadOnlySpan<byte> bytes) => Convert(bytes, flush: false);

    /// <summary>Ends the stream: held-back bytes of an incomplete character become U+FFFD.</summary>
    public string Flush() => Convert([], flush: true);

    private string Convert(ReadOnlySpan<byte> bytes, bool flush)
    {
        var needed = _decoder.GetCharCount(bytes, flush) ;
        if (needed == 0)
        {
            // GetCharCount does not consume state; GetChars must still run to take in the bytes.
            _decoder.GetChars(bytes, Span<char>.Empty, flush);
            return string.Empty;
        }

        if (_chars.Length < needed)
        {
            _chars = new char[Math.Max(needed, _chars.Length * 2)];
        }

        var written = _decoder.GetChars(bytes, _chars, flush);
        return new string(_chars, 0, written);
    }
}
