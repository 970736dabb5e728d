namespace DeepSeekCuda.Text;

/// <summary>
/// A tokenizer as the generation layer sees it: text to ids and ids back to bytes. Byte-level
/// tokenizers can split a UTF-8 character across tokens, so decoding goes through
/// <see cref="GetTokenBytes"/> and a streaming UTF-8 decoder rather than per-token strings.
/// </summary>
public interface ITokenizer
{
    /// <summary>One more than the largest id the tokenizer can produce.</summary>
    int VocabSize { get; }

    /// <summary>Beginning-of-sentence id, if the tokenizer has one.</summary>
    int? BosId { get; }

    /// <summary>End-of-sentence id, if the tokenizer has one.</summary>
    int? EosId { get; }

    /// <summary>Whether prompts get <see cref="BosId"/> prepended (tokenizer_config.json's <c>add_bos_token</c>).</summary>
    bool AddBosToken { get; }

    /// <summary>
    /// Encodes text. Added tokens (special or not) written in the text are recognized as such, so use
    /// this only for text whose author may write control tokens (a raw prompt); see <see cref="EncodeLiteral"/>.
    /// </summary>
    /// <param name="text">The text.</param>
    /// <param name="addBos">Prepend <see cref="BosId"/>.</param>
    int[] Encode(string text, bool addBos);

    /// <summary>
    /// Encodes text as ordinary text: no added token is recognized, so text that spells one (a chat
    /// marker such as <c>&lt;｜Assistant｜&gt;</c>) becomes its ordinary pieces and cannot fake a turn. For
    /// content inside a chat prompt (Hugging Face's <c>split_special_tokens</c>, here for every added token).
    /// </summary>
    /// <remarks>The ids' bytes (<see cref="GetTokenBytes"/>) are never fewer than the text's UTF-8 bytes.</remarks>
    int[] EncodeLiteral(string text);

    /// <summary>The id of the added token whose content is exactly <paramref name="content"/>, or null (also for a plain vocabulary entry).</summary>
    int? AddedTokenId(string content);

    /// <summary>The UTF-8 bytes token <paramref name="id"/> stands for (an added token: its content).</summary>
    ReadOnlySpan<byte> GetTokenBytes(int id);

    /// <summary>Whether <paramref name="id"/> is a special added token (BOS, EOS, chat markers).</summary>
    bool IsSpecial(int id);

    /// <summary>The id of a token given by its exact vocabulary or added-token string, or null.</summary>
    int? TokenToId(string token);

    /// <summary>Decodes ids to text; invalid UTF-8 becomes U+FFFD.</summary>
    string Decode(ReadOnlySpan<int> ids);
}
