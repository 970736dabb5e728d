using System.Diagnostics;
using System.Text;

namespace DeepSeekCuda.Tests.Text;

/// <summary>
/// Issue 19, class 5: a run of one repeated character is one long pre-token, and encoding it must cost
/// about what normal text of the same size costs (it once cost 30-100x more per byte, through hash
/// collisions of every "x x" merge in the merge table).
/// </summary>
[TestClass]
public sealed class RepeatedCharacterTests
{
    private const int Size = 256 * 1024;

    // DeepSeek-V3's merges join equal pieces in powers of two up to a largest run (128 spaces, 8 letters,
    // 16 newlines), so a run whose length is a multiple of 1024 is the encoding of 1024 repeated.
    private const int Block = 1024;

    /// <summary>Wall time of the fastest of a few encodings, so a busy machine inflates the ratio less.</summary>
    private static double FastestSeconds(string text)
    {
        var best = double.MaxValue;
        for (var i = 0; i < 3; i++)
        {
            var clock = Stopwatch.StartNew();
            TokenizerFixtures.DeepSeek.Encode(text, addBos: false);
            best = Math.Min(best, clock.Elapsed.TotalSeconds);
        }

        return best;
    }

    private static string NormalText()
    {
        var sb = new StringBuilder(Size + 4096);
        while (sb.Length < Size)
        {
            foreach (var c in TokenizerFixtures.Cases)
            {
                sb.Append(c.Text).Append('\n');
            }
        }

        return sb.ToString(0, Size);
    }

    [TestMethod]
    [DataRow(' ')]
    [DataRow('a')]
    [DataRow('\n')]
    [DataRow('!')]
    public void ARunEncodesAsRepeatedBlocksAtTheSpeedOfNormalText(char c)
    {
        var tokenizer = TokenizerFixtures.DeepSeek;
        var run = new string(c, Size);

        // The independent check: the simple quadratic merge loop on one block, repeated.
        var block = tokenizer.BpeWith(new string(c, Block), heap: false);
        var expected = Enumerable.Repeat(block, Size / Block).SelectMany(b => b).ToArray();
        var ids = tokenizer.Encode(run, addBos: false);
        CollectionAssert.AreEqual(expected, ids, TokenizerFixtures.Describe(expected, ids));

        var normal = NormalText();
        tokenizer.Encode(normal, addBos: false); // warm-up: JIT and the piece cache, as in steady use
        var normalSeconds = FastestSeconds(normal);
        var runSeconds = FastestSeconds(run);
        var ratio = runSeconds / normalSeconds;
        Console.WriteLine($"{Size} x U+{(int)c:X4}: {runSeconds * 1000:F1} ms; normal text: {normalSeconds * 1000:F1} ms; ratio {ratio:F2}");
        Assert.IsLessThan(5.0, ratio, $"a run of U+{(int)c:X4} encodes {ratio:F1}x slower than normal text of the same size");
    }
}
