"""The disk tier: a local cache directory with a byte budget and LRU eviction.

Objects are files under the root (``ObjectDir``: atomic writes, stale temp files of dead
writers removed); the index of sizes in recency order lives in this process's memory and
is rebuilt from the directory on start.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ember_weights_store.digests import FastChecksum
from ember_weights_store.keys import validate_key
from ember_weights_store.tiers import (
    ObjectDir,
    ObjectNotFoundError,
    ObjectTooLargeError,
    TierUsage,
    check_budget,
)
from ember_weights_store.verified import FileIdentity

__all__ = ["DiskTier"]

_T = TypeVar("_T")
_Buffer = bytes | bytearray | memoryview


class DiskTier:
    """A local cache directory with a byte budget and least-recently-used eviction.

    The index (key -> size, in recency order) lives in memory and is rebuilt from the
    directory on start, oldest access/modify time first. One process owns a root; within
    it, every method is thread-safe. Sizes are object bytes, not filesystem blocks.

    Writes are not fsynced unless ``fsync=True``: this is a cache of chunks the origin
    holds, and every read of a copy is checked against its checksum (the loader, the
    readahead), so a copy a power cut left torn or empty is found and fetched again.
    Syncing each write makes whoever fills it wait for the disk: SmolLM2's 270 MB took
    0.52-0.74 s synced on a cloud VM, 0.17 s into the page cache.
    """

    holds_decoded = True

    def __init__(
        self, root: Path, *, budget_bytes: int, name: str = "disk", fsync: bool = False
    ) -> None:
        check_budget(budget_bytes, tier=name)
        self.name = name
        self.budget_bytes = budget_bytes
        self._dir = ObjectDir(root, tier=name, fsync=fsync)
        self._cond = threading.Condition()
        self._index: OrderedDict[str, int] = OrderedDict()  # oldest first
        self._size = 0
        self._reserved = 0  # bytes of puts in flight, held against the budget
        found = sorted(
            self._dir.scan(remove_stale_temp=True),
            key=lambda item: max(item[1].st_atime_ns, item[1].st_mtime_ns),
        )
        for key, st in found:
            self._index[key] = st.st_size
            self._size += st.st_size
        with self._cond:
            # The budget may have shrunk since the last run.
            self._evict_locked(0)

    @property
    def root(self) -> Path:
        return self._dir.root

    def _touch(self, key: str) -> bool:
        with self._cond:
            if key in self._index:
                self._index.move_to_end(key)
                return True
            return False

    def has(self, key: str) -> bool:
        validate_key(key)
        return self._touch(key)

    def get(self, key: str) -> bytes:
        return self._read(key, lambda: self._dir.read(key))

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self._read(key, lambda: self._dir.read_range(key, start, length))

    def read_into(
        self, key: str, out: memoryview, *, on_piece: Callable[[memoryview], None] | None = None
    ) -> None:
        self._read(key, lambda: self._dir.read_into(key, out, on_piece))

    def object_path(self, key: str) -> Path:
        """The file holding ``key`` (for mapping it; it may be evicted, i.e. unlinked,
        at any time, which a mapping survives)."""
        validate_key(key)
        return self._dir.path(key)

    def readahead(self, key: str, *, checksum: FastChecksum | None = None) -> FileIdentity | None:
        """Reads ``key`` from the disk into the page cache, feeding ``checksum``; returns
        the file it read (None if this tier does not hold it). Not a use for eviction."""
        validate_key(key)
        with self._cond:
            if key not in self._index:
                return None
        return self._dir.readahead(key, checksum)

    def _read(self, key: str, read: Callable[[], _T]) -> _T:
        if not self.has(key):
            raise ObjectNotFoundError(key, tier=self.name)
        try:
            return read()
        except ObjectNotFoundError:
            # Removed behind our back (by hand, or a full-disk cleaner): forget it too.
            with self._cond:
                # Re-checked under the lock: a concurrent put may have just restored it.
                if key in self._index and not self._dir.path(key).is_file():
                    self._size -= self._index.pop(key)
            raise

    def put(self, key: str, data: _Buffer) -> None:
        self._put(key, data, keep_existing=False)

    def put_if_absent(self, key: str, data: _Buffer) -> bool:
        """:meth:`put`, unless a file for ``key`` is there already, written by this
        process or another (False: nothing written). Replacing a file another process
        mapped would leave that process holding a second, orphaned copy."""
        return self._put(key, data, keep_existing=True)

    def _put(self, key: str, data: _Buffer, *, keep_existing: bool) -> bool:
        validate_key(key)
        if keep_existing and self._dir.path(key).is_file():
            with self._cond:
                self._know_locked(key)
            return False
        size = len(data)
        if size > self.budget_bytes:
            raise ObjectTooLargeError(
                f"object {key!r} is {size} bytes, more than the {self.name!r} tier's whole "
                f"budget of {self.budget_bytes}; raise budget_bytes or serve it from a slower tier",
                param="data",
            )
        with self._cond:
            # Reserve before writing so concurrent puts cannot overshoot the budget together.
            while not self._evict_locked(size):
                self._cond.wait()
            self._reserved += size
        try:
            tmp, final = self._dir.write_temp(key, data)
            with self._cond:
                if keep_existing and final.is_file():  # another writer's won the race
                    tmp.unlink(missing_ok=True)
                    self._know_locked(key)
                    return False
                # Rename and index change together, so a concurrent delete or eviction of the
                # same key can never leave the index naming a file that is gone.
                self._dir.rename(key, tmp, final)
                old = self._index.pop(key, None)
                if old is not None:
                    self._size -= old
                self._index[key] = size
                self._size += size
            self._dir.sync_dir(final)
        finally:
            with self._cond:
                self._reserved -= size
                self._cond.notify_all()
        return True

    def _know_locked(self, key: str) -> None:
        """Marks ``key``'s file, found in place, used now; indexes it if another process
        wrote it since this one scanned the root."""
        if key in self._index:
            self._index.move_to_end(key)
            return
        with contextlib.suppress(FileNotFoundError):  # evicted meanwhile: nothing to know
            size = self._dir.path(key).stat().st_size
            self._index[key] = size
            self._size += size

    def _evict_locked(self, incoming: int) -> bool:
        """Evicts LRU objects until ``incoming`` more bytes fit; False if in-flight puts block."""
        while self._size + self._reserved + incoming > self.budget_bytes:
            if not self._index:
                return False
            key, size = self._index.popitem(last=False)
            self._size -= size
            self._dir.unlink(key)  # under the lock: a re-put of this key must not race it
        return True

    def delete(self, key: str) -> bool:
        validate_key(key)
        with self._cond:
            size = self._index.pop(key, None)
            if size is not None:
                self._size -= size
            removed = self._dir.unlink(key)
            self._cond.notify_all()
        return removed or size is not None

    def keys(self) -> list[str]:
        """A snapshot of the keys, least recently used first."""
        with self._cond:
            return list(self._index)

    def usage(self) -> TierUsage:
        with self._cond:
            return TierUsage(len(self._index), self._size, self.budget_bytes)
