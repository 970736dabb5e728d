using System.Runtime.CompilerServices;

namespace DeepSeekCuda.Inference.Constraints;

// The automaton runs over UTF-8 bytes, not characters: byte-level BPE tokens split characters, and a byte
// automaton rejects a token whose bytes cannot begin valid UTF-8 at the point it would be written, which a
// character automaton over decoded text cannot see. A state is a set of persistent stacks (one per live
// parse); the top of every stack is a leaf that consumes bytes, rules below it are continuations. Nothing is
// mutated after construction, so a state is a value that can key a cache.

/// <summary>One frame of a persistent stack: a node and its small integer state, over the rest of the stack.</summary>
internal sealed class Frame : IEquatable<Frame>
{
    /// <summary>The stack of a finished parse: the grammar matched a complete sentence.</summary>
    public static readonly Frame End = new(EndNode.Instance, 0, null);

    private readonly int _hash;

    public Frame(Node node, int data, Frame? next)
    {
        Node = node;
        Data = data;
        Next = next;
        _hash = HashCode.Combine(RuntimeHelpers.GetHashCode(node), data, next?._hash ?? 0);
    }

    public Node Node { get; }

    public int Data { get; }

    public Frame? Next { get; }

    public bool Equals(Frame? other)
    {
        var a = this;
        var b = other;
        while (true)
        {
            if (ReferenceEquals(a, b))
            {
                return true;
            }

            if (a is null || b is null || a._hash != b._hash || !ReferenceEquals(a.Node, b.Node) || a.Data != b.Data)
            {
                return false;
            }

            a = a.Next;
            b = b.Next;
        }
    }

    public override bool Equals(object? obj) => Equals(obj as Frame);

    public override int GetHashCode() => _hash;
}

/// <summary>A node of a compiled grammar: a <see cref="Leaf"/> consumes bytes, a <see cref="Rule"/> expands into frames.</summary>
internal abstract class Node
{
}

/// <summary>A node that consumes input itself; its frame data is the lexer state (0 on entry).</summary>
internal abstract class Leaf : Node
{
    /// <summary>The data after consuming <paramref name="b"/>, or -1 when <paramref name="b"/> cannot come next.</summary>
    public abstract int Step(int data, byte b);

    /// <summary>Whether the leaf may end here.</summary>
    public abstract bool CanFinish(int data);

    /// <summary>Whether the leaf may consume more here.</summary>
    public abstract bool CanContinue(int data);
}

/// <summary>A node that stands for other nodes: entering its frame pushes (or offers) those.</summary>
internal abstract class Rule : Node
{
    /// <summary>Enters what this rule stands for in state <paramref name="data"/>, with <paramref name="rest"/> below.</summary>
    public abstract void Expand(int data, Frame? rest, Expander x);
}

/// <summary>The bottom of a finished parse: consumes nothing, never ends twice.</summary>
internal sealed class EndNode : Leaf
{
    public static readonly EndNode Instance = new();

    public override int Step(int data, byte b) => -1;

    public override bool CanFinish(int data) => false;

    public override bool CanContinue(int data) => false;
}

/// <summary>
/// Collects the stacks a step leads to, each with a leaf on top (or <see cref="Frame.End"/>), without
/// duplicates. Entering a frame runs rules until only leaves are on top.
/// </summary>
internal sealed class Expander
{
    private const int MaxRecursion = 2000;
    private readonly List<Frame> _stacks = [];
    private int _recursion;

    /// <summary>Enters <paramref name="stack"/>: a leaf on top is kept (and popped too, if it may end); a rule is expanded.</summary>
    public void Enter(Frame? stack)
    {
        if (stack is null)
        {
            Add(Frame.End);
            return;
        }

        if (++_recursion > MaxRecursion)
        {
            throw new InvalidOperationException("the grammar recurses without consuming input (a left-recursive $ref?)");
        }

        try
        {
            switch (stack.Node)
            {
                case Leaf leaf:
                    if (leaf.CanContinue(stack.Data))
                    {
                        Add(stack);
                    }

                    if (leaf.CanFinish(stack.Data))
                    {
                        Enter(stack.Next);
                    }

                    break;
                case Rule rule:
                    rule.Expand(stack.Data, stack.Next, this);
                    break;
            }
        }
        finally
        {
            _recursion--;
        }
    }

    private void Add(Frame stack)
    {
        foreach (var s in _stacks)
        {
            if (s.Equals(stack))
            {
                return;
            }
        }

        _stacks.Add(stack);
    }

    /// <summary>The collected stacks as a state, or null when there are none; clears the collector.</summary>
    public AutomatonState? Take()
    {
        if (_stacks.Count == 0)
        {
            return null;
        }

        var state = new AutomatonState([.. _stacks]);
        _stacks.Clear();
        return state;
    }
}

/// <summary>
/// A set of live parses, each a stack with a leaf (or <see cref="Frame.End"/>) on top. Immutable, with value
/// equality, so it keys the mask cache.
/// </summary>
internal sealed class AutomatonState : IEquatable<AutomatonState>
{
    private readonly int _hash;

    public AutomatonState(Frame[] stacks)
    {
        // A canonical order, so the same set reached two ways compares equal.
        Array.Sort(stacks, static (a, b) => a.GetHashCode().CompareTo(b.GetHashCode()));
        Stacks = stacks;
        var h = new HashCode();
        foreach (var s in stacks)
        {
            h.Add(s.GetHashCode());
        }

        _hash = h.ToHashCode();
        foreach (var s in stacks)
        {
            IsComplete |= ReferenceEquals(s, Frame.End);
            HasFreeText |= s.Node is FreeTextLeaf;
            HasControl |= s.Node is ControlTokenLeaf;
        }
    }

    public Frame[] Stacks { get; }

    /// <summary>Some parse has matched a complete sentence.</summary>
    public bool IsComplete { get; }

    /// <summary>Some parse is inside <see cref="Grammar.FreeText"/>: every id is allowed.</summary>
    public bool HasFreeText { get; }

    /// <summary>Some parse expects an added token.</summary>
    public bool HasControl { get; }

    /// <summary>The state at the start of <paramref name="root"/>.</summary>
    public static AutomatonState Start(Node root)
    {
        var x = new Expander();
        x.Enter(new Frame(root, 0, null));
        return x.Take() ?? throw new InvalidOperationException("the grammar matches nothing");
    }

    /// <summary>The state after byte <paramref name="b"/>, or null when no parse accepts it.</summary>
    public AutomatonState? Step(byte b, Expander x)
    {
        if (Stacks is [{ Node: Leaf only } single])
        {
            // One parse whose leaf stays in the same state and cannot end there (most bytes inside a string): the
            // state is unchanged, so the trie walk steps through such subtrees without allocating.
            var same = only.Step(single.Data, b);
            if (same == single.Data && !only.CanFinish(same))
            {
                return this;
            }
        }

        foreach (var s in Stacks)
        {
            var leaf = (Leaf)s.Node;
            var next = leaf.Step(s.Data, b);
            if (next >= 0)
            {
                x.Enter(next == s.Data ? s : new Frame(leaf, next, s.Next));
            }
        }

        return x.Take();
    }

    /// <summary>The state after all of <paramref name="bytes"/>, or null when they are rejected.</summary>
    public AutomatonState? Step(ReadOnlySpan<byte> bytes, Expander x)
    {
        var state = this;
        foreach (var b in bytes)
        {
            state = state.Step(b, x);
            if (state is null)
            {
                return null;
            }
        }

        return state;
    }

    /// <summary>The state after added token <paramref name="id"/>, or null when no parse expects it.</summary>
    public AutomatonState? StepAdded(int id, Expander x)
    {
        foreach (var s in Stacks)
        {
            if (s.Node is FreeTextLeaf)
            {
                x.Enter(s);
            }
            else if (s.Node is ControlTokenLeaf control && control.Id == id)
            {
                x.Enter(s.Next);
            }
        }

        return x.Take();
    }

    /// <summary>Whether added token <paramref name="id"/> may come next.</summary>
    public bool AllowsAdded(int id)
    {
        foreach (var s in Stacks)
        {
            if (s.Node is FreeTextLeaf || (s.Node is ControlTokenLeaf control && control.Id == id))
            {
                return true;
            }
        }

        return false;
    }

    public bool Equals(AutomatonState? other)
    {
        if (ReferenceEquals(this, other))
        {
            return true;
        }

        if (other is null || other._hash != _hash || other.Stacks.Length != Stacks.Length)
        {
            return false;
        }

        for (var i = 0; i < Stacks.Length; i++)
        {
            if (!Stacks[i].Equals(other.Stacks[i]))
            {
                return false;
            }
        }

        return true;
    }

    public override bool Equals(object? obj) => Equals(obj as AutomatonState);

    public override int GetHashCode() => _hash;
}
