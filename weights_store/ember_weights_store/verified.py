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
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    # Not at import: a new worker imports this module before it connects to its router,
    # and the manifest module brings numpy (~0.15 s of that start, measured).
    from ember_weights_store.manifest import Manifest

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
    """Chunk key -> the files whose bytes matched the chunk's checksum: one per tier
    checked (a zygote prepared for two pools of one model, each with its own host tier,
    holds both pools' checks). Filled by one thread and read after it is done (a
    future's result, a joined thread)."""

    def __init__(self) -> None:
        self._files: dict[str, set[FileIdentity]] = {}

    def add(self, key: str, identity: FileIdentity) -> None:
        self._files.setdefault(key, set()).add(identity)

    def update(self, other: VerifiedCopies) -> None:
        """Adds ``other``'s checks to these."""
        for key, identities in other._files.items():
            self._files.setdefault(key, set()).update(identities)

    def covers(self, key: str, path: Path) -> bool:
        """True if ``path`` still names a file that was checked for ``key``."""
        identities = self._files.get(key)
        if not identities:
            return False
        try:
            return FileIdentity.of(os.stat(path)) in identities
        except OSError:
            return False

    def __len__(self) -> int:
        """Files checked."""
        return sum(len(identities) for identities in self._files.values())

    def as_dict(self) -> dict[str, list[list[int]]]:
        """Key -> [[device, inode, size, mtime_ns], ...]: JSON for another process (a
        worker's readahead child hands its checks back so)."""
        return {
            key: [list(identity) for identity in sorted(identities)]
            for key, identities in self._files.items()
        }

    @classmethod
    def from_dict(cls, found: dict[str, list[list[int]]]) -> VerifiedCopies:
        copies = cls()
        for key, identities in found.items():
            for identity in identities:
                copies.add(key, FileIdentity(*(int(v) for v in identity)))
        return copies


@dataclass
class Readahead:
    """What a readahead did (``readahead.read_ahead``): the manifest it read, bytes read
    into the page cache (from the disk tier or a local bucket), stored bytes fetched from
    an object tier and written decoded into a cache tier, and the cache-tier copies it
    checksummed or wrote from checked bytes (``verified``). ``corrupt`` lists the keys
    whose copy failed the check: left for the loader, which discards such a copy and
    fetches the chunk again. A worker's readahead child hands it over as JSON
    (:meth:`as_dict`), so the worker reads neither the manifest nor those chunks again."""

    manifest: Manifest | None = None
    bytes_read: int = 0
    fetched_bytes: int = 0
    # Chunks fetched, by the tier they came from, and the cache tier they were written to.
    fetched_from: dict[str, int] = field(default_factory=dict)
    landed_in: str | None = None
    verified: VerifiedCopies = field(default_factory=VerifiedCopies)
    corrupt: list[str] = field(default_factory=list)

    def sources(self, chunks_by_tier: dict[str, int]) -> dict[str, int]:
        """Where a load's chunks came from, given where the loader read them: a chunk
        fetched ahead counts for the tier it was fetched from, not for the cache tier it
        landed in, which the loader then read it from."""
        fetched = sum(self.fetched_from.values())
        if not fetched or self.landed_in not in chunks_by_tier:
            return dict(chunks_by_tier)
        merged = dict(chunks_by_tier)
        merged[self.landed_in] -= min(fetched, merged[self.landed_in])
        for tier, n in self.fetched_from.items():
            merged[tier] = merged.get(tier, 0) + n
        return {tier: n for tier, n in merged.items() if n}

    def as_dict(self) -> dict[str, Any]:
        return {
            "manifest": None if self.manifest is None else self.manifest.to_dict(),
            "bytes_read": self.bytes_read,
            "fetched_bytes": self.fetched_bytes,
            "fetched_from": dict(self.fetched_from),
            "landed_in": self.landed_in,
            "verified": self.verified.as_dict(),
            "corrupt": list(self.corrupt),
        }

    @classmethod
    def from_dict(cls, found: dict[str, Any]) -> Readahead:
        """The :meth:`as_dict` form back; ModelFormatError if the manifest in it is not
        valid (it is checked again, as any manifest read)."""
        from ember_weights_store.manifest import Manifest

        manifest = found.get("manifest")
        return cls(
            manifest=None if manifest is None else Manifest.from_dict(manifest),
            bytes_read=int(found.get("bytes_read", 0)),
            fetched_bytes=int(found.get("fetched_bytes", 0)),
            fetched_from={str(t): int(n) for t, n in found.get("fetched_from", {}).items()},
            landed_in=found.get("landed_in"),
            verified=VerifiedCopies.from_dict(found.get("verified", {})),
            corrupt=[str(k) for k in found.get("corrupt", [])],
        )
