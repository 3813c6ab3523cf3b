"""The cold-start path: manifest -> chunks from the nearest tier -> verified ->
decompressed straight into one flat buffer per dtype -> tensors are views.

Chunks load in parallel threads: fetching waits on I/O and zstd releases the GIL, so
both overlap. A chunk whose bytes do not hash to its key is discarded from the tier
that served it and fetched from the next one; a good copy found further away is
promoted into the nearer tiers.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ember_core import EmberError, ModelFormatError
from ember_weights_store.codecs import codec_for
from ember_weights_store.manifest import ChunkEntry, Manifest
from ember_weights_store.store import WeightsStore
from ember_weights_store.tiers import ObjectNotFoundError


@dataclass
class LoadReport:
    """Seconds per phase, summed over worker threads (so they can exceed wall time)."""

    manifest_s: float = 0.0
    fetch_s: float = 0.0
    decompress_s: float = 0.0
    verify_s: float = 0.0
    wall_s: float = 0.0
    raw_bytes: int = 0
    stored_bytes: int = 0
    chunks_by_tier: dict[str, int] = field(default_factory=dict)
    discarded: list[str] = field(default_factory=list)  # "tier:key" of corrupt copies

    @property
    def gbps(self) -> float:
        return self.raw_bytes / self.wall_s / 1e9 if self.wall_s else 0.0


@dataclass
class LoadedWeights:
    manifest: Manifest
    buffers: dict[str, torch.Tensor]  # dtype -> [buffer_bytes] uint8
    tensors: dict[str, torch.Tensor]  # views into the buffers
    report: LoadReport


def load(
    store: WeightsStore,
    model_id: str,
    revision: str = "main",
    *,
    threads: int = 4,
    buffers: dict[str, torch.Tensor] | None = None,
) -> LoadedWeights:
    """Loads a model's tensors. Pass ``buffers`` from a previous load of the same
    layout to reuse them instead of allocating."""
    t0 = time.perf_counter()
    report = LoadReport()
    manifest = store.manifest(model_id, revision)
    report.manifest_s = time.perf_counter() - t0
    sizes = manifest.buffer_sizes
    if buffers is None or {k: v.numel() for k, v in buffers.items()} != sizes:
        buffers = {d: torch.empty(n, dtype=torch.uint8) for d, n in sizes.items()}
    lock = threading.Lock()

    def one(chunk: ChunkEntry) -> None:
        out = buffers[chunk.dtype][chunk.offset_bytes : chunk.offset_bytes + chunk.raw_size]
        view = memoryview(out.numpy())  # type: ignore[arg-type]  # ndarray is a Buffer
        _load_chunk(store, manifest, chunk, view, report, lock)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for f in [pool.submit(one, c) for c in manifest.chunks]:
            f.result()
    tensors = {}
    for e in manifest.tensors:
        raw = buffers[e.dtype][e.offset_bytes : e.end_bytes]
        tensors[e.name] = raw.view(getattr(torch, e.dtype)).view(e.shape)
    report.wall_s = time.perf_counter() - t0
    return LoadedWeights(manifest, buffers, tensors, report)


def _timed(report: LoadReport, lock: threading.Lock, phase: str) -> Callable[[float], None]:
    def add(started: float) -> None:
        with lock:
            setattr(report, phase, getattr(report, phase) + time.perf_counter() - started)

    return add


def _load_chunk(
    store: WeightsStore,
    manifest: Manifest,
    chunk: ChunkEntry,
    out: memoryview,
    report: LoadReport,
    lock: threading.Lock,
) -> None:
    codec = codec_for(chunk.codec)
    tried: list[str] = []
    for i, tier in enumerate(store.tiers):
        started = time.perf_counter()
        try:  # one request per tier: a miss costs the same as has() would
            stored = tier.get(chunk.hash)
        except ObjectNotFoundError:
            continue
        except EmberError:
            tried.append(f"{tier.name} (read failed)")
            continue
        _timed(report, lock, "fetch_s")(started)
        started = time.perf_counter()
        try:
            codec.decode_into(stored, out)
        except ModelFormatError:
            ok = False
        else:
            _timed(report, lock, "decompress_s")(started)
            started = time.perf_counter()
            ok = "sha256:" + hashlib.sha256(out).hexdigest() == chunk.hash
            _timed(report, lock, "verify_s")(started)
        if not ok:
            tier.delete(chunk.hash)  # never serve this copy again
            tried.append(f"{tier.name} (corrupt, discarded)")
            with lock:
                report.discarded.append(f"{tier.name}:{chunk.hash}")
            continue
        for nearer in store.tiers[:i]:  # promote for the next cold start
            with contextlib.suppress(EmberError):  # a full cache is not a failed load
                nearer.put(chunk.hash, stored)
        with lock:
            report.raw_bytes += chunk.raw_size
            report.stored_bytes += len(stored)
            report.chunks_by_tier[tier.name] = report.chunks_by_tier.get(tier.name, 0) + 1
        return
    missing = [t.name for t in store.tiers if f"{t.name} (" not in " ".join(tried)]
    raise ModelFormatError(
        f"model {manifest.model_id!r}: chunk {chunk.hash} ({chunk.dtype} bytes "
        f"{chunk.offset_bytes}..{chunk.offset_bytes + chunk.raw_size}) has no good copy; tiers "
        f"tried: {', '.join(tried + [f'{n} (absent)' for n in missing]) or 'none'}. "
        "Re-import or push the model again"
    )
