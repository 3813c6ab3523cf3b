"""Bound weights kept in the host tier, so the next worker maps them instead of binding.

Binding a bf16 checkpoint on a CPU without bf16 matmul units converts every matrix to
float32: on SmolLM2 that is ~540 MB of fresh pages and most of a prewarmed worker's cold
start. The result depends only on the checkpoint and the compute dtype, so the first
worker to bind a model writes it into the machine's host tier (one flat object plus a
small index), and every later worker maps that object privately (copy-on-write, pages
faulted in as the first forward reads them): the conversion is paid once per machine,
and the bytes are in RAM once however many workers use them.

The key names the model's content (a hash of its manifest), the dtype and the layout
version; a stale or partial entry is never read (the index is written last, and a
mismatch with the model's tensors falls back to binding). Entries are ordinary host-tier
objects: within its byte budget, evicted least recently used like the chunks, pinned
while a worker maps them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ember_weights_store.host_tier import HostTier
from ember_weights_store.manifest import Manifest
from ember_weights_store.mapping import map_chunk_files

__all__ = ["BoundCache", "manifest_digest"]

log = logging.getLogger(__name__)

# Bump when the fused layout (weights._fuse) or which tensors bind converts changes.
_LAYOUT_VERSION = 3  # 2: matrices deferred to packing left out; 3: the first layer's too
_ALIGN = 64  # bytes: every tensor starts on a cache line
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.bfloat16, torch.float16)}


@dataclass(frozen=True)
class BoundCache:
    """One model's bound weights in one compute dtype, in a host tier.

    Example::

        cache = BoundCache.for_model(host_tier, manifest, torch.float32)
        state = cache.load()            # None on a miss
        if state is None:
            state = bind(...)
            cache.store_in_background(state)
    """

    host: HostTier
    key: str  # of the data object; the index is key + "-index"

    @classmethod
    def for_model(cls, host: HostTier, manifest: Manifest, dtype: torch.dtype) -> BoundCache:
        name = str(dtype).removeprefix("torch.")
        return cls(host, f"bound/{manifest_digest(manifest)}-{name}-v{_LAYOUT_VERSION}")

    @property
    def index_key(self) -> str:
        return f"{self.key}-index"

    def load(self, expected: Mapping[str, torch.Size]) -> dict[str, torch.Tensor] | None:
        """The bound tensors, mapped; None if absent, incomplete or not for ``expected``
        (state-dict name -> shape)."""
        if not self.host.has(self.index_key):
            return None
        if not self.host.has(self.key):
            # The tier evicted the data (least recently used) and kept the small index: a
            # full tier, not a fault. This worker binds and stores it again.
            log.info("bound weights %s were evicted from the host tier; binding", self.key)
            return None
        try:
            index = json.loads(self.host.get(self.index_key))
            entries = index["tensors"]
            if {n: tuple(s) for n, (_, s, _) in entries.items()} != {
                n: tuple(s) for n, s in expected.items()
            }:
                log.warning("bound weights %s do not match the model; binding instead", self.key)
                return None
            # Pinned for this process's life: the tensors are views of the mapping.
            self.host.pin([self.key, self.index_key], owner=f"bound-{os.getpid()}")
            flat = map_chunk_files(
                [(self.host.object_path(self.key), 0, index["size_bytes"])],
                index["size_bytes"],
            )
        except (OSError, ValueError, KeyError) as exc:
            log.warning("bound weights %s unreadable (%s); binding instead", self.key, exc)
            return None
        out = {}
        for name, (dtype, shape, offset) in entries.items():
            nbytes = _nbytes(_DTYPES[dtype], shape)
            out[name] = flat[offset : offset + nbytes].view(_DTYPES[dtype]).view(shape)
        return out

    def store(self, state: Mapping[str, torch.Tensor]) -> None:
        """Writes ``state`` (CPU tensors): the data object, then the index that makes it
        visible. A full tier is not an error: the next worker binds, as this one did.

        Each tensor goes from its own memory straight to the tier: a model-sized staging
        copy (the 1.1B model's 4.4 GB in float32) would be held next to the bound
        weights, the chunks and the packing of a worker that has just started."""
        entries: dict[str, tuple[str, list[int], int]] = {}
        pieces: list[memoryview] = []
        offset = 0
        for name, t in state.items():
            pad = -offset % _ALIGN
            if pad:
                pieces.append(memoryview(bytes(pad)))
                offset += pad
            entries[name] = (str(t.dtype).removeprefix("torch."), list(t.shape), offset)
            # Bytes, not values: numpy has no bfloat16, so the view is uint8.
            pieces.append(t.contiguous().view(-1).view(torch.uint8).numpy().data)
            offset += t.numel() * t.element_size()
        try:
            self.host.put(self.key, pieces)
            index = {"size_bytes": offset, "tensors": entries}
            self.host.put(self.index_key, json.dumps(index).encode())
        except Exception as exc:  # a cache: binding still works without it
            log.warning("could not keep bound weights %s in the host tier: %s", self.key, exc)

    def store_in_background(self, state: Mapping[str, torch.Tensor]) -> threading.Thread:
        """:meth:`store` on a thread: the worker that bound serves meanwhile."""
        thread = threading.Thread(target=self.store, args=(dict(state),), daemon=True)
        thread.start()
        return thread


def manifest_digest(manifest: Manifest) -> str:
    """A short name for a model's content: what host-tier entries derived from it share."""
    content = repr((manifest.model_id, manifest.tensors, manifest.chunks)).encode()
    return hashlib.sha256(content).hexdigest()[:24]


def _nbytes(dtype: torch.dtype, shape: list[int]) -> int:
    return torch.Size(shape).numel() * dtype.itemsize
