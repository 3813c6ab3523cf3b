"""Host tier: host RAM shared by every worker process on a machine, as files on tmpfs.

Objects are plain files under a tmpfs directory (``/dev/shm/ember-host`` by default), laid
out with the same ``key_to_path`` mapping as every other tier. Because the page cache of a
tmpfs file *is* its storage, processes that ``open_view`` the same object map the very same
physical pages: four workers serving one model hold one copy of its weights.

No authoritative state lives in memory, since any process on the machine may put, read,
pin or evict at any time. The filesystem is the index:

- objects: their size is ``st_size``, their recency ``st_mtime`` (set on every access);
- ``.lock``: an ``fcntl.flock`` lock taken exclusively for every mutation of the index
  (put's commit, delete, eviction, pin, unpin) and shared for ``usage``;
- ``.pins/<owner>.json``: the keys an owner has pinned and the pid (and start time) of the
  process that pinned them. Pins of a dead process are ignored and removed, so a crashed
  worker can never keep its model in RAM forever.

Names starting with ``.`` are never keys, so the lock, the pins and temp files can never be
mistaken for objects.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ember_core import CapacityError, InvalidRequestError
from ember_weights_store.digests import FastChecksum
from ember_weights_store.file_lock import file_lock
from ember_weights_store.host_lease import forget_dead_leases
from ember_weights_store.keys import validate_key
from ember_weights_store.processes import alive, start_time, temp_name, temp_writer_alive
from ember_weights_store.tiers import (
    ObjectDir,
    ObjectNotFoundError,
    ObjectTooLargeError,
    Pieces,
    TierUsage,
    check_budget,
    pieces_of,
)
from ember_weights_store.verified import FileIdentity

__all__ = ["DEFAULT_HOST_ROOT", "HostTier", "HostTierFullError"]

DEFAULT_HOST_ROOT = Path("/dev/shm/ember-host")
_LOCK_NAME = ".lock"
_PINS_DIR = ".pins"
_OWNER = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")


class HostTierFullError(CapacityError):
    """A put cannot fit because the objects that would have to go are pinned (in use)."""

    code = "host_tier_full"


class HostTier:
    """A byte-budgeted, LRU, pin-aware object tier in shared host RAM (tmpfs files).

    Any number of instances, in any number of processes, may share one ``root``; they see
    one index. The budget counts object bytes. Bytes of puts still being written (temp
    files) are not counted until they are committed, so the tier can briefly exceed its
    budget by the size of the puts in flight.
    """

    holds_decoded = True

    def __init__(
        self, root: Path = DEFAULT_HOST_ROOT, *, budget_bytes: int, name: str = "host"
    ) -> None:
        check_budget(budget_bytes, tier=name)
        self.name = name
        self.budget_bytes = budget_bytes
        # No fsync: tmpfs has no disk behind it, and the tier is gone on reboot anyway.
        self._dir = ObjectDir(Path(root), tier=name, fsync=False)
        self._pins = self._dir.root / _PINS_DIR
        self._pins.mkdir(exist_ok=True)
        self._lock_path = self._dir.root / _LOCK_NAME

    @property
    def root(self) -> Path:
        return self._dir.root

    # -- locking and recency ------------------------------------------------------------

    def _locked(self, *, exclusive: bool = True) -> contextlib.AbstractContextManager[None]:
        return file_lock(self._lock_path, exclusive=exclusive)

    def _touch(self, path: Path) -> None:
        # Explicit nanoseconds: the kernel stamps files with a coarse (jiffy) clock, which
        # would give objects written in the same few milliseconds the same recency.
        now = time.time_ns()
        with contextlib.suppress(FileNotFoundError):
            os.utime(path, ns=(now, now))

    # -- Tier protocol ------------------------------------------------------------------

    def has(self, key: str) -> bool:
        path = self._dir.path(key)
        if not path.is_file():
            return False
        self._touch(path)  # the loader asks has() before get(): count it as a use
        return True

    def get(self, key: str) -> bytes:
        data = self._dir.read(key)
        self._touch(self._dir.path(key))
        return data

    def get_range(self, key: str, start: int, length: int) -> bytes:
        data = self._dir.read_range(key, start, length)
        self._touch(self._dir.path(key))
        return data

    def read_into(
        self, key: str, out: memoryview, *, on_piece: Callable[[memoryview], None] | None = None
    ) -> None:
        self._dir.read_into(key, out, on_piece)
        self._touch(self._dir.path(key))

    def object_path(self, key: str) -> Path:
        """Where ``key``'s file is (whether or not it exists): for mapping it in place."""
        return self._dir.path(key)

    def readahead(self, key: str, *, checksum: FastChecksum | None = None) -> FileIdentity | None:
        """Feeds ``key``'s bytes to ``checksum`` (they are in RAM already: nothing to read
        ahead); returns the file it read (None if absent). Not a use for eviction."""
        validate_key(key)
        return self._dir.readahead(key, checksum)

    def open_view(self, key: str) -> memoryview:
        """A read-only view of the object's bytes, mapped straight from tmpfs.

        Every process that opens the same object maps the same physical pages, so the
        bytes are in RAM once however many workers use them. Pin the key while the view is
        in use: eviction unlinks the file, and its pages stay allocated (outside the
        budget) until the last view is released.
        """
        path = self._dir.path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFoundError(key, tier=self.name) from None
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                return memoryview(b"")  # mmap refuses empty files
            mapped = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(fd)  # the mapping keeps the file's pages alive on its own
        self._touch(path)
        return memoryview(mapped)

    def put(self, key: str, data: Pieces) -> None:
        """Stores ``data`` (one buffer, or pieces written one after another) as ``key``."""
        self._put(key, data, keep_existing=False)

    def put_if_absent(self, key: str, data: Pieces) -> bool:
        """:meth:`put`, unless ``key`` is there already (False: nothing written). For
        objects any of several processes may produce, identical whoever does: replacing
        one would leave the processes that mapped it holding a second, orphaned copy."""
        return self._put(key, data, keep_existing=True)

    def _put(self, key: str, data: Pieces, *, keep_existing: bool) -> bool:
        validate_key(key)
        if keep_existing and self._dir.path(key).is_file():
            return False
        size = sum(piece.nbytes for piece in pieces_of(data))
        if size > self.budget_bytes:
            raise ObjectTooLargeError(
                f"object {key!r} is {size} bytes, more than the {self.name!r} tier's whole "
                f"budget of {self.budget_bytes}; raise budget_bytes or serve it from a slower tier",
                param="data",
            )
        # Copy the bytes outside the lock, so puts from many workers write in parallel;
        # only the eviction decision and the rename are serialized.
        tmp, final = self._dir.write_temp(key, data)
        try:
            with self._locked():
                if keep_existing and final.is_file():
                    return False  # another process's put won the race
                self._make_room_locked(key, size)
                self._dir.rename(key, tmp, final)
                self._touch(final)
        finally:
            tmp.unlink(missing_ok=True)  # gone already after a successful rename
        return True

    def delete(self, key: str) -> bool:
        """Removes ``key`` even if pinned: an explicit delete overrides the pins."""
        validate_key(key)
        with self._locked():
            return self._dir.unlink(key)

    def release_unpinned(self) -> int:
        """Removes every object no live process pins and returns the bytes given back to
        the OS. For a process that filled the tier for its own workers and is done with
        it: tmpfs files outlive their writers, so without this they hold their RAM until
        reboot. A process that still maps a removed object keeps its pages until it
        unmaps them; objects other processes pin stay. Leases of dead holders go too
        (``host_lease.forget_dead_leases``)."""
        with self._locked():
            freed = self._remove_all_but_locked(self._live_pins_locked())
        forget_dead_leases(self.root)
        return freed

    def release_abandoned(self) -> int:
        """``release_unpinned``, but only where no live process pins anything: then no
        process uses the tier, and what it holds was left by processes that are gone (a
        pool killed before it could give it back). Returns the bytes given back, 0 while
        the tier is in use. Decided and done under one lock, so a process cannot start
        using the tier in between."""
        with self._locked():
            freed = 0 if self._live_pins_locked() else self._remove_all_but_locked(set())
        forget_dead_leases(self.root)
        return freed

    def _remove_all_but_locked(self, keep: set[str]) -> int:
        freed = 0
        for key, st in list(self._dir.scan(remove_stale_temp=True)):
            if key not in keep and self._dir.unlink(key):
                freed += st.st_size
        if freed:  # what a pool leaves in /dev/shm once it has given its RAM back: nothing
            self._dir.prune_empty_dirs()
        return freed

    def usage(self) -> TierUsage:
        # Shared lock: a consistent snapshot between two commits, computed from the directory
        # because no process can keep a true running total of a shared index.
        count = size = 0
        with self._locked(exclusive=False):
            for _, st in self._dir.scan(remove_stale_temp=False):
                count += 1
                size += st.st_size
        return TierUsage(num_objects=count, size_bytes=size, budget_bytes=self.budget_bytes)

    def keys(self) -> list[str]:
        """A snapshot of the keys, least recently used first."""
        with self._locked(exclusive=False):
            found = list(self._dir.scan(remove_stale_temp=False))
        return [key for key, _ in sorted(found, key=lambda kv: (kv[1].st_mtime_ns, kv[0]))]

    # -- eviction -----------------------------------------------------------------------

    def _make_room_locked(self, key: str, size: int) -> None:
        """Evicts least recently used unpinned objects until ``size`` more bytes fit.

        Decides before removing anything: if the pinned objects leave too little room, it
        raises and evicts nothing, so a failed put costs the other workers no cache.
        """
        pinned = self._live_pins_locked()
        total = 0
        victims: list[tuple[int, str, int]] = []
        for other, st in self._dir.scan(remove_stale_temp=True):
            if other == key:
                continue  # being replaced: its bytes are freed by the rename
            total += st.st_size
            if other not in pinned:
                victims.append((st.st_mtime_ns, other, st.st_size))
        need = total + size - self.budget_bytes
        if need <= 0:
            return
        victims.sort()
        chosen: list[str] = []
        for _, other, other_size in victims:
            if need <= 0:
                break
            chosen.append(other)
            need -= other_size
        if need > 0:
            raise HostTierFullError(
                f"host tier {self.name!r} cannot fit {key!r} ({size} bytes): its budget of "
                f"{self.budget_bytes} bytes is held by pinned objects of models in use; unpin "
                "a model, raise budget_bytes, or serve this one from a slower tier",
                param="data",
            )
        for other in chosen:
            self._dir.unlink(other)

    # -- pins ---------------------------------------------------------------------------

    def pin(self, keys: Iterable[str], *, owner: str) -> None:
        """Protects ``keys`` from eviction until ``unpin(owner)`` or this process exits.

        Pinning adds to what ``owner`` already pins. Keys need not be present yet, so a
        loader can pin a model before fetching it and its own puts cannot evict each other.
        """
        path = self._pin_path(owner)
        wanted = {validate_key(k) for k in keys}
        me = os.getpid()
        with self._locked():
            held = _read_pin(path)
            if held is not None and held[0] == me:
                wanted |= held[1]
            elif held is not None and alive(held[0], held[2]):
                # One owner, one process: otherwise the pins would die with the wrong one.
                raise InvalidRequestError(
                    f"pin owner {owner!r} is held by live process {held[0]}; give each "
                    "process its own owner name (e.g. include the pid)",
                    param="owner",
                )
            # Written atomically so a reader never sees half a pin file.
            record = {"pid": me, "start": start_time(me), "keys": sorted(wanted)}
            tmp = self._pins / temp_name(owner)
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path)

    def unpin(self, owner: str) -> bool:
        """Drops every pin of ``owner``; returns whether it had any."""
        path = self._pin_path(owner)
        with self._locked():
            try:
                path.unlink()
            except FileNotFoundError:
                return False
        return True

    @contextlib.contextmanager
    def pinned(self, keys: Iterable[str], *, owner: str) -> Iterator[None]:
        """``pin`` for the duration of a ``with`` block."""
        self.pin(keys, owner=owner)
        try:
            yield
        finally:
            self.unpin(owner)

    def pinned_keys(self) -> set[str]:
        """Every key pinned by a live process (removes the pins of dead ones)."""
        with self._locked():
            return self._live_pins_locked()

    def _pin_path(self, owner: str) -> Path:
        if not isinstance(owner, str) or not _OWNER.fullmatch(owner):
            raise InvalidRequestError(
                f"pin owner {owner!r} must be 1-200 characters of [A-Za-z0-9._-], not "
                "starting with '.'; use e.g. 'worker-3' or the request id",
                param="owner",
            )
        return self._pins / f"{owner}.json"

    def _live_pins_locked(self) -> set[str]:
        keys: set[str] = set()
        for entry in self._pins.iterdir():
            if entry.name.startswith("."):
                if not temp_writer_alive(entry.name):
                    entry.unlink(missing_ok=True)  # temp of a pin() killed mid-write
                continue
            held = _read_pin(entry)
            if held is None or not alive(held[0], held[2]):
                # Nobody will ever unpin for a dead process: drop its pins here.
                entry.unlink(missing_ok=True)
                continue
            keys |= held[1]
        return keys


def _read_pin(path: Path) -> tuple[int, set[str], int | None] | None:
    """(pid, keys, start time) of a pin file; ``None`` if missing or unreadable."""
    try:
        record = json.loads(path.read_text())
        return int(record["pid"]), set(record["keys"]), record.get("start")
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
