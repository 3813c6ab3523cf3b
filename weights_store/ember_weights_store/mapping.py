"""Zero-copy flat buffers: a model's chunk files mapped side by side into one address range.

A model's flat buffer is cut into chunks, and the host tier holds each decoded chunk as a file
in tmpfs. Mapping those files one after another at fixed addresses inside one reserved range
gives a single contiguous buffer whose pages *are* the host tier's pages: no copy, no fresh
memory to fault in, and every worker process that maps the same model shares one physical copy.
Mappings are private (copy-on-write), so a stray write changes that process's view only, never
the shared chunk.

Python's ``mmap`` cannot place a mapping at a chosen address, so this calls libc's ``mmap``
with ``MAP_FIXED`` through ctypes. Chunk offsets are multiples of the chunk size, which the
manifest keeps a multiple of 4 KiB, so every chunk starts on a page boundary.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ember_core import InvalidRequestError, ModelFormatError
from ember_weights_store.libc import MAP_FAILED, libc

__all__ = ["drop_file_pages", "map_chunk_files", "populate_file_pages"]

_PAGE = mmap.PAGESIZE
# Linux values; the mmap module exposes neither.
_PROT_NONE = 0
_MAP_FIXED = 0x10
_MADV_DONTNEED = 4
_MADV_POPULATE_READ = 22  # Linux 5.14+


def _round_up(n: int) -> int:
    return -(-n // _PAGE) * _PAGE


def _check(addr: int | None, what: str) -> int:
    if addr is None or addr == MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {what} failed: {os.strerror(err)}")
    return addr


def map_chunk_files(
    pieces: Sequence[tuple[Path, int, int]],
    size_bytes: int,
    *,
    on_release: Callable[[], object] | None = None,
) -> torch.Tensor:
    """A ``[size_bytes]`` uint8 tensor whose bytes are the files ``pieces`` = (path, offset,
    length), each mapped at its offset. Offsets must be page-aligned and the pieces must tile
    the buffer exactly. The mapping lives as long as the tensor (and any view of it); then
    ``on_release`` is called (the loader unpins the chunks there). Pages are mapped as
    they are first read (the kernel maps a few neighbours per fault); ``MAP_POPULATE``
    would be slower, not faster: on a private writable mapping it prefaults for writing,
    which copies every page (0.72 s against 0.04 s for SmolLM2's float32 weights here).

    Raises ModelFormatError if a file is missing or not ``length`` bytes long.
    """
    expected = 0
    for _, offset, length in pieces:
        if offset != expected or offset % _PAGE:
            raise InvalidRequestError(
                f"chunk at byte {offset} is not page-aligned or leaves a gap; mapping needs "
                f"chunks that tile the buffer on {_PAGE}-byte boundaries"
            )
        expected += length
    if expected != size_bytes:
        raise InvalidRequestError(f"chunks cover {expected} bytes, the buffer is {size_bytes}")
    reserved = max(_PAGE, _round_up(size_bytes))
    # Reserve the whole range first, so the fixed mappings below can never land on (and
    # silently replace) anything else this process has mapped.
    base = _check(
        libc.mmap(None, reserved, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0),
        "a reserved range",
    )
    try:
        for path, offset, length in pieces:
            fd = os.open(path, os.O_RDONLY)
            try:
                if os.fstat(fd).st_size != length:
                    raise ModelFormatError(
                        f"{path} holds {os.fstat(fd).st_size} bytes, {length} expected; the "
                        "cached chunk is truncated or stale"
                    )
                _check(
                    libc.mmap(
                        base + offset,
                        _round_up(length),
                        mmap.PROT_READ | mmap.PROT_WRITE,
                        mmap.MAP_PRIVATE | _MAP_FIXED,  # inside our own reservation
                        fd,
                        0,
                    ),
                    str(path),
                )
            finally:
                os.close(fd)  # the mapping keeps the file's pages alive on its own
    except BaseException:
        libc.munmap(base, reserved)
        raise
    holder = (ctypes.c_uint8 * max(1, size_bytes)).from_address(base)
    # torch.frombuffer keeps ``holder`` alive for as long as any tensor shares its storage;
    # when the last one goes, ``holder`` is collected and the range unmapped.
    weakref.finalize(holder, libc.munmap, base, reserved)
    if on_release is not None:
        weakref.finalize(holder, on_release)
    return torch.frombuffer(holder, dtype=torch.uint8)[:size_bytes]


def drop_file_pages(address: int, size_bytes: int) -> int:
    """Unmaps from this process the whole pages of ``[address, address + size_bytes)``,
    which must lie in a mapping :func:`map_chunk_files` made, and returns the bytes
    dropped. The file keeps them (the page cache, or tmpfs), no longer held by this
    process: page-cache pages become reclaimable. Reading the range again faults the
    file's bytes back in, so nothing is lost; on anonymous memory the same call would
    zero it, which is why callers pass only ranges they know are mapped files."""
    start = _round_up(address)
    end = (address + size_bytes) // _PAGE * _PAGE  # whole pages only: neighbours keep theirs
    if end <= start or libc.madvise(start, end - start, _MADV_DONTNEED) != 0:
        return 0
    return end - start


def populate_file_pages(address: int, size_bytes: int) -> bool:
    """Maps into this process, now and in one call, every page of ``[address, address +
    size_bytes)`` (a mapping :func:`map_chunk_files` made), read-only: the file's pages,
    no copy. Returns False where the kernel cannot (older than 5.14); reads then fault
    them in as before. Read page by page, a mapped tmpfs file costs a fault per few
    pages: the 1.1B model's 2.2 GB of packed matrices took 0.26-0.27 s for a first
    request where later ones took 0.16; populated first (0.045-0.051 s), 0.16-0.17."""
    start = address // _PAGE * _PAGE
    end = _round_up(address + size_bytes)
    return end > start and libc.madvise(start, end - start, _MADV_POPULATE_READ) == 0
