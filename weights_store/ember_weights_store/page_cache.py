"""Reading a file into the page cache ahead of its reader, without copying it anywhere.

A new worker reads its chunks into the page cache on a thread while torch imports
(``WeightsStore.readahead``). ``posix_fadvise(WILLNEED)`` is not enough for that: Linux
reads at most one readahead window per call (the larger of the device's
``read_ahead_kb`` and its largest I/O: 8 MiB on this project's VMs, 128 KiB on many
disks), so it left half of every 16 MiB chunk on disk here, and would leave almost all of
it on a default-configured disk. Instead each file is mapped and populated
(``MADV_POPULATE_READ``, Linux 5.14+), which reads all of it, blocking, and copies
nothing; elsewhere it is read in pieces into a scratch buffer. Given a checksum, the
bytes are hashed from there while they are hot, so the check costs no second read.
Imports no torch.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

from ember_weights_store.digests import FastChecksum
from ember_weights_store.libc import MAP_FAILED, libc

__all__ = ["read_into_page_cache"]

_MADV_POPULATE_READ = 22  # Linux uapi value; the mmap module has no name for it
_PIECE_BYTES = 8 << 20  # the fallback's reads: few syscalls, a small scratch buffer
_libc = libc if sys.platform == "linux" else None  # elsewhere: the fallback's reads


def read_into_page_cache(fd: int, size_bytes: int, *, checksum: FastChecksum | None = None) -> None:
    """Brings the first ``size_bytes`` of the open file ``fd`` into the page cache and
    returns once they are there; ``checksum``, if given, is fed those bytes in order.
    ctypes, ``os.preadv`` and the hash release the GIL, so a thread doing this leaves
    an importing main thread alone."""
    if size_bytes <= 0:
        return
    if _libc is not None and _populate(fd, size_bytes, checksum):
        return
    scratch = memoryview(bytearray(min(_PIECE_BYTES, size_bytes)))
    done = 0
    while done < size_bytes:
        n = os.preadv(fd, [scratch[: size_bytes - done]], done)
        if n == 0:
            return  # shorter than asked (truncated meanwhile): the checksum will not match
        if checksum is not None:
            checksum.update(scratch[:n])
        done += n


def _populate(fd: int, size_bytes: int, checksum: FastChecksum | None) -> bool:
    """Maps the file shared read-only, populates the mapping and hashes it; False if
    this kernel cannot populate (older than 5.14), so the caller reads instead."""
    assert _libc is not None  # Linux only: checked by the caller
    addr = _libc.mmap(None, size_bytes, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == MAP_FAILED:
        return False
    try:
        if _libc.madvise(addr, size_bytes, _MADV_POPULATE_READ) != 0:
            return False
        if checksum is not None:
            checksum.update(memoryview((ctypes.c_char * size_bytes).from_address(addr)))
        return True
    finally:
        _libc.munmap(addr, size_bytes)
