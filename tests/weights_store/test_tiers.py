"""Tier contract (local bucket and disk cache), key safety, LRU, restart and kill -9."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest

import ember_weights_store.disk_tier as disk_tier_module
from ember_core import InvalidRequestError, ModelFormatError, NotFoundError
from ember_weights_store.bucket_tier import LocalBucketTier
from ember_weights_store.disk_tier import DiskTier
from ember_weights_store.tiers import (
    ObjectNotFoundError,
    ObjectTooLargeError,
    ReadsInto,
    Tier,
    key_to_path,
    path_to_key,
    validate_key,
)

MakeTier = Callable[[Path], Tier]

TIER_KINDS: dict[str, MakeTier] = {
    "bucket": lambda root: LocalBucketTier(root),
    "disk": lambda root: DiskTier(root, budget_bytes=1 << 20),
}


def content_key(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


@pytest.fixture(params=sorted(TIER_KINDS))
def tier(request: pytest.FixtureRequest, tmp_path: Path) -> Tier:
    return TIER_KINDS[request.param](tmp_path / "root")


def test_put_get_has_range_delete_usage(tier: Tier) -> None:
    assert isinstance(tier, Tier)
    data = bytes(range(256)) * 40
    key = content_key(data)
    manifest_key = "manifests/org--name/main.json"
    assert not tier.has(key)
    tier.put(key, data)
    tier.put(manifest_key, b'{"v": 1}')
    assert tier.has(key) and tier.has(manifest_key)
    assert tier.get(key) == data
    assert tier.get_range(key, 0, 10) == data[:10]
    assert tier.get_range(key, 1000, 2000) == data[1000:3000]
    assert tier.get_range(key, len(data), 0) == b""
    assert tier.usage().num_objects == 2
    assert tier.usage().size_bytes == len(data) + 8
    tier.put(manifest_key, b"{}")  # overwrite replaces, not adds
    assert tier.get(manifest_key) == b"{}"
    assert tier.usage().size_bytes == len(data) + 2
    assert tier.delete(key) is True
    assert tier.delete(key) is False
    assert not tier.has(key)
    assert tier.usage().num_objects == 1


def test_read_into_fills_the_callers_buffer(tier: Tier) -> None:
    # Both tiers read straight into a buffer: the disk tier as a cache tier, the bucket so
    # the loader fetches a stored chunk into scratch that is not the C heap's.
    assert isinstance(tier, ReadsInto)
    data = os.urandom(5000)
    key = content_key(data)
    tier.put(key, data)
    out = bytearray(len(data))
    tier.read_into(key, memoryview(out))
    assert bytes(out) == data
    with pytest.raises(ModelFormatError, match="truncated or stale"):
        tier.read_into(key, memoryview(bytearray(10)))
    with pytest.raises(ObjectNotFoundError):
        tier.read_into(content_key(b"absent"), memoryview(bytearray(1)))


def test_missing_key_names_key_and_tier(tier: Tier) -> None:
    key = "sha256:" + "ab" * 32
    for call in (lambda: tier.get(key), lambda: tier.get_range(key, 0, 1)):
        with pytest.raises(ObjectNotFoundError) as info:
            call()
        assert isinstance(info.value, NotFoundError)
        assert key in str(info.value) and tier.name in str(info.value)


def test_ranges_past_end_or_negative_are_refused(tier: Tier) -> None:
    tier.put("objects/x", b"0123456789")
    for start, length in ((5, 6), (11, 0), (-1, 2), (0, -1)):
        with pytest.raises(InvalidRequestError, match="objects/x"):
            tier.get_range("objects/x", start, length)


BAD_KEYS = ["../x", "/abs", "a\\b", "a/../b", "", "a//b", "a/", ".hidden", "a/.tmp-1-x", "x\x00y"]
BAD_KEYS += ["sp ace", "chunks/sha256/ab/abcd", "sha256:XYZ", "sha256:" + "AB" * 32, "a:b"]


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_bad_keys_are_rejected_and_nothing_is_written(tmp_path: Path, bad: str) -> None:
    (tmp_path / "sibling").write_bytes(b"keep")
    before = files_under(tmp_path)
    tiers = [make(tmp_path / "root") for make in TIER_KINDS.values()]
    calls: list[Callable[[], object]] = []
    for t in tiers:
        calls += [partial(t.put, bad, b"evil"), partial(t.get, bad), partial(t.has, bad)]
        calls += [partial(t.get_range, bad, 0, 1), partial(t.delete, bad)]
    for call in calls:
        with pytest.raises(InvalidRequestError):
            call()
    assert files_under(tmp_path) == before | {"root"}
    assert (tmp_path / "sibling").read_bytes() == b"keep"


def test_key_paths_are_one_to_one() -> None:
    digest = "ab" + "cd" * 31
    assert key_to_path(f"sha256:{digest}") == f"chunks/sha256/ab/{digest}"
    assert path_to_key(f"chunks/sha256/ab/{digest}") == f"sha256:{digest}"
    assert path_to_key(f"chunks/sha256/zz/{digest}") is None
    assert key_to_path("manifests/org--m/rev.json") == "manifests/org--m/rev.json"
    assert path_to_key("manifests/org--m/rev.json") == "manifests/org--m/rev.json"
    assert validate_key("a/b-c_d.e") == "a/b-c_d.e"


def test_key_that_runs_through_an_object_is_refused(tier: Tier) -> None:
    tier.put("a", b"1")
    with pytest.raises(InvalidRequestError, match="prefix"):
        tier.put("a/b", b"2")
    tier.put("d/e", b"3")
    with pytest.raises(InvalidRequestError, match="prefix"):
        tier.put("d", b"4")
    assert tier.get("a") == b"1" and tier.get("d/e") == b"3"


# --- DiskTier: budget, LRU, restart -------------------------------------------------------


def test_lru_evicts_least_recently_used(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, budget_bytes=300)
    for name in "abc":
        disk.put(name, name.encode() * 100)
    disk.get("a")  # a becomes most recent; b is now the oldest
    disk.put("d", b"d" * 100)
    assert disk.keys() == ["c", "a", "d"]
    assert not (tmp_path / "b").exists()
    disk.get_range("c", 0, 1)
    disk.has("a")
    disk.put("e", b"e" * 100)
    assert disk.keys() == ["c", "a", "e"]  # d was oldest after c and a were touched
    assert disk.usage().size_bytes == 300


def test_usage_never_exceeds_budget(tmp_path: Path) -> None:
    rng = random.Random(7)
    disk = DiskTier(tmp_path, budget_bytes=10_000)
    for i in range(200):
        disk.put(f"o/{i}", b"x" * rng.randrange(0, 4000))
        usage = disk.usage()
        assert usage.budget_bytes == 10_000 and usage.size_bytes <= 10_000
    on_disk = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert on_disk == disk.usage().size_bytes


def test_concurrent_puts_stay_within_budget(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, budget_bytes=50_000, fsync=False)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for i in range(100):
            disk.put(f"t{seed}/{i % 30}", bytes([seed]) * rng.randrange(1, 9000))
            assert disk.usage().size_bytes <= 50_000
            disk.has(f"t{seed}/{rng.randrange(30)}")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    files = {p.relative_to(tmp_path).as_posix(): p for p in tmp_path.rglob("*") if p.is_file()}
    assert set(files) == set(disk.keys())
    assert sum(p.stat().st_size for p in files.values()) == disk.usage().size_bytes <= 50_000


def test_object_removed_behind_the_tiers_back_is_forgotten(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, budget_bytes=100)
    disk.put("gone", b"g" * 40)
    (tmp_path / "gone").unlink()
    with pytest.raises(ObjectNotFoundError, match="gone"):
        disk.get("gone")
    assert not disk.has("gone") and disk.usage().size_bytes == 0


def test_oversize_object_is_refused_and_not_stored(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, budget_bytes=100)
    disk.put("small", b"s" * 50)
    with pytest.raises(ObjectTooLargeError, match="budget"):
        disk.put("big", b"b" * 101)
    assert not disk.has("big") and disk.has("small")
    assert files_under(tmp_path) == {"small"}


def test_restart_rebuilds_index_from_file_times(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, budget_bytes=300)
    for name in "abc":
        disk.put(name, name.encode() * 100)
    for name, t in (("b", 1_000), ("c", 2_000), ("a", 3_000)):
        os.utime(tmp_path / name, (t, t))
    again = DiskTier(tmp_path, budget_bytes=300)
    assert again.usage() == disk.usage()
    assert again.keys() == ["b", "c", "a"]
    again.put("d", b"d" * 100)
    assert sorted(again.keys()) == ["a", "c", "d"]
    smaller = DiskTier(tmp_path, budget_bytes=150)  # a shrunken budget evicts at start
    assert smaller.keys() == ["d"] and smaller.usage().size_bytes == 100


def test_restart_removes_dead_writers_temp_files_only(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, budget_bytes=1000)
    disk.put("sha256:" + "12" * 32, b"ok")
    chunk_dir = tmp_path / "chunks" / "sha256" / "12"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    stale = chunk_dir / f".tmp-{dead.stdout.strip()}-deadbeef"
    live = chunk_dir / f".tmp-{os.getpid()}-cafef00d"
    stale.write_bytes(b"half a chu")
    live.write_bytes(b"in flight")
    again = DiskTier(tmp_path, budget_bytes=1000)
    assert not stale.exists() and live.exists()
    assert again.usage().num_objects == 1 and again.usage().size_bytes == 2


# --- kill -9 during writes (real processes) -----------------------------------------------

# The child loads disk_tier.py by path: importing the package would pull in torch (~2 s a trial).
CHILD = """
import hashlib, importlib.util, os, random, sys, time
spec = importlib.util.spec_from_file_location("tiers_under_test", sys.argv[1])
tiers = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = tiers
spec.loader.exec_module(tiers)
disk = tiers.DiskTier(sys.argv[2], budget_bytes=int(sys.argv[3]))
seed, mode = int(sys.argv[4]), sys.argv[5]
def payload(i):
    return random.Random(seed * 100_000 + i).randbytes(random.Random(i).randrange(1, 3 << 20))
for i in range(3):
    data = payload(i)
    disk.put("sha256:" + hashlib.sha256(data).hexdigest(), data)
if mode == "torn":
    real_write = os.write
    def half_write(fd, view):  # write half a chunk, then hang until killed
        real_write(fd, view[: len(view) // 2])
        print("torn", flush=True)
        time.sleep(60)
    os.write = half_write
print("ready", flush=True)
i = 3
while True:
    data = payload(i)
    disk.put("sha256:" + hashlib.sha256(data).hexdigest(), data)
    i += 1
"""


def run_child_and_kill(root: Path, *, budget: int, seed: int, mode: str, delay: float) -> None:
    args = [str(Path(disk_tier_module.__file__)), str(root), str(budget), str(seed), mode]
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        if mode == "torn":
            assert proc.stdout.readline().strip() == "torn"
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL


def assert_every_object_verifies(root: Path, budget: int) -> DiskTier:
    disk = DiskTier(root, budget_bytes=budget)
    keys = disk.keys()
    assert keys, "the child stored nothing before it was killed"
    for key in keys:
        assert disk.has(key)
        assert content_key(disk.get(key)) == key, f"{key} reads back wrong after kill -9"
    assert not [p for p in root.rglob(".tmp-*")], "a dead writer's temp file survived restart"
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert on_disk == {key_to_path(k) for k in keys}
    assert disk.usage().size_bytes <= budget
    return disk


def test_kill_9_mid_write_leaves_only_verifiable_objects(tmp_path: Path) -> None:
    rng = random.Random(1234)
    budget = 12 << 20  # small enough that the child also evicts while it writes
    for trial in range(3):
        run_child_and_kill(
            tmp_path, budget=budget, seed=trial, mode="loop", delay=rng.uniform(0.0, 0.4)
        )
        assert_every_object_verifies(tmp_path, budget)


def test_kill_9_with_a_torn_temp_file(tmp_path: Path) -> None:
    budget = 64 << 20
    run_child_and_kill(tmp_path, budget=budget, seed=99, mode="torn", delay=0.0)
    torn = list(tmp_path.rglob(".tmp-*"))
    assert len(torn) == 1  # the half-written chunk really is on disk before restart
    disk = assert_every_object_verifies(tmp_path, budget)
    assert disk.usage().num_objects == 3


def test_disk_put_if_absent_keeps_a_file_another_process_wrote(tmp_path: Path) -> None:
    """Replacing it would orphan the copy that process mapped; the tier indexes it."""
    ours = DiskTier(tmp_path / "disk", budget_bytes=1 << 20)
    theirs = DiskTier(tmp_path / "disk", budget_bytes=1 << 20)  # another process's view
    assert theirs.put_if_absent("k", b"first")
    before = ours.object_path("k").stat().st_ino
    assert not ours.put_if_absent("k", b"second")
    assert ours.get("k") == b"first" and ours.object_path("k").stat().st_ino == before
    assert ours.usage().size_bytes == 5
    assert ours.put_if_absent("other", b"x") and ours.get("other") == b"x"
