"""Scratch memory for one load's chunks from an object tier, kept off the C heap.

A chunk fetched from an object tier (the local bucket, S3) passes through two buffers
before it is in the flat buffer: its stored bytes, and for ``zstd-bytegroup`` the two
decompressed byte streams it interleaves. Allocated with ``malloc`` (``bytes``, numpy),
each of the loader's threads would serve them from its own glibc arena: after the first,
glibc's dynamic mmap threshold rises to their size (~8-16 MiB), so the rest come from the
arena, and an arena's free top is never given back (``malloc_trim`` trims only the main
heap's). A worker that fetched SmolLM2 from the bucket kept 62 MiB more than one that
mapped the disk tier, in eight such arenas; with ``MALLOC_ARENA_MAX=1`` none, but that
slowed a new interpreter's start by 5% (``bench/coldstart.py``, 2026-12-06).

So each thread takes its scratch here: anonymous mappings, reused chunk after chunk on
that thread (so their pages fault in once, as an arena's would), and unmapped, their pages
given back, when the load is done (:meth:`LoadScratch.close`).

The decoded streams always go through it, and the stored bytes where the tier can read
into a buffer without a copy of its own (``ReadsInto``: the local bucket, with ``preadv``).
An S3 response's bytes are botocore's: read a piece at a time into scratch, they cost a
copy under the GIL (one 11 MiB GET into a buffer: 9.3 -> 10.6 ms), so S3 keeps ``get`` and
its stored bytes stay on the C heap: one stored chunk per loader thread may stay in its
arena. (With both, repeated SmolLM2 loads from S3 in one process, as ``bench/weights.py``
times them, took 0.30 -> 0.39 s: that copy, and the faults below.)

What it costs: a process's first load faults the scratch's pages in, as it faulted the
arenas' (SmolLM2 from the bucket, one load per new process, medians of 8: 0.325 s before,
0.301 s with it). A second load in the same process faults them in again where the arenas
were warm: repeated loads in one process, as ``bench/weights.py`` times them, went from
0.245 to 0.289 s, and from S3 (stored bytes through ``get``, decoded streams through
this) 0.292-0.299 to 0.316-0.319 s. A worker loads once.

Example::

    scratch = LoadScratch(floor_bytes=largest_chunk_bytes)
    stored = scratch.buffer("stored", chunk.stored_size)  # this thread's, reused
    ...
    scratch.close()  # once every thread is done with the load
"""

from __future__ import annotations

import contextlib
import mmap
import threading

__all__ = ["LoadScratch"]


class LoadScratch:
    """Per-thread, per-purpose scratch buffers of one load (see the module docstring)."""

    def __init__(self, *, floor_bytes: int = 0) -> None:
        # Every buffer is at least this large (a load passes its largest chunk's size): a
        # thread maps each purpose's buffer once, however the chunks' sizes vary, where
        # growing it would fault in fresh pages for a new mapping again and again.
        self.floor_bytes = floor_bytes
        self._local = threading.local()
        self._lock = threading.Lock()
        self._maps: list[mmap.mmap] = []  # every mapping made, to unmap at close
        self._closed = False

    def buffer(self, purpose: str, nbytes: int) -> memoryview:
        """``nbytes`` of writable scratch for ``purpose`` ("stored", "decoded"), this
        thread's own: the same pages as its last buffer for that purpose, where they
        are large enough. Valid until this thread asks for ``purpose`` again or
        :meth:`close`; drop the view before then."""
        held: dict[str, mmap.mmap] = self._local.__dict__.setdefault("maps", {})
        mapping = held.get(purpose)
        if mapping is None or mapping.closed or len(mapping) < nbytes:
            mapping = mmap.mmap(-1, max(nbytes, self.floor_bytes, 1))
            with self._lock:
                if self._closed:
                    mapping.close()
                    raise RuntimeError("this load's scratch is closed; a load takes none after")
                self._maps.append(mapping)
            held[purpose] = mapping  # a smaller one it replaces is unmapped at close
        return memoryview(mapping)[:nbytes]

    @property
    def mapped_bytes(self) -> int:
        """Bytes of scratch mapped now, over every thread."""
        with self._lock:
            return sum(len(m) for m in self._maps if not m.closed)

    def close(self) -> None:
        """Unmaps every buffer, giving its pages back. Call it once the load's threads are
        done; a view still held keeps its mapping until garbage collected."""
        with self._lock:
            self._closed = True
            maps, self._maps = self._maps, []
        for mapping in maps:
            with contextlib.suppress(BufferError):  # a view outlives the load: GC unmaps it
                mapping.close()
