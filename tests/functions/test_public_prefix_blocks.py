"""BlockManager's public prefix: a chat preamble's blocks, shared by every tenant, pinned
against eviction, its partial tail handed out by copy, and restored into a fresh manager.
Pure Python, no model (``test_public_prefix.py`` runs it in an engine)."""

from __future__ import annotations

import pytest

from ember_core import CapacityError
from ember_functions.block_manager import BlockManager, SlotCopy
from ember_functions.sequence import Sequence

from .block_sequences import admit_and_compute, seq


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
