namespace DeepSeekCuda.Text;

/// <summary>
/// GPT-2's reversible byte-to-character table (<c>bytes_to_unicode</c>): every byte maps to a
/// printable character so byte-level BPE vocabularies can be stored as JSON strings.
/// </summary>
internal static class ByteLevel
{
    /// <summary>Character standing for each byte.</summary>
    public static readonly char[] ByteToChar = BuildByteToChar();

    /// <summary>Byte each table character stands for, or -1; indexed by char (all table chars are below U+0200).</summary>
    public static readonly short[] CharToByte = BuildCharToByte(ByteToChar);

    private static char[] BuildByteToChar()
    {
        var table = new char[256];
        var assigned = new bool[256];
        for (var b = '!'; b <= '~'; b++) { table[b] = b; assigned[b] = true; }
        for (var b = '\u00A1'; b <= '\u00AC'; b++) { table[b] = b; assigned[b] = true; }
        for (var b = '\u00AE'; b <= '\u00FF'; b++) { table[b] = b; assigned[b] = true; }
        var n = 0;
        for (var b = 0; b < 256; b++)
        {
            if (!assigned[b])
            {
                table[b] = (char)(256 + n);
                n++;
            }
        }

        return table;
    }

    private static short[] BuildCharToByte(char[] byteToChar)
    {
        var table = new short[0x200];
        Array.Fill(table, (short)-1);
        for (var b = 0; b < 256; b++)
        {
            table[byteToChar[b]] = (short)b;
        }

        return table;
    }

    /// <summary>
    /// Decodes a vocabulary string to bytes as Hugging Face's ByteLevel decoder does: when any
    /// character is outside the table, the token's own UTF-8 is used instead.
    /// </summary>
    public static byte[] DecodeToken(string token)
    {
        var bytes = new byte[token.Length];
        for (var i = 0; i < token.Length; i++)
        {
            var c = token[i];
            var b = c < CharToByte.Length ? CharToByte[c] : (short)-1;
            if (b < 0)
            {
                return System.Text.Encoding.UTF8.GetBytes(token);
            }

            bytes[i] = (byte)b;
        }

        return bytes;
    }
}
