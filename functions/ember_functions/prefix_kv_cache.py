"""The public prefix's KV kept in the host tier, so a new worker starts with it cached.

Every chat request starts with the chat template's preamble (SmolLM2: 23 of a one-line
question's 37 tokens). A READY engine computes its KV once, while idle, and pins it
(``LLMEngine.cache_public_prefix``); until then each request prefills it again. A worker
that has just started serves its first request before it was ever idle, so that request,
the one a cold start is waiting for, paid the preamble's prefill: 0.060 s to its first
token where a READY worker took 0.038 on SmolLM2 (2026-12-06, the AMX machine).

The KV depends only on the model (weights, architecture, tokenizer and template), the
compute dtype and the cache's block layout, so the first worker to compute it writes it
into the machine's host tier, with the prefix's token ids, and every later worker of the
model writes it into its own KV cache as it binds (~0.7 MB for SmolLM2, read and
written in ~1.6 ms) instead of computing it. Entries are ordinary host-tier objects, small, and
evicted like any other; a missing, partial or mismatched one is a miss, and the worker
computes the prefix once idle, as before.

Example::

    cache = PrefixKVCache.for_model(host_tier, manifest, torch.bfloat16, block_size=16)
    found = cache.load(
        dtype=torch.bfloat16,
        vocab_size=49152,
        expected_shape=lambda n: kv_cache.blocks_shape(blocks.blocks_for(n)),
    )
    if found is None:
        ...  # compute it, then cache.store(PrefixKV(tokens, kv_cache.read_blocks(ids)))
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ember_functions.bound_cache import manifest_digest
from ember_weights_store.host_tier import HostTier
from ember_weights_store.manifest import Manifest

__all__ = ["PrefixKV", "PrefixKVCache"]

log = logging.getLogger(__name__)

_LAYOUT_VERSION = 1  # bump when KVCache.read_blocks' layout changes


@dataclass(frozen=True)
class PrefixKV:
    """A public prefix and its KV, as ``KVCache.read_blocks`` lays out its blocks."""

    tokens: list[int]
    blocks: torch.Tensor  # [layers, 2, num_blocks, block_size, kv_heads, head_dim]


@dataclass(frozen=True)
class PrefixKVCache:
    """One model's public-prefix KV in one compute dtype and block size, in a host tier."""

    host: HostTier
    key: str  # of the data object; the index, written after it, is key + "-index"

    @classmethod
    def for_model(
        cls, host: HostTier, manifest: Manifest, dtype: torch.dtype, *, block_size: int
    ) -> PrefixKVCache:
        # The weights (manifest_digest), and what else makes the KV: the architecture (RoPE,
        # norms) and the tokenizer with its chat template (the preamble's tokens).
        model = json.dumps(
            [
                manifest_digest(manifest),
                manifest.architecture,
                sorted(manifest.tokenizer_files.items()),
            ],
            sort_keys=True,
        )
        digest = hashlib.sha256(model.encode()).hexdigest()[:24]
        name = str(dtype).removeprefix("torch.")
        return cls(host, f"prefix-kv/{digest}-{name}-b{block_size}-v{_LAYOUT_VERSION}")

    @property
    def index_key(self) -> str:
        return f"{self.key}-index"

    def load(
        self,
        *,
        dtype: torch.dtype,
        vocab_size: int,
        expected_shape: Callable[[int], tuple[int, ...]],
    ) -> PrefixKV | None:
        """The stored prefix, or None if absent or unusable. ``expected_shape(num_tokens)``
        is the block tensor's shape the engine's cache needs for a prefix that long."""
        if not (self.host.has(self.index_key) and self.host.has(self.key)):
            return None
        try:
            index = json.loads(self.host.get(self.index_key))
            tokens = [int(t) for t in index["tokens"]]
            shape = tuple(index["shape"])
            data = self.host.get(self.key)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("public prefix KV %s unreadable (%s); computing it", self.key, exc)
            return None
        valid = all(0 <= t < vocab_size for t in tokens)
        if not tokens or not valid or shape != expected_shape(len(tokens)):
            log.warning("public prefix KV %s does not fit this engine; computing it", self.key)
            return None
        blocks = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if blocks.numel() != torch.Size(shape).numel() * dtype.itemsize:
            log.warning("public prefix KV %s is truncated; computing it", self.key)
            return None
        return PrefixKV(tokens, blocks.view(dtype).view(shape))

    def store(self, prefix: PrefixKV) -> None:
        """Writes the data object, then the index that makes it visible. A full tier is
        not an error: the next worker computes the prefix, as this one did."""
        blocks = prefix.blocks.contiguous()
        index = {"tokens": prefix.tokens, "shape": list(blocks.shape)}
        try:
            self.host.put(self.key, blocks.view(-1).view(torch.uint8).numpy().data)
            self.host.put(self.index_key, json.dumps(index).encode())
        except Exception as exc:  # a cache: the next worker computes it instead
            log.warning("could not keep public prefix KV %s in the host tier: %s", self.key, exc)
