using System.Text;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using DeepSeekCuda.Text;

namespace DeepSeekCuda.Hosting;

/// <summary>
/// Builds the demo checkpoint's tokenizer.json: a byte-level BPE in Hugging Face's format (the same
/// loader reads it as reads DeepSeek's), with merges learned from a short embedded text and DeepSeek's
/// special tokens, so the demo exercises the real text path end to end.
/// </summary>
internal static class DemoTokenizer
{
    public const string Bos = "<｜begin▁of▁sentence｜>";
    public const string Eos = "<｜end▁of▁sentence｜>";

    // GPT-2's split rule; DeepSeek's own is longer, but any rule the loader supports will do here.
    private const string SplitPattern = @"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

    private const string Corpus =
        "The sky is blue because air scatters short wavelengths of sunlight more than long ones. " +
        "Hello! How can I help you today? Let me think about the question step by step. " +
        "DeepSeek-V3 is a mixture-of-experts language model with multi-head latent attention. " +
        "The answer is that the model reads the prompt, thinks, and then writes its reply. " +
        "Numbers like 1, 2, 3 and 42 appear in text, and so do words in other languages: bonjour, hola, hallo. " +
        "We run the model on the CPU in float32, and on NVIDIA GPUs with hand-written CUDA kernels.";

    /// <summary>Special and added tokens after the byte-level vocabulary: (content, special).</summary>
    private static readonly (string Content, bool Special)[] TrailingAdded =
    [
        ("<｜User｜>", true), ("<｜Assistant｜>", true), ("<think>", false), ("</think>", false),
    ];

    /// <summary>Writes tokenizer.json and tokenizer_config.json into <paramref name="directory"/>; returns the vocabulary size.</summary>
    public static int Write(string directory, int vocabSize)
    {
        var byteChars = ByteLevel.ByteToChar;
        var vocab = new List<string> { Bos, Eos, "<｜▁pad▁｜>" };
        vocab.AddRange(Enumerable.Range(0, 256).Select(b => byteChars[b].ToString()));
        var mergeBudget = vocabSize - vocab.Count - TrailingAdded.Length;
        if (mergeBudget < 0)
        {
            throw new ArgumentOutOfRangeException(nameof(vocabSize), vocabSize, "too small for the byte-level vocabulary");
        }

        var merges = LearnMerges(byteChars, mergeBudget);
        vocab.AddRange(merges.Select(m => m.Left + m.Right));
        var firstTrailing = vocab.Count;
        vocab.AddRange(TrailingAdded.Select(t => t.Content));

        var vocabJson = new JsonObject();
        for (var i = 0; i < vocab.Count; i++)
        {
            vocabJson[vocab[i]] = i;
        }

        var added = new JsonArray();
        void Add(int id, string content, bool special) => added.Add(new JsonObject
        {
            ["id"] = id, ["content"] = content, ["single_word"] = false, ["lstrip"] = false,
            ["rstrip"] = false, ["normalized"] = false, ["special"] = special,
        });
        Add(0, Bos, true);
        Add(1, Eos, true);
        Add(2, "<｜▁pad▁｜>", true);
        for (var i = 0; i < TrailingAdded.Length; i++)
        {
            Add(firstTrailing + i, TrailingAdded[i].Content, TrailingAdded[i].Special);
        }

        var tokenizer = new JsonObject
        {
            ["version"] = "1.0",
            ["added_tokens"] = added,
            ["normalizer"] = null,
            ["pre_tokenizer"] = new JsonObject
            {
                ["type"] = "Sequence",
                ["pretokenizers"] = new JsonArray
                {
                    new JsonObject
                    {
                        ["type"] = "Split", ["pattern"] = new JsonObject { ["Regex"] = SplitPattern },
                        ["behavior"] = "Isolated", ["invert"] = false,
                    },
                    new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["trim_offsets"] = false, ["use_regex"] = false },
                },
            },
            ["decoder"] = new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = true, ["trim_offsets"] = true, ["use_regex"] = true },
            ["model"] = new JsonObject
            {
                ["type"] = "BPE", ["dropout"] = null, ["unk_token"] = null, ["continuing_subword_prefix"] = null,
                ["end_of_word_suffix"] = null, ["fuse_unk"] = false, ["byte_fallback"] = false,
                ["vocab"] = vocabJson,
                ["merges"] = new JsonArray(merges.Select(m => (JsonNode)JsonValue.Create(m.Left + " " + m.Right)!).ToArray()),
            },
        };
        var config = new JsonObject
        {
            ["add_bos_token"] = true, ["add_eos_token"] = false, ["bos_token"] = Bos, ["eos_token"] = Eos,
            ["model_max_length"] = 4096, ["tokenizer_class"] = "LlamaTokenizerFast",
        };
        File.WriteAllText(Path.Combine(directory, "tokenizer.json"), tokenizer.ToJsonString());
        File.WriteAllText(Path.Combine(directory, "tokenizer_config.json"), config.ToJsonString());
        return vocab.Count;
    }

    /// <summary>Standard BPE training: repeatedly merge the most frequent adjacent pair (ties: first seen in sorted order).</summary>
    private static List<(string Left, string Right)> LearnMerges(char[] byteChars, int count)
    {
        var words = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (Match m in Regex.Matches(Corpus, SplitPattern))
        {
            var mapped = string.Concat(Encoding.UTF8.GetBytes(m.Value).Select(b => byteChars[b]));
            words[mapped] = words.GetValueOrDefault(mapped) + 1;
        }

        var split = words.ToDictionary(kv => kv.Key, kv => kv.Key.Select(c => c.ToString()).ToList(), StringComparer.Ordinal);
        var merges = new List<(string, string)>();
        while (merges.Count < count)
        {
            var pairs = new Dictionary<(string, string), int>();
            foreach (var (word, symbols) in split)
            {
                for (var i = 0; i + 1 < symbols.Count; i++)
                {
                    var key = (symbols[i], symbols[i + 1]);
                    pairs[key] = pairs.GetValueOrDefault(key) + words[word];
                }
            }

            if (pairs.Count == 0)
            {
                break;
            }

            var best = pairs.OrderByDescending(p => p.Value)
                .ThenBy(p => p.Key.Item1, StringComparer.Ordinal).ThenBy(p => p.Key.Item2, StringComparer.Ordinal).First().Key;
            merges.Add(best);
            foreach (var symbols in split.Values)
            {
                for (var i = 0; i + 1 < symbols.Count; i++)
                {
                    if (symbols[i] == best.Item1 && symbols[i + 1] == best.Item2)
                    {
                        symbols[i] = best.Item1 + best.Item2;
                        symbols.RemoveAt(i + 1);
                    }
                }
            }
        }

        return merges;
    }
}
