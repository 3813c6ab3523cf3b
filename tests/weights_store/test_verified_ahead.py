"""Chunks checked by the readahead are not hashed again by the loader, and only while the
file at the chunk's path is the one that was checked."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ember_weights_store import DiskTier, HostTier, LocalBucketTier
from ember_weights_store.loader import load
from ember_weights_store.store import WeightsStore

MIB = 1 << 20
CHUNK = 1 * MIB


@pytest.fixture
def host_root() -> Iterator[Path]:
    path = Path("/dev/shm") / f"ember-verified-test-{uuid.uuid4().hex}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _checkpoint(path: Path) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    tensors = {f"w{i}": torch.randn(MIB // 4, generator=gen) for i in range(4)}  # 4 MiB
    save_file(tensors, str(path))
    return tensors


@pytest.fixture
def on_disk(tmp_path: Path) -> tuple[WeightsStore, DiskTier, dict[str, torch.Tensor]]:
    """A 4 MiB model in a bucket and, after one load, in the disk tier."""
    original = _checkpoint(tmp_path / "m.safetensors")
    bucket = LocalBucketTier(tmp_path / "bucket")
    disk = DiskTier(tmp_path / "disk", budget_bytes=256 * MIB)
    store = WeightsStore([disk, bucket])
    store.import_safetensors_file(tmp_path / "m.safetensors", model_id="m", chunk_size_bytes=CHUNK)
    load(store, "m").wait_promoted()
    return store, disk, original


def _rewrite_in_place(path: Path, *, flip_at: int | None) -> None:
    """Writes the file again without a new inode, as a stray writer would (the stores
    never do: they rename complete files into place). Later than the kernel's coarse
    file clock can blur, so the modification time moves."""
    time.sleep(0.02)
    data = bytearray(path.read_bytes())
    if flip_at is not None:
        data[flip_at] ^= 0x40
    with path.open("r+b") as f:
        f.write(data)


def test_the_loader_skips_the_chunks_the_readahead_checked(
    on_disk: tuple[WeightsStore, DiskTier, dict[str, torch.Tensor]],
) -> None:
    store, _, original = on_disk
    n = len(store.manifest("m").chunks)

    ahead = store.readahead("m")
    loaded = load(store, "m", verified=ahead.verified)

    assert len(ahead.verified) == n and not ahead.corrupt
    assert loaded.report.mapped and loaded.report.chunks_by_tier == {"disk": n}
    assert loaded.report.verified_ahead == n
    assert loaded.report.verify_s == 0.0  # nothing hashed on the way to READY
    for name, t in original.items():
        assert torch.equal(loaded.tensors[name], t), name
    # Without the readahead's checks the loader hashes every chunk itself.
    plain = load(store, "m")
    assert plain.report.verified_ahead == 0 and plain.report.verify_s > 0


def test_a_chunk_changed_after_the_readahead_is_checked_again_and_discarded(
    on_disk: tuple[WeightsStore, DiskTier, dict[str, torch.Tensor]],
) -> None:
    store, disk, original = on_disk
    chunks = store.manifest("m").chunks
    ahead = store.readahead("m")
    victim = chunks[1].hash
    _rewrite_in_place(disk.object_path(victim), flip_at=9)

    loaded = load(store, "m", verified=ahead.verified)

    assert f"disk:{victim}" in loaded.report.discarded
    for name, t in original.items():  # fetched again from the bucket
        assert torch.equal(loaded.tensors[name], t), name


def test_a_replaced_copy_is_not_covered_by_the_check_of_the_old_one(
    on_disk: tuple[WeightsStore, DiskTier, dict[str, torch.Tensor]],
) -> None:
    store, disk, _ = on_disk
    chunks = store.manifest("m").chunks
    ahead = store.readahead("m")
    first, second = chunks[0].hash, chunks[2].hash
    data = disk.get(first)
    disk.delete(first)
    disk.put(first, data)  # evicted and written again: another file, same bytes
    _rewrite_in_place(disk.object_path(second), flip_at=None)  # same inode, new mtime

    assert not ahead.verified.covers(first, disk.object_path(first))
    assert not ahead.verified.covers(second, disk.object_path(second))
    assert ahead.verified.covers(chunks[1].hash, disk.object_path(chunks[1].hash))
    loaded = load(store, "m", verified=ahead.verified)
    assert loaded.report.verified_ahead == len(chunks) - 2
    assert not loaded.report.discarded


def test_a_copy_corrupt_before_the_readahead_is_reported_and_left_to_the_loader(
    on_disk: tuple[WeightsStore, DiskTier, dict[str, torch.Tensor]],
) -> None:
    store, disk, original = on_disk
    victim = store.manifest("m").chunks[3].hash
    _rewrite_in_place(disk.object_path(victim), flip_at=123)

    ahead = store.readahead("m")
    loaded = load(store, "m", verified=ahead.verified)

    assert ahead.corrupt == [victim]
    assert not ahead.verified.covers(victim, disk.object_path(victim))
    assert f"disk:{victim}" in loaded.report.discarded
    for name, t in original.items():
        assert torch.equal(loaded.tensors[name], t), name


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a tmpfs at /dev/shm")
def test_host_tier_copies_are_checked_ahead_too(tmp_path: Path, host_root: Path) -> None:
    original = _checkpoint(tmp_path / "m.safetensors")
    bucket = LocalBucketTier(tmp_path / "bucket")
    WeightsStore([bucket]).import_safetensors_file(
        tmp_path / "m.safetensors", model_id="m", chunk_size_bytes=CHUNK
    )
    store = WeightsStore([HostTier(host_root, budget_bytes=256 * MIB), bucket])
    load(store, "m").wait_promoted()
    n = len(store.manifest("m").chunks)

    ahead = store.readahead("m")
    loaded = load(store, "m", verified=ahead.verified)

    assert len(ahead.verified) == n
    assert loaded.report.chunks_by_tier == {"host": n} and loaded.report.verified_ahead == n
    for name, t in original.items():
        assert torch.equal(loaded.tensors[name], t), name


def test_without_populate_the_read_is_checked_the_same(
    on_disk: tuple[WeightsStore, DiskTier, dict[str, torch.Tensor]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ember_weights_store import page_cache

    store, _, _ = on_disk
    monkeypatch.setattr(page_cache, "_libc", None)  # a kernel or OS without it
    monkeypatch.setattr(page_cache, "_PIECE_BYTES", 300_000)  # pieces not page-aligned
    ahead = store.readahead("m")
    assert len(ahead.verified) == len(store.manifest("m").chunks) and not ahead.corrupt


def test_the_file_identity_names_device_inode_size_and_mtime(tmp_path: Path) -> None:
    from ember_weights_store.verified import FileIdentity

    path = tmp_path / "f"
    path.write_bytes(b"abc")
    st = os.stat(path)
    assert FileIdentity.of(st) == (st.st_dev, st.st_ino, 3, st.st_mtime_ns)
