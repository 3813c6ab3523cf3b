"""Storage tiers behind one small interface: has / get / get_range / put / delete / usage.

Keys are content hashes (``sha256:<hex>``) or object paths (``manifests/org--name/rev.json``).
Every tier maps a key to the same relative path (``key_to_path``), so a local bucket, a disk
cache and an S3 prefix all share one layout and a directory can be synced to a bucket as is.

Writes are atomic everywhere: bytes go to a temp file in the target's directory, are fsynced
where the tier keeps the only copy (a bucket), then ``os.replace``d over the target. A reader
(or a restart after kill -9) sees the old object, the new one, or none, never a torn one.
Temp names start with ``.tmp-`` and no key segment may start with ``.``, so a temp file can
never be mistaken for an object.

This module holds the protocols and ``ObjectDir``, the file side every file-backed tier
shares; the tiers are ``bucket_tier``, ``disk_tier``, ``host_tier`` and ``s3_tier``.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from ember_core import InvalidRequestError, ModelFormatError, NotFoundError
from ember_weights_store.digests import FastChecksum
from ember_weights_store.keys import key_to_path, path_to_key, validate_key
from ember_weights_store.page_cache import read_into_page_cache
from ember_weights_store.processes import TEMP_PREFIX, temp_name, temp_writer_alive
from ember_weights_store.verified import FileIdentity

__all__ = [
    "READ_PIECE_BYTES",
    "CacheTier",
    "ObjectDir",
    "ObjectNotFoundError",
    "ObjectTooLargeError",
    "Pieces",
    "ReadsInto",
    "Tier",
    "TierUsage",
    "check_budget",
    "check_range",
    "key_to_path",
    "path_to_key",
    "pieces_of",
    "validate_key",
]

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
class ReadsInto(Tier, Protocol):
    """A tier that can read an object straight into the caller's buffer: every cache tier,
    and the local bucket (the loader reads a stored chunk into scratch that is not the C
    heap's: ``load_scratch``)."""

    def read_into(
        self, key: str, out: memoryview, *, on_piece: Callable[[memoryview], None] | None = None
    ) -> None:
        """Fill ``out`` with the object's bytes, calling ``on_piece`` on each piece as it lands
        (the loader checksums it while it is still in cache). ``ModelFormatError`` if the
        object's size is not ``len(out)``."""
        ...


@runtime_checkable
class CacheTier(ReadsInto, Protocol):
    """A tier that holds chunks decoded (``holds_decoded``) and can read one straight into
    the caller's buffer."""


#: Pieces of a ``read_into``: small enough to be checksummed while still in the CPU's cache,
#: large enough that the per-call overhead stays under a few percent.
READ_PIECE_BYTES = 1 << 20


def check_range(key: str, start: int, length: int, size: int) -> None:
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


class ObjectDir:
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
            check_range(key, start, length, os.fstat(fd).st_size)
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
        tmp = final.parent / temp_name(uuid.uuid4().hex)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileNotFoundError:  # another process pruned the empty folder just made
            final.parent.mkdir(parents=True, exist_ok=True)
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

    def prune_empty_dirs(self) -> int:
        """Removes the empty folders under the root (not the root, nor its dot-folders);
        returns how many. A writer that made a folder for its temp file a moment before
        makes it again (``write_temp``); one with its temp file inside keeps it."""
        removed = 0
        for dirpath, _, _ in os.walk(self.root, topdown=False):
            if dirpath == str(self.root):
                continue
            if any(part.startswith(".") for part in Path(dirpath).relative_to(self.root).parts):
                continue
            with contextlib.suppress(OSError):  # not empty, or gone already
                os.rmdir(dirpath)
                removed += 1
        return removed

    def scan(self, *, remove_stale_temp: bool) -> Iterator[tuple[str, os.stat_result]]:
        """Yields (key, stat) for every object; removes temp files whose writer is dead."""
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = os.path.relpath(dirpath, self.root)
            for fname in filenames:
                full = os.path.join(dirpath, fname)
                if fname.startswith(TEMP_PREFIX):
                    # A live writer (another tier instance, another worker process) may
                    # still rename its temp file: only a dead writer's is removed.
                    if remove_stale_temp and not temp_writer_alive(fname):
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
