using System.Text;
using DeepSeekCuda.Text;

namespace DeepSeekCuda.Tests.Text;

[TestClass]
public sealed class Utf8StreamDecoderTests
{
    private static int ByteToken(byte b) => TokenizerFixtures.DeepSeek.TokenToId(ByteLevel.ByteToChar[b].ToString())!.Value;

    [TestMethod]
    public void StreamsEveryCaseLikeDecode()
    {
        var tokenizer = TokenizerFixtures.DeepSeek;
        foreach (var c in TokenizerFixtures.Cases)
        {
            var decoder = new Utf8StreamDecoder(tokenizer);
            var sb = new StringBuilder();
            foreach (var id in c.Ids)
            {
                var chunk = decoder.Push(id);
                Assert.IsFalse(chunk.Length > 0 && char.IsHighSurrogate(chunk[^1]), "a chunk ended inside a surrogate pair");
                sb.Append(chunk);
                Assert.StartsWith(sb.ToString(), c.Text, StringComparison.Ordinal, "streamed text is not a prefix of the full text");
            }

            sb.Append(decoder.Flush());
            Assert.AreEqual(tokenizer.Decode(c.Ids), sb.ToString());
            Assert.AreEqual(c.Text, sb.ToString());
        }
    }

    [TestMethod]
    public void HoldsBackAFourByteCharacterUntilComplete()
    {
        var decoder = new Utf8StreamDecoder(TokenizerFixtures.DeepSeek);
        var bytes = Encoding.UTF8.GetBytes("\U0001F600");
        Assert.HasCount(4, bytes);
        Assert.AreEqual("a", decoder.Push(ByteToken((byte)'a')));
        Assert.AreEqual("", decoder.Push(ByteToken(bytes[0])));
        Assert.AreEqual("", decoder.Push(ByteToken(bytes[1])));
        Assert.AreEqual("", decoder.Push(ByteToken(bytes[2])));
        Assert.AreEqual("\U0001F600", decoder.Push(ByteToken(bytes[3])));
        Assert.AreEqual("", decoder.Flush());
    }

    [TestMethod]
    public void InvalidBytesBecomeReplacementAsSoonAsKnown()
    {
        var decoder = new Utf8StreamDecoder(TokenizerFixtures.DeepSeek);
        Assert.AreEqual("\uFFFD", decoder.Push(ByteToken(0xFF)));
        Assert.AreEqual("", decoder.Push(ByteToken(0xF0)));
        Assert.AreEqual("\uFFFDA", decoder.Push(ByteToken((byte)'A')));
        Assert.AreEqual("", decoder.Push(ByteToken(0xE4)));
        Assert.AreEqual("\uFFFD", decoder.Flush());
    }

    [TestMethod]
    public void SpecialTokensStreamAsTheirContent()
    {
        var decoder = new Utf8StreamDecoder(TokenizerFixtures.DeepSeek);
        Assert.AreEqual("<｜begin▁of▁sentence｜>", decoder.Push(0));
    }
}
