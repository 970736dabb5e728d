using DeepSeekCuda.Serving;

namespace DeepSeekCuda.Tests.Serving;

[TestClass]
public sealed class KvBlockManagerTests
{
    [TestMethod]
    public void TableRowsAddressPositionsIn64TokenBlocks()
    {
        var m = new KvBlockManager(totalBlocks: 10, maxRequests: 3, maxBlocksPerRequest: 4);
        var a = m.Admit(130); // 3 blocks
        var b = m.Admit(64);  // 1 block
        Assert.AreEqual(6, m.FreeBlocks);
        Assert.AreEqual(3, m.Blocks(a).Length);
        Assert.AreEqual(1, m.Blocks(b).Length);
        var table = m.Table.ToArray();
        Assert.AreEqual(3 * 4, table.Length);
        for (var p = 0; p < 130; p++)
        {
            var (block, row) = m.Locate(a, p);
            Assert.AreEqual(table[a * 4 + p / 64], block);
            Assert.AreEqual(p % 64, row);
        }

        Assert.AreEqual(-1, table[a * 4 + 3], "unused entries are -1");
        Assert.AreEqual(-1, table[b * 4 + 1]);
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => m.Locate(a, 130));
        CollectionAssert.AllItemsAreUnique(m.Blocks(a).ToArray().Concat(m.Blocks(b).ToArray()).ToArray());
    }

    [TestMethod]
    public void APoolMadeToShrinkToFitShrinksOnlyBeforeAnythingIsHandedOut()
    {
        var fixedSize = new KvBlockManager(10, 2, 4);
        Assert.ThrowsExactly<InvalidOperationException>(() => fixedSize.ShrinkTo(5), "a pool of a set size keeps it");

        var m = new KvBlockManager(10, 2, 4) { ShrinkToFit = true };
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => m.ShrinkTo(11), "shrinking never grows");
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => m.ShrinkTo(-1));
        m.ShrinkTo(5);
        Assert.AreEqual(5, m.TotalBlocks);
        Assert.AreEqual(5, m.FreeBlocks);
        var a = m.Admit(4 * 64);
        CollectionAssert.AreEqual(new[] { 0, 1, 2, 3 }, m.Blocks(a).ToArray(), "the lowest ids first, as in any pool");
        Assert.IsFalse(m.CanAdmit(2 * 64), "one block is left of the five");
        Assert.ThrowsExactly<InvalidOperationException>(() => m.ShrinkTo(4), "blocks are handed out");
        m.Free(a);
        Assert.AreEqual(5, m.FreeBlocks);
    }

    [TestMethod]
    public void GrowthTakesABlockOnlyAtABoundary()
    {
        var m = new KvBlockManager(4, 1, 4);
        var s = m.Admit(63);
        Assert.AreEqual(3, m.FreeBlocks);
        Assert.IsTrue(m.TryReserve(s, 64));
        Assert.AreEqual(3, m.FreeBlocks, "64 tokens still fit one block");
        Assert.IsTrue(m.TryReserve(s, 65));
        Assert.AreEqual(2, m.FreeBlocks);
        Assert.AreEqual(65, m.Capacity(s));
        Assert.IsTrue(m.TryReserve(s, 10), "shrinking through TryReserve changes nothing");
        Assert.AreEqual(65, m.Capacity(s));
        Assert.AreEqual(2, m.Blocks(s).Length);
    }

    [TestMethod]
    public void RefusalsLeaveNothingBehind()
    {
        var m = new KvBlockManager(4, 3, 4);
        var s = m.Admit(200); // 4 blocks: the pool is empty
        var table = m.Table.ToArray();
        Assert.IsFalse(m.TryAdmit(1, out var none));
        Assert.AreEqual(-1, none);
        Assert.IsFalse(m.CanAdmit(1));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => m.TryReserve(s, 257), "longer than a table row");
        Assert.ThrowsExactly<KvCacheFullException>(() => m.Admit(1));
        CollectionAssert.AreEqual(table, m.Table.ToArray());
        Assert.AreEqual(0, m.FreeBlocks);
        Assert.AreEqual(2, m.FreeSlots);

        // A grow that needs two blocks when one is free takes neither.
        m.Truncate(s, 150); // 3 blocks, 1 free
        table = m.Table.ToArray();
        var other = m.Admit(0);
        Assert.IsFalse(m.TryReserve(other, 65));
        Assert.ThrowsExactly<KvCacheFullException>(() => m.Reserve(other, 65));
        Assert.AreEqual(1, m.FreeBlocks);
        Assert.AreEqual(0, m.Blocks(other).Length);
        CollectionAssert.AreEqual(table, m.Table.ToArray());
    }

    [TestMethod]
    public void SlotsRunOutBeforeBlocks()
    {
        var m = new KvBlockManager(100, 2, 4);
        m.Admit(1);
        m.Admit(1);
        Assert.IsFalse(m.TryAdmit(1, out _));
        Assert.AreEqual(98, m.FreeBlocks);
    }

    [TestMethod]
    public void VersionMovesExactlyWhenTheTableChanges()
    {
        var m = new KvBlockManager(4, 3, 4);
        var table = m.Table.ToArray();
        var version = m.Version;
        void Check(string what)
        {
            var changed = !m.Table.SequenceEqual(table);
            Assert.AreEqual(changed, m.Version != version, what);
            table = m.Table.ToArray();
            version = m.Version;
        }

        var s = m.Admit(10);
        Check("admission takes a block");
        m.Reserve(s, 64);
        Check("growth within the block");
        m.Reserve(s, 65);
        Check("growth into a second block");
        Assert.IsFalse(m.TryAdmit(200, out _));
        Check("a refused admission");
        m.Truncate(s, 65);
        Check("a truncation that frees nothing");
        m.Truncate(s, 30);
        Check("a truncation that frees a block");
        var empty = m.Admit(0);
        Check("admitting an empty request");
        m.Free(empty);
        Check("freeing a slot without blocks");
        m.Free(s);
        Check("freeing a slot with a block");
    }

    [TestMethod]
    public void TruncateReturnsSurplusBlocks()
    {
        var m = new KvBlockManager(8, 1, 8);
        var s = m.Admit(130);
        var first = m.Blocks(s)[0];
        Assert.AreEqual(0, m.Truncate(s, 129));
        Assert.AreEqual(1, m.Truncate(s, 65));
        Assert.AreEqual(1, m.Truncate(s, 64));
        Assert.AreEqual(first, m.Blocks(s)[0], "the kept prefix stays where it was");
        Assert.AreEqual(7, m.FreeBlocks);
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => m.Truncate(s, 65), "cannot truncate upwards");
        m.Free(s);
        Assert.AreEqual(8, m.FreeBlocks);
        Assert.IsFalse(m.IsActive(s));
        Assert.ThrowsExactly<ArgumentException>(() => m.Free(s), "double free");
    }

    [TestMethod]
    public void BadArgumentsAreRejected()
    {
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => new KvBlockManager(-1, 1, 1));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => new KvBlockManager(1, 0, 1));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => new KvBlockManager(1, 1, 0));
        var m = new KvBlockManager(1, 1, 1);
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => m.TryAdmit(65, out _));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => m.TryAdmit(-1, out _));
        Assert.ThrowsExactly<ArgumentException>(() => m.Blocks(0));
        Assert.AreEqual(0, KvBlockManager.BlocksFor(0));
        Assert.AreEqual(1, KvBlockManager.BlocksFor(64));
        Assert.AreEqual(2, KvBlockManager.BlocksFor(65));
    }

    /// <summary>
    /// Random admit / grow / truncate / finish / cancel against a model that only tracks each request's
    /// length: after every operation, each request owns exactly ⌈length/64⌉ blocks, no block has two
    /// owners or is both owned and free, and at the end every block is back.
    /// </summary>
    [TestMethod]
    [DataRow(1)]
    [DataRow(2)]
    [DataRow(3)]
    public void RandomOperationsKeepOwnershipExact(int seed)
    {
        const int total = 40, slots = 6, perRequest = 12;
        var m = new KvBlockManager(total, slots, perRequest);
        var model = new Dictionary<int, int>(); // slot -> reserved tokens
        var rng = new Random(seed);
        var refusals = 0;
        for (var op = 0; op < 5000; op++)
        {
            var used = model.Values.Sum(KvBlockManager.BlocksFor);
            switch (rng.Next(5))
            {
                case 0 or 1:
                {
                    var tokens = rng.Next(0, perRequest * 64 + 1);
                    var fits = model.Count < slots && used + KvBlockManager.BlocksFor(tokens) <= total;
                    Assert.AreEqual(fits, m.TryAdmit(tokens, out var slot), $"op {op}: admit {tokens}");
                    if (fits)
                    {
                        Assert.IsFalse(model.ContainsKey(slot));
                        model[slot] = tokens;
                    }
                    else
                    {
                        refusals++;
                    }

                    break;
                }

                case 2 when model.Count > 0:
                {
                    var slot = model.Keys.ElementAt(rng.Next(model.Count));
                    var tokens = Math.Min(perRequest * 64, model[slot] + rng.Next(1, 100));
                    var fits = used - KvBlockManager.BlocksFor(model[slot]) + KvBlockManager.BlocksFor(tokens) <= total;
                    Assert.AreEqual(fits, m.TryReserve(slot, tokens), $"op {op}: grow slot {slot} to {tokens}");
                    if (fits)
                    {
                        model[slot] = tokens;
                    }

                    break;
                }

                case 3 when model.Count > 0:
                {
                    var slot = model.Keys.ElementAt(rng.Next(model.Count));
                    var length = rng.Next(0, model[slot] + 1);
                    var freed = m.Truncate(slot, length);
                    Assert.AreEqual(KvBlockManager.BlocksFor(model[slot]) - KvBlockManager.BlocksFor(length), freed);
                    model[slot] = length;
                    break;
                }

                case 4 when model.Count > 0:
                {
                    // Finish and cancel are the same to the block manager: everything goes back.
                    var slot = model.Keys.ElementAt(rng.Next(model.Count));
                    m.Free(slot);
                    model.Remove(slot);
                    break;
                }
            }

            CheckInvariants(m, model, total);
        }

        foreach (var slot in model.Keys.ToList())
        {
            m.Free(slot);
        }

        Assert.AreEqual(total, m.FreeBlocks);
        Assert.AreEqual(slots, m.FreeSlots);
        Assert.IsTrue(m.Table.ToArray().All(b => b == -1));
        Assert.IsGreaterThan(0, refusals, "the pool ran full at times");
    }

    private static void CheckInvariants(KvBlockManager m, Dictionary<int, int> model, int total)
    {
        var owned = new HashSet<int>();
        for (var slot = 0; slot < m.MaxRequests; slot++)
        {
            Assert.AreEqual(model.ContainsKey(slot), m.IsActive(slot));
            var row = m.Table.Slice(slot * m.MaxBlocksPerRequest, m.MaxBlocksPerRequest);
            var expected = model.TryGetValue(slot, out var tokens) ? KvBlockManager.BlocksFor(tokens) : 0;
            for (var i = 0; i < row.Length; i++)
            {
                if (i < expected)
                {
                    Assert.IsTrue(row[i] >= 0 && row[i] < total, $"slot {slot} entry {i} = {row[i]}");
                    Assert.IsTrue(owned.Add(row[i]), $"block {row[i]} has two owners");
                }
                else
                {
                    Assert.AreEqual(-1, row[i], $"slot {slot} entry {i} past its {expected} blocks");
                }
            }

            if (expected > 0 || model.ContainsKey(slot))
            {
                Assert.AreEqual(tokens, m.Capacity(slot));
            }
        }

        Assert.AreEqual(total - owned.Count, m.FreeBlocks);
    }
}
