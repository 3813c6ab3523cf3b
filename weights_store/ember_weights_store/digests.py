"""The two digests a chunk carries, and why there are two.

- ``sha256:<hex>`` of the raw bytes is the chunk's **name**: its key in every tier, what
  deduplicates a fine-tune against its base, and what ``ember models verify`` checks. It is
  collision-resistant, and slow: about 1.8 GB/s per core here.
- ``xxh3_128:<hex>`` of the same raw bytes is the chunk's **checksum**: what the loader checks
  on every load. A warm load moves bytes at memory speed (~11 GB/s on this machine); SHA-256
  on every load would cap it near 3.5 GB/s on two cores, while XXH3 runs at ~30 GB/s per
  core. Its job is to catch a corrupt or truncated copy (a torn write, a bad disk, a flipped
  bit), not an adversary, and 128 bits make an undetected random corruption vanishingly
  unlikely. The name was checked against the bytes once, when they were imported.

The checksum is computed incrementally (``FastChecksum.update``) so the loader can hash each
piece right after reading it, while it is still in cache, instead of a second pass over memory.
"""

from __future__ import annotations

import hashlib
import re

__all__ = ["CHECKSUM_RE", "FastChecksum", "fast_checksum", "sha256_key"]

CHECKSUM_RE = re.compile(r"xxh3_128:[0-9a-f]{32}")

_Buffer = bytes | bytearray | memoryview


def sha256_key(data: _Buffer) -> str:
    """The content address of ``data``: ``sha256:<64 hex>``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


class FastChecksum:
    """Streaming ``xxh3_128``; feed pieces in order, then compare ``hexdigest()``."""

    def __init__(self) -> None:
        # Imported at the first checksum, not with the module: a worker whose chunks were
        # checked before it started (its readahead child, or a check recorded on a host-tier
        # file) hashes nothing, and need not load it (~4 ms of its imports).
        import xxhash

        self._h = xxhash.xxh3_128()

    def update(self, piece: _Buffer) -> None:
        self._h.update(piece)

    def hexdigest(self) -> str:
        return "xxh3_128:" + self._h.hexdigest()


def fast_checksum(data: _Buffer) -> str:
    """The load-time checksum of ``data``: ``xxh3_128:<32 hex>``."""
    import xxhash

    return "xxh3_128:" + xxhash.xxh3_128_hexdigest(data)
