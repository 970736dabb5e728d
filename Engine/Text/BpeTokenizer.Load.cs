using System.Text;
using System.Text.Json;
using DeepSeekCuda.Loader;

namespace DeepSeekCuda.Text;

public sealed partial class BpeTokenizer
{
    /// <summary>
    /// The largest tokenizer.json or tokenizer_config.json read, checked before reading (DeepSeek-V3's
    /// tokenizer.json is about 8 MB): a bigger file is refused rather than held in memory several times over.
    /// </summary>
    public const long MaxFileBytes = 256L << 20;

    /// <summary>
    /// The largest token id accepted, whatever the vocabulary size (DeepSeek-V3's largest is 129,279):
    /// per-id tables are sized by the largest id, so one huge id in a file would allocate gigabytes.
    /// </summary>
    public const int MaxTokenId = 4 << 20;

    /// <summary>
    /// Ids may leave gaps (DeepSeek-V3 leaves a few hundred), but the largest id may be at most this many
    /// past the number of vocabulary and added entries, so tables stay proportional to the file.
    /// </summary>
    public const int MaxIdGap = 1 << 16;

    /// <summary>
    /// Loads <c>tokenizer.json</c> and, if present, <c>tokenizer_config.json</c> from <paramref name="folder"/>.
    /// </summary>
    /// <exception cref="DirectoryNotFoundException">The folder does not exist.</exception>
    /// <exception cref="FileNotFoundException">tokenizer.json is missing.</exception>
    /// <exception cref="TokenizerFormatException">A file is malformed or uses an unsupported feature.</exception>
    public static BpeTokenizer Load(string folder)
    {
        ArgumentNullException.ThrowIfNull(folder);
        if (!Directory.Exists(folder))
        {
            throw new DirectoryNotFoundException($"tokenizer folder not found: {folder}");
        }

        var tokenizerPath = Path.Combine(folder, "tokenizer.json");
        if (!File.Exists(tokenizerPath))
        {
            throw new FileNotFoundException($"tokenizer.json not found in {folder}", tokenizerPath);
        }

        var configPath = Path.Combine(folder, "tokenizer_config.json");
        var config = File.Exists(configPath) ? ReadFile(configPath) : null;
        return Build(ReadFile(tokenizerPath), tokenizerPath, config, configPath);
    }

    /// <summary>
    /// Reads a tokenizer file as <see cref="ModelFiles"/> allows (a regular file of at most
    /// <see cref="MaxFileBytes"/>, a link only into its own folder or the hub's blobs; a FIFO or
    /// /dev/zero would hang or never end), refusals as <see cref="TokenizerFormatException"/>s.
    /// </summary>
    internal static string ReadFile(string path)
    {
        path = Path.GetFullPath(path);
        byte[] bytes;
        try
        {
            bytes = ModelFiles.ReadAllBytes(path, Path.GetDirectoryName(path)!, MaxFileBytes);
        }
        catch (CheckpointException e)
        {
            var problem = e.Message.StartsWith(path + ": ", StringComparison.Ordinal) ? e.Message[(path.Length + 2)..] : e.Message;
            throw new TokenizerFormatException(path, problem, e);
        }

        // As File.ReadAllText: a UTF-8 byte order mark is not part of the text.
        return Encoding.UTF8.GetString(bytes.AsSpan().StartsWith(Encoding.UTF8.Preamble) ? bytes.AsSpan(Encoding.UTF8.Preamble.Length) : bytes);
    }

    /// <summary>Builds a tokenizer from the text of tokenizer.json and optionally tokenizer_config.json.</summary>
    /// <exception cref="TokenizerFormatException">The JSON is malformed or uses an unsupported feature.</exception>
    public static BpeTokenizer FromJson(string tokenizerJson, string? tokenizerConfigJson = null)
    {
        ArgumentNullException.ThrowIfNull(tokenizerJson);
        return Build(tokenizerJson, "tokenizer.json", tokenizerConfigJson, "tokenizer_config.json");
    }

    private static BpeTokenizer Build(string tokenizerJson, string tokenizerName, string? configJson, string configName)
    {
        BpeTokenizer tokenizer;
        using (var doc = Parse(tokenizerJson, tokenizerName))
        {
            tokenizer = BuildModel(doc.RootElement, tokenizerName);
        }

        if (configJson is not null)
        {
            using var config = Parse(configJson, configName);
            tokenizer.ApplyConfig(config.RootElement, configName);
        }

        return tokenizer;
    }

    private static JsonDocument Parse(string json, string name)
    {
        try
        {
            return JsonDocument.Parse(json, new JsonDocumentOptions { AllowTrailingCommas = true });
        }
        catch (JsonException ex)
        {
            throw new TokenizerFormatException(name, $"invalid JSON: {ex.Message}", ex);
        }
    }

    private static BpeTokenizer BuildModel(JsonElement root, string file)
    {
        if (root.ValueKind != JsonValueKind.Object)
        {
            throw new TokenizerFormatException(file, "the top level is not a JSON object");
        }

        if (!root.TryGetProperty("model", out var model) || model.ValueKind != JsonValueKind.Object)
        {
            throw new TokenizerFormatException(file, "model is missing");
        }

        var type = OptionalString(model, "type", file, "model.type");
        if (type is not null && type != "BPE")
        {
            throw new TokenizerFormatException(file, $"unsupported model type '{type}' (only BPE)");
        }

        CheckUnsupportedModelOptions(model, file);
        var ignoreMerges = model.TryGetProperty("ignore_merges", out var im) && im.ValueKind == JsonValueKind.True;

        if (!model.TryGetProperty("vocab", out var vocabElement) || vocabElement.ValueKind != JsonValueKind.Object)
        {
            throw new TokenizerFormatException(file, "model.vocab is missing or not an object");
        }

        var vocab = new Dictionary<string, int>(StringComparer.Ordinal);
        var index = 0;
        foreach (var entry in vocabElement.EnumerateObject())
        {
            var token = ReadString(() => entry.Name, file, $"model.vocab entry #{index}");
            if (entry.Value.ValueKind != JsonValueKind.Number || !entry.Value.TryGetInt32(out var id) || id < 0)
            {
                throw new TokenizerFormatException(file, $"model.vocab entry '{token}' has no valid id");
            }

            vocab[token] = id;
            index++;
        }

        var byteToId = new int[256];
        for (var b = 0; b < 256; b++)
        {
            var s = ByteLevel.ByteToChar[b].ToString();
            if (!vocab.TryGetValue(s, out byteToId[b]))
            {
                throw new TokenizerFormatException(file, $"model.vocab lacks the byte-level token for byte 0x{b:X2} ('{s}'); not a byte-level BPE vocabulary");
            }
        }

        var merges = ReadMerges(model, vocab, file);
        var added = ReadAddedTokens(root, file);
        CheckIdRange(vocab, added, file);
        CheckNormalizer(root, file);
        var preTokenizer = ReadPreTokenizer(root, file);
        return new BpeTokenizer(vocab, merges, byteToId, added, preTokenizer, ignoreMerges);
    }

    /// <summary>Bounds the largest id before tables sized by it are allocated (<see cref="MaxTokenId"/>, <see cref="MaxIdGap"/>).</summary>
    private static void CheckIdRange(Dictionary<string, int> vocab, List<AddedToken> added, string file)
    {
        var limit = (int)Math.Min(MaxTokenId, (long)vocab.Count + added.Count + MaxIdGap);
        var why = $"over the limit {limit} ({vocab.Count} vocabulary and {added.Count} added entries plus {MaxIdGap}, at most {MaxTokenId})";
        foreach (var (token, id) in vocab)
        {
            if (id > limit)
            {
                throw new TokenizerFormatException(file, $"model.vocab entry '{token}' has id {id}, {why}");
            }
        }

        for (var i = 0; i < added.Count; i++)
        {
            if (added[i].Id > limit)
            {
                throw new TokenizerFormatException(file, $"added_tokens[{i}].id is {added[i].Id}, {why}");
            }
        }
    }

    private static void CheckUnsupportedModelOptions(JsonElement model, string file)
    {
        if (model.TryGetProperty("dropout", out var d) && d.ValueKind == JsonValueKind.Number && d.GetDouble() > 0)
        {
            throw new TokenizerFormatException(file, "model.dropout is not supported");
        }

        foreach (var name in new[] { "continuing_subword_prefix", "end_of_word_suffix" })
        {
            if (model.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.String && ReadString(v, file, "model." + name).Length > 0)
            {
                throw new TokenizerFormatException(file, $"model.{name} is not supported");
            }
        }

        if (model.TryGetProperty("byte_fallback", out var bf) && bf.ValueKind == JsonValueKind.True)
        {
            throw new TokenizerFormatException(file, "model.byte_fallback is not supported (byte-level BPE only)");
        }
    }

    private static Dictionary<ulong, long> ReadMerges(JsonElement model, Dictionary<string, int> vocab, string file)
    {
        var merges = new Dictionary<ulong, long>(PairComparer.Instance);
        if (!model.TryGetProperty("merges", out var mergesElement) || mergesElement.ValueKind == JsonValueKind.Null)
        {
            return merges;
        }

        if (mergesElement.ValueKind != JsonValueKind.Array)
        {
            throw new TokenizerFormatException(file, "model.merges is not an array");
        }

        var rank = 0;
        foreach (var entry in mergesElement.EnumerateArray())
        {
            string left, right;
            if (entry.ValueKind == JsonValueKind.String)
            {
                // Byte-level tokens never hold a real space, so "a b" splits unambiguously.
                var merge = ReadString(entry, file, $"model.merges[{rank}]");
                var parts = merge.Split(' ');
                if (parts.Length != 2)
                {
                    throw new TokenizerFormatException(file, $"bad merge entry #{rank}: '{merge}' is not two tokens separated by one space");
                }

                (left, right) = (parts[0], parts[1]);
            }
            else if (entry.ValueKind == JsonValueKind.Array && entry.GetArrayLength() == 2
                     && entry[0].ValueKind == JsonValueKind.String && entry[1].ValueKind == JsonValueKind.String)
            {
                (left, right) = (ReadString(entry[0], file, $"model.merges[{rank}][0]"), ReadString(entry[1], file, $"model.merges[{rank}][1]"));
            }
            else
            {
                throw new TokenizerFormatException(file, $"bad merge entry #{rank}: expected \"a b\" or [\"a\", \"b\"], got {entry.GetRawText()}");
            }

            if (!vocab.TryGetValue(left, out var leftId) || !vocab.TryGetValue(right, out var rightId))
            {
                throw new TokenizerFormatException(file, $"bad merge entry #{rank}: '{(vocab.ContainsKey(left) ? right : left)}' is not in model.vocab");
            }

            if (!vocab.TryGetValue(left + right, out var mergedId))
            {
                throw new TokenizerFormatException(file, $"bad merge entry #{rank}: the merged token '{left + right}' is not in model.vocab");
            }

            // A repeated pair takes its last rank, as building Hugging Face's map does.
            merges[((ulong)(uint)leftId << 32) | (uint)rightId] = ((long)rank << 32) | (uint)mergedId;
            rank++;
        }

        return merges;
    }

    private static List<AddedToken> ReadAddedTokens(JsonElement root, string file)
    {
        var list = new List<AddedToken>();
        if (!root.TryGetProperty("added_tokens", out var added) || added.ValueKind == JsonValueKind.Null)
        {
            return list;
        }

        if (added.ValueKind != JsonValueKind.Array)
        {
            throw new TokenizerFormatException(file, "added_tokens is not an array");
        }

        var index = 0;
        foreach (var t in added.EnumerateArray())
        {
            if (t.ValueKind != JsonValueKind.Object
                || !t.TryGetProperty("id", out var idEl) || !idEl.TryGetInt32(out var id) || id < 0
                || !t.TryGetProperty("content", out var contentEl) || contentEl.ValueKind != JsonValueKind.String)
            {
                throw new TokenizerFormatException(file, $"added_tokens[{index}] needs a non-negative integer id and a string content");
            }

            list.Add(new AddedToken(
                id,
                ReadString(contentEl, file, $"added_tokens[{index}].content"),
                Flag(t, "special", false),
                Flag(t, "single_word", false),
                Flag(t, "lstrip", false),
                Flag(t, "rstrip", false),
                Flag(t, "normalized", !Flag(t, "special", false))));
            index++;
        }

        return list;
    }

    private static bool Flag(JsonElement obj, string name, bool fallback) =>
        obj.TryGetProperty(name, out var v) ? v.ValueKind == JsonValueKind.True || (v.ValueKind != JsonValueKind.False && fallback) : fallback;

    private static void CheckNormalizer(JsonElement root, string file)
    {
        if (root.TryGetProperty("normalizer", out var n))
        {
            CheckNormalizer(n, file, "normalizer");
        }
    }

    private static void CheckNormalizer(JsonElement n, string file, string where)
    {
        if (n.ValueKind == JsonValueKind.Null)
        {
            return;
        }

        var type = n.ValueKind == JsonValueKind.Object ? OptionalString(n, "type", file, where + ".type") : null;
        if (type == "Sequence" && n.TryGetProperty("normalizers", out var inner) && inner.ValueKind == JsonValueKind.Array)
        {
            var i = 0;
            foreach (var child in inner.EnumerateArray())
            {
                CheckNormalizer(child, file, $"{where}.normalizers[{i++}]");
            }

            return;
        }

        throw new TokenizerFormatException(file, $"unsupported normalizer at {where}: '{type ?? n.GetRawText()}' (only none or an empty Sequence)");
    }

    private static PreTokenizer ReadPreTokenizer(JsonElement root, string file)
    {
        if (!root.TryGetProperty("pre_tokenizer", out var pt) || pt.ValueKind == JsonValueKind.Null)
        {
            throw new TokenizerFormatException(file, "pre_tokenizer is missing; a byte-level BPE tokenizer needs a ByteLevel pre-tokenizer");
        }

        var steps = new List<PreTokenizerStep>();
        AddSteps(pt, "pre_tokenizer", steps, file);
        if (!steps.Any(s => s is ByteLevelStep))
        {
            throw new TokenizerFormatException(file, "pre_tokenizer has no ByteLevel step; only byte-level BPE is supported");
        }

        return new PreTokenizer(steps.ToArray());
    }

    private static void AddSteps(JsonElement pt, string where, List<PreTokenizerStep> steps, string file)
    {
        if (pt.ValueKind != JsonValueKind.Object)
        {
            throw new TokenizerFormatException(file, $"{where} is not an object");
        }

        var type = OptionalString(pt, "type", file, where + ".type");
        switch (type)
        {
            case "Sequence":
                if (!pt.TryGetProperty("pretokenizers", out var list) || list.ValueKind != JsonValueKind.Array)
                {
                    throw new TokenizerFormatException(file, $"{where}.pretokenizers is missing");
                }

                var i = 0;
                foreach (var child in list.EnumerateArray())
                {
                    AddSteps(child, $"{where}.pretokenizers[{i++}]", steps, file);
                }

                break;
            case "ByteLevel":
                steps.Add(new ByteLevelStep(Flag(pt, "add_prefix_space", false), Flag(pt, "use_regex", true), file, where));
                break;
            case "Split":
                steps.Add(ReadSplit(pt, where, file));
                break;
            default:
                throw new TokenizerFormatException(file, $"unsupported pre-tokenizer at {where}: '{type}' (only Sequence, Split, ByteLevel)");
        }
    }

    private static RegexSplitStep ReadSplit(JsonElement pt, string where, string file)
    {
        if (Flag(pt, "invert", false))
        {
            throw new TokenizerFormatException(file, $"{where}: Split with invert=true is not supported");
        }

        var behavior = OptionalString(pt, "behavior", file, where + ".behavior") ?? "Isolated";
        if (behavior is not ("Isolated" or "Removed"))
        {
            throw new TokenizerFormatException(file, $"{where}: Split behavior '{behavior}' is not supported (only Isolated, Removed)");
        }

        if (!pt.TryGetProperty("pattern", out var pattern) || pattern.ValueKind != JsonValueKind.Object)
        {
            throw new TokenizerFormatException(file, $"{where}.pattern is missing");
        }

        string regex;
        if (pattern.TryGetProperty("Regex", out var r) && r.ValueKind == JsonValueKind.String)
        {
            regex = ReadString(r, file, where + ".pattern.Regex");
        }
        else if (pattern.TryGetProperty("String", out var s) && s.ValueKind == JsonValueKind.String)
        {
            regex = System.Text.RegularExpressions.Regex.Escape(ReadString(s, file, where + ".pattern.String"));
        }
        else
        {
            throw new TokenizerFormatException(file, $"{where}.pattern needs a Regex or String");
        }

        try
        {
            return new RegexSplitStep(regex, behavior == "Removed", file, where);
        }
        catch (ArgumentException ex)
        {
            throw new TokenizerFormatException(file, $"{where}.pattern: {ex.Message}", ex);
        }
    }

    private static string? OptionalString(JsonElement obj, string name, string file, string where)
    {
        if (!obj.TryGetProperty(name, out var v) || v.ValueKind == JsonValueKind.Null)
        {
            return null;
        }

        return v.ValueKind == JsonValueKind.String ? ReadString(v, file, where) : throw new TokenizerFormatException(file, $"{where} is not a string");
    }

    /// <summary>
    /// Reads a JSON string value. System.Text.Json refuses an escaped unpaired surrogate (<c>"\ud800"</c>),
    /// which no UTF-8 text can hold, with an <see cref="InvalidOperationException"/> naming neither file nor
    /// field; this names both.
    /// </summary>
    /// <exception cref="TokenizerFormatException">The string holds an unpaired surrogate.</exception>
    internal static string ReadString(JsonElement value, string file, string where) => ReadString(() => value.GetString()!, file, where);

    /// <summary>What a JSON string holding an escaped unpaired surrogate is told, after the field's name.</summary>
    internal const string UnpairedSurrogate = "holds an unpaired surrogate escape (\\uD800-\\uDFFF), which is not Unicode text";

    private static string ReadString(Func<string> read, string file, string where)
    {
        try
        {
            return read();
        }
        catch (InvalidOperationException ex)
        {
            throw new TokenizerFormatException(file, $"{where} {UnpairedSurrogate}", ex);
        }
    }

    private void ApplyConfig(JsonElement config, string file)
    {
        if (config.ValueKind != JsonValueKind.Object)
        {
            throw new TokenizerFormatException(file, "the top level is not a JSON object");
        }

        AddBosToken = config.TryGetProperty("add_bos_token", out var add) && add.ValueKind == JsonValueKind.True;
        BosId = ConfigToken(config, "bos_token", file);
        EosId = ConfigToken(config, "eos_token", file);
        if (AddBosToken && BosId is null)
        {
            throw new TokenizerFormatException(file, "add_bos_token is true but there is no bos_token");
        }
    }

    private int? ConfigToken(JsonElement config, string name, string file)
    {
        if (!config.TryGetProperty(name, out var v) || v.ValueKind == JsonValueKind.Null)
        {
            return null;
        }

        string? content = v.ValueKind switch
        {
            JsonValueKind.String => ReadString(v, file, name),
            JsonValueKind.Object when v.TryGetProperty("content", out var c) && c.ValueKind == JsonValueKind.String => ReadString(c, file, name + ".content"),
            _ => throw new TokenizerFormatException(file, $"{name} is neither a string nor an object with a string content"),
        };
        return TokenToId(content!) ?? throw new TokenizerFormatException(file, $"{name} '{content}' is not a token of tokenizer.json");
    }
}
