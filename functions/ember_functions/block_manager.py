"""KV block accounting: which sequence owns which cache block. Pure Python.

Blocks are fixed-size groups of token slots. A full block is content-addressed by a
chained hash of (parent block hash, prefix key, its tokens), so a new request whose
prompt starts with the same tokens, under the same tenant and adapter, reuses the blocks
instead of recomputing them: those are its *cached* tokens.

Free blocks keep their contents and hash until they are handed out again, so the
prefix cache costs no memory beyond the cache itself. The allocator hands out, in order:
free blocks that hold no cached prefix, most recently freed first; then *fresh* blocks,
never handed out (ids ``first_fresh_block`` and up, in id order); then cached blocks,
least recently freed first. Reusing used blocks before fresh ones keeps a worker's
resident KV memory to what its load needed: on CPU a fresh block's pages are not even
mapped until first written (``KVCache``), and the engine faults in a short runway of
fresh blocks while idle (``LLMEngine.extend_kv_runway``) so requests do not wait on it.

The prefix key keeps tenants apart: a tenant's cache salt is in every block's hash, so
a hit can only ever tell a tenant about its own requests. One prefix is exempt, the
*public prefix* (``set_public_prefix``): token ids derived from public information
alone (the chat template's preamble, ``Tokenizer.chat_preamble``). Leading blocks that
hold exactly it are hashed without the salt, in a namespace no salt can reach, so every
tenant's chat requests share them; the engine computes and pins them itself
(``pin_public_prefix``), so whether they hit never depends on anyone's traffic. The
preamble's tail, the tokens past its last whole block, is pinned too, in a block of its
own: a sequence that starts with the whole preamble is admitted with those slots copied
into its first new block (a ``SlotCopy`` the runner carries out before the step), so it
computes none of the preamble, not just its whole blocks (SmolLM2: 23 tokens, not 16).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, abc
from typing import NamedTuple

from ember_core import CapacityError
from ember_functions.sequence import Sequence


def block_hash(parent: bytes, key: bytes, tokens: list[int]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(key)
    h.update(b"\x00")
    h.update(b"".join(t.to_bytes(4, "little") for t in tokens))
    return h.digest()


def _public_key(adapter_id: str) -> bytes:
    """The hash key of public blocks. It starts with 0xFF, which no UTF-8 string (so no
    salt) contains: the public and private namespaces cannot meet. It carries the
    adapter, whose weights make the blocks' contents."""
    return b"\xff" + adapter_id.encode()


class SlotCopy(NamedTuple):
    """Copy the KV of the first ``num_tokens`` slots of block ``src`` into block ``dst``,
    every layer, before the step that admitted ``dst``'s sequence runs."""

    src: int
    dst: int
    num_tokens: int


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
        self._free_used: list[int] = []  # freed, no cached prefix: a stack, newest last
        self._fresh_from = 0  # blocks [this, num_blocks) were never handed out
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        # Per sequence: the hashes of its full, committed blocks, in order.
        self._seq_hashes: dict[str, list[bytes]] = {}
        self._public: list[int] = []  # the public prefix's tokens
        self._pinned: list[int] = []  # its whole blocks, cached and referenced for good
        self._tail: int | None = None  # the block holding its tail, referenced for good
        self._copies: list[SlotCopy] = []  # admitted since the last take_copies()

    # -- queries -------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_used) + self.num_blocks - self._fresh_from + len(self._free_cached)

    @property
    def first_fresh_block(self) -> int:
        """Blocks from this id up were never handed out; the allocator takes them in id
        order, and only once no freed uncached block is left."""
        return self._fresh_from

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_pinned_blocks(self) -> int:
        """Blocks held by ``pin_public_prefix``: in use for good, by every tenant."""
        return len(self._pinned) + (self._tail is not None)

    @property
    def public_prefix(self) -> list[int]:
        """The public prefix's tokens."""
        return list(self._public)

    def cached_tokens(self, seq: Sequence, hits: abc.Sequence[int]) -> int:
        """Tokens of ``seq`` that admitting it with ``hits`` (``match_prefix``) leaves
        computed: the hits' blocks, plus the public prefix's tail when the hits are
        exactly its whole blocks and its tail is pinned."""
        return len(hits) * self.block_size + self._public_tail(seq, len(hits))

    def _public_tail(self, seq: Sequence, num_hits: int) -> int:
        """Tail tokens of the public prefix that ``seq`` gets by copy, or 0."""
        n, bs = len(self._public), self.block_size
        if self._tail is None or seq.adapter_id or num_hits != n // bs:
            return 0
        tokens = seq.token_ids
        # One token at least is left to compute, as with any prefix hit.
        if len(tokens) <= n or tokens[:n] != self._public:
            return 0
        return n - num_hits * bs

    def _public_blocks(self, tokens: list[int]) -> int:
        """How many leading blocks of ``tokens`` hold exactly the public prefix's."""
        bs, n = self.block_size, 0
        while (n + 1) * bs <= len(self._public) and (
            tokens[n * bs : (n + 1) * bs] == self._public[n * bs : (n + 1) * bs]
        ):
            n += 1
        return n

    def _hashes(self, seq: Sequence, start: int, stop: int, parent: bytes) -> abc.Iterator[bytes]:
        """Hashes of ``seq``'s blocks ``start..stop-1``, chained from ``parent``."""
        tokens = seq.token_ids
        private, public = seq.prefix_key.encode(), _public_key(seq.adapter_id)
        shared = self._public_blocks(tokens)
        bs = self.block_size
        for i in range(start, stop):
            key = public if i < shared else private
            parent = block_hash(parent, key, tokens[i * bs : (i + 1) * bs])
            yield parent

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of ``seq``'s tokens; takes no reference.

        At least one token is always left uncached: the model must run on it to
        produce the next token's logits.
        """
        if not self.prefix_cache:
            return []
        tokens = seq.token_ids
        hits: list[int] = []
        for h in self._hashes(seq, 0, (len(tokens) - 1) // self.block_size, b""):
            block = self._block_of.get(h)
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
        """Give a waiting sequence its cached prefix plus blocks for ``num_new_tokens``
        past ``cached_tokens(seq, cached_blocks)``; a public tail it gets is queued as a
        ``SlotCopy`` (``take_copies``)."""
        tail = self._public_tail(seq, len(cached_blocks))
        cached = len(cached_blocks) * self.block_size + tail
        need = self.blocks_for(cached + num_new_tokens)
        if not self.can_allocate(need - len(cached_blocks), reusing=cached_blocks):
            raise CapacityError("not enough free KV blocks; check can_allocate first")
        for b in cached_blocks:
            self._acquire(b)
        seq.block_table = list(cached_blocks) + self._allocate(need - len(cached_blocks))
        seq.num_computed_tokens = cached
        self._seq_hashes[seq.request_id] = [self._hash_of[b] for b in cached_blocks]
        if tail:
            assert self._tail is not None  # _public_tail checked
            self._copies.append(SlotCopy(self._tail, seq.block_table[len(cached_blocks)], tail))

    def take_copies(self) -> list[SlotCopy]:
        """The slot copies queued by admissions since the last call, in order."""
        copies, self._copies = self._copies, []
        return copies

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
        parent = hashes[-1] if hashes else b""
        for i, h in enumerate(self._hashes(seq, len(hashes), full, parent), start=len(hashes)):
            hashes.append(h)
            block = seq.block_table[i]
            if h not in self._block_of:
                self._block_of[h] = block
                self._hash_of[block] = h

    def release(self, seq: Sequence) -> None:
        """Return every block of ``seq``; its full blocks stay findable by hash."""
        for b in reversed(seq.block_table):
            self._ref_count[b] -= 1
            if self._ref_count[b] == 0:
                if b in self._hash_of:
                    self._free_cached[b] = None
                else:
                    self._free_used.append(b)
        seq.block_table = []
        seq.num_computed_tokens = 0
        self._seq_hashes.pop(seq.request_id, None)

    def set_public_prefix(self, tokens: abc.Sequence[int]) -> int:
        """Makes ``tokens`` the public prefix: it must come from public information only
        (the chat template), never from a request, or tenants could probe each other's
        prompts. Returns the tokens shared (0 when the prefix cache is off). Blocks
        pinned for an earlier prefix are let go."""
        self._unpin()
        self._public = list(tokens) if self.prefix_cache else []
        return len(self._public)

    def pin_public_prefix(self, seq: Sequence | None = None) -> int:
        """Takes a lasting reference on the public prefix's whole blocks the base model
        has cached so far, so nothing evicts them, and, given ``seq``, a base-model
        sequence that has computed the whole prefix, on its block holding the prefix's
        tail. Returns the tokens pinned (what a chat request starting with the prefix
        gets computed on admission)."""
        bs, key, parent = self.block_size, _public_key(""), b""
        whole = len(self._public) // bs
        for i in range(whole):
            parent = block_hash(parent, key, self._public[i * bs : (i + 1) * bs])
            block = self._block_of.get(parent)
            if block is None:
                break
            if block not in self._pinned:
                self._acquire(block)
                self._pinned.append(block)
        tail = len(self._public) - whole * bs
        computed = (
            seq is not None
            and not seq.adapter_id
            and seq.num_computed_tokens >= len(self._public)
            and seq.token_ids[: len(self._public)] == self._public
        )
        if tail and computed and self._tail is None and len(self._pinned) == whole:
            assert seq is not None  # computed says so
            self._tail = seq.block_table[whole]
            self._acquire(self._tail)
        return len(self._pinned) * bs + (tail if self._tail is not None else 0)

    def can_restore_public_prefix(self, num_tokens: int) -> bool:
        """Whether :meth:`restore_public_prefix` of ``num_tokens`` tokens may run: the
        prefix cache is on, nothing is cached or pinned yet (an engine just built), and
        the blocks are free."""
        return (
            self.prefix_cache
            and not self._hash_of
            and not self._pinned
            and self._tail is None
            and self.num_free_blocks >= self.blocks_for(num_tokens)
        )

    def restore_public_prefix(self, tokens: abc.Sequence[int]) -> list[int]:
        """Makes ``tokens`` the public prefix, as :meth:`set_public_prefix`, and pins it
        at once as though computed: its whole blocks cached under their public hashes,
        its tail in a block of its own. Returns those blocks, in order: the caller writes
        the prefix's KV into them before any step runs (kept by another engine of the
        same model, ``prefix_kv_cache``). Check :meth:`can_restore_public_prefix` first."""
        if not self.can_restore_public_prefix(len(tokens)):
            raise CapacityError(
                "cannot restore the public prefix here; check can_restore_public_prefix first"
            )
        self.set_public_prefix(tokens)
        bs, key, parent = self.block_size, _public_key(""), b""
        whole, tail = divmod(len(self._public), bs)
        blocks = self._allocate(self.blocks_for(len(self._public)))  # referenced once: pins
        for i, block in enumerate(blocks[:whole]):
            parent = block_hash(parent, key, self._public[i * bs : (i + 1) * bs])
            self._block_of[parent] = block
            self._hash_of[block] = parent
        self._pinned = blocks[:whole]
        self._tail = blocks[whole] if tail else None
        return blocks

    def public_prefix_blocks(self) -> list[int]:
        """The blocks pinned for the public prefix, whole ones first, then the tail's:
        what :meth:`restore_public_prefix` hands back in another manager."""
        return self._pinned + ([self._tail] if self._tail is not None else [])

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use keep their contents), pins too."""
        self._unpin()
        self._free_used.extend(self._free_cached)
        self._free_cached.clear()
        self._hash_of.clear()
        self._block_of.clear()

    # -- internals ------------------------------------------------------------------

    def _unpin(self) -> None:
        for b in self._pinned + ([self._tail] if self._tail is not None else []):
            self._ref_count[b] -= 1
            if self._ref_count[b] == 0:
                if b in self._hash_of:
                    self._free_cached[b] = None  # still findable until handed out again
                else:
                    self._free_used.append(b)
        self._pinned = []
        self._tail = None

    def _acquire(self, block: int) -> None:
        if self._ref_count[block] == 0:
            self._free_cached.pop(block, None)
        self._ref_count[block] += 1

    def _allocate(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            if self._free_used:
                b = self._free_used.pop()
            elif self._fresh_from < self.num_blocks:
                b, self._fresh_from = self._fresh_from, self._fresh_from + 1
            else:
                b, _ = self._free_cached.popitem(last=False)
                del self._block_of[self._hash_of.pop(b)]
            self._ref_count[b] = 1
            out.append(b)
        return out
