using System.Text.Encodings.Web;
using System.Text.Json;

namespace DeepSeekCuda.Inference.Constraints;

/// <summary>
/// Compiles the supported subset of JSON Schema to grammar nodes (see <see cref="Grammar.JsonSchema"/>). A
/// keyword that would constrain values and is not enforced is refused with its JSON pointer, never ignored.
/// </summary>
internal sealed class JsonSchemaCompiler(JsonElement root)
{
    /// <summary>Keywords that only describe; they never change what is valid.</summary>
    private static readonly HashSet<string> Annotations = new(StringComparer.Ordinal)
    {
        "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly", "writeOnly",
        "$defs", "definitions",
    };

    private static readonly HashSet<string> Handled = new(StringComparer.Ordinal)
    {
        "type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "enum", "const", "anyOf", "oneOf", "$ref", "format",
    };

    private static readonly string[] AllTypes = ["object", "array", "string", "number", "integer", "boolean", "null"];

    private static readonly JsonWriterOptions CompactWriter = new() { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping, Indented = false };

    private readonly Dictionary<string, RefRule> _refs = new(StringComparer.Ordinal);

    // References being compiled with nothing consumed since they were entered: one of them reached again would
    // recurse without input. Objects and arrays consume their bracket first, so their members start afresh.
    private HashSet<string> _unconsumed = new(StringComparer.Ordinal);
    private readonly JsonElement _root = root.Clone();

    public Node Compile() => Compile(_root, "#");

    private Node Compile(JsonElement schema, string path)
    {
        switch (schema.ValueKind)
        {
            case JsonValueKind.True:
                return JsonNodes.Value;
            case JsonValueKind.False:
                throw new ArgumentException($"the schema at '{path}' is false: no value matches it", nameof(schema));
            case JsonValueKind.Object:
                break;
            default:
                throw new ArgumentException($"the schema at '{path}' is a {schema.ValueKind}, not an object or boolean", nameof(schema));
        }

        foreach (var p in schema.EnumerateObject())
        {
            if (!Handled.Contains(p.Name) && !Annotations.Contains(p.Name))
            {
                throw new NotSupportedException($"JSON Schema keyword '{p.Name}' at '{Pointer(path, p.Name)}' is not supported by constrained decoding (it would not be enforced)");
            }
        }

        if (schema.TryGetProperty("$ref", out var reference))
        {
            foreach (var p in schema.EnumerateObject())
            {
                if (p.Name != "$ref" && Handled.Contains(p.Name))
                {
                    throw new NotSupportedException($"JSON Schema keyword '{p.Name}' beside '$ref' at '{Pointer(path, p.Name)}' is not supported");
                }
            }

            return Reference(reference, Pointer(path, "$ref"));
        }

        var types = Types(schema, path);
        if (schema.TryGetProperty("const", out var constant))
        {
            if (schema.TryGetProperty("enum", out var also) && !(also.ValueKind == JsonValueKind.Array && also.EnumerateArray().Any(e => JsonElement.DeepEquals(e, constant))))
            {
                throw new ArgumentException($"'const' at '{Pointer(path, "const")}' is not one of 'enum': nothing matches", nameof(schema));
            }

            return Values([constant], types, String(schema, path), Pointer(path, "const"));
        }

        if (schema.TryGetProperty("enum", out var values))
        {
            if (values.ValueKind != JsonValueKind.Array)
            {
                throw new ArgumentException($"'enum' at '{Pointer(path, "enum")}' is not an array", nameof(schema));
            }

            return Values([.. values.EnumerateArray()], types, String(schema, path), Pointer(path, "enum"));
        }

        var anyOf = schema.TryGetProperty("anyOf", out var a) ? ("anyOf", a) : schema.TryGetProperty("oneOf", out var o) ? ("oneOf", o) : default;
        if (anyOf.Item1 is not null)
        {
            if (schema.TryGetProperty("anyOf", out _) && schema.TryGetProperty("oneOf", out _))
            {
                throw new NotSupportedException($"'anyOf' and 'oneOf' together at '{path}' are not supported");
            }

            foreach (var p in schema.EnumerateObject())
            {
                if (p.Name != anyOf.Item1 && Handled.Contains(p.Name))
                {
                    throw new NotSupportedException($"JSON Schema keyword '{p.Name}' beside '{anyOf.Item1}' at '{Pointer(path, p.Name)}' is not supported");
                }
            }

            var keyword = Pointer(path, anyOf.Item1);
            if (anyOf.Item2.ValueKind != JsonValueKind.Array || anyOf.Item2.GetArrayLength() == 0)
            {
                throw new ArgumentException($"'{anyOf.Item1}' at '{keyword}' is not a non-empty array", nameof(schema));
            }

            var choices = anyOf.Item2.EnumerateArray().ToArray();
            var compiled = new ChoiceRule([.. choices.Select((s, i) => Compile(s, $"{keyword}/{i}"))]);
            if (anyOf.Item1 == "oneOf")
            {
                CheckDisjoint(choices, keyword);
            }

            return compiled;
        }

        var alternatives = types.Select(t => Typed(schema, t, path)).ToArray();
        return alternatives.Length == 1 ? alternatives[0] : new ChoiceRule(alternatives);
    }

    /// <summary>
    /// <c>oneOf</c> is enforced as <c>anyOf</c>, which is exact only when no value matches two alternatives. Accepted
    /// when every pair is provably disjoint: different JSON types (integer counts as a number), different const/enum
    /// values, or objects that both require a property whose const/enum values differ (a tagged union); refused
    /// otherwise rather than enforced loosely.
    /// </summary>
    private void CheckDisjoint(JsonElement[] choices, string keyword)
    {
        var shapes = choices.Select(c => Shape(c, 0)).ToArray();
        for (var i = 0; i < shapes.Length; i++)
        {
            for (var j = i + 1; j < shapes.Length; j++)
            {
                if (!Disjoint(shapes[i], shapes[j]))
                {
                    throw new NotSupportedException($"'oneOf' at '{keyword}': alternatives {i} and {j} may both match one value, which constrained decoding cannot rule out (use anyOf, or make them differ in type, const/enum, or a required const property)");
                }
            }
        }
    }

    /// <summary>What a schema can match, coarsely: its JSON types, its values when it is a const/enum, its object tags.</summary>
    private sealed record SchemaShape(HashSet<string> Types, JsonElement[]? Values, Dictionary<string, JsonElement[]> Tags);

    private SchemaShape Shape(JsonElement schema, int depth)
    {
        if (schema.ValueKind != JsonValueKind.Object || depth > 32)
        {
            return new SchemaShape([.. AllTypes.Where(t => t != "integer")], null, []);
        }

        if (schema.TryGetProperty("$ref", out var r) && r.ValueKind == JsonValueKind.String)
        {
            return Shape(Resolve(r.GetString()!, "#"), depth + 1);
        }

        var values = schema.TryGetProperty("const", out var c) ? [c] : schema.TryGetProperty("enum", out var e) ? e.EnumerateArray().ToArray() : null;
        if (values is not null)
        {
            return new SchemaShape([.. values.Select(KindOf)], values, []);
        }

        foreach (var k in new[] { "anyOf", "oneOf" })
        {
            if (schema.TryGetProperty(k, out var alts))
            {
                return new SchemaShape([.. alts.EnumerateArray().SelectMany(a => Shape(a, depth + 1).Types)], null, []);
            }
        }

        var tags = new Dictionary<string, JsonElement[]>(StringComparer.Ordinal);
        if (schema.TryGetProperty("properties", out var props) && props.ValueKind == JsonValueKind.Object && schema.TryGetProperty("required", out var req) && req.ValueKind == JsonValueKind.Array)
        {
            foreach (var name in req.EnumerateArray().Where(n => n.ValueKind == JsonValueKind.String).Select(n => n.GetString()!))
            {
                if (props.TryGetProperty(name, out var ps) && Shape(ps, depth + 1).Values is { } tagValues)
                {
                    tags[name] = tagValues;
                }
            }
        }

        return new SchemaShape([.. Types(schema, "#").Select(t => t == "integer" ? "number" : t)], null, tags);
    }

    private static bool Disjoint(SchemaShape a, SchemaShape b)
    {
        if (!a.Types.Overlaps(b.Types))
        {
            return true;
        }

        if (a.Values is not null && b.Values is not null)
        {
            return !a.Values.Any(x => b.Values.Any(y => JsonElement.DeepEquals(x, y)));
        }

        // Both may be objects: disjoint when they are only objects and a tag both require has no value in common.
        var objectsOnly = a.Types.SetEquals(["object"]) && b.Types.SetEquals(["object"]);
        return objectsOnly && a.Tags.Any(t => b.Tags.TryGetValue(t.Key, out var other) && !t.Value.Any(x => other.Any(y => JsonElement.DeepEquals(x, y))));
    }

    private static string KindOf(JsonElement v) => v.ValueKind switch
    {
        JsonValueKind.Object => "object",
        JsonValueKind.Array => "array",
        JsonValueKind.String => "string",
        JsonValueKind.Number => "number",
        JsonValueKind.True or JsonValueKind.False => "boolean",
        _ => "null",
    };

    /// <summary>The types the schema allows: its <c>type</c>, else those its keywords imply, else all.</summary>
    private static string[] Types(JsonElement schema, string path)
    {
        if (schema.TryGetProperty("type", out var type))
        {
            var names = type.ValueKind switch
            {
                JsonValueKind.String => [type.GetString()!],
                JsonValueKind.Array => type.EnumerateArray().Select(t => t.ValueKind == JsonValueKind.String ? t.GetString()! : "").ToArray(),
                _ => [""],
            };
            foreach (var n in names)
            {
                if (!AllTypes.Contains(n))
                {
                    throw new ArgumentException($"'type' at '{Pointer(path, "type")}' names '{n}', not a JSON Schema type", nameof(schema));
                }
            }

            if (names.Length == 0)
            {
                throw new ArgumentException($"'type' at '{Pointer(path, "type")}' is empty: no value matches", nameof(schema));
            }

            // An integer is a number; writing integers for ["number", "integer"] would be narrower than needed.
            return names.Contains("number") ? [.. names.Where(n => n != "integer").Distinct()] : [.. names.Distinct()];
        }

        if (schema.TryGetProperty("properties", out _) || schema.TryGetProperty("required", out _) || schema.TryGetProperty("additionalProperties", out _))
        {
            return ["object"];
        }

        if (schema.TryGetProperty("items", out _) || schema.TryGetProperty("minItems", out _) || schema.TryGetProperty("maxItems", out _))
        {
            return ["array"];
        }

        return [.. AllTypes.Where(t => t != "integer")];
    }

    private Node Typed(JsonElement schema, string type, string path) => type switch
    {
        "object" => AfterInput(() => Object(schema, path)),
        "array" => AfterInput(() => Array(schema, path)),
        "string" => String(schema, path),
        "number" => JsonNumberLeaf.Number,
        "integer" => JsonNumberLeaf.Integer,
        "boolean" => new ChoiceRule([JsonNodes.True, JsonNodes.False]),
        _ => JsonNodes.Null,
    };

    private Node AfterInput(Func<Node> compile)
    {
        var saved = _unconsumed;
        _unconsumed = new HashSet<string>(StringComparer.Ordinal);
        try
        {
            return compile();
        }
        finally
        {
            _unconsumed = saved;
        }
    }

    /// <summary>A string, in the schema's <c>format</c> when it has one of those enforced (<see cref="FormatStringLeaf"/>).</summary>
    private static Node String(JsonElement schema, string path)
    {
        if (!schema.TryGetProperty("format", out var format))
        {
            return JsonStringLeaf.Instance;
        }

        return (format.ValueKind == JsonValueKind.String ? format.GetString() : null) switch
        {
            "date-time" => FormatStringLeaf.DateTime,
            "date" => FormatStringLeaf.Date,
            "uuid" => FormatStringLeaf.Uuid,
            var other => throw new NotSupportedException($"JSON Schema keyword 'format' at '{Pointer(path, "format")}' is '{other}': only 'date-time', 'date' and 'uuid' are enforced"),
        };
    }

    private Node Object(JsonElement schema, string path)
    {
        var required = new HashSet<string>(StringComparer.Ordinal);
        if (schema.TryGetProperty("required", out var req))
        {
            if (req.ValueKind != JsonValueKind.Array || req.EnumerateArray().Any(r => r.ValueKind != JsonValueKind.String))
            {
                throw new ArgumentException($"'required' at '{Pointer(path, "required")}' is not an array of strings", nameof(schema));
            }

            required.UnionWith(req.EnumerateArray().Select(r => r.GetString()!));
        }

        var hasAdditional = schema.TryGetProperty("additionalProperties", out var additional);
        if (!schema.TryGetProperty("properties", out var properties))
        {
            if (required.Count > 0)
            {
                throw new NotSupportedException($"'required' without 'properties' at '{Pointer(path, "required")}' is not supported");
            }

            // No declared properties: a map whose values match additionalProperties (any value when absent).
            return !hasAdditional || additional.ValueKind == JsonValueKind.True ? JsonNodes.Object
                : additional.ValueKind == JsonValueKind.False ? new ObjectRule([])
                : JsonNodes.MapOf(Compile(additional, Pointer(path, "additionalProperties")));
        }

        if (properties.ValueKind != JsonValueKind.Object)
        {
            throw new ArgumentException($"'properties' at '{Pointer(path, "properties")}' is not an object", nameof(schema));
        }

        if (hasAdditional && additional.ValueKind is not (JsonValueKind.True or JsonValueKind.False or JsonValueKind.Object))
        {
            throw new ArgumentException($"'additionalProperties' at '{Pointer(path, "additionalProperties")}' is not a schema", nameof(schema));
        }

        // Only the declared properties are written, which is valid whatever additionalProperties says, so a schema
        // given for additional ones is never used (nor refused for keywords it could not enforce).

        var list = new List<ObjectProperty>();
        var propertiesPath = Pointer(path, "properties");
        var names = new HashSet<string>(StringComparer.Ordinal);
        foreach (var p in properties.EnumerateObject())
        {
            names.Add(p.Name);
            list.Add(new ObjectProperty(SerializeString(p.Name), Compile(p.Value, Pointer(propertiesPath, p.Name)), required.Contains(p.Name)));
        }

        foreach (var r in required)
        {
            if (!names.Contains(r))
            {
                throw new NotSupportedException($"'required' at '{Pointer(path, "required")}' names '{r}', which is not in 'properties' (only declared properties are written)");
            }
        }

        return new ObjectRule([.. list]);
    }

    private Node Array(JsonElement schema, string path)
    {
        var min = Count(schema, "minItems", path) ?? 0;
        var max = Count(schema, "maxItems", path) ?? ArrayRule.Unbounded;
        if (min > max)
        {
            throw new ArgumentException($"'minItems' ({min}) is above 'maxItems' ({max}) at '{path}': no array matches", nameof(schema));
        }

        if (min >= ArrayRule.Unbounded)
        {
            throw new NotSupportedException($"'minItems' at '{Pointer(path, "minItems")}' is above {ArrayRule.Unbounded - 1}");
        }

        Node item = JsonNodes.Value;
        if (schema.TryGetProperty("items", out var items))
        {
            if (items.ValueKind == JsonValueKind.Array)
            {
                throw new NotSupportedException($"tuple 'items' (an array of schemas) at '{Pointer(path, "items")}' is not supported");
            }

            if (items.ValueKind == JsonValueKind.False)
            {
                if (min > 0)
                {
                    throw new ArgumentException($"'items' at '{Pointer(path, "items")}' is false but 'minItems' is {min}: no array matches", nameof(schema));
                }

                return new ArrayRule(JsonNodes.Value, 0, 0);
            }

            item = Compile(items, Pointer(path, "items"));
        }

        return new ArrayRule(item, min, Math.Min(max, ArrayRule.Unbounded));
    }

    private static int? Count(JsonElement schema, string keyword, string path)
    {
        if (!schema.TryGetProperty(keyword, out var value))
        {
            return null;
        }

        if (value.ValueKind != JsonValueKind.Number || !value.TryGetDecimal(out var d) || d < 0 || d != decimal.Truncate(d))
        {
            throw new ArgumentException($"'{keyword}' at '{Pointer(path, keyword)}' is not a non-negative integer", nameof(schema));
        }

        return d >= ArrayRule.Unbounded ? ArrayRule.Unbounded : (int)d;
    }

    /// <summary>Exactly one of <paramref name="values"/> (an enum or const), written compactly; those not of an allowed type are dropped.</summary>
    /// <remarks>String values must also match the schema's <c>format</c> (<paramref name="strings"/>, its string grammar).</remarks>
    private static Node Values(JsonElement[] values, string[] types, Node strings, string path)
    {
        var x = new Expander();
        var stringStart = AutomatonState.Start(strings);
        var kept = values
            .Where(v => types.Any(t => IsOfType(v, t)))
            .Select(Serialize)
            .Where(bytes => bytes[0] != '"' || stringStart.Step(bytes, x) is { IsComplete: true })
            .Select(bytes => (Node)new LiteralLeaf(bytes))
            .ToArray();
        if (kept.Length == 0)
        {
            throw new ArgumentException($"no value of '{path}' has an allowed type (and format): nothing matches", nameof(values));
        }

        return kept.Length == 1 ? kept[0] : new ChoiceRule(kept);
    }

    private static bool IsOfType(JsonElement v, string type) => type switch
    {
        "object" => v.ValueKind == JsonValueKind.Object,
        "array" => v.ValueKind == JsonValueKind.Array,
        "string" => v.ValueKind == JsonValueKind.String,
        "number" => v.ValueKind == JsonValueKind.Number,
        "integer" => v.ValueKind == JsonValueKind.Number && v.TryGetDecimal(out var d) && d == decimal.Truncate(d),
        "boolean" => v.ValueKind is JsonValueKind.True or JsonValueKind.False,
        _ => v.ValueKind == JsonValueKind.Null,
    };

    private static byte[] Serialize(JsonElement value)
    {
        using var buffer = new MemoryStream();
        using (var writer = new Utf8JsonWriter(buffer, CompactWriter))
        {
            value.WriteTo(writer);
        }

        return buffer.ToArray();
    }

    /// <summary>A property name as JSON text (quoted, escaped as <see cref="Serialize"/> escapes), without reflection-based serialization (the tools are trimmed).</summary>
    private static byte[] SerializeString(string text)
    {
        using var buffer = new MemoryStream();
        using (var writer = new Utf8JsonWriter(buffer, CompactWriter))
        {
            writer.WriteStringValue(text);
        }

        return buffer.ToArray();
    }

    private Node Reference(JsonElement reference, string path)
    {
        var target = reference.ValueKind == JsonValueKind.String ? reference.GetString()! : "";
        if (!target.StartsWith('#'))
        {
            throw new NotSupportedException($"'$ref' at '{path}' is '{target}': only local references ('#/...') are supported");
        }

        if (_refs.TryGetValue(target, out var known))
        {
            if (_unconsumed.Contains(target))
            {
                throw new NotSupportedException($"'$ref' at '{path}' refers back to '{target}' before any input is consumed (left recursion)");
            }

            return known;
        }

        var node = Resolve(target, path);
        var rule = new RefRule();
        _refs[target] = rule;
        _unconsumed.Add(target);
        rule.Target = Compile(node, target);
        _unconsumed.Remove(target);
        return rule;
    }

    private JsonElement Resolve(string target, string path)
    {
        var current = _root;
        foreach (var raw in target.Length <= 1 ? [] : target[1..].TrimStart('/').Split('/'))
        {
            var token = Uri.UnescapeDataString(raw).Replace("~1", "/", StringComparison.Ordinal).Replace("~0", "~", StringComparison.Ordinal);
            if (current.ValueKind == JsonValueKind.Object && current.TryGetProperty(token, out var child))
            {
                current = child;
            }
            else if (current.ValueKind == JsonValueKind.Array && int.TryParse(token, out var index) && index >= 0 && index < current.GetArrayLength())
            {
                current = current[index];
            }
            else
            {
                throw new ArgumentException($"'$ref' at '{path}' points to '{target}', which the schema does not have", nameof(target));
            }
        }

        return current;
    }

    private static string Pointer(string path, string token) => $"{path}/{token.Replace("~", "~0", StringComparison.Ordinal).Replace("/", "~1", StringComparison.Ordinal)}";
}
