"""The cold-start path: manifest -> chunks from the nearest tier -> verified -> written
straight into one flat buffer per dtype -> tensors are views.

Each chunk is one task on a thread pool; fetching waits on I/O, and zstd, XXH3 and
``preadv`` all release the GIL, so tasks overlap on every core. Where a chunk comes from
decides what the task does:

- a cache tier (host RAM, local disk) holds it decoded: ``read_into`` reads it straight into
  its place in the flat buffer, checksumming each piece as it lands. No copy, no scratch
  memory, no decompression: a warm load runs at the speed of the medium.
- an object tier (local bucket, S3) holds it as stored: fetch the stored bytes, decode them
  into the buffer, checksum the result.

A copy that fails its checksum (or has the wrong size, or does not decode) is deleted from
the tier that served it and the chunk is fetched from the next one. Once a chunk is good it is
promoted into every nearer tier: cache tiers get the decoded bytes, written from the flat
buffer by a background thread so the load does not wait for them (``wait_promoted``).

Memory in flight is bounded by construction: only chunks fetched from an object tier occupy
memory outside the flat buffers, one stored chunk (plus, for ``zstd-bytegroup``, one raw-size
scratch) per worker thread. The report records the peak.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch

from ember_core import EmberError, InvalidRequestError
from ember_weights_store.check_records import checked_copy
from ember_weights_store.disk_tier import DiskTier
from ember_weights_store.host_tier import HostTier
from ember_weights_store.load_job import LoadJob, LoadReport
from ember_weights_store.manifest import ChunkEntry, Manifest
from ember_weights_store.mapping import drop_file_pages, map_chunk_files
from ember_weights_store.staging import StagingRing, copy_engine_for
from ember_weights_store.store import WeightsStore
from ember_weights_store.verified import FileIdentity, VerifiedCopies

__all__ = ["DEFAULT_LOAD_THREADS", "LoadedWeights", "load"]

#: Enough requests in flight to keep a cold disk or an object store busy; CPU work (zstd,
#: checksums) never needs more threads than cores, but waiting ones cost nothing.
DEFAULT_LOAD_THREADS = 8


@dataclass
class LoadedWeights:
    manifest: Manifest
    buffers: dict[str, torch.Tensor]  # dtype -> [buffer_bytes] uint8
    tensors: dict[str, torch.Tensor]  # views into the buffers
    report: LoadReport
    _promotions: list[Future[int]] = field(default_factory=list, repr=False)

    def wait_promoted(self, timeout_s: float | None = None) -> int:
        """Blocks until the background promotions of this load are written; returns their
        bytes. A promotion that failed (a full cache) is skipped: it never fails a load."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        total = 0
        for f in self._promotions:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            total += f.result(timeout=left)
        self._promotions.clear()
        self.report.promoted_bytes += total
        return total


def load(
    store: WeightsStore,
    model_id: str,
    revision: str = "main",
    *,
    threads: int = DEFAULT_LOAD_THREADS,
    reuse: LoadedWeights | None = None,
    promote: bool = True,
    zero_copy: bool = True,
    device: str | torch.device = "cpu",
    staging_slots: int | None = None,
    verified: VerifiedCopies | None = None,
    manifest: Manifest | None = None,
) -> LoadedWeights:
    """Loads a model's tensors from the nearest tiers that hold them.

    Pass ``reuse=`` a previous load of a model with the same buffer sizes (a worker swapping
    revisions or reloading) to fill its buffers again instead of allocating and faulting in
    fresh memory; its tensors are overwritten. ``promote=False`` leaves nearer tiers alone.

    ``device="cuda:0"`` loads onto the GPU through ``staging_slots`` (default 4) pinned
    chunk-sized host slots, overlapping reads with async copies (``staging``); the buffers
    and tensors are then on the device and nothing is promoted in the background. Passing
    ``staging_slots`` on the CPU runs the same staged path with synchronous copies.

    When the nearest cache tier that holds every chunk keeps them as files (host RAM; or
    the disk tier, when no nearer tier holds them all), the buffers are those files' pages
    mapped copy-on-write (``zero_copy``, the default): nothing is copied, every worker on
    the machine shares one physical copy of the model, and chunks are promoted into the
    nearer tiers from the mapping. ``reuse`` is ignored then. Where the store shares
    models across processes (a host tier; or the disk tier, where a host tier holds
    derived copies only) and the chunks did not all come from that tier, the load fills it
    and maps that copy (``_map_filled_tier``), so the machine holds one copy of the model,
    not two. Mapped
    chunks are checked against their checksums, except those in ``verified`` (this
    process checked the same files already: ``WeightsStore.readahead``). ``manifest``:
    the model's manifest, read already (by that readahead): not read again.

    Example::

        store = ModelCatalog(home).store()
        weights = load(store, "smollm2-135m")
        print(weights.report.gbps, weights.report.chunks_by_tier)
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InvalidRequestError(f"threads must be a positive integer, got {threads!r}")
    t0 = time.perf_counter()
    report = LoadReport()
    if manifest is None:
        manifest = store.manifest(model_id, revision)
    elif (manifest.model_id, manifest.revision) != (model_id, revision):
        raise InvalidRequestError(
            f"the manifest passed is {manifest.model_id}@{manifest.revision}, not "
            f"{model_id}@{revision}; pass the load's own manifest, or none",
            param="manifest",
        )
    report.manifest_s = time.perf_counter() - t0
    target = torch.device(device)
    if target.type != "cpu" or staging_slots is not None:
        return _load_staged(store, manifest, report, t0, target, threads, staging_slots or 4)
    loaded = _map_from_cache(store, manifest, report, threads, verified) if zero_copy else None
    if loaded is None:
        buffers = _buffers_for(manifest, reuse)
        report.alloc_s = time.perf_counter() - t0 - report.manifest_s
        job = LoadJob(store, manifest, report)
        pool = store.pool(threads)
        futures = [pool.submit(job.into_buffer, c, buffers) for c in manifest.chunks]
        try:
            for f in futures:
                f.result()
        finally:
            wait(futures)  # every thread done with the job's scratch before it goes
            job.finish()
        loaded = buffers, job
    shared = _shared_tier(store)
    all_from_shared = shared is not None and report.chunks_by_tier == {
        shared.name: len(manifest.chunks)
    }
    if zero_copy and promote and shared is not None and not all_from_shared:
        loaded = _map_filled_tier(store, manifest, report, threads, loaded, shared) or loaded
    buffers, job = loaded
    report.wall_s = time.perf_counter() - t0
    weights = LoadedWeights(manifest, buffers, _tensor_views(manifest, buffers), report)
    if promote:
        weights._promotions = job.promote_in_background(buffers)
    return weights


def _load_staged(
    store: WeightsStore,
    manifest: Manifest,
    report: LoadReport,
    t0: float,
    device: torch.device,
    threads: int,
    slots: int,
) -> LoadedWeights:
    buffers = {
        d: torch.empty(n, dtype=torch.uint8, device=device)
        for d, n in manifest.buffer_sizes.items()
    }
    report.alloc_s = time.perf_counter() - t0 - report.manifest_s
    ring = StagingRing(
        slots=slots,
        slot_bytes=max((c.raw_size for c in manifest.chunks), default=1),
        engine=copy_engine_for(device),
        pin=device.type == "cuda",
    )
    job = LoadJob(store, manifest, report)
    # More workers than slots would only queue on the ring.
    with ThreadPoolExecutor(
        max_workers=min(threads, slots), thread_name_prefix="ember-stage"
    ) as pool:
        futures = [pool.submit(job.via_staging, c, ring, buffers) for c in manifest.chunks]
        try:
            for f in futures:
                f.result()
        finally:
            wait(futures)
            job.finish()
    ring.finish()
    report.staged_copies = ring.copies
    report.staging_slots_peak = ring.max_in_use
    report.wall_s = time.perf_counter() - t0
    return LoadedWeights(manifest, buffers, _tensor_views(manifest, buffers), report)


def _tensor_views(manifest: Manifest, buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors = {}
    for e in manifest.tensors:
        raw = buffers[e.dtype][e.offset_bytes : e.end_bytes]
        tensors[e.name] = raw.view(getattr(torch, e.dtype)).view(e.shape)
    return tensors


def _map_from_cache(
    store: WeightsStore,
    manifest: Manifest,
    report: LoadReport,
    threads: int,
    verified: VerifiedCopies | None,
) -> tuple[dict[str, torch.Tensor], LoadJob] | None:
    """The zero-copy path: when the nearest cache tier holding every chunk keeps them as
    files (host RAM, or the disk tier when no nearer tier holds them all), map the chunk
    files in place (``mapping``) instead of copying them, and verify them there. Returns
    the buffers and the job (whose promotions fill nearer tiers), or None, having changed
    nothing but a corrupt copy (deleted), when the copying path must run instead.

    From host RAM the chunks are pinned while any tensor of this load is alive. From the
    disk tier nothing is pinned: an evicted chunk's file is unlinked, and a mapping keeps
    an unlinked file's pages. Mapped disk-tier pages are the page cache's: no fresh memory
    to fault in and no copy, which on a cold disk leaves the reads alone (and those may
    have started before this process imported torch: ``WeightsStore.readahead``)."""
    if manifest.chunk_size_bytes % mmap.PAGESIZE:
        return None
    keys = [c.hash for c in manifest.chunks]
    for index, tier in enumerate(store.tiers):
        if isinstance(tier, HostTier):
            owner = f"load-{os.getpid()}-{uuid.uuid4().hex[:12]}"
            tier.pin(keys, owner=owner)  # before looking, so nothing we find can be evicted
            if all(tier.object_path(k).is_file() for k in keys):
                return _map_tier(store, manifest, report, threads, index, tier, owner, verified)
            tier.unpin(owner)
        elif isinstance(tier, DiskTier) and all(tier.has(k) for k in keys):
            return _map_tier(store, manifest, report, threads, index, tier, None, verified)
        if not tier.holds_decoded:
            return None  # an object tier: chunks must be fetched and decoded
    return None


def _map_tier(
    store: WeightsStore,
    manifest: Manifest,
    report: LoadReport,
    threads: int,
    index: int,  # of ``tier`` in the store: chunks are promoted into the tiers before it
    tier: HostTier | DiskTier,
    owner: str | None,  # the host tier's pin, released when the last buffer goes
    verified: VerifiedCopies | None,  # checked already: not hashed again
) -> tuple[dict[str, torch.Tensor], LoadJob] | None:
    started = time.perf_counter()
    remaining = [len(manifest.buffer_sizes)]
    lock = threading.Lock()

    def release() -> None:  # called as each buffer's mapping goes; unpin after the last
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last and owner is not None and isinstance(tier, HostTier):
            with contextlib.suppress(Exception):  # may run at interpreter exit
                tier.unpin(owner)

    try:
        buffers = {
            dtype: map_chunk_files(
                [
                    (tier.object_path(c.hash), c.offset_bytes, c.raw_size)
                    for c in manifest.chunks
                    if c.dtype == dtype
                ],
                size,
                on_release=release,
            )
            for dtype, size in manifest.buffer_sizes.items()
        }
    except (OSError, EmberError):
        if owner is not None and isinstance(tier, HostTier):
            tier.unpin(owner)
        return None  # a chunk vanished or is the wrong size: copy from wherever it is
    report.fetch_s = time.perf_counter() - started
    job = LoadJob(store, manifest, report)

    # Asked after mapping: a file checked ahead and still at its path is the one mapped,
    # checked by this load's readahead (``verified``) or, in the host tier, once by any
    # process (``check_records``). The loader records nothing itself: it hashes a mapping
    # of a file opened before it looks at the path, so it cannot say which inode it checked.
    records = isinstance(tier, HostTier)
    ahead = {
        c.hash
        for c in manifest.chunks
        if (verified is not None and verified.covers(c.hash, tier.object_path(c.hash)))
        or (records and c.checksum and checked_copy(tier.object_path(c.hash), c.checksum))
    }

    def verify(chunk: ChunkEntry) -> bool:
        view = buffers[chunk.dtype][chunk.offset_bytes : chunk.end_bytes]
        ok = job.verify(chunk, memoryview(view.numpy()))  # type: ignore[arg-type]
        # Checking it brought every page into this process; hand them back (the file
        # keeps them), so it holds what it then reads, not every row of an embedding it
        # looks a few up in (125 MiB of a 1.1B model's first worker).
        drop_file_pages(view.data_ptr(), view.numel())
        return ok

    # Only what was not checked ahead goes to the pool: for a model checked ahead, nothing,
    # and no pool thread is started for it (in a worker each start waits for the GIL,
    # which the tokenizer's parse on another thread holds for ~30 ms at a time).
    unchecked = [c for c in manifest.chunks if c.hash not in ahead]
    verdicts = list(store.pool(threads).map(verify, unchecked)) if unchecked else []
    bad = [c for c, ok in zip(unchecked, verdicts, strict=True) if not ok]
    if bad:
        for c in bad:
            tier.delete(c.hash)
            report.discarded.append(f"{tier.name}:{c.hash}")
        return None  # the mapping and pin go with ``buffers``; the copying path refetches
    report.raw_bytes = manifest.raw_size_bytes
    report.stored_bytes = report.raw_bytes
    report.chunks_by_tier = {tier.name: len(manifest.chunks)}
    report.verified_ahead = len(ahead)
    report.mapped = True
    job.to_promote = [(c, index) for c in manifest.chunks]  # into the nearer cache tiers
    return buffers, job


def _shared_tier(store: WeightsStore) -> HostTier | DiskTier | None:
    """The tier whose files a store's processes share the model through, where they do:
    its host tier if that holds chunks, else its disk tier if a host tier holds what
    they derive (``ModelCatalog.store(host_chunks=False)``); None where each process
    may keep its own copy."""
    host = store.derived_tier
    if host is None or host in store.tiers:
        return host
    return next((t for t in store.tiers if isinstance(t, DiskTier)), None)


def _map_filled_tier(
    store: WeightsStore,
    manifest: Manifest,
    report: LoadReport,
    threads: int,
    loaded: tuple[dict[str, torch.Tensor], LoadJob],  # checked: a further tier's, or copies
    tier: HostTier | DiskTier,  # ``_shared_tier``
) -> tuple[dict[str, torch.Tensor], LoadJob] | None:
    """A store with a shared tier is one whose machine shares models across processes: a
    load that did not come from it (the disk tier's files mapped, or chunks fetched and
    decoded into this process's buffers) fills it now, from those checked bytes, and maps
    the tier's copy instead (None if it cannot: the buffers stand). Otherwise this
    process would hold the model alone, in page-cache pages or its own memory, while
    every later process maps the shared copy: two copies in RAM for as long as it runs
    (measured: SmolLM2's first worker of a pool held 256 MiB of the disk tier's pages,
    its second the same of the host tier's; ``bench/pool_memory.py``)."""
    started = time.perf_counter()
    buffers, job = loaded
    keys = [c.hash for c in manifest.chunks]
    owner = None
    if isinstance(tier, HostTier):
        owner = f"load-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        tier.pin(keys, owner=owner)  # first: the puts below can then never evict each other
    # Copies written here, from checked bytes, are not hashed again when mapped; copies
    # another process left (chunks models share, a fill cut short) are, as any load's.
    written = VerifiedCopies()
    try:
        for chunk in manifest.chunks:
            view = buffers[chunk.dtype][chunk.offset_bytes : chunk.end_bytes].numpy()
            if tier.put_if_absent(chunk.hash, memoryview(view)):  # type: ignore[arg-type]
                report.promoted_bytes += chunk.raw_size
                written.add(chunk.hash, FileIdentity.of(os.stat(tier.object_path(chunk.hash))))
    except (OSError, EmberError):  # the tier cannot hold the model: keep what was loaded
        if owner is not None and isinstance(tier, HostTier):
            tier.unpin(owner)
        return None
    # Mapped on a report of its own: ``report`` stays the load it was, the fill apart.
    remap = LoadReport()
    index = store.tiers.index(tier)
    remapped = _map_tier(store, manifest, remap, threads, index, tier, owner, written)
    report.discarded += remap.discarded  # a bad copy another process left
    report.verify_s += remap.verify_s
    report.mapped = report.mapped or remapped is not None
    report.fill_s = time.perf_counter() - started
    # The load's own promotions still fill the tiers further out (the shared tier, full
    # already, is skipped), from the shared tier's pages now.
    return None if remapped is None else (remapped[0], job)


def _buffers_for(manifest: Manifest, reuse: LoadedWeights | None) -> dict[str, torch.Tensor]:
    sizes = manifest.buffer_sizes
    # Mapped buffers are the host tier's pages: writing into them would copy every page
    # (copy-on-write) and leave the tier's chunks unshared. Only copied buffers are reused.
    if reuse is not None and not reuse.report.mapped:
        have = {k: v.numel() for k, v in reuse.buffers.items()}
        if have == sizes:
            reuse.wait_promoted()  # its promotions read these buffers; let them finish first
            return reuse.buffers
    return {d: torch.empty(n, dtype=torch.uint8) for d, n in sizes.items()}
