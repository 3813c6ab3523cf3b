"""Host-tier files checked once: the readahead records a check on the file, and later
readaheads and loads map it without hashing it again, for as long as it is that inode at
that size; a copy replaced or truncated is hashed again, and a corrupt one caught."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ember_weights_store import HostTier, LocalBucketTier
from ember_weights_store.check_records import checked_copy, record_check
from ember_weights_store.loader import load
from ember_weights_store.store import WeightsStore
from ember_weights_store.verified import FileIdentity

MIB = 1 << 20
CHUNK = 1 * MIB
SUM = "xxh3_128:00112233445566778899aabbccddeeff"


def _xattrs_work(root: Path) -> bool:
    probe = root / f".probe-{uuid.uuid4().hex}"
    probe.write_bytes(b"x")
    try:
        os.setxattr(probe, "user.ember.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


@pytest.fixture
def host_root() -> Iterator[Path]:
    if not Path("/dev/shm").is_dir():
        pytest.skip("needs a tmpfs at /dev/shm")
    path = Path("/dev/shm") / f"ember-records-test-{uuid.uuid4().hex}"
    path.mkdir()
    if not _xattrs_work(path):
        shutil.rmtree(path)
        pytest.skip("this tmpfs keeps no user xattrs (Linux before 6.6): every load hashes")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_record_holds_for_that_file_at_that_size_and_checksum(host_root: Path) -> None:
    path = host_root / "chunk"
    path.write_bytes(b"a" * 4096)
    assert checked_copy(path, SUM) is None  # nothing recorded yet
    identity = FileIdentity.of(os.stat(path))
    record_check(path, identity, SUM)
    assert checked_copy(path, SUM) == identity
    assert checked_copy(path, SUM.replace("00", "ff")) is None  # other bytes expected

    os.truncate(path, 2048)  # the same inode, another size
    assert checked_copy(path, SUM) is None

    replacement = host_root / "chunk.tmp"
    replacement.write_bytes(b"a" * 4096)
    os.replace(replacement, path)  # a new inode at the path: no record on it
    assert checked_copy(path, SUM) is None
    assert checked_copy(host_root / "absent", SUM) is None


def test_no_record_for_a_file_that_is_not_the_one_checked(host_root: Path) -> None:
    path = host_root / "chunk"
    path.write_bytes(b"a" * 4096)
    checked = FileIdentity.of(os.stat(path))
    replacement = host_root / "chunk.tmp"
    replacement.write_bytes(b"b" * 4096)
    os.replace(replacement, path)  # replaced between the hash and the record
    record_check(path, checked, SUM)
    assert checked_copy(path, SUM) is None


def _host_store(tmp_path: Path, host_root: Path) -> tuple[WeightsStore, HostTier]:
    gen = torch.Generator().manual_seed(1)
    tensors = {f"w{i}": torch.randn(MIB // 4, generator=gen) for i in range(4)}  # 4 MiB
    save_file(tensors, str(tmp_path / "m.safetensors"))
    bucket = LocalBucketTier(tmp_path / "bucket")
    WeightsStore([bucket]).import_safetensors_file(
        tmp_path / "m.safetensors", model_id="m", chunk_size_bytes=CHUNK
    )
    host = HostTier(host_root / "tier", budget_bytes=256 * MIB)
    store = WeightsStore([host, bucket])
    load(store, "m").wait_promoted()
    return store, host


def test_a_second_readahead_and_a_load_hash_nothing_the_first_one_checked(
    tmp_path: Path, host_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _ = _host_store(tmp_path, host_root)
    n = len(store.manifest("m").chunks)
    first = store.readahead("m")  # hashes every chunk, and records it on each file
    assert len(first.verified) == n and not first.corrupt

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a recorded chunk was read to be hashed again")

    monkeypatch.setattr(HostTier, "readahead", no_reading)
    second = store.readahead("m")
    assert len(second.verified) == n and not second.corrupt
    # A load with no readahead of its own (an in-process engine) trusts them too.
    plain = load(store, "m")
    assert plain.report.chunks_by_tier == {"host": n}
    assert plain.report.verified_ahead == n and plain.report.verify_s == 0.0


def test_a_corrupt_copy_renamed_over_a_checked_one_is_caught(
    tmp_path: Path, host_root: Path
) -> None:
    store, host = _host_store(tmp_path, host_root)
    chunks = store.manifest("m").chunks
    store.readahead("m")
    victim = host.object_path(chunks[2].hash)
    bad = bytearray(victim.read_bytes())
    bad[77] ^= 0x40
    stray = victim.with_name(".stray")
    stray.write_bytes(bad)
    os.replace(stray, victim)  # a new inode: the record stayed with the old one

    again = store.readahead("m")
    assert again.corrupt == [chunks[2].hash]
    loaded = load(store, "m", verified=again.verified)
    assert f"host:{chunks[2].hash}" in loaded.report.discarded
    # The chunk fetched again is promoted into the tier on a thread: done before the
    # fixture removes the tier, or it writes into a tree being removed and leaves it.
    loaded.wait_promoted()
