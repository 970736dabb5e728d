using DeepSeekCuda.Text;

namespace DeepSeekCuda.Tests.Text;

[TestClass]
public sealed class CodePointRegexTests
{
    private static string FirstMatch(string pattern, string input) =>
        CodePointRegex.Compile(CodePointRegex.Translate(pattern, astral: true), RegexSplitStep.DefaultMatchTimeout).Match(input).Value;

    [TestMethod]
    public void CategoriesMatchAstralCodePoints()
    {
        // U+1D400..U+1D402 are mathematical bold capitals (Lu); U+1D7CF.. are mathematical bold digits (Nd).
        Assert.AreEqual("\U0001D400\U0001D401\U0001D402", FirstMatch(@"\p{L}+", "\U0001D400\U0001D401\U0001D402!"));
        Assert.AreEqual("\U0001D7CF\U0001D7D0\U0001D7D1", FirstMatch(@"\p{N}{1,3}", "\U0001D7CF\U0001D7D0\U0001D7D1\U0001D7D2"));
        Assert.AreEqual("\U0001F600", FirstMatch(@"\p{S}", "a\U0001F600"));
    }

    [TestMethod]
    public void NegatedClassesAndDotTakeWholePairs()
    {
        Assert.AreEqual("a", FirstMatch(@"[^\p{S}]+", "a\U0001F600b"));
        Assert.AreEqual("\U0001F600", FirstMatch(@"\S", "\U0001F600"));
        Assert.AreEqual("\U0001F600x", FirstMatch(@"..", "\U0001F600x"));
        Assert.AreEqual("\U0001F600", FirstMatch(@"\P{L}", "\U0001F600"));
        Assert.AreEqual("", FirstMatch(@"[^\r\n\p{L}\p{P}\p{S}]", "\U0001F600"));
    }
}
