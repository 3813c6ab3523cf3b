"""Storage tiers behind one small interface: has / get / get_range / put / delete / usage.

Keys are content hashes (``sha256:<hex>``) or object paths (``manifests/org--name/rev.json``).
Every tier maps a key to the same relative path (``key_to_path``), so a local bucket, a disk
cache and an S3 prefix all share one layout and a directory can be synced to a bucket as is.

Writes are atomic everywhere: bytes go to a temp file in the target's directory, are fsynced,
then ``os.replace``d over the target. A reader (or a restart after kill -9) sees the old object,
the new one, or none, never a torn one. Temp names start with ``.tmp-`` and no key segment may
start with ``.``, so a temp file can never be mistaken for an object.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

from ember_core import InvalidRequestError, ModelFormatError, NotFoundError
from ember_weights_store.digests import FastChecksum
from ember_weights_store.keys import key_to_path, path_to_key, validate_key
from ember_weights_store.page_cache import read_into_page_cache
from ember_weights_store.verified import FileIdentity

__all__ = [
    "READ_PIECE_BYTES",
    "CacheTier",
    "DiskTier",
    "LocalBucketTier",
    "ObjectNotFoundError",
    "ObjectTooLargeError",
    "Pieces",
    "Tier",
    "TierUsage",
    "key_to_path",
    "path_to_key",
    "pieces_of",
    "validate_key",
]

_TMP_PREFIX = ".tmp-"
_T = TypeVar("_T")
_Buffer = bytes | bytearray | memoryview
# An object's bytes in one buffer, or in pieces written one after another (so a caller
# with its bytes in many places never has to gather them into one more copy first).
Pieces = _Buffer | Sequence[_Buffer]


def pieces_of(data: Pieces) -> tuple[memoryview, ...]:
    """``data`` as byte views, one per piece."""
    parts = (data,) if isinstance(data, bytes | bytearray | memoryview) else data
    return tuple(memoryview(p).cast("B") for p in parts)


class ObjectNotFoundError(NotFoundError):
    """A tier does not hold the requested key."""

    code = "object_not_found"

    def __init__(self, key: str, *, tier: str) -> None:
        super().__init__(
            f"tier {tier!r} has no object {key!r}; fetch it from another tier, or re-import "
            "or re-push the model that references it",
            param="key",
        )
        self.key = key
        self.tier = tier


class ObjectTooLargeError(InvalidRequestError):
    """An object can never fit a bounded tier."""

    code = "object_too_large"


@dataclass(frozen=True)
class TierUsage:
    num_objects: int
    size_bytes: int
    #: ``None`` for unbounded tiers.
    budget_bytes: int | None


@runtime_checkable
class Tier(Protocol):
    """What the loader and importers need from any place that holds objects.

    ``holds_decoded`` says what form a chunk takes in this tier. Object tiers (the local
    bucket, S3) hold chunks as stored, compressed by their codec: that is what travels over
    the network and what the store's size counts. Cache tiers (disk, host RAM) hold chunks
    decoded, so a warm load is a read at the speed of the medium with no decompression;
    they implement ``CacheTier.read_into``.
    """

    name: str
    holds_decoded: bool

    def has(self, key: str) -> bool: ...

    def get(self, key: str) -> bytes: ...

    def get_range(self, key: str, start: int, length: int) -> bytes: ...

    def put(self, key: str, data: bytes) -> None: ...

    def delete(self, key: str) -> bool: ...

    def usage(self) -> TierUsage: ...


@runtime_checkable
class CacheTier(Tier, Protocol):
    """A tier that holds chunks decoded and can read one straight into the caller's buffer."""

    def read_into(
        self, key: str, out: memoryview, *, on_piece: Callable[[memoryview], None] | None = None
    ) -> None:
        """Fill ``out`` with the object's bytes, calling ``on_piece`` on each piece as it lands
        (the loader checksums it while it is still in cache). ``ModelFormatError`` if the
        object's size is not ``len(out)``."""
        ...


#: Pieces of a ``read_into``: small enough to be checksummed while still in the CPU's cache,
#: large enough that the per-call overhead stays under a few percent.
READ_PIECE_BYTES = 1 << 20


def _check_range(key: str, start: int, length: int, size: int) -> None:
    if start < 0 or length < 0:
        raise InvalidRequestError(
            f"range start={start} length={length} of {key!r} is negative; pass offsets >= 0",
            param="start",
        )
    if start + length > size:
        # A short read would hand the loader a truncated chunk, so refuse it outright.
        raise InvalidRequestError(
            f"range [{start}, {start + length}) of {key!r} runs past its {size} bytes; "
            "check the manifest's byte range against the object",
            param="length",
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Dir:
    """Atomic file I/O under one root; keys are validated before any path is built."""

    def __init__(self, root: Path, *, tier: str, fsync: bool) -> None:
        self.root = Path(root)
        self.tier = tier
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / key_to_path(key)

    def read(self, key: str) -> bytes:
        try:
            with open(self.path(key), "rb", buffering=0) as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFoundError(key, tier=self.tier) from None

    def read_range(self, key: str, start: int, length: int) -> bytes:
        try:
            fd = os.open(self.path(key), os.O_RDONLY)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFoundError(key, tier=self.tier) from None
        try:
            _check_range(key, start, length, os.fstat(fd).st_size)
            parts: list[bytes] = []
            done = 0
            while done < length:  # pread may return fewer bytes than asked
                part = os.pread(fd, length - done, start + done)
                if not part:
                    raise ObjectNotFoundError(key, tier=self.tier)  # truncated under us
                parts.append(part)
                done += len(part)
            return b"".join(parts)
        finally:
            os.close(fd)

    def read_into(
        self, key: str, out: memoryview, on_piece: Callable[[memoryview], None] | None
    ) -> None:
        try:
            fd = os.open(self.path(key), os.O_RDONLY)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFoundError(key, tier=self.tier) from None
        try:
            size = os.fstat(fd).st_size
            if size != len(out):
                raise ModelFormatError(
                    f"tier {self.tier!r} holds {size} bytes for {key!r} but {len(out)} were "
                    "expected; the copy is truncated or stale, fetch it from another tier"
                )
            done = 0
            while done < size:
                piece = out[done : done + READ_PIECE_BYTES]
                n = os.preadv(fd, [piece], done)
                if n == 0:
                    raise ModelFormatError(
                        f"{key!r} in tier {self.tier!r} was truncated while being read; "
                        "fetch it from another tier"
                    )
                if on_piece is not None:
                    on_piece(piece[:n])
                done += n
        finally:
            os.close(fd)

    def readahead(self, key: str, checksum: FastChecksum | None) -> FileIdentity | None:
        """Reads the object into the page cache (``read_into_page_cache``: all of it,
        blocking, nothing copied out), feeding ``checksum``; returns the file it read
        (None if absent)."""
        try:
            fd = os.open(self.path(key), os.O_RDONLY)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        try:
            st = os.fstat(fd)
            read_into_page_cache(fd, st.st_size, checksum=checksum)
            return FileIdentity.of(st)
        finally:
            os.close(fd)

    def write_temp(self, key: str, data: Pieces) -> tuple[Path, Path]:
        """Writes ``data`` (in order, if in pieces) to a fresh temp file beside the key's
        path; returns (temp, final)."""
        final = self.path(key)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise InvalidRequestError(
                f"object key {key!r} runs through an existing object; a key cannot be both an "
                "object and a prefix of another key",
                param="key",
            ) from None
        tmp = final.parent / f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for view in pieces_of(data):
                while view:
                    view = view[os.write(fd, view) :]
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        return tmp, final

    def commit(self, key: str, tmp: Path, final: Path) -> None:
        self.rename(key, tmp, final)
        self.sync_dir(final)

    def rename(self, key: str, tmp: Path, final: Path) -> None:
        try:
            os.replace(tmp, final)
        except IsADirectoryError:
            tmp.unlink(missing_ok=True)
            raise InvalidRequestError(
                f"object key {key!r} is a prefix of other keys; pick a key that is not a folder",
                param="key",
            ) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def sync_dir(self, final: Path) -> None:
        if self.fsync:
            # The rename lives in the directory: sync it so a power cut keeps the object.
            dfd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def unlink(self, key: str) -> bool:
        try:
            self.path(key).unlink()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return False
        return True

    def scan(self, *, remove_stale_temp: bool) -> Iterator[tuple[str, os.stat_result]]:
        """Yields (key, stat) for every object; removes temp files whose writer is dead."""
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = os.path.relpath(dirpath, self.root)
            for fname in filenames:
                full = os.path.join(dirpath, fname)
                if fname.startswith(_TMP_PREFIX):
                    if remove_stale_temp and _stale_temp(fname):
                        Path(full).unlink(missing_ok=True)
                    continue
                rel = fname if rel_dir == "." else f"{rel_dir}/{fname}".replace(os.sep, "/")
                key = path_to_key(rel)
                if key is None:
                    continue  # not ours; never counted, never served
                try:
                    yield key, os.stat(full)
                except FileNotFoundError:
                    continue


def check_budget(budget_bytes: int, *, tier: str) -> None:
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes <= 0:
        raise InvalidRequestError(
            f"{tier} tier budget_bytes={budget_bytes!r}; give a positive byte budget",
            param="budget_bytes",
        )


def _stale_temp(fname: str) -> bool:
    # A live writer (another tier instance, another worker process) may still rename its temp
    # file, so only files whose writing process is gone are removed.
    pid_text = fname[len(_TMP_PREFIX) :].split("-", 1)[0]
    return not pid_text.isdigit() or not _pid_alive(int(pid_text))


class LocalBucketTier:
    """A directory laid out like a bucket: the embedded default object store, unbounded.

    Keeps no state in memory, so several processes may share one root.
    """

    holds_decoded = False

    def __init__(self, root: Path, *, name: str = "bucket", fsync: bool = True) -> None:
        self.name = name
        self._dir = _Dir(root, tier=name, fsync=fsync)

    @property
    def root(self) -> Path:
        return self._dir.root

    def has(self, key: str) -> bool:
        return self._dir.path(key).is_file()

    def get(self, key: str) -> bytes:
        return self._dir.read(key)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self._dir.read_range(key, start, length)

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


class DiskTier:
    """A local cache directory with a byte budget and least-recently-used eviction.

    The index (key -> size, in recency order) lives in memory and is rebuilt from the
    directory on start, oldest access/modify time first. One process owns a root; within
    it, every method is thread-safe. Sizes are object bytes, not filesystem blocks.
    """

    holds_decoded = True

    def __init__(
        self, root: Path, *, budget_bytes: int, name: str = "disk", fsync: bool = True
    ) -> None:
        check_budget(budget_bytes, tier=name)
        self.name = name
        self.budget_bytes = budget_bytes
        self._dir = _Dir(root, tier=name, fsync=fsync)
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
        validate_key(key)
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
