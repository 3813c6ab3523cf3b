"""Loading from the host tier maps its chunk files in place: same tensors, chunks pinned while
in use, a corrupt copy falls back to the copying path, and four worker processes loading the
same model hold one copy of it in RAM. The disk tier's chunk files are mapped the same way
when no nearer tier holds them all. A load that did not come from the host tier fills it
and maps that copy, so the first process of a machine does not hold the model alone."""

from __future__ import annotations

import gc
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ember_weights_store import DiskTier, HostTier, LocalBucketTier
from ember_weights_store.digests import fast_checksum
from ember_weights_store.loader import load
from ember_weights_store.mapping import drop_file_pages, map_chunk_files, populate_file_pages
from ember_weights_store.store import WeightsStore

SHM = Path("/dev/shm")
pytestmark = pytest.mark.skipif(not SHM.is_dir(), reason="needs a tmpfs at /dev/shm")
MIB = 1 << 20
CHUNK = 1 * MIB


@pytest.fixture
def host_root() -> Iterator[Path]:
    path = SHM / f"ember-zero-copy-test-{uuid.uuid4().hex}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_checkpoint(path: Path, *, mib: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n = mib * MIB // 2 // 4  # four bf16 tensors
    tensors = {f"w{i}": torch.randn(n, generator=gen).to(torch.bfloat16) for i in range(4)}
    tensors["odd"] = torch.randn(33, generator=gen)  # a second dtype, not page-sized
    save_file(tensors, str(path))
    return tensors


def _flip_bit(path: Path, *, at: int) -> None:
    """Corrupts a cached chunk in place, as a bad disk or a stray write would."""
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def stores(tmp_path: Path, host_root: Path) -> tuple[WeightsStore, HostTier, WeightsStore]:
    bucket = LocalBucketTier(tmp_path / "bucket")
    host = HostTier(host_root, budget_bytes=256 * MIB)
    return WeightsStore([host, bucket]), host, WeightsStore([bucket])


def test_host_load_maps_chunks_in_place_and_pins_them_while_alive(
    tmp_path: Path, host_root: Path
) -> None:
    original = make_checkpoint(tmp_path / "m.safetensors", mib=8)
    store, host, origin = stores(tmp_path, host_root)
    origin.import_safetensors_file(tmp_path / "m.safetensors", model_id="m", chunk_size_bytes=CHUNK)
    first = load(store, "m")
    n = len(first.manifest.chunks)
    assert n == 9  # 8 MiB of bf16 in 1 MiB chunks, and the float32 buffer
    # Decoded from the bucket, written into the host tier, and mapped there.
    assert first.report.chunks_by_tier == {"bucket": n} and first.report.mapped
    assert first.report.promoted_bytes == sum(c.raw_size for c in first.manifest.chunks)
    assert _mapped_from(host_root) >= n and first.report.fill_s > 0
    for name, t in original.items():
        assert torch.equal(first.tensors[name], t), name
    first.wait_promoted()
    del first
    gc.collect()
    mapped = load(store, "m")
    assert mapped.report.mapped and mapped.report.chunks_by_tier == {"host": n}
    for name, t in original.items():
        assert torch.equal(mapped.tensors[name], t), name
    keys = {c.hash for c in mapped.manifest.chunks}
    assert keys <= host.pinned_keys()  # in use: never evicted
    # Copy-on-write: a write changes this process's tensor, never the shared chunk.
    mapped.tensors["w0"][0] = 1234.0
    chunk = mapped.manifest.chunks[0]
    assert fast_checksum(host.get(chunk.hash)) == chunk.checksum
    del mapped
    gc.collect()
    assert not keys & host.pinned_keys()


def test_corrupt_host_chunk_is_discarded_and_the_load_copies_instead(
    tmp_path: Path, host_root: Path
) -> None:
    original = make_checkpoint(tmp_path / "m.safetensors", mib=4)
    store, host, origin = stores(tmp_path, host_root)
    origin.import_safetensors_file(tmp_path / "m.safetensors", model_id="m", chunk_size_bytes=CHUNK)
    load(store, "m").wait_promoted()
    victim = origin.manifest("m").chunks[2].hash
    _flip_bit(host.object_path(victim), at=100)
    loaded = load(store, "m")
    assert f"host:{victim}" in loaded.report.discarded
    assert loaded.report.chunks_by_tier == {"host": 4, "bucket": 1}  # the bad one refetched
    for name, t in original.items():
        assert torch.equal(loaded.tensors[name], t), name
    # And the host tier holds a good copy again, which this load maps.
    (bad,) = [c for c in loaded.manifest.chunks if c.hash == victim]
    assert fast_checksum(host.get(victim)) == bad.checksum and loaded.report.mapped


def _disk_tier_holding(tmp_path: Path) -> tuple[dict[str, torch.Tensor], DiskTier, LocalBucketTier]:
    original = make_checkpoint(tmp_path / "m.safetensors", mib=4)
    bucket = LocalBucketTier(tmp_path / "bucket")
    disk = DiskTier(tmp_path / "disk", budget_bytes=256 * MIB)
    bucket_store = WeightsStore([bucket])
    bucket_store.import_safetensors_file(
        tmp_path / "m.safetensors", model_id="m", chunk_size_bytes=CHUNK
    )
    load(WeightsStore([disk, bucket]), "m").wait_promoted()  # the disk tier holds it now
    return original, disk, bucket


def _mapped_from(root: Path) -> int:
    """Mappings of this process's whose file lies under ``root``."""
    return sum(str(root) in line for line in Path("/proc/self/maps").read_text().splitlines())


def test_disk_load_maps_the_disk_tiers_files(tmp_path: Path) -> None:
    original, disk, bucket = _disk_tier_holding(tmp_path)

    from_disk = load(WeightsStore([disk, bucket]), "m")

    n = len(from_disk.manifest.chunks)
    assert from_disk.report.mapped and from_disk.report.chunks_by_tier == {"disk": n}
    assert _mapped_from(tmp_path / "disk") >= n
    for name, t in original.items():
        assert torch.equal(from_disk.tensors[name], t), name
    # Evicting a chunk from the disk tier unlinks its file; the mapping keeps its pages.
    disk.delete(from_disk.manifest.chunks[0].hash)
    assert torch.equal(from_disk.tensors["w0"], original["w0"])


def test_checking_a_mapped_load_leaves_its_pages_to_the_file_until_they_are_read(
    tmp_path: Path,
) -> None:
    """Hashing every chunk through the mapping faults every page in; they are handed
    back, so the process holds only what it reads (a few rows of an embedding, say)."""
    original, disk, bucket = _disk_tier_holding(tmp_path)

    loaded = load(WeightsStore([disk, bucket]), "m")

    assert loaded.report.mapped and loaded.report.verified_ahead == 0  # all hashed here
    rss_kb, _ = _pss_kb_under(os.getpid(), tmp_path / "disk")
    assert rss_kb <= 64, rss_kb  # at most the pages chunk edges share with a neighbour
    assert torch.equal(loaded.tensors["w1"], original["w1"])
    rss_kb, _ = _pss_kb_under(os.getpid(), tmp_path / "disk")
    w1_kb = original["w1"].numel() * 2 // 1024
    assert w1_kb <= rss_kb <= w1_kb + 64 + 256, (rss_kb, w1_kb)  # + fault-around


def test_with_a_host_tier_a_disk_load_fills_it_and_maps_the_host_copy(
    tmp_path: Path, host_root: Path
) -> None:
    """Mapping the disk tier's files would leave this process alone on their pages while
    every later one maps the host tier's copy: the model twice in RAM."""
    original, disk, bucket = _disk_tier_holding(tmp_path)
    host = HostTier(host_root, budget_bytes=256 * MIB)
    store = WeightsStore([host, disk, bucket])

    from_disk = load(store, "m")

    n = len(from_disk.manifest.chunks)
    total = sum(c.raw_size for c in from_disk.manifest.chunks)
    report = from_disk.report
    assert report.mapped and report.chunks_by_tier == {"disk": n}  # where they came from
    assert report.promoted_bytes == total and report.fill_s > 0
    assert from_disk.wait_promoted() == 0  # nothing left to write
    assert _mapped_from(host_root) >= n and _mapped_from(tmp_path / "disk") == 0
    assert {c.hash for c in from_disk.manifest.chunks} <= host.pinned_keys()
    for name, t in original.items():
        assert torch.equal(from_disk.tensors[name], t), name
    again = load(store, "m")
    assert again.report.mapped and again.report.chunks_by_tier == {"host": n}
    assert again.report.fill_s == 0


def test_with_a_host_tier_for_derived_copies_only_a_bucket_load_fills_the_disk_tier(
    tmp_path: Path, host_root: Path
) -> None:
    """Where host RAM holds only what workers derive, processes share the model through
    the disk tier's page cache: the first load from the bucket writes the disk tier and
    maps it, rather than keeping a private copy while every later process maps the files."""
    original = make_checkpoint(tmp_path / "m.safetensors", mib=4)
    bucket = LocalBucketTier(tmp_path / "bucket")
    WeightsStore([bucket]).import_safetensors_file(
        tmp_path / "m.safetensors", model_id="m", chunk_size_bytes=CHUNK
    )
    disk = DiskTier(tmp_path / "disk", budget_bytes=256 * MIB)
    host = HostTier(host_root, budget_bytes=256 * MIB)
    store = WeightsStore([disk, bucket], derived_tier=host)

    first = load(store, "m")

    n = len(first.manifest.chunks)
    report = first.report
    assert report.mapped and report.chunks_by_tier == {"bucket": n} and report.fill_s > 0
    assert report.promoted_bytes == sum(c.raw_size for c in first.manifest.chunks)
    assert first.wait_promoted() == 0
    assert _mapped_from(tmp_path / "disk") >= n and _mapped_from(host_root) == 0
    assert host.keys() == []  # no chunk in host RAM
    for name, t in original.items():
        assert torch.equal(first.tensors[name], t), name
    again = load(store, "m")
    assert again.report.mapped and again.report.chunks_by_tier == {"disk": n}
    assert again.report.fill_s == 0


def test_a_host_copy_the_fill_did_not_write_is_checked_before_it_is_mapped(
    tmp_path: Path, host_root: Path
) -> None:
    original, disk, bucket = _disk_tier_holding(tmp_path)
    host = HostTier(host_root, budget_bytes=256 * MIB)
    victim = WeightsStore([bucket]).manifest("m").chunks[1]
    # Left by an earlier fill cut short, and corrupt since: the only chunk in the tier.
    host.put(victim.hash, bytes(victim.raw_size))  # the right size, the wrong bytes

    loaded = load(WeightsStore([host, disk, bucket]), "m")

    assert f"host:{victim.hash}" in loaded.report.discarded
    assert _mapped_from(tmp_path / "disk") >= 1  # the disk tier's mapping stands
    for name, t in original.items():
        assert torch.equal(loaded.tensors[name], t), name


def test_a_host_tier_too_small_for_the_model_leaves_the_disk_mapping(
    tmp_path: Path, host_root: Path
) -> None:
    original, disk, bucket = _disk_tier_holding(tmp_path)
    host = HostTier(host_root, budget_bytes=2 * MIB)  # the model is 4 MiB
    loaded = load(WeightsStore([host, disk, bucket]), "m")
    assert loaded.report.mapped and _mapped_from(tmp_path / "disk") >= 1
    for name, t in original.items():
        assert torch.equal(loaded.tensors[name], t), name


def test_corrupt_disk_chunk_is_discarded_and_the_load_copies_instead(tmp_path: Path) -> None:
    original = make_checkpoint(tmp_path / "m.safetensors", mib=4)
    bucket = LocalBucketTier(tmp_path / "bucket")
    disk = DiskTier(tmp_path / "disk", budget_bytes=256 * MIB)
    store = WeightsStore([disk, bucket])
    store.import_safetensors_file(tmp_path / "m.safetensors", model_id="m", chunk_size_bytes=CHUNK)
    load(store, "m").wait_promoted()
    victim = store.manifest("m").chunks[1].hash
    _flip_bit(disk.object_path(victim), at=7)

    loaded = load(store, "m")

    assert not loaded.report.mapped
    assert f"disk:{victim}" in loaded.report.discarded
    for name, t in original.items():
        assert torch.equal(loaded.tensors[name], t), name


def test_mapping_refuses_gaps_and_misaligned_chunks(tmp_path: Path) -> None:
    f = tmp_path / "a"
    f.write_bytes(b"x" * 8192)
    with pytest.raises(Exception, match="page-aligned"):
        map_chunk_files([(f, 100, 8192)], 8292)
    with pytest.raises(Exception, match="cover"):
        map_chunk_files([(f, 0, 8192)], 9000)


def test_dropping_a_mappings_pages_keeps_its_bytes_and_only_whole_pages_go(
    tmp_path: Path,
) -> None:
    page = mmap.PAGESIZE
    data = bytes(range(256)) * (4 * page // 256)  # four pages, no two alike
    f = tmp_path / "chunk"
    f.write_bytes(data)
    buf = map_chunk_files([(f, 0, len(data))], len(data))
    # From 100 bytes into the first page to 100 bytes into the fourth: the whole pages
    # inside are the second and third.
    assert drop_file_pages(buf.data_ptr() + 100, 3 * page) == 2 * page
    assert drop_file_pages(buf.data_ptr() + 100, page - 200) == 0  # no whole page inside
    assert bytes(buf.numpy()) == data  # read again: the file's bytes, faulted back in


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def test_populating_a_mapping_maps_the_files_pages_without_copying_them() -> None:
    size = 64 << 20
    data = bytes(range(256)) * (size // 256)
    with tempfile.NamedTemporaryFile(dir="/dev/shm") as f:  # tmpfs, as the host tier
        f.write(data)
        f.flush()
        buf = map_chunk_files([(Path(f.name), 0, size)], size)
        shared, anon = _rss_kib("RssShmem"), _rss_kib("RssAnon")
        assert populate_file_pages(buf.data_ptr(), size)
        # All of it is now this process's, as the tmpfs file's own pages: none copied.
        assert _rss_kib("RssShmem") - shared >= (size >> 10) * 0.95
        assert _rss_kib("RssAnon") - anon < 4 << 10
        assert bytes(buf[:4096].numpy()) == data[:4096]
        assert bytes(buf[-4096:].numpy()) == data[-4096:]


WORKER = """
import sys
from pathlib import Path
from ember_weights_store import DiskTier, HostTier, LocalBucketTier
from ember_weights_store.loader import load
from ember_weights_store.store import WeightsStore
host = HostTier(Path(sys.argv[1]), budget_bytes=1 << 30)
loaded = load(WeightsStore([host, LocalBucketTier(Path(sys.argv[2]))]), "m")
total = sum(float(t.float().sum()) for t in loaded.tensors.values())  # use every weight
print("ready", loaded.report.mapped, flush=True)
sys.stdin.readline()
"""


def _pss_kb_under(pid: int, root: Path) -> tuple[int, int]:
    """(Rss, Pss) in kB of the process's mappings of files under ``root``."""
    rss = pss = 0
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and not head[0].endswith(":"):
            inside = len(head) >= 6 and head[5].startswith(str(root))
        elif inside and head[0] == "Rss:":
            rss += int(head[1])
        elif inside and head[0] == "Pss:":
            pss += int(head[1])
    return rss, pss


@pytest.mark.slow
def test_four_workers_loading_one_model_hold_one_copy_in_ram(
    tmp_path: Path, host_root: Path
) -> None:
    make_checkpoint(tmp_path / "m.safetensors", mib=32)
    store, host, origin = stores(tmp_path, host_root)
    origin.import_safetensors_file(tmp_path / "m.safetensors", model_id="m", chunk_size_bytes=CHUNK)
    load(store, "m").wait_promoted()
    size_kb = host.usage().size_bytes // 1024
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(host_root), str(tmp_path / "bucket")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().split() == ["ready", "True"]
        shares = [_pss_kb_under(p.pid, host_root) for p in procs]
        for rss, pss in shares:
            assert rss >= 0.95 * size_kb, shares  # each has the whole model resident...
            assert pss <= 0.3 * size_kb, shares  # ...but only a quarter of it is its own
        assert sum(pss for _, pss in shares) <= 1.1 * size_kb, shares
    finally:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in procs:
            assert proc.wait(timeout=60) == 0
            assert proc.stdout is not None
            proc.stdout.close()
