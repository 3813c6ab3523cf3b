"""BlockManager: KV block accounting and the prefix cache. Pure Python, no model."""

from __future__ import annotations

import pytest

from ember_core import CapacityError
from ember_functions.block_manager import BlockManager, SlotCopy, block_hash
from ember_functions.sampling_params import SamplingParams
from ember_functions.sequence import Sequence


def seq(rid: str, tokens: list[int], *, salt: str = "") -> Sequence:
    return Sequence(
        request_id=rid,
        prompt_ids=list(tokens),
        params=SamplingParams(),
        max_tokens=16,
        arrival_s=0.0,
        cache_salt=salt,
    )


def admit_and_compute(bm: BlockManager, s: Sequence) -> None:
    """Admits ``s`` (with whatever prefix hits it has) and marks every token computed,
    as a full prefill would."""
    hits = bm.match_prefix(s)
    bm.admit(s, cached_blocks=hits, num_new_tokens=s.num_tokens - len(hits) * bm.block_size)
    s.num_computed_tokens = s.num_tokens
    bm.commit(s)


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


def test_kv_blocks_export_and_import_round_trip() -> None:
    import torch

    from ember_functions.attention import KVCache

    cache = KVCache(
        num_layers=2,
        num_blocks=6,
        block_size=4,
        num_kv_heads=2,
        head_dim=8,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    cache.data.copy_(torch.randn_like(cache.data))
    saved = cache.read_blocks([4, 1])  # [layers, 2, 2 blocks, block_size, kv_heads, head_dim]
    assert saved.shape == (2, 2, 2, 4, 2, 8)
    cache.write_blocks([0, 3], saved)
    assert torch.equal(cache.read_blocks([0, 3]), saved)
    assert torch.equal(cache.read_blocks([0]), cache.read_blocks([4]))
    k_layer0, _ = cache.layer(0)  # [kv_heads, slots, head_dim]: block 3 holds block 1's
    assert torch.equal(k_layer0[:, 12:16], k_layer0[:, 4:8])
    assert torch.equal(saved[0, 0, 1].transpose(0, 1), k_layer0[:, 4:8])
    with pytest.raises(ValueError, match="expected"):
        cache.write_blocks([0], saved)


def test_sequence_token_slices_match_the_full_list() -> None:
    s = seq("slices", list(range(10)))
    s.output_ids.extend([100, 101, 102])
    full = s.token_ids
    for start in range(len(full) + 1):
        for end in range(start, len(full) + 1):
            assert s.tokens(start, end) == full[start:end]


def test_public_prefix_blocks_are_shared_across_tenants_and_nothing_after_them() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    preamble = [7, 7, 7, 7, 8, 8]  # one whole block, and a tail of two tokens
    assert bm.set_public_prefix(preamble) == 6
    assert bm.public_prefix == preamble
    a = seq("a", [*preamble, 1, 2, 3, 4, 5], salt="tenant-a")
    admit_and_compute(bm, a)
    # Another tenant's prompt with the same preamble reuses the public block, and only it:
    # block 1 holds the tenant's own tokens and is keyed by its salt.
    b = seq("b", [*preamble, 1, 2, 3, 4, 5], salt="tenant-b")
    assert bm.match_prefix(b) == a.block_table[:1]
    # The same tenant gets its private blocks too.
    again = seq("a2", [*preamble, 1, 2, 3, 4, 5], salt="tenant-a")
    assert bm.match_prefix(again) == a.block_table[:2]
    # A prompt that differs inside the public block shares nothing.
    assert bm.match_prefix(seq("c", [7, 7, 7, 9, 8, 8, 1, 2, 3], salt="tenant-b")) == []


def test_public_blocks_are_keyed_by_adapter_and_unreachable_by_any_salt() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    bm.set_public_prefix([7, 7, 7, 7])
    base = seq("a", [7, 7, 7, 7, 1], salt="t")
    admit_and_compute(bm, base)
    tuned = seq("b", [7, 7, 7, 7, 1], salt="t")
    tuned.adapter_id = "sha256:adapter"
    assert bm.match_prefix(tuned) == []  # another adapter's weights make other K/V
    # No salt hashes into the public namespace: without a public prefix set, nothing hits.
    other = BlockManager(num_blocks=16, block_size=4)
    for salt in ("", "\xff", "\x00"):
        admit_and_compute(other, seq(f"s{salt!r}", [7, 7, 7, 7, 1], salt=salt))
    other.set_public_prefix([7, 7, 7, 7])
    assert other.match_prefix(seq("p", [7, 7, 7, 7, 1], salt="x")) == []


def test_pinned_public_blocks_survive_eviction_and_unpin_on_reset() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.set_public_prefix([7, 7, 7, 7])
    assert bm.pin_public_prefix() == 0  # nothing computed yet
    first = seq("a", [7, 7, 7, 7, 1], salt="t")
    admit_and_compute(bm, first)
    public_block = first.block_table[0]
    bm.release(first)
    assert bm.pin_public_prefix() == 4
    assert bm.pin_public_prefix() == 4  # pinning twice takes one reference
    assert bm.num_free_blocks == 3
    # Fill every other block with other tenants' work: the public block stays.
    hog = seq("b", list(range(12)), salt="u")
    admit_and_compute(bm, hog)
    bm.release(hog)
    hog2 = seq("c", list(range(100, 112)), salt="u")
    admit_and_compute(bm, hog2)
    hit = bm.match_prefix(seq("d", [7, 7, 7, 7, 2], salt="v"))
    assert hit == [public_block]
    bm.release(hog2)
    bm.reset_prefix_cache()
    assert bm.num_free_blocks == 4
    assert bm.match_prefix(seq("e", [7, 7, 7, 7, 2], salt="v")) == []


def test_no_public_prefix_without_the_prefix_cache() -> None:
    bm = BlockManager(num_blocks=4, block_size=4, prefix_cache=False)
    assert bm.set_public_prefix([7, 7, 7, 7]) == 0
    assert bm.public_prefix == []


def pinned_preamble(bm: BlockManager, preamble: list[int]) -> Sequence:
    """What the engine does: computes the preamble as a base-model sequence, pins its
    blocks (the tail's too) and lets the sequence go. Returns the sequence."""
    bm.set_public_prefix(preamble)
    own = seq("public", [*preamble, 0])  # the engine asks for more than the preamble
    bm.admit(own, cached_blocks=[], num_new_tokens=len(preamble))
    own.num_computed_tokens = len(preamble)
    bm.commit(own)
    assert bm.pin_public_prefix(own) == len(preamble)
    bm.release(own)
    return own


def test_a_chat_starting_with_the_preamble_gets_its_tail_by_copy() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    preamble = [7, 7, 7, 7, 8, 8]
    pinned_preamble(bm, preamble)
    assert bm.num_pinned_blocks == 2  # the whole block and the tail's
    assert bm.num_free_blocks == 14
    a = seq("a", [*preamble, 1, 2, 3], salt="tenant-a")
    hits = bm.match_prefix(a)
    assert bm.cached_tokens(a, hits) == 6
    bm.admit(a, cached_blocks=hits, num_new_tokens=3)
    assert a.num_computed_tokens == 6
    assert len(a.block_table) == 3  # 9 tokens
    tail_block = bm.take_copies()[0].src
    assert bm.take_copies() == []  # taken once
    b = seq("b", [*preamble, 4], salt="tenant-b")
    bm.admit(b, cached_blocks=bm.match_prefix(b), num_new_tokens=1)
    assert bm.take_copies() == [SlotCopy(tail_block, b.block_table[1], 2)]
    assert tail_block not in a.block_table + b.block_table  # copied from, never handed out
    for s in (a, b):
        bm.release(s)
    assert bm.num_free_blocks == 14


def test_no_tail_copy_unless_the_hits_are_exactly_the_public_blocks() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    preamble = [7, 7, 7, 7, 8, 8]
    pinned_preamble(bm, preamble)
    mine = seq("a", [*preamble, 1, 2, 3, 4, 5], salt="t")
    admit_and_compute(bm, mine)
    bm.take_copies()
    bm.release(mine)
    cases = {
        # The tenant's own cached blocks reach further than the tail would.
        "own cache": (seq("a2", [*preamble, 1, 2, 3, 4, 5], salt="t"), 8),
        # Another adapter's K/V are other values: neither blocks nor tail.
        "adapter": (seq("b", [*preamble, 1], salt="u"), 0),
        # Nothing would be left to compute: the whole block only, as any hit.
        "just the preamble": (seq("c", list(preamble), salt="u"), 4),
        # Differs inside the tail.
        "other tail": (seq("d", [7, 7, 7, 7, 8, 9, 1], salt="u"), 4),
    }
    cases["adapter"][0].adapter_id = "sha256:adapter"
    for name, (s, cached) in cases.items():
        hits = bm.match_prefix(s)
        assert bm.cached_tokens(s, hits) == cached, name
        bm.admit(s, cached_blocks=hits, num_new_tokens=s.num_tokens - cached)
        assert s.num_computed_tokens == cached, name
        assert bm.take_copies() == [], name
        bm.release(s)


def test_a_preamble_shorter_than_a_block_is_all_tail() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    pinned_preamble(bm, [7, 7, 7])
    a = seq("a", [7, 7, 7, 1, 2], salt="t")
    assert bm.match_prefix(a) == []
    bm.admit(a, cached_blocks=[], num_new_tokens=2)
    assert a.num_computed_tokens == 3
    assert bm.take_copies()[0].dst == a.block_table[0]
    bm.release(a)
    bm.reset_prefix_cache()  # unpins the tail's block too
    assert bm.num_pinned_blocks == 0
    assert bm.num_free_blocks == 8
    b = seq("b", [7, 7, 7, 1, 2], salt="t")
    assert bm.cached_tokens(b, bm.match_prefix(b)) == 0


def test_a_restored_public_prefix_is_pinned_as_a_computed_one_would_be() -> None:
    preamble = [7, 7, 7, 7, 8, 8]
    computed = BlockManager(num_blocks=16, block_size=4)
    pinned_preamble(computed, preamble)
    restored = BlockManager(num_blocks=16, block_size=4)
    assert restored.can_restore_public_prefix(len(preamble))
    blocks = restored.restore_public_prefix(preamble)
    assert blocks == restored.public_prefix_blocks() and len(blocks) == 2  # whole, tail
    assert restored.public_prefix == preamble
    assert restored.num_pinned_blocks == computed.num_pinned_blocks == 2
    assert restored.num_free_blocks == computed.num_free_blocks == 14
    # A chat starting with it is admitted the same way: the whole block hit, the tail copied.
    for bm in (computed, restored):
        a = seq("a", [*preamble, 1, 2, 3], salt="tenant-a")
        hits = bm.match_prefix(a)
        assert hits == bm.public_prefix_blocks()[:1]
        bm.admit(a, cached_blocks=hits, num_new_tokens=3)
        assert a.num_computed_tokens == 6
        assert bm.take_copies() == [SlotCopy(bm.public_prefix_blocks()[1], a.block_table[1], 2)]
        bm.release(a)
    # Pins come off on a reset, as computed ones do.
    restored.reset_prefix_cache()
    assert restored.num_free_blocks == 16 and restored.num_pinned_blocks == 0


def test_a_public_prefix_is_restored_only_into_a_fresh_manager_with_room() -> None:
    preamble = [7, 7, 7, 7, 8, 8]
    busy = BlockManager(num_blocks=16, block_size=4)
    admit_and_compute(busy, seq("a", [1, 2, 3, 4, 5]))  # a cached block already
    assert not busy.can_restore_public_prefix(len(preamble))
    with pytest.raises(CapacityError, match="can_restore_public_prefix"):
        busy.restore_public_prefix(preamble)
    assert busy.public_prefix == []  # refused: nothing changed
    assert not BlockManager(num_blocks=1, block_size=4).can_restore_public_prefix(6)
    assert not BlockManager(
        num_blocks=4, block_size=4, prefix_cache=False
    ).can_restore_public_prefix(6)
    again = BlockManager(num_blocks=16, block_size=4)
    again.restore_public_prefix(preamble)
    assert not again.can_restore_public_prefix(len(preamble))  # once
