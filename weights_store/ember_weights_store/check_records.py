"""Host-tier files checked once: a record on the file that it matched its checksum.

A host-tier object is written to a temp file and renamed into place, and nothing opens it
for writing after that. A process that has checked one against its manifest checksum says
so on the file itself (``record_check``: an extended attribute, which tmpfs keeps since
Linux 6.6), and later loads map that file without hashing it again (``checked_copy``).
Before, every new worker hashed the whole model in host RAM while it imported torch: on
the 1.1B model that ~2.2 GB of hashing, in the readahead child beside the import, slowed
the import by ~90 ms (2 cores).

What is still caught: a file replaced by another rename is a new inode, without the
record; one truncated or grown no longer has the recorded size; both are hashed again.
What is not: a write in place into a committed file, which nothing in Ember does, and
which a worker that mapped the file before the write would not see either. The record
names the checksum, so a manifest that expects other bytes under the key is not
satisfied by it. Where the filesystem keeps no user xattrs, every load hashes, as before.
Only the host tier keeps records: disks do corrupt data, so the disk tier is hashed on
every load.

Records are written by the readahead (``readahead.py``: a new worker's child, a zygote's
check), which hashes a file through the descriptor it took the file's identity from; the
loader only reads them (it hashes a mapping, and cannot say which inode that was).

Example::

    copy = checked_copy(path, chunk.checksum)      # None: hash it, then
    record_check(path, identity_hashed, chunk.checksum)
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ember_weights_store.verified import FileIdentity

__all__ = ["checked_copy", "record_check"]

_XATTR = "user.ember.checked"  # "<checksum> <size in bytes>"


def checked_copy(path: Path, checksum: str) -> FileIdentity | None:
    """The file at ``path``, if a process recorded that it matched ``checksum`` and it is
    still the size it was; None when it must be hashed: no record, another checksum, no
    such file, or no xattrs on this filesystem."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if os.getxattr(fd, _XATTR) != _record(checksum, st.st_size):
            return None
        return FileIdentity.of(st)
    except OSError:
        return None
    finally:
        os.close(fd)


def record_check(path: Path, checked: FileIdentity, checksum: str) -> None:
    """Records on the file at ``path`` that it matched ``checksum``, if it is still the
    file ``checked`` names (else nothing: it is hashed next time). Quietly nothing where
    the filesystem keeps no xattrs."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            if FileIdentity.of(st) == checked:
                os.setxattr(fd, _XATTR, _record(checksum, st.st_size))
        finally:
            os.close(fd)


def _record(checksum: str, size_bytes: int) -> bytes:
    return f"{checksum} {size_bytes}".encode()
