"""``read_ahead`` with chunks only in an object tier: fetched, decoded, checked and written
into the host tier while torch imports, so the loader maps them there and hashes none of
them again; never into a disk tier (whose writes wait for the disk). Real S3 through
moto's HTTP server, real files."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch

from ember_weights_store import DiskTier, HostTier, LocalBucketTier
from ember_weights_store.loader import load
from ember_weights_store.s3_tier import S3Tier
from ember_weights_store.store import WeightsStore

CHUNK = 64 * 1024


@pytest.fixture
def bucket_dir(tiny_model: Callable[..., Path], tmp_path: Path) -> Path:
    """A tiny model imported into a local bucket, and nowhere else."""
    store = WeightsStore([LocalBucketTier(tmp_path / "bucket")])
    store.import_hf_dir(tiny_model("llama"), model_id="acme/tiny", chunk_size_bytes=CHUNK)
    return tmp_path / "bucket"


def _model_bytes(store: WeightsStore) -> int:
    return sum(c.raw_size for c in store.manifest("acme/tiny").chunks)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[HostTier]:
    tier = HostTier(tmp_path / "shm", budget_bytes=64 << 20)
    yield tier
    tier.release_unpinned()


def test_chunks_only_in_the_bucket_land_decoded_in_the_host_tier(
    bucket_dir: Path, host: HostTier
) -> None:
    store = WeightsStore([host, LocalBucketTier(bucket_dir)])
    manifest = store.manifest("acme/tiny")

    ahead = store.readahead("acme/tiny")

    # (``has`` would touch the files: a new mtime, so a check no longer theirs)
    assert all(host.object_path(c.hash).is_file() for c in manifest.chunks)
    assert len(ahead.verified) == len(manifest.chunks)
    assert ahead.fetched_bytes > 0 and ahead.bytes_read == 0
    assert ahead.manifest == manifest
    loaded = load(store, "acme/tiny", verified=ahead.verified)
    assert loaded.report.mapped  # the landed files, not a copy
    assert loaded.report.chunks_by_tier == {"host": len(manifest.chunks)}
    assert loaded.report.verified_ahead == len(manifest.chunks)  # none hashed again
    # Where this start's chunks came from: the bucket, through the host tier.
    assert ahead.sources(loaded.report.chunks_by_tier) == {"bucket": len(manifest.chunks)}
    reference = load(WeightsStore([LocalBucketTier(bucket_dir)]), "acme/tiny")
    for name, tensor in reference.tensors.items():
        assert torch.equal(loaded.tensors[name], tensor), name


def test_nothing_is_fetched_into_a_disk_tier(bucket_dir: Path, tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "disk", budget_bytes=64 << 20)
    store = WeightsStore([disk, LocalBucketTier(bucket_dir)])

    ahead = store.readahead("acme/tiny")

    # The loader decodes them into memory and fills the disk tier in the background; the
    # readahead reads the stored copies into the page cache for it.
    assert disk.keys() == [] and ahead.fetched_bytes == 0 and ahead.bytes_read > 0


def test_chunks_from_s3_land_in_the_host_tier(
    bucket_dir: Path, tmp_path: Path, s3_endpoint: str, host: HostTier
) -> None:
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="models")
    origin = S3Tier(bucket="models", prefix="m", endpoint_url=s3_endpoint)
    bucket = LocalBucketTier(bucket_dir)
    for key in list(bucket.keys()):  # the model pushed to S3 as it is
        origin.put(key, bucket.get(key))
    store = WeightsStore([host, DiskTier(tmp_path / "disk", budget_bytes=64 << 20), origin])

    ahead = store.readahead("acme/tiny")

    keys = [c.hash for c in store.manifest("acme/tiny").chunks]
    assert all(host.object_path(k).is_file() for k in keys)
    loaded = load(store, "acme/tiny", verified=ahead.verified)
    assert loaded.report.chunks_by_tier == {"host": len(keys)}
    assert loaded.report.verified_ahead == len(keys)
    assert ahead.sources(loaded.report.chunks_by_tier) == {"s3": len(keys)}


def test_a_corrupt_stored_chunk_is_left_to_the_loader(bucket_dir: Path, host: HostTier) -> None:
    bucket = LocalBucketTier(bucket_dir)
    store = WeightsStore([host, bucket])
    bad = store.manifest("acme/tiny").chunks[1]
    stored = bytearray(bucket.get(bad.hash))
    stored[len(stored) // 2] ^= 0xFF
    bucket.put(bad.hash, bytes(stored))

    ahead = store.readahead("acme/tiny")

    assert not host.object_path(bad.hash).exists()
    assert bad.hash not in ahead.verified.as_dict()
    with pytest.raises(Exception, match=bad.hash):  # the loader reports it, as ever
        load(store, "acme/tiny", verified=ahead.verified)


def test_nothing_is_fetched_into_a_tier_the_model_does_not_fit(
    bucket_dir: Path, tmp_path: Path
) -> None:
    probe = WeightsStore([LocalBucketTier(bucket_dir)])
    host = HostTier(tmp_path / "shm", budget_bytes=_model_bytes(probe) - 1)
    store = WeightsStore([host, LocalBucketTier(bucket_dir)])

    ahead = store.readahead("acme/tiny")

    # Each chunk would have evicted earlier ones: the stored copies are read instead.
    assert host.keys() == [] and ahead.fetched_bytes == 0 and ahead.bytes_read > 0


def test_fetch_false_leaves_object_tier_chunks_to_the_loader(
    bucket_dir: Path, host: HostTier
) -> None:
    store = WeightsStore([host, LocalBucketTier(bucket_dir)])

    ahead = store.readahead("acme/tiny", fetch=False)

    assert host.keys() == [] and ahead.fetched_bytes == 0 and len(ahead.verified) == 0


def test_fetching_ahead_imports_no_torch(
    bucket_dir: Path, tmp_path: Path, python_json: Callable[[str], Any]
) -> None:
    """It runs while torch imports: were torch imported here, the two would take turns."""
    code = f"""
import json, sys
from pathlib import Path
from ember_weights_store import HostTier, LocalBucketTier
from ember_weights_store.store import WeightsStore

host = HostTier(Path({str(tmp_path / "shm")!r}), budget_bytes=64 << 20)
store = WeightsStore([host, LocalBucketTier(Path({str(bucket_dir)!r}))])
ahead = store.readahead("acme/tiny")
host.release_unpinned()
print(json.dumps({{"fetched": ahead.fetched_bytes, "torch": "torch" in sys.modules}}))
"""
    result = python_json(code)
    assert result["fetched"] > 0
    assert result["torch"] is False
