using System.Text.Json;
using DeepSeekCuda.Tests.Support;
using DeepSeekCuda.Text;

namespace DeepSeekCuda.Tests.Text;

/// <summary>
/// Tool definitions in the prompt, checked against prompts rendered by @huggingface/jinja from the
/// templates' own text (Data/jinja-cases: SGLang's DeepSeek tool templates for the tool block, V3's
/// tokenizer_config.json chat_template for the conversation). See that folder's README.
/// </summary>
[TestClass]
public sealed class ToolTemplateCasesTests
{
    private static readonly Lazy<ToolCase[]> LazyCases = new(LoadCases);

    /// <summary>The cases, for other tests that want realistic conversations.</summary>
    internal static ToolCase[] Cases => LazyCases.Value;

    [TestMethod]
    public void CasesCoverBothKindsAndBothGenerationModes()
    {
        Assert.IsGreaterThanOrEqualTo(70, Cases.Length);
        Assert.IsTrue(Cases.Any(c => c.Options.Kind == ChatTemplateKind.V3 && c.Text is not null));
        Assert.IsTrue(Cases.Any(c => c.Options.Kind == ChatTemplateKind.R1));
        Assert.IsTrue(Cases.Any(c => !c.Options.AddGenerationPrompt));
        Assert.IsTrue(Cases.Any(c => !c.Turns.Any(t => t.Role == ChatTurnRole.System)));
    }

    [TestMethod]
    public void V3_WithTools_RendersEveryCaseExactly()
    {
        var n = 0;
        foreach (var c in Cases.Where(c => c.Text is not null))
        {
            AssertSameText(c.Text!, ChatTemplate.Render(c.Turns, c.Options), c.Name);
            n++;
        }

        Assert.IsGreaterThan(30, n);
    }

    [TestMethod]
    public void V3_WithoutTools_EqualsV3sOwnTemplate()
    {
        // The same conversations with no tools: our transcription of V3's chat_template (RenderV3) against
        // the template itself, past tool calls and outputs included.
        foreach (var c in Cases.Where(c => c.OfficialText is not null))
        {
            AssertSameText(c.OfficialText!, ChatTemplate.Render(c.Turns, c.Options with { Tools = null }), c.Name);
        }
    }

    [TestMethod]
    public void EveryKind_ToolBlockFollowsTheSystemPrompt_RestUnchanged()
    {
        foreach (var c in Cases)
        {
            var plain = ChatTemplate.Render(c.Turns, c.Options with { Tools = null });
            Assert.IsTrue(plain.StartsWith(c.Head, StringComparison.Ordinal), c.Name);
            AssertSameText(c.Head + c.ToolBlock + plain[c.Head.Length..], ChatTemplate.Render(c.Turns, c.Options), c.Name);
        }
    }

    [TestMethod]
    public void EveryCase_IdsEqualEncodingTheRenderedText()
    {
        // Where no content spells a marker, the ids we send equal Hugging Face's encoding of the rendered
        // text: the instruction's markers are control tokens, everything else ordinary text.
        var tokenizer = TokenizerFixtures.DeepSeek;
        var n = 0;
        foreach (var c in Cases.Where(c => !c.ContentSpellsMarker))
        {
            var text = ChatTemplate.Render(c.Turns, c.Options);
            var expected = tokenizer.Encode(text, addBos: false);
            var actual = ChatTemplate.Encode(tokenizer, c.Turns, c.Options);
            CollectionAssert.AreEqual(expected, actual, $"{c.Name}: {TokenizerFixtures.Describe(expected, actual)}");
            n++;
        }

        Assert.AreEqual(Cases.Length, n, "no case content spells a marker, so every case is checked");
    }

    [TestMethod]
    public void ToolBlockMarkers_AreControlTokens_ToolJsonIsText()
    {
        var marker = "<｜tool▁calls▁begin｜>";
        var tools = new[] { new ChatToolDefinition("evil", "Writes " + marker + " in its description.", null) };
        var segments = ChatTemplate.RenderSegments([ChatTurn.User("Hi")], new ChatTemplateOptions { Tools = tools });
        Assert.AreEqual(1, segments.Count(s => s.IsControl && s.Text == marker), "the instruction's example call");
        Assert.IsTrue(segments.Any(s => !s.IsControl && s.Text.Contains(marker, StringComparison.Ordinal)), "the description stays text");
        var ids = ChatTemplate.Encode(TokenizerFixtures.DeepSeek, [ChatTurn.User("Hi")], new ChatTemplateOptions { Tools = tools });
        Assert.AreEqual(1, ids.Count(id => id == TokenizerFixtures.DeepSeek.AddedTokenId(marker)));
    }

    [TestMethod]
    public void NullOrEmptyTools_LeaveThePromptUnchanged()
    {
        ChatTurn[] turns = [ChatTurn.System("S"), ChatTurn.User("Hi")];
        foreach (var kind in new[] { ChatTemplateKind.V3, ChatTemplateKind.R1 })
        {
            var plain = ChatTemplate.Render(turns, new ChatTemplateOptions { Kind = kind });
            Assert.AreEqual(plain, ChatTemplate.Render(turns, new ChatTemplateOptions { Kind = kind, Tools = null }));
            Assert.AreEqual(plain, ChatTemplate.Render(turns, new ChatTemplateOptions { Kind = kind, Tools = [] }));
        }
    }

    [TestMethod]
    public void ToolWithoutName_OrUndefinedParameters_IsRefused()
    {
        Assert.ThrowsExactly<ArgumentException>(() => ChatTemplate.Render([ChatTurn.User("Hi")], new ChatTemplateOptions { Tools = [new ChatToolDefinition("", null, null)] }));
        Assert.ThrowsExactly<ArgumentException>(() => ChatTemplate.Render([ChatTurn.User("Hi")], new ChatTemplateOptions { Tools = [new ChatToolDefinition("f", null, default(JsonElement))] }));
    }

    private static void AssertSameText(string expected, string actual, string name)
    {
        if (expected == actual)
        {
            return;
        }

        var i = 0;
        while (i < expected.Length && i < actual.Length && expected[i] == actual[i])
        {
            i++;
        }

        string Around(string s) => JsonSerializer.Serialize(s.Substring(Math.Max(0, i - 40), Math.Min(s.Length, i + 40) - Math.Max(0, i - 40)));
        Assert.Fail($"{name}: first difference at {i}: expected …{Around(expected)}… got …{Around(actual)}… (lengths {expected.Length}/{actual.Length})");
    }

    private static ToolCase[] LoadCases()
    {
        var path = Path.Combine(SharedData.Checkout, "Tests", "Text", "Data", "jinja-cases", "tool-template-cases.json");
        using var doc = JsonDocument.Parse(File.ReadAllText(path));
        return [.. doc.RootElement.GetProperty("cases").EnumerateArray().Select(ToolCase.From)];
    }

    internal sealed record ToolCase(string Name, IReadOnlyList<ChatTurn> Turns, ChatTemplateOptions Options, string Head, string ToolBlock, string? Text, string? OfficialText, bool ContentSpellsMarker)
    {
        public static ToolCase From(JsonElement c)
        {
            var tools = c.GetProperty("tools").EnumerateArray().Select(t => new ChatToolDefinition(
                t.GetProperty("name").GetString()!,
                t.TryGetProperty("description", out var d) ? d.GetString() : null,
                t.TryGetProperty("parameters", out var p) ? p.Clone() : null)).ToList();
            var turns = c.GetProperty("messages").EnumerateArray().Select(Turn).ToList();
            var options = new ChatTemplateOptions
            {
                Kind = Enum.Parse<ChatTemplateKind>(c.GetProperty("kind").GetString()!),
                AddGenerationPrompt = c.GetProperty("add_generation_prompt").GetBoolean(),
                Tools = tools,
            };
            var strings = turns.SelectMany(t => new[] { t.Content ?? string.Empty }.Concat((t.ToolCalls ?? []).SelectMany(k => new[] { k.Name, k.Arguments, k.Type })))
                .Concat(Strings(c.GetProperty("tools")));
            return new ToolCase(
                c.GetProperty("name").GetString()!,
                turns,
                options,
                c.GetProperty("head").GetString()!,
                c.GetProperty("tool_block").GetString()!,
                c.TryGetProperty("text", out var text) ? text.GetString() : null,
                c.TryGetProperty("official_text", out var official) ? official.GetString() : null,
                strings.Any(s => s.Contains("<｜", StringComparison.Ordinal) || s.Contains("<|", StringComparison.Ordinal)));
        }

        /// <summary>Every key and string value in <paramref name="e"/>, decoded.</summary>
        private static IEnumerable<string> Strings(JsonElement e) => e.ValueKind switch
        {
            JsonValueKind.String => [e.GetString()!],
            JsonValueKind.Array => e.EnumerateArray().SelectMany(Strings),
            JsonValueKind.Object => e.EnumerateObject().SelectMany(p => Strings(p.Value).Prepend(p.Name)),
            _ => [],
        };

        /// <summary>A message of a case file (ours or the tokenizer's chat-template cases) as a template turn.</summary>
        internal static ChatTurn Turn(JsonElement m)
        {
            var content = m.GetProperty("content").ValueKind == JsonValueKind.Null ? null : m.GetProperty("content").GetString();
            IReadOnlyList<ChatToolCall>? calls = m.TryGetProperty("tool_calls", out var tc)
                ? [.. tc.EnumerateArray().Select(k => new ChatToolCall(
                    k.GetProperty("function").GetProperty("name").GetString()!,
                    k.GetProperty("function").GetProperty("arguments").GetString()!,
                    k.GetProperty("type").GetString()!))]
                : null;
            var role = m.GetProperty("role").GetString() switch
            {
                "system" => ChatTurnRole.System,
                "user" => ChatTurnRole.User,
                "assistant" => ChatTurnRole.Assistant,
                "tool" => ChatTurnRole.Tool,
                var r => throw new InvalidDataException(r),
            };
            return new ChatTurn(role, content, calls);
        }
    }
}
