using System.Text.Json;
using System.Text.Json.Nodes;
using DeepSeekCuda.Text;

namespace DeepSeekCuda.Tests.Text;

/// <summary>
/// Builds small tokenizer.json documents by hand: every byte is a token whose id is the byte value,
/// so expected ids can be worked out on paper.
/// </summary>
internal static class TinyTokenizer
{
    public static JsonObject Document(
        IEnumerable<(string Left, string Right)> merges,
        bool arrayMerges,
        JsonNode? preTokenizer = null,
        JsonArray? addedTokens = null)
    {
        var vocab = new JsonObject();
        for (var b = 0; b < 256; b++)
        {
            vocab[ByteLevel.ByteToChar[b].ToString()] = b;
        }

        var mergeArray = new JsonArray();
        var next = 256;
        foreach (var (l, r) in merges)
        {
            if (!vocab.ContainsKey(l + r))
            {
                vocab[l + r] = next++;
            }

            mergeArray.Add(arrayMerges ? new JsonArray(l, r) : JsonValue.Create(l + " " + r));
        }

        return new JsonObject
        {
            ["version"] = "1.0",
            ["added_tokens"] = addedTokens ?? [],
            ["normalizer"] = null,
            ["pre_tokenizer"] = preTokenizer ?? new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["use_regex"] = true },
            ["model"] = new JsonObject { ["type"] = "BPE", ["vocab"] = vocab, ["merges"] = mergeArray },
        };
    }

    public static BpeTokenizer Build(JsonObject doc, string? config = null) => BpeTokenizer.FromJson(doc.ToJsonString(), config);

    public static JsonObject Added(int id, string content, bool special = true, bool lstrip = false, bool rstrip = false, bool singleWord = false) => new()
    {
        ["id"] = id,
        ["content"] = content,
        ["single_word"] = singleWord,
        ["lstrip"] = lstrip,
        ["rstrip"] = rstrip,
        ["normalized"] = false,
        ["special"] = special,
    };

    public static JsonObject SplitThenByteLevel(string regex) => new()
    {
        ["type"] = "Sequence",
        ["pretokenizers"] = new JsonArray(
            new JsonObject { ["type"] = "Split", ["pattern"] = new JsonObject { ["Regex"] = regex }, ["behavior"] = "Isolated", ["invert"] = false },
            new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["use_regex"] = false }),
    };

    public static string Serialize(JsonNode node) => node.ToJsonString(new JsonSerializerOptions { WriteIndented = false });
}
