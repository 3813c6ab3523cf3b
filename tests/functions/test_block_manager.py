"""BlockManager: KV block accounting and the prefix cache. Pure Python, no model."""

from __future__ import annotations

import pytest

from ember_core import CapacityError
from ember_functions.block_manager import BlockManager, block_hash

from .block_sequences import admit_and_compute, seq


def test_rejects_empty_pools() -> None:
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=4)
    with pytest.raises(ValueError):
        BlockManager(num_blocks=4, block_size=0)


def test_admit_takes_ceil_blocks_and_release_returns_them() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.blocks_for(0) == 0 and bm.blocks_for(4) == 1 and bm.blocks_for(5) == 2
    s = seq("a", list(range(10)))
    bm.admit(s, cached_blocks=[], num_new_tokens=10)
    assert len(s.block_table) == 3 == len(set(s.block_table))
    assert s.num_computed_tokens == 0
    assert bm.num_free_blocks == 5
    bm.release(s)
    assert bm.num_free_blocks == 8
    assert s.block_table == [] and s.num_computed_tokens == 0


def test_can_allocate_accounting() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.can_allocate(8) and not bm.can_allocate(9)
    s = seq("a", list(range(12)))
    bm.admit(s, cached_blocks=[], num_new_tokens=12)
    assert bm.can_allocate(5) and not bm.can_allocate(6)
    too_big = seq("b", list(range(100, 124)))
    with pytest.raises(CapacityError):
        bm.admit(too_big, cached_blocks=[], num_new_tokens=24)
    assert bm.num_free_blocks == 5  # a refused admission takes nothing
    bm.release(s)


def test_grow_allocates_only_at_block_boundaries() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    s = seq("a", list(range(4)))
    bm.admit(s, cached_blocks=[], num_new_tokens=4)
    s.num_computed_tokens = 4
    assert bm.can_grow(s, 1)
    bm.grow(s, 1)  # position 4 opens a second block
    assert len(s.block_table) == 2 and bm.num_free_blocks == 0
    s.num_computed_tokens = 5
    bm.grow(s, 3)  # positions 5..7 fit in the same block
    assert len(s.block_table) == 2
    s.num_computed_tokens = 8
    assert not bm.can_grow(s, 1)
    with pytest.raises(CapacityError):
        bm.grow(s, 1)
    bm.release(s)
    assert bm.num_free_blocks == 2


def test_prefix_hits_need_the_same_tokens_and_salt() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    tokens = list(range(10, 20))  # 2 full blocks + 2 tokens
    a = seq("a", tokens, salt="tenant-a")
    admit_and_compute(bm, a)
    a_blocks = list(a.block_table)
    bm.release(a)
    assert bm.match_prefix(seq("b", tokens, salt="tenant-a")) == a_blocks[:2]
    # Tenant isolation: same tokens under another salt (or none) never hit.
    assert bm.match_prefix(seq("c", tokens, salt="tenant-b")) == []
    assert bm.match_prefix(seq("d", tokens)) == []
    # Hashes chain: a change in block 1 keeps block 0's hit, one in block 0 loses both.
    changed_1 = [*tokens[:5], 99, *tokens[6:]]
    assert bm.match_prefix(seq("e", changed_1, salt="tenant-a")) == a_blocks[:1]
    changed_0 = [99, *tokens[1:]]
    assert bm.match_prefix(seq("f", changed_0, salt="tenant-a")) == []


def test_block_hash_covers_parent_salt_and_tokens() -> None:
    h = block_hash(b"", b"", [1, 2, 3, 4])
    assert h == block_hash(b"", b"", [1, 2, 3, 4])
    assert h != block_hash(b"", b"t", [1, 2, 3, 4])
    assert h != block_hash(b"\x01", b"", [1, 2, 3, 4])
    assert h != block_hash(b"", b"", [1, 2, 3, 5])
    assert block_hash(b"", b"ab", [1]) != block_hash(b"", b"a", [ord("b") << 8 | 1])


def test_at_least_one_token_is_left_uncached() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    tokens = list(range(8))  # exactly 2 full blocks
    a = seq("a", tokens)
    admit_and_compute(bm, a)
    a_blocks = list(a.block_table)
    bm.release(a)
    # Same 8 tokens: the last one must be computed for its logits, so block 1 is redone.
    assert bm.match_prefix(seq("b", tokens)) == a_blocks[:1]
    assert bm.match_prefix(seq("c", [*tokens, 8])) == a_blocks
    assert bm.match_prefix(seq("d", tokens[:1])) == []


def test_admit_with_hits_reuses_blocks_and_counts_them_computed() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    a = seq("a", list(range(9)))  # 3 blocks, 2 of them full
    admit_and_compute(bm, a)
    a_blocks = list(a.block_table)
    bm.release(a)
    assert bm.num_free_blocks == 3
    b = seq("b", [*range(8), 42])
    hits = bm.match_prefix(b)
    assert hits == a_blocks[:2]
    # The two hits are free cached blocks: reviving them uses up two of the three free.
    assert bm.can_allocate(1, reusing=hits)
    assert not bm.can_allocate(2, reusing=hits)
    bm.admit(b, cached_blocks=hits, num_new_tokens=1)
    assert b.block_table[:2] == a_blocks[:2]
    assert b.num_computed_tokens == 8
    assert bm.num_free_blocks == 0
    bm.release(b)
    assert bm.num_free_blocks == 3


def test_shared_blocks_are_reference_counted() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq("a", list(range(12)))
    admit_and_compute(bm, a)  # a keeps running; its 3 full blocks are committed
    b = seq("b", [*range(12), 7])
    hits = bm.match_prefix(b)
    assert hits == a.block_table
    assert bm.can_allocate(1, reusing=hits)  # blocks in use are not free: nothing revived
    bm.admit(b, cached_blocks=hits, num_new_tokens=1)
    assert bm.num_free_blocks == 8 - 3 - 1
    bm.release(a)
    assert bm.num_free_blocks == 4  # b still holds the shared blocks
    bm.release(b)
    assert bm.num_free_blocks == 8


def test_plain_free_blocks_are_handed_out_before_cached_ones() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq("a", [1, 2, 3, 4])
    admit_and_compute(bm, a)
    a_blocks = list(a.block_table)
    bm.release(a)
    probe = seq("p", [1, 2, 3, 4, 5])
    assert bm.match_prefix(probe) == a_blocks
    c = seq("c", [9, 9, 9, 9])
    bm.admit(c, cached_blocks=[], num_new_tokens=4)
    assert set(c.block_table).isdisjoint(a_blocks)  # the two never-cached blocks
    assert bm.match_prefix(probe) == a_blocks  # the cache survived
    d = seq("d", [8, 8])
    bm.admit(d, cached_blocks=[], num_new_tokens=2)
    # Now a cached block must go: the tail of a's prefix, which was freed first, so the
    # head (the more widely shareable block) stays findable.
    assert d.block_table == [a_blocks[1]]
    assert bm.match_prefix(probe) == a_blocks[:1]
    for s in (c, d):
        bm.release(s)
    assert bm.num_free_blocks == 4


def test_used_blocks_are_reused_newest_first_before_fresh_ones() -> None:
    # Fresh blocks cost a worker resident memory (their pages are mapped on first
    # write): a freed block that holds no cached prefix is handed out again first.
    bm = BlockManager(num_blocks=8, block_size=2)
    assert bm.first_fresh_block == 0
    a, b = seq("a", [1]), seq("b", [2])
    bm.admit(a, cached_blocks=[], num_new_tokens=1)
    bm.admit(b, cached_blocks=[], num_new_tokens=1)
    assert (a.block_table, b.block_table, bm.first_fresh_block) == ([0], [1], 2)
    bm.release(a)
    bm.release(b)
    c = seq("c", [3, 3, 3])
    bm.admit(c, cached_blocks=[], num_new_tokens=3)
    assert c.block_table == [1, 0]  # b's block, freed last, first
    assert bm.first_fresh_block == 2
    d = seq("d", [4])
    bm.admit(d, cached_blocks=[], num_new_tokens=1)
    assert d.block_table == [2]  # no used block left: the next fresh one, in id order
    assert bm.first_fresh_block == 3
    for s in (c, d):
        bm.release(s)
    assert bm.num_free_blocks == 8


def test_fresh_blocks_are_handed_out_before_cached_prefixes_are_evicted() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    a = seq("a", [1, 2, 3])
    admit_and_compute(bm, a)
    cached = a.block_table[0]
    bm.release(a)
    b = seq("b", [7, 7])
    bm.admit(b, cached_blocks=[], num_new_tokens=2)
    c = seq("c", [8, 8])
    bm.admit(c, cached_blocks=[], num_new_tokens=2)
    assert cached not in b.block_table + c.block_table
    assert bm.first_fresh_block == 3
    assert bm.match_prefix(seq("a2", [1, 2, 3])) == [cached]  # still findable
    for s in (b, c):
        bm.release(s)


def test_cached_blocks_are_evicted_least_recently_freed_first() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    x, y = seq("x", [1, 2, 3]), seq("y", [5, 6, 7])
    admit_and_compute(bm, x)
    admit_and_compute(bm, y)
    x0, y0 = x.block_table[0], y.block_table[0]
    bm.release(x)  # x's full block is freed before y's
    bm.release(y)
    fill = seq("f", [0, 0, 0, 0])
    bm.admit(fill, cached_blocks=[], num_new_tokens=4)  # takes the two partial blocks
    assert x0 not in fill.block_table and y0 not in fill.block_table
    one = seq("o", [4, 4])
    bm.admit(one, cached_blocks=[], num_new_tokens=2)
    assert one.block_table == [x0]
    assert bm.match_prefix(seq("y2", [5, 6, 7])) == [y0]
    assert bm.match_prefix(seq("x2", [1, 2, 3])) == []
    bm.release(fill)
    bm.release(one)


def test_duplicate_content_is_registered_once() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = seq("a", list(range(5))), seq("b", list(range(5)))
    for s in (a, b):  # both admitted in one step, before either committed anything
        bm.admit(s, cached_blocks=[], num_new_tokens=5)
    for s in (a, b):
        s.num_computed_tokens = 5
        bm.commit(s)
    a0, b0 = a.block_table[0], b.block_table[0]
    assert a0 != b0
    bm.release(b)
    bm.release(a)
    assert bm.match_prefix(seq("c", list(range(5)))) == [a0]
    # b's duplicate was never registered, so it came back as a plain block: the seven
    # plain blocks are all handed out before a's cached one.
    big = seq("big", list(range(100, 128)))
    bm.admit(big, cached_blocks=[], num_new_tokens=28)
    assert b0 in big.block_table and a0 not in big.block_table
    assert bm.match_prefix(seq("c", list(range(5)))) == [a0]
    bm.release(big)
    assert bm.num_free_blocks == 8


def test_commit_registers_only_full_computed_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq("a", list(range(10)))
    bm.admit(s, cached_blocks=[], num_new_tokens=10)
    s.num_computed_tokens = 6  # a chunked prefill stopped inside block 1
    bm.commit(s)
    bm.commit(s)  # idempotent
    probe = seq("p", list(range(10)))
    assert bm.match_prefix(probe) == s.block_table[:1]
    s.num_computed_tokens = 10
    bm.commit(s)
    assert bm.match_prefix(probe) == s.block_table[:2]
    bm.release(s)


def test_reset_and_disabled_prefix_cache() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq("a", list(range(9)))
    admit_and_compute(bm, a)
    bm.release(a)
    assert bm.match_prefix(seq("b", list(range(9))))
    bm.reset_prefix_cache()
    assert bm.match_prefix(seq("b", list(range(9)))) == []
    assert bm.num_free_blocks == 8

    off = BlockManager(num_blocks=8, block_size=4, prefix_cache=False)
    c = seq("c", list(range(9)))
    admit_and_compute(off, c)
    off.release(c)
    assert off.match_prefix(seq("d", list(range(9)))) == []
    assert off.num_free_blocks == 8


# -- bugs ------------------------------------------------------------------------------


def test_prefix_hits_need_the_same_adapter() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    base = seq("a", list(range(9)), salt="tenant")
    admit_and_compute(bm, base)
    bm.release(base)
    tuned = seq("b", list(range(9)), salt="tenant")
    tuned.adapter_id = "acme/sql-v2"
    tuned.adapter_slot = 3
    assert bm.match_prefix(tuned) == []


def test_sequence_token_slices_match_the_full_list() -> None:
    s = seq("slices", list(range(10)))
    s.output_ids.extend([100, 101, 102])
    full = s.token_ids
    for start in range(len(full) + 1):
        for end in range(start, len(full) + 1):
            assert s.tokens(start, end) == full[start:end]
