"""A model's chunks made ready on this machine before the loader asks for them: what a new
worker does while torch imports (in a child process: ``ember_functions.early_readahead``)
and a zygote once for all its children.

For each chunk, its nearest copy decides:

- a file in a local tier (host RAM, the disk tier, a local bucket): read into the page
  cache, all of it (``page_cache``), and checksummed on the way if the tier holds it
  decoded;
- only in an object tier (the bucket, S3), where the nearest cache tier is host RAM:
  fetched, decoded, checked, and written there, where the loader maps it without a copy
  (``loader._map_from_cache``). That is the whole of a cold start from the object store
  but mapping and binding, done while torch imports instead of after. Not into a disk
  tier: past the page cache's dirty limit its writes wait for the disk (the 1.1B model's
  2.2 GB took 5.2-5.8 s to write there on a cloud VM, against 2.9 s for the loader's
  whole fetch and decode), where the loader decodes into memory and fills the disk tier
  in the background, after the first token;
- anything else is left to the loader, which fetches it as usually. A remote tier is
  never asked whether it holds a chunk a local tier holds (a request each).

Every failure here (a corrupt copy, a full tier, an unreachable endpoint) only leaves the
chunk to the loader, which reports it. Imports no torch: see the package's ``__init__``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from ember_core import EmberError
from ember_weights_store.bucket_tier import LocalBucketTier
from ember_weights_store.check_records import checked_copy, record_check
from ember_weights_store.codecs import codec_for
from ember_weights_store.digests import FastChecksum
from ember_weights_store.disk_tier import DiskTier
from ember_weights_store.host_tier import HostTier
from ember_weights_store.manifest import ChunkEntry, Manifest
from ember_weights_store.tiers import Tier
from ember_weights_store.verified import FileIdentity, Readahead

if TYPE_CHECKING:
    from ember_weights_store.store import WeightsStore

__all__ = ["READAHEAD_THREADS", "read_ahead"]

# Chunks a readahead reads at once. Four in flight took a cloud VM's disk from 1.2 to 1.8
# GB/s; more gained nothing there.
READAHEAD_THREADS = 4


def read_ahead(
    store: WeightsStore,
    model_id: str,
    revision: str = "main",
    *,
    threads: int = READAHEAD_THREADS,
    fetch: bool = True,
    manifest: Manifest | None = None,
) -> Readahead:
    """Brings ``model_id``'s chunks to this machine's nearest tiers and into the page cache
    (see the module's docstring); returns once every chunk is done. ``fetch=False`` leaves
    chunks only in an object tier to the loader. ``threads`` chunks are worked on at once:
    a disk serves several reads in flight faster than one, and one chunk's hashing or
    decoding runs while others are read or fetched. ``manifest``: the model's, read
    already (it is read here otherwise).

    Example::

        ahead = read_ahead(store, "acme/tiny")   # while torch imports
        loaded = load(store, "acme/tiny", verified=ahead.verified)
    """
    if manifest is None:
        manifest = store.manifest(model_id, revision)
    landing = _landing_tier(store, manifest) if fetch else None
    ahead = Readahead(manifest=manifest, landed_in=None if landing is None else landing.name)

    def one(chunk: ChunkEntry) -> tuple[FileIdentity, bool | None, int, str] | None:
        # With somewhere to decode them to, chunks only in an object tier are not read
        # as stored: the loader would have to decode them after the imports.
        found = _read_local(store.tiers, chunk, objects=landing is None)
        if found is None and landing is not None:
            return _fetch_into(store.tiers, landing, chunk)
        return None if found is None else (*found, 0, "")

    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="ember-readahead") as pool:
        # ``map`` keeps the manifest's order: results pair with their chunks.
        for chunk, done in zip(manifest.chunks, pool.map(one, manifest.chunks), strict=True):
            if done is None:
                continue
            copy, checked, fetched_bytes, source = done
            if source:
                ahead.fetched_bytes += fetched_bytes
                ahead.fetched_from[source] = ahead.fetched_from.get(source, 0) + 1
            else:
                ahead.bytes_read += copy.size_bytes
            if checked is True:
                ahead.verified.add(chunk.hash, copy)
            elif checked is False:
                ahead.corrupt.append(chunk.hash)
    return ahead


def _landing_tier(store: WeightsStore, manifest: Manifest) -> HostTier | None:
    """Where fetched chunks go: the nearest cache tier, the one the loader maps a model
    from, if it is host RAM (see the module's docstring) and the whole model fits its
    budget (else they would evict each other before the load)."""
    nearest = next((t for t in store.tiers if t.holds_decoded), None)
    if not isinstance(nearest, HostTier):
        return None
    return nearest if manifest.raw_size_bytes <= nearest.budget_bytes else None


def _read_local(
    tiers: list[Tier], chunk: ChunkEntry, *, objects: bool
) -> tuple[FileIdentity, bool | None] | None:
    """Reads one chunk's nearest local copy into the page cache: (the file read, whether
    it matched its checksum, None if not checked); None if no local tier holds it, or
    only an object tier (a local bucket) and not ``objects``."""
    for tier in tiers:
        if not tier.holds_decoded and not objects:
            return None
        if not isinstance(tier, (DiskTier, HostTier, LocalBucketTier)):
            if tier.holds_decoded and not tier.has(chunk.hash):
                continue  # another RAM cache, without it: look further
            return None  # only remote from here
        if isinstance(tier, HostTier) and chunk.checksum:
            # In RAM already, so there is nothing to read ahead: only the check, which a
            # process may have recorded on the file (``check_records``).
            trusted = checked_copy(tier.object_path(chunk.hash), chunk.checksum)
            if trusted is not None:
                return trusted, True
        checksum = FastChecksum() if tier.holds_decoded and chunk.checksum else None
        copy = tier.readahead(chunk.hash, checksum=checksum)
        if copy is not None:
            checked = None if checksum is None else checksum.hexdigest() == chunk.checksum
            if checked and isinstance(tier, HostTier):
                record_check(tier.object_path(chunk.hash), copy, chunk.checksum)
            return copy, checked
    return None


def _fetch_into(
    tiers: list[Tier], landing: HostTier, chunk: ChunkEntry
) -> tuple[FileIdentity, bool, int, str] | None:
    """Fetches ``chunk`` from the first object tier with a good copy, decodes it, checks
    it and writes it into ``landing``: (the file written, True, stored bytes fetched, the
    tier fetched from); None if no object tier gave a good copy, or ``landing`` took none
    (it may have one from another process now: the loader checks that one)."""
    for tier in tiers:
        if tier.holds_decoded:
            continue
        try:
            stored = tier.get(chunk.hash)
            raw = bytearray(chunk.raw_size)
            codec_for(chunk.codec).decode_into(stored, memoryview(raw))
        except EmberError:  # absent, unreachable or corrupt here: the next tier, or the loader
            continue
        if not chunk.matches(raw):
            continue
        try:
            if not landing.put_if_absent(chunk.hash, raw):
                return None
            identity = FileIdentity.of(os.stat(landing.object_path(chunk.hash)))
        except (OSError, EmberError):  # full, or evicted at once: the loader fetches it
            return None
        return identity, True, len(stored), tier.name
    return None
