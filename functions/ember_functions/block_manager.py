"""KV block accounting: which sequence owns which cache block. Pure Python.

Blocks are fixed-size groups of token slots. A full block is content-addressed by a
chained hash of (parent block hash, prefix key, its tokens), so a new request whose
prompt starts with the same tokens, under the same tenant and adapter, reuses the blocks
instead of recomputing them: those are its *cached* tokens.

Free blocks keep their contents and hash until they are handed out again, so the
prefix cache costs no memory beyond the cache itself; uncached free blocks are
handed out before cached ones, and cached ones least recently freed first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, abc, deque

from ember_core import CapacityError
from ember_functions.sequence import Sequence


def block_hash(parent: bytes, salt: str, tokens: list[int]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(salt.encode())
    h.update(b"\x00")
    h.update(b"".join(t.to_bytes(4, "little") for t in tokens))
    return h.digest()


class BlockManager:
    def __init__(self, *, num_blocks: int, block_size: int, prefix_cache: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_cache = prefix_cache
        self._ref_count = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._free_plain: deque[int] = deque(range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        # Per sequence: the hashes of its full, committed blocks, in order.
        self._seq_hashes: dict[str, list[bytes]] = {}

    # -- queries -------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_plain) + len(self._free_cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of ``seq``'s tokens; takes no reference.

        At least one token is always left uncached: the model must run on it to
        produce the next token's logits.
        """
        if not self.prefix_cache:
            return []
        tokens = seq.token_ids
        hits: list[int] = []
        parent = b""
        for i in range((len(tokens) - 1) // self.block_size):
            chunk = tokens[i * self.block_size : (i + 1) * self.block_size]
            parent = block_hash(parent, seq.prefix_key, chunk)
            block = self._block_of.get(parent)
            if block is None:
                break
            hits.append(block)
        return hits

    def can_allocate(self, num_new_blocks: int, *, reusing: abc.Sequence[int] = ()) -> bool:
        # Reusing a free cached block takes it out of the free pool too.
        revived = sum(1 for b in reusing if self._ref_count[b] == 0)
        return self.num_free_blocks - revived >= num_new_blocks

    # -- actions -------------------------------------------------------------------

    def admit(self, seq: Sequence, *, cached_blocks: list[int], num_new_tokens: int) -> None:
        """Give a waiting sequence its cached prefix plus blocks for ``num_new_tokens``."""
        need = self.blocks_for(len(cached_blocks) * self.block_size + num_new_tokens)
        if not self.can_allocate(need - len(cached_blocks), reusing=cached_blocks):
            raise CapacityError("not enough free KV blocks; check can_allocate first")
        for b in cached_blocks:
            self._acquire(b)
        seq.block_table = list(cached_blocks) + self._allocate(need - len(cached_blocks))
        seq.num_computed_tokens = len(cached_blocks) * self.block_size
        self._seq_hashes[seq.request_id] = [self._hash_of[b] for b in cached_blocks]

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        need = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return self.num_free_blocks >= need

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        """Make ``seq``'s block table cover ``num_new_tokens`` more tokens."""
        need = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need > 0:
            if self.num_free_blocks < need:
                raise CapacityError("not enough free KV blocks; check can_grow first")
            seq.block_table.extend(self._allocate(need))

    def commit(self, seq: Sequence) -> None:
        """Register the hashes of blocks that became full of computed tokens."""
        if not self.prefix_cache:
            return
        hashes = self._seq_hashes.setdefault(seq.request_id, [])
        full = seq.num_computed_tokens // self.block_size
        if full <= len(hashes):
            return
        tokens = seq.token_ids
        parent = hashes[-1] if hashes else b""
        for i in range(len(hashes), full):
            parent = block_hash(
                parent, seq.prefix_key, tokens[i * self.block_size : (i + 1) * self.block_size]
            )
            hashes.append(parent)
            block = seq.block_table[i]
            if parent not in self._block_of:
                self._block_of[parent] = block
                self._hash_of[block] = parent

    def release(self, seq: Sequence) -> None:
        """Return every block of ``seq``; its full blocks stay findable by hash."""
        for b in reversed(seq.block_table):
            self._ref_count[b] -= 1
            if self._ref_count[b] == 0:
                if b in self._hash_of:
                    self._free_cached[b] = None
                else:
                    self._free_plain.append(b)
        seq.block_table = []
        seq.num_computed_tokens = 0
        self._seq_hashes.pop(seq.request_id, None)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use keep their contents)."""
        self._free_plain.extend(self._free_cached)
        self._free_cached.clear()
        self._hash_of.clear()
        self._block_of.clear()

    # -- internals ------------------------------------------------------------------

    def _acquire(self, block: int) -> None:
        if self._ref_count[block] == 0:
            self._free_cached.pop(block, None)
        self._ref_count[block] += 1

    def _allocate(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            if self._free_plain:
                b = self._free_plain.popleft()
            else:
                b, _ = self._free_cached.popitem(last=False)
                del self._block_of[self._hash_of.pop(b)]
            self._ref_count[b] = 1
            out.append(b)
        return out
