using System.Runtime.CompilerServices;
using System.Text;
using System.Text.Json;

namespace DeepSeekCuda.Inference.Constraints;

/// <summary>
/// An immutable description of the output a <see cref="GrammarConstraint"/> allows: JSON, a JSON Schema, exact
/// text, added tokens, and sequences and choices of those. Matched over the UTF-8 bytes of the sampled
/// tokens, so a literal is allowed however the tokenizer splits it. One grammar may serve many requests: its
/// compiled form and mask cache are kept per <see cref="TokenVocabulary"/>.
/// </summary>
public abstract class Grammar
{
    private readonly ConditionalWeakTable<TokenVocabulary, CompiledGrammar> _compiled = [];

    private protected Grammar()
    {
    }

    /// <summary>
    /// Any JSON value. Whitespace is allowed where JSON allows it (before and after the value too, so a model may
    /// open with a blank line), at most 32 bytes in a row, so a constrained model cannot loop on whitespace.
    /// </summary>
    public static Grammar JsonValue() => new NodeGrammar(JsonNodes.Text(JsonNodes.Value));

    /// <summary>A JSON object (OpenAI's <c>response_format: json_object</c>), otherwise as <see cref="JsonValue"/>.</summary>
    public static Grammar JsonObject() => new NodeGrammar(JsonNodes.Text(JsonNodes.Object));

    /// <summary>
    /// A JSON value valid against <paramref name="schema"/>, from a subset of JSON Schema (2020-12 and draft 7
    /// spellings): <c>type</c> (one or an array), <c>properties</c>, <c>required</c>, <c>additionalProperties</c>,
    /// <c>items</c>, <c>minItems</c>, <c>maxItems</c>, <c>enum</c>, <c>const</c>, <c>anyOf</c>, <c>oneOf</c>,
    /// <c>format</c> <c>date-time</c>, <c>date</c> and <c>uuid</c> (as .NET writes <see cref="DateTime"/>,
    /// <see cref="DateOnly"/> and <see cref="Guid"/>), and <c>$ref</c> to a local JSON pointer (<c>#/$defs/...</c>,
    /// <c>#/properties/...</c>; recursion allowed). Annotations (<c>title</c>,
    /// <c>description</c>, <c>default</c>, <c>examples</c>, <c>$schema</c>, <c>$id</c>, ...) are ignored.
    /// Whitespace as in <see cref="JsonValue"/>. Objects with <c>properties</c> are written with only those properties, in the schema's order;
    /// <c>oneOf</c> is accepted when its alternatives are provably disjoint (types, const/enum values, or a required
    /// const property of objects: a tagged union), and refused otherwise.
    /// </summary>
    /// <param name="schema">The schema.</param>
    /// <exception cref="NotSupportedException">A keyword that constrains values but is not enforced (<c>pattern</c>,
    /// another <c>format</c>, <c>minimum</c>, <c>minLength</c>, <c>allOf</c>, ...); the message names it and its JSON pointer.</exception>
    /// <exception cref="ArgumentException">A schema that is malformed or that nothing can match; the message names the JSON pointer.</exception>
    public static Grammar JsonSchema(JsonElement schema) => new NodeGrammar(JsonNodes.Text(new JsonSchemaCompiler(schema).Compile()));

    /// <summary>Exactly the UTF-8 bytes of <paramref name="text"/>, however tokenized (no added token matches it).</summary>
    /// <param name="text">The text.</param>
    public static Grammar Literal(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        return new NodeGrammar(new LiteralLeaf(Encoding.UTF8.GetBytes(text)));
    }

    /// <summary>Exactly the id of added token <paramref name="addedToken"/> (e.g. <c>&lt;｜tool▁calls▁begin｜&gt;</c>).</summary>
    /// <param name="addedToken">The added token's content; the vocabulary must have it (checked by <see cref="GrammarConstraint"/>).</param>
    public static Grammar ControlToken(string addedToken)
    {
        ArgumentException.ThrowIfNullOrEmpty(addedToken);
        return new ControlGrammar(addedToken);
    }

    /// <summary>The parts one after another.</summary>
    /// <param name="parts">The parts.</param>
    public static Grammar Sequence(params Grammar[] parts)
    {
        ArgumentNullException.ThrowIfNull(parts);
        return new CompositeGrammar(parts, choice: false);
    }

    /// <summary>Any one of <paramref name="alternatives"/> (none: nothing matches).</summary>
    /// <param name="alternatives">The alternatives.</param>
    public static Grammar Choice(params Grammar[] alternatives)
    {
        ArgumentNullException.ThrowIfNull(alternatives);
        return new CompositeGrammar(alternatives, choice: true);
    }

    /// <summary>Anything from here on: every token, added ones included, with end of sentence allowed at any point.</summary>
    public static Grammar FreeText() => new NodeGrammar(FreeTextLeaf.Instance);

    /// <summary>This grammar compiled for <paramref name="vocabulary"/>, with its mask cache; built once per vocabulary.</summary>
    internal CompiledGrammar CompileFor(TokenVocabulary vocabulary) => _compiled.GetValue(vocabulary, v => new CompiledGrammar(Build(v), v));

    /// <summary>The root node of this grammar for <paramref name="vocabulary"/> (added tokens resolved to its ids).</summary>
    internal abstract Node Build(TokenVocabulary vocabulary);

    private sealed class NodeGrammar(Node node) : Grammar
    {
        internal override Node Build(TokenVocabulary vocabulary) => node;
    }

    private sealed class ControlGrammar(string content) : Grammar
    {
        internal override Node Build(TokenVocabulary vocabulary) =>
            new ControlTokenLeaf(vocabulary.AddedTokenId(content) ?? throw new ArgumentException($"the tokenizer has no added token '{content}'", nameof(vocabulary)));
    }

    private sealed class CompositeGrammar : Grammar
    {
        private readonly Grammar[] _parts;
        private readonly bool _choice;

        public CompositeGrammar(Grammar[] parts, bool choice)
        {
            foreach (var p in parts)
            {
                ArgumentNullException.ThrowIfNull(p, nameof(parts));
            }

            _parts = [.. parts];
            _choice = choice;
        }

        internal override Node Build(TokenVocabulary vocabulary)
        {
            var nodes = _parts.Select(p => p.Build(vocabulary)).ToArray();
            return _choice ? new ChoiceRule(nodes) : new SequenceRule(nodes);
        }
    }
}
