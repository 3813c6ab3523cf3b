"""One load's chunk work: each chunk from the nearest tier with a good copy, into its place.

``LoadJob`` is the state a load's worker threads share: where each chunk came from (for
promotion into the nearer tiers afterwards), the phases' seconds and the bytes in flight
(``LoadReport``). A cache tier's decoded copy is read straight into the flat buffer and
checksummed piece by piece; an object tier's stored copy is fetched, decoded into the
buffer and checksummed; a copy that fails is deleted from its tier and the next tier is
tried. ``loader.load`` decides which path a load takes; this module does the chunks.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ember_core import EmberError, ModelFormatError
from ember_weights_store.codecs import codec_for
from ember_weights_store.digests import FastChecksum
from ember_weights_store.load_scratch import LoadScratch
from ember_weights_store.manifest import ChunkEntry, Manifest
from ember_weights_store.staging import StagingRing
from ember_weights_store.tiers import CacheTier, ObjectNotFoundError, ReadsInto, Tier

if TYPE_CHECKING:
    from ember_weights_store.store import WeightsStore

__all__ = ["LoadJob", "LoadReport"]


@dataclass
class LoadReport:
    """Where the time went. Phase seconds are summed over worker threads, so together they
    can exceed ``wall_s``; ``wall_s`` is what a cold start waits for."""

    manifest_s: float = 0.0
    alloc_s: float = 0.0
    fetch_s: float = 0.0  # reading cache tiers, fetching from object tiers
    decompress_s: float = 0.0
    verify_s: float = 0.0
    wall_s: float = 0.0
    raw_bytes: int = 0
    stored_bytes: int = 0  # bytes read from the tiers that served each chunk
    chunks_by_tier: dict[str, int] = field(default_factory=dict)
    discarded: list[str] = field(default_factory=list)  # "tier:key" of corrupt copies
    peak_in_flight_bytes: int = 0  # stored chunks and scratch held outside the flat buffers
    promoted_bytes: int = 0  # written into nearer tiers (after ``wait_promoted``)
    mapped: bool = False  # zero-copy: the buffers are a cache tier's files' pages, mapped
    staged_copies: int = 0  # chunks copied to the device through the pinned ring
    staging_slots_peak: int = 0  # most pinned slots in use at once (<= staging_slots)
    verified_ahead: int = 0  # mapped chunks checked before the load (not hashed again)
    # Filling the tier a machine's processes share the model through (host RAM, or the
    # disk tier where host RAM holds derived copies only) from a further tier's checked
    # bytes, then mapping it there (``loader._map_filled_tier``).
    fill_s: float = 0.0

    @property
    def gbps(self) -> float:
        """Raw bytes made ready per second of wall time."""
        return self.raw_bytes / self.wall_s / 1e9 if self.wall_s else 0.0


class LoadJob:
    """The per-load state shared by worker threads: accounting, and what to promote."""

    def __init__(self, store: WeightsStore, manifest: Manifest, report: LoadReport) -> None:
        self.store = store
        self.manifest = manifest
        self.report = report
        self._lock = threading.Lock()
        self._in_flight = 0
        self.to_promote: list[tuple[ChunkEntry, int]] = []  # (chunk, index of its source)
        # Object tiers' stored chunks and decoded streams pass through this, not the C
        # heap, whose thread arenas would keep it (``load_scratch``); ``finish`` frees it.
        self.scratch = LoadScratch(
            floor_bytes=max((max(c.raw_size, c.stored_size) for c in manifest.chunks), default=0)
        )

    def finish(self) -> None:
        """Gives back the scratch pages the load's chunks passed through; call it once
        every chunk is in place."""
        self.scratch.close()

    def _add(self, phase: str, started: float) -> None:
        with self._lock:
            setattr(self.report, phase, getattr(self.report, phase) + time.perf_counter() - started)

    def _hold(self, nbytes: int) -> None:
        with self._lock:
            self._in_flight += nbytes
            self.report.peak_in_flight_bytes = max(
                self.report.peak_in_flight_bytes, self._in_flight
            )

    def into_buffer(self, chunk: ChunkEntry, buffers: dict[str, torch.Tensor]) -> None:
        """Loads ``chunk`` into its place in the host flat buffers; promotes it later."""
        region = buffers[chunk.dtype][chunk.offset_bytes : chunk.end_bytes]
        index = self.load_chunk(chunk, memoryview(region.numpy()))  # type: ignore[arg-type]
        if index:
            with self._lock:
                self.to_promote.append((chunk, index))

    def via_staging(
        self, chunk: ChunkEntry, ring: StagingRing, device_buffers: dict[str, torch.Tensor]
    ) -> None:
        """Loads ``chunk`` into a pinned slot and copies it on to the device buffers. The slot
        is reused as soon as the copy is done, so promotion writes from it right away."""
        slot, view = ring.acquire(chunk.raw_size)
        out = memoryview(view.numpy())  # type: ignore[arg-type]
        index = self.load_chunk(chunk, out)
        for tier in self.store.tiers[:index]:
            if tier.holds_decoded:
                with contextlib.suppress(EmberError):  # a full cache is not a failed load
                    tier.put(chunk.hash, out)  # type: ignore[arg-type]  # any buffer will do
        ring.submit(slot, device_buffers[chunk.dtype][chunk.offset_bytes : chunk.end_bytes])

    def load_chunk(self, chunk: ChunkEntry, out: memoryview) -> int:
        """Fills ``out`` with the chunk's verified bytes from the nearest tier that has a good
        copy; returns that tier's index."""
        tried: list[str] = []
        for i, tier in enumerate(self.store.tiers):
            try:
                if isinstance(tier, CacheTier) and tier.holds_decoded:
                    ok, stored_size = self._read_decoded(tier, chunk, out), chunk.raw_size
                else:
                    ok, stored_size = self._fetch_and_decode(tier, chunk, out, i)
            except ObjectNotFoundError:
                continue
            except EmberError:
                tried.append(f"{tier.name} (read failed)")
                continue
            if not ok:
                tier.delete(chunk.hash)  # never serve this copy again
                tried.append(f"{tier.name} (corrupt, discarded)")
                with self._lock:
                    self.report.discarded.append(f"{tier.name}:{chunk.hash}")
                continue
            with self._lock:
                self.report.raw_bytes += chunk.raw_size
                self.report.stored_bytes += stored_size
                self.report.chunks_by_tier[tier.name] = (
                    self.report.chunks_by_tier.get(tier.name, 0) + 1
                )
            return i
        absent = [t.name for t in self.store.tiers if f"{t.name} (" not in " ".join(tried)]
        raise ModelFormatError(
            f"model {self.manifest.model_id!r}: chunk {chunk.hash} ({chunk.dtype} bytes "
            f"{chunk.offset_bytes}..{chunk.end_bytes}) has no good copy; tiers tried: "
            f"{', '.join(tried + [f'{n} (absent)' for n in absent]) or 'none'}. "
            "Re-import or push the model again"
        )

    def _read_decoded(self, tier: CacheTier, chunk: ChunkEntry, out: memoryview) -> bool:
        started = time.perf_counter()
        if not chunk.checksum:  # a manifest from before checksums: check the name instead
            try:
                tier.read_into(chunk.hash, out)
            except ModelFormatError:
                return False
            self._add("fetch_s", started)
            return self.verify(chunk, out)
        checksum = FastChecksum()
        hashing_s = 0.0

        def on_piece(piece: memoryview) -> None:
            nonlocal hashing_s
            t = time.perf_counter()
            checksum.update(piece)
            hashing_s += time.perf_counter() - t

        try:
            tier.read_into(chunk.hash, out, on_piece=on_piece)
        except ModelFormatError:
            return False
        with self._lock:
            self.report.fetch_s += time.perf_counter() - started - hashing_s
            self.report.verify_s += hashing_s
        return checksum.hexdigest() == chunk.checksum

    def _fetch_and_decode(
        self, tier: Tier, chunk: ChunkEntry, out: memoryview, index: int
    ) -> tuple[bool, int]:
        started = time.perf_counter()
        stored: bytes | memoryview
        if isinstance(tier, ReadsInto):
            stored = self.scratch.buffer("stored", chunk.stored_size)
            try:
                tier.read_into(chunk.hash, stored)
            except ModelFormatError:
                return False, chunk.stored_size
        else:
            stored = tier.get(chunk.hash)
        self._add("fetch_s", started)
        scratch = chunk.raw_size if chunk.codec == "zstd-bytegroup" else 0
        self._hold(len(stored) + scratch)
        try:
            started = time.perf_counter()
            try:
                codec_for(chunk.codec).decode_into(
                    stored, out, scratch=lambda n: self.scratch.buffer("decoded", n)
                )
            except ModelFormatError:
                return False, len(stored)
            self._add("decompress_s", started)
            if not self.verify(chunk, out):
                return False, len(stored)
            # Nearer object tiers (a bucket in front of S3) take the stored form; it is only
            # in memory now, so write it before letting it go rather than queueing it.
            for nearer in self.store.tiers[:index]:
                if not nearer.holds_decoded:
                    with contextlib.suppress(EmberError):  # a full cache is not a failed load
                        nearer.put(chunk.hash, stored)  # type: ignore[arg-type]  # any buffer
            return True, len(stored)
        finally:
            self._hold(-(len(stored) + scratch))

    def verify(self, chunk: ChunkEntry, out: memoryview) -> bool:
        started = time.perf_counter()
        ok = chunk.matches(out)
        self._add("verify_s", started)
        return ok

    def promote_in_background(self, buffers: dict[str, torch.Tensor]) -> list[Future[int]]:
        """Writes every chunk that came from further away into the nearer cache tiers, from
        the flat buffers (so nothing is copied or held for it), on one background thread."""
        work = [
            (chunk, tier)
            for chunk, index in self.to_promote
            for tier in self.store.tiers[:index]
            if tier.holds_decoded
        ]
        if not work:
            return []
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ember-promote")

        def run() -> int:
            written = 0
            for chunk, tier in work:
                if tier.has(chunk.hash):
                    continue  # another load's, or this one's (filled before mapping it)
                data = memoryview(
                    buffers[chunk.dtype][chunk.offset_bytes : chunk.end_bytes].numpy()  # type: ignore[arg-type]
                )
                try:
                    tier.put(chunk.hash, data)  # type: ignore[arg-type]  # cache tiers take any buffer
                except EmberError:
                    continue  # a full cache is not a failed load
                written += chunk.raw_size
            return written

        future = pool.submit(run)
        pool.shutdown(wait=False)  # the thread finishes its work, then exits
        return [future]
