"""Leases in the host tier: work one process does for every process on the machine.

Some work's result is the same whoever does it, and lands in the host tier for all: a
model's packed matrices, for one (``ember_functions.packed_cache``). Workers started
together would otherwise all do it, each paying the CPU and a private copy of the result,
and keep only the first. A lease lets the first take the work and the others wait for its
result:

- ``acquire`` takes the lease, or renews it for its holder; it fails while another holds
  it. The holder renews it as it makes progress (a layer packed).
- A lease not renewed for ``stale_s`` may be taken by another: its holder stopped (busy
  serving, short of RAM, its engine dropped), and a waiter should not wait on it. The
  holder may say, as it renews, how long its next piece may take (``acquire(stale_s=)``:
  a big layer on a slow machine); its word then counts, not the waiter's default.
  ``acquire(until_released=True)`` holds it until ``release`` however long, for work
  that renews nothing while it runs (writing the result out).
- A holder that dies frees its lease at once: records name the holder's process
  (pid and start time, ``processes.alive``).

Leases are files under the tier's ``.leases/`` (a name starting with ``.`` is never an
object key), their record JSON, their renewal time the file's mtime, mutated under the
directory's own ``flock``. Nothing lives in one process's memory, as in the tier itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path

from ember_core import InvalidRequestError
from ember_weights_store.file_lock import file_lock
from ember_weights_store.processes import (
    TEMP_PREFIX,
    alive,
    start_time,
    temp_name,
    temp_writer_alive,
)

__all__ = ["HostLease", "forget_dead_leases"]

_LEASES_DIR = ".leases"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


class HostLease:
    """One named lease in the host tier at ``root``, as seen by one holder.

    ``holder`` tells holders within one process apart (two engines of one process each
    hold their own); across processes the pid does.

    Example::

        lease = HostLease(tier.root, "pack-model-bf16", holder="engine-1", stale_s=3.0)
        if lease.acquire():        # ours: do a piece, acquire again after each
            ...
            lease.acquire(until_released=True)  # writing the result out
            ...
            lease.release()
        elif lease.held_elsewhere():
            ...                    # wait for the holder's result
    """

    def __init__(self, root: Path, name: str, *, holder: str, stale_s: float) -> None:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidRequestError(
                f"lease name {name!r} must be 1-200 characters of [A-Za-z0-9._-] starting "
                "with a letter or digit; derive it from the object key, e.g. 'pack-<digest>'",
                param="name",
            )
        self.name = name
        self.holder = holder
        self.stale_s = _checked_stale_s(stale_s)
        self._dir = Path(root) / _LEASES_DIR
        self._dir.mkdir(parents=True, exist_ok=True)
        self._path = self._dir / f"{name}.json"

    def acquire(self, *, until_released: bool = False, stale_s: float | None = None) -> bool:
        """Takes the lease or renews it; False while another holder has it (alive, and it
        renewed it within its ``stale_s`` or holds it until released). ``stale_s``: how
        long others must wait for this holder's next renewal (default: the lease's)."""
        stale_s = self.stale_s if stale_s is None else _checked_stale_s(stale_s)
        with _locked(self._dir):
            record = self._read()
            if record is not None and not self._mine(record) and self._binding(record):
                return False
            self._write_locked(until_released=until_released, stale_s=stale_s)
            return True

    def renew(self, *, stale_s: float | None = None) -> bool:
        """Renews the lease only if this holder still has it: False, and nothing done,
        if another took it meanwhile or it is free (unlike ``acquire``, never takes it)."""
        stale_s = self.stale_s if stale_s is None else _checked_stale_s(stale_s)
        with _locked(self._dir):
            record = self._read()
            if record is None or not self._mine(record):
                return False
            self._write_locked(until_released=False, stale_s=stale_s)
            return True

    def _write_locked(self, *, until_released: bool, stale_s: float) -> None:
        me = os.getpid()
        body = {
            "pid": me,
            "start": start_time(me),
            "holder": self.holder,
            "until_released": until_released,
            "stale_s": stale_s,
        }
        temp = self._dir / temp_name(self.name)
        temp.write_text(json.dumps(body))
        now = time.time_ns()  # explicit: the kernel's file clock is coarse
        os.utime(temp, ns=(now, now))
        os.replace(temp, self._path)

    def held_elsewhere(self) -> bool:
        """Whether another holder has the lease now (``acquire`` would fail)."""
        with _locked(self._dir, exclusive=False):
            record = self._read()
            return record is not None and not self._mine(record) and self._binding(record)

    def release(self) -> bool:
        """Gives the lease up if this holder has it; returns whether it had."""
        with _locked(self._dir):
            record = self._read()
            if record is None or not self._mine(record):
                return False
            self._path.unlink(missing_ok=True)
            return True

    def _mine(self, record: dict[str, object]) -> bool:
        return record.get("pid") == os.getpid() and record.get("holder") == self.holder

    def _binding(self, record: dict[str, object]) -> bool:
        """Whether another's record still keeps the lease from us."""
        if not _holder_alive(record):
            return False  # its holder is gone, and will never release it
        if record.get("until_released"):
            return True
        try:
            renewed_ns = self._path.stat().st_mtime_ns
        except FileNotFoundError:
            return False
        stale_s = record.get("stale_s")
        if not isinstance(stale_s, int | float):
            stale_s = self.stale_s  # a record from before holders said so
        return time.time_ns() - renewed_ns <= stale_s * 1e9

    def _read(self) -> dict[str, object] | None:
        try:
            record = json.loads(self._path.read_text())
        except (FileNotFoundError, ValueError):
            return None  # no lease (records are replaced whole, so never half a one)
        return record if isinstance(record, dict) else None


def forget_dead_leases(root: Path) -> int:
    """Removes the lease files of holders that are gone, and returns how many. A holder
    killed mid-work never releases its lease: the lease is free already, but its file
    would stay in /dev/shm. The host tier calls this when it gives its objects back.

    Example::

        forget_dead_leases(tier.root)  # -> 1 after a packer was killed while storing
    """
    leases = Path(root) / _LEASES_DIR
    if not leases.is_dir():
        return 0
    removed = 0
    with _locked(leases):
        for path in leases.iterdir():
            if path.name.startswith("."):
                if path.name.startswith(TEMP_PREFIX) and not temp_writer_alive(path.name):
                    path.unlink(missing_ok=True)  # a record its writer never put in place
                continue
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                record = None  # unreadable: nobody can hold it
            if not isinstance(record, dict) or not _holder_alive(record):
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def _checked_stale_s(stale_s: float) -> float:
    if not isinstance(stale_s, int | float) or not stale_s >= 0:
        raise InvalidRequestError(
            f"stale_s={stale_s!r}; give the seconds after which a lease its holder has "
            "not renewed may be taken (>= 0)",
            param="stale_s",
        )
    return float(stale_s)


def _holder_alive(record: dict[str, object]) -> bool:
    pid, start = record.get("pid"), record.get("start")
    return isinstance(pid, int) and alive(pid, start if isinstance(start, int) else None)


def _locked(leases: Path, *, exclusive: bool = True) -> contextlib.AbstractContextManager[None]:
    """The leases directory's lock (``file_lock``)."""
    return file_lock(leases / ".lock", exclusive=exclusive)
