"""The local bucket: a directory laid out as an object store's bucket, the embedded default.

Every key is a file at ``key_to_path(key)`` under the root, written atomically
(``ObjectDir``), so a machine's bucket can be synced to S3 as it is and several processes
may share one root.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from ember_weights_store.digests import FastChecksum
from ember_weights_store.keys import validate_key
from ember_weights_store.tiers import ObjectDir, TierUsage
from ember_weights_store.verified import FileIdentity

__all__ = ["LocalBucketTier"]


class LocalBucketTier:
    """A directory laid out like a bucket: the embedded default object store, unbounded.

    Keeps no state in memory, so several processes may share one root.
    """

    holds_decoded = False

    def __init__(self, root: Path, *, name: str = "bucket", fsync: bool = True) -> None:
        self.name = name
        self._dir = ObjectDir(root, tier=name, fsync=fsync)

    @property
    def root(self) -> Path:
        return self._dir.root

    def has(self, key: str) -> bool:
        return self._dir.path(key).is_file()

    def get(self, key: str) -> bytes:
        return self._dir.read(key)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self._dir.read_range(key, start, length)

    def read_into(
        self, key: str, out: memoryview, *, on_piece: Callable[[memoryview], None] | None = None
    ) -> None:
        """The stored bytes straight into ``out`` (``ReadsInto``)."""
        self._dir.read_into(key, out, on_piece)

    def put(self, key: str, data: bytes) -> None:
        tmp, final = self._dir.write_temp(key, data)
        self._dir.commit(key, tmp, final)

    def delete(self, key: str) -> bool:
        return self._dir.unlink(key)

    def readahead(self, key: str, *, checksum: FastChecksum | None = None) -> FileIdentity | None:
        """Reads ``key`` (as stored) from the disk into the page cache, feeding
        ``checksum``; returns the file it read (None if absent)."""
        validate_key(key)
        return self._dir.readahead(key, checksum)

    def keys(self) -> Iterator[str]:
        for key, _ in self._dir.scan(remove_stale_temp=False):
            yield key

    def usage(self) -> TierUsage:
        # Walks the tree: the bucket is shared, so no process can keep a true running total.
        count = size = 0
        for _, st in self._dir.scan(remove_stale_temp=False):
            count += 1
            size += st.st_size
        return TierUsage(num_objects=count, size_bytes=size, budget_bytes=None)

    def remove_stale_temp_files(self) -> None:
        for _ in self._dir.scan(remove_stale_temp=True):
            pass
