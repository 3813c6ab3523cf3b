"""One lock file shared by every process on the machine: the host tier's index, its leases.

``flock`` on a fresh open file description per acquisition: flock excludes other
descriptions, so threads of one process exclude each other just as separate processes
do, and closing the descriptor releases the lock, even when its holder is killed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["file_lock"]


@contextlib.contextmanager
def file_lock(path: Path, *, exclusive: bool = True) -> Iterator[None]:
    """Holds ``path``'s flock (created if missing) for the block: exclusive, or shared
    with other readers.

    Example::

        with file_lock(root / ".lock"):
            ...  # no other process or thread holds it now
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock
