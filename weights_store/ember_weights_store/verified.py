"""Cache-tier files whose checksum this process has already checked, and which files they were.

A new worker reads its chunks into the page cache on a thread while torch imports
(``WeightsStore.readahead``); the other core is idle then, so it checksums each chunk as it
reads it. The loader, which maps the same files after the imports, skips the chunks checked
that way instead of hashing them a second time on the way to READY.

A check holds for one file: the one the readahead read, named by device, inode, size and
modification time. If the path now names another file (the chunk was evicted and written
again, or replaced), the loader checks that one itself. Cache tiers replace a chunk only by
renaming a complete file into place and never write one in place, so a file that kept its
identity kept its bytes. Imports no torch.

Example::

    ahead = store.readahead("acme/tiny")          # on a thread, while torch imports
    loaded = load(store, "acme/tiny", verified=ahead.verified)
    loaded.report.verified_ahead                   # chunks not hashed again
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

__all__ = ["FileIdentity", "Readahead", "VerifiedCopies"]


class FileIdentity(NamedTuple):
    """Which file a path named when it was read."""

    device: int
    inode: int
    size_bytes: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class VerifiedCopies:
    """Chunk key -> the file whose bytes matched the chunk's checksum. Filled by one
    thread and read after it is done (a future's result, a joined thread)."""

    def __init__(self) -> None:
        self._files: dict[str, FileIdentity] = {}

    def add(self, key: str, identity: FileIdentity) -> None:
        self._files[key] = identity

    def update(self, other: VerifiedCopies) -> None:
        """Adds ``other``'s checks (a later check of a key replaces an earlier one)."""
        self._files.update(other._files)

    def covers(self, key: str, path: Path) -> bool:
        """True if ``path`` still names the file that was checked for ``key``."""
        identity = self._files.get(key)
        if identity is None:
            return False
        try:
            return FileIdentity.of(os.stat(path)) == identity
        except OSError:
            return False

    def __len__(self) -> int:
        return len(self._files)

    def as_dict(self) -> dict[str, list[int]]:
        """Key -> [device, inode, size, mtime_ns]: JSON for another process (a worker's
        readahead child hands its checks back so)."""
        return {key: list(identity) for key, identity in self._files.items()}

    @classmethod
    def from_dict(cls, found: dict[str, list[int]]) -> VerifiedCopies:
        copies = cls()
        for key, identity in found.items():
            copies.add(key, FileIdentity(*(int(v) for v in identity)))
        return copies


@dataclass
class Readahead:
    """What ``WeightsStore.readahead`` did: bytes read into the page cache (from the disk
    tier or a local bucket), and the cache-tier copies it checksummed on the way (disk or
    host tier). ``corrupt`` lists the keys whose copy failed the check: left for the loader,
    which discards such a copy and fetches the chunk again."""

    bytes_read: int = 0
    verified: VerifiedCopies = field(default_factory=VerifiedCopies)
    corrupt: list[str] = field(default_factory=list)
