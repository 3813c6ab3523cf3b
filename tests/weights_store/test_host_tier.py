"""Host tier: Tier contract, LRU under a budget, pins (and dead pinners), cross-process index,
and one physical copy in RAM for several processes mapping the same object."""

from __future__ import annotations

import array
import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember_core import CapacityError, InvalidRequestError
from ember_weights_store import host_tier
from ember_weights_store.host_tier import HostTier, HostTierFullError
from ember_weights_store.tiers import (
    ObjectNotFoundError,
    ObjectTooLargeError,
    Tier,
    TierUsage,
    key_to_path,
)

SHM = Path("/dev/shm")
pytestmark = pytest.mark.skipif(not SHM.is_dir(), reason="needs a tmpfs at /dev/shm")

KB = 1 << 10
MIB = 1 << 20

# The package's __init__ imports torch (~2 s); a worker that only maps the host tier does not
# need it, so the child registers a bare package and imports just the host tier's modules.
CHILD = """
import sys, types
pkg = types.ModuleType("ember_weights_store")
pkg.__path__ = [PKG_DIR]
sys.modules["ember_weights_store"] = pkg
from pathlib import Path
from ember_weights_store.host_tier import HostTier

root, budget, action, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
tier = HostTier(Path(root), budget_bytes=budget)
if action == "put":
    tier.put(key, bytes.fromhex(sys.argv[5]))
    u = tier.usage()
    print(u.num_objects, u.size_bytes, flush=True)
elif action == "pin":
    tier.pin([key], owner="child")
    print("pinned", flush=True)
    if sys.argv[5] == "wait":
        sys.stdin.readline()
elif action == "map":
    view = tier.open_view(key)
    touched = bytes(view[::4096])  # one byte from every page: all of them resident
    print("ready", len(touched), flush=True)
    sys.stdin.readline()
""".replace("PKG_DIR", repr(str(Path(host_tier.__file__).parent)))


def run_child(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def root() -> Iterator[Path]:
    path = SHM / f"ember-host-test-{uuid.uuid4().hex}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_tier_contract(root: Path) -> None:
    tier = HostTier(root, budget_bytes=1 * MIB)
    assert isinstance(tier, Tier)
    key = "sha256:" + "ab" * 32
    assert not tier.has(key)
    with pytest.raises(ObjectNotFoundError):
        tier.get(key)
    with pytest.raises(ObjectNotFoundError):
        tier.open_view(key)
    tier.put(key, b"hello world")
    assert (root / key_to_path(key)).read_bytes() == b"hello world"
    assert tier.has(key)
    assert tier.get(key) == b"hello world"
    assert tier.get_range(key, 6, 5) == b"world"
    assert bytes(tier.open_view(key)) == b"hello world"
    with pytest.raises(InvalidRequestError):
        tier.get_range(key, 6, 6)  # past the end
    tier.put("manifests/org--m/rev.json", b"{}")
    tier.put(key, b"hi")  # overwrite counts the new size only
    assert tier.usage() == TierUsage(num_objects=2, size_bytes=4, budget_bytes=1 * MIB)
    tier.put("empty", b"")
    assert bytes(tier.open_view("empty")) == b""
    assert tier.delete(key)
    assert not tier.delete(key)
    assert not tier.has(key)
    with pytest.raises(InvalidRequestError):
        tier.put("../escape", b"x")
    with pytest.raises(ObjectTooLargeError):
        tier.put("big", b"x" * (MIB + 1))
    assert not tier.has("big")
    # Lock, pins and temp files are never objects.
    assert sorted(tier.keys()) == ["empty", "manifests/org--m/rev.json"]
    assert not [p for p in root.rglob(".tmp-*")]
    with pytest.raises(InvalidRequestError):
        HostTier(root, budget_bytes=0)


def test_put_in_pieces_writes_them_in_order_and_counts_every_byte(root: Path) -> None:
    tier = HostTier(root, budget_bytes=KB)
    words = memoryview(array.array("I", [1, 2, 3]))  # items of 4 bytes: 12 bytes, not 3
    tier.put("joined", [b"ab", bytearray(b"cd"), words, memoryview(b"")])
    assert tier.get("joined") == b"abcd" + words.tobytes()
    assert tier.usage().size_bytes == 4 + 12
    with pytest.raises(ObjectTooLargeError):
        tier.put("big", [b"x" * (KB // 2), b"y" * (KB // 2 + 1)])
    assert not tier.has("big") and not [p for p in root.rglob(".tmp-*")]


def test_lru_eviction_keeps_budget(root: Path) -> None:
    tier = HostTier(root, budget_bytes=3 * KB)
    for name in "abc":
        tier.put(name, b"x" * KB)
    assert tier.get("a")  # a is now the most recently used
    tier.put("d", b"x" * KB)
    assert not tier.has("b")
    assert all(tier.has(k) for k in "acd")
    tier.put("e", b"x" * (2 * KB))  # needs two slots: c, then a (d was written after a's use)
    assert tier.keys() == ["d", "e"]
    assert tier.usage().size_bytes == 3 * KB


def test_pinned_objects_survive_pressure(root: Path) -> None:
    tier = HostTier(root, budget_bytes=3 * KB)
    tier.put("a", b"x" * KB)
    tier.pin(["a"], owner="worker-1")
    for i in range(10):
        tier.put(f"k{i}", b"y" * KB)
        assert tier.has("a")
    assert tier.usage().size_bytes <= 3 * KB
    assert tier.pinned_keys() == {"a"}
    assert tier.unpin("worker-1")
    assert not tier.unpin("worker-1")
    tier.has("k9")
    tier.put("z", b"z" * (2 * KB))
    assert not tier.has("a")


def test_put_that_cannot_fit_past_pins_stores_nothing(root: Path) -> None:
    tier = HostTier(root, budget_bytes=3 * KB)
    for name in "abc":
        tier.put(name, b"x" * KB)
    with tier.pinned(["a", "b"], owner="w"):
        tier.put("d", b"d" * KB)  # c is unpinned and goes
        assert not tier.has("c")
        tier.pin(["d"], owner="w")
        with pytest.raises(HostTierFullError) as err:
            tier.put("e", b"e" * KB)
        assert isinstance(err.value, CapacityError)
        assert "pinned" in str(err.value)
        assert not tier.has("e")
        assert all(tier.has(k) for k in "abd")  # a failed put evicts nothing
        assert not list(root.rglob(".tmp-*"))
    assert tier.pinned_keys() == set()
    tier.put("e", b"e" * KB)


def test_put_if_absent_keeps_the_first_write(root: Path) -> None:
    tier = HostTier(root, budget_bytes=4 * KB)
    assert tier.put_if_absent("a", b"1" * KB)
    assert not tier.put_if_absent("a", [memoryview(b"2" * KB)])
    assert tier.get("a") == b"1" * KB and tier.usage().num_objects == 1
    assert not list(root.rglob(".tmp-*"))


def test_release_unpinned_gives_back_all_but_what_live_processes_pin(root: Path) -> None:
    tier = HostTier(root, budget_bytes=8 * KB)
    for name in "abc":
        tier.put(name, b"x" * KB)
    tier.pin(["a"], owner="worker-1")
    (root / ".pins" / "dead.json").write_text(  # a dead process's pin protects nothing
        json.dumps({"pid": os.getpid(), "start": 1, "keys": ["b"]})
    )
    assert tier.release_unpinned() == 2 * KB
    assert tier.keys() == ["a"]
    tier.unpin("worker-1")
    assert tier.release_unpinned() == KB
    assert tier.usage().num_objects == 0 and tier.release_unpinned() == 0


def test_release_abandoned_gives_back_everything_only_when_no_live_process_pins(
    root: Path,
) -> None:
    tier = HostTier(root, budget_bytes=8 * KB)
    for name in "ab":
        tier.put(name, b"x" * KB)
    tier.pin(["a"], owner="worker-1")
    assert tier.release_abandoned() == 0 and sorted(tier.keys()) == ["a", "b"]
    (root / ".pins" / "dead.json").write_text(  # a dead process uses nothing
        json.dumps({"pid": os.getpid(), "start": 1, "keys": ["b"]})
    )
    tier.unpin("worker-1")
    assert tier.release_abandoned() == 2 * KB and tier.keys() == []


def test_release_leaves_no_empty_folders_and_the_tier_fills_again(root: Path) -> None:
    tier = HostTier(root, budget_bytes=8 * KB)
    chunk = "sha256:" + "ab" * 32
    tier.put(chunk, b"x" * KB)
    tier.put("packed/model/layer-0", b"y" * KB)
    tier.pin(["packed/model/layer-0"], owner="worker-1")
    assert tier.release_unpinned() == KB
    assert not (root / key_to_path(chunk)).parent.exists()  # its fan-out folders went
    assert (root / "packed" / "model").is_dir()  # a pinned object's folder stays
    tier.unpin("worker-1")
    assert tier.release_unpinned() == KB
    # Only the index's own dot-entries are left; the next pool fills the tier as before.
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == []
    tier.put(chunk, b"z" * KB)
    assert tier.get(chunk) == b"z" * KB


def test_a_writer_whose_folder_is_pruned_under_it_makes_it_again(root: Path) -> None:
    tier = HostTier(root, budget_bytes=8 * KB)
    folder = root / "packed" / "model"
    folder.mkdir(parents=True)
    real_open = os.open
    pruned = []

    def pruned_first(path: object, *args: object, **kwargs: object) -> int:
        if str(path).startswith(str(folder)) and not pruned:
            folder.rmdir()  # as a release in another process would, between mkdir and open
            pruned.append(path)
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "open", pruned_first)
        tier.put("packed/model/layer-0", b"y" * KB)
    assert pruned and tier.get("packed/model/layer-0") == b"y" * KB


def test_pin_owner_rules(root: Path) -> None:
    tier = HostTier(root, budget_bytes=KB)
    with pytest.raises(InvalidRequestError):
        tier.pin(["a"], owner="../x")
    tier.pin(["a"], owner="w")
    tier.pin(["b"], owner="w")  # adds to the owner's pins
    assert tier.pinned_keys() == {"a", "b"}
    # A pin whose pid was reused by another process (different start time) is dead.
    (root / ".pins" / "stale.json").write_text(
        json.dumps({"pid": os.getpid(), "start": 1, "keys": ["c"]})
    )
    assert tier.pinned_keys() == {"a", "b"}
    assert not (root / ".pins" / "stale.json").exists()


@pytest.mark.parametrize("death", ["exit", "kill"])
def test_pins_of_dead_process_stop_protecting(root: Path, death: str) -> None:
    budget = 3 * KB
    tier = HostTier(root, budget_bytes=budget)
    tier.put("a", b"a" * KB)
    proc = run_child(root, budget, "pin", "a", "wait" if death == "kill" else "exit")
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "pinned"
    if death == "kill":
        for i in range(4):  # the live child's pin holds
            tier.put(f"k{i}", b"k" * KB)
        assert tier.has("a")
        assert tier.pinned_keys() == {"a"}
        proc.kill()  # SIGKILL: no chance to unpin
    assert proc.wait(timeout=10) in (0, -9)
    proc.stdout.close()
    assert proc.stdin is not None
    proc.stdin.close()
    assert tier.pinned_keys() == set()
    assert not (root / ".pins" / "child.json").exists()
    for i in range(4):
        tier.put(f"n{i}", b"n" * KB)
    assert not tier.has("a")


def test_instances_and_processes_share_one_index(root: Path) -> None:
    one = HostTier(root, budget_bytes=4 * KB)
    two = HostTier(root, budget_bytes=4 * KB)
    one.put("a", b"a" * KB)
    assert two.get("a") == b"a" * KB
    proc = run_child(root, 4 * KB, "put", "b", (b"b" * KB).hex())
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert out.split() == ["2", str(2 * KB)]
    assert one.get("b") == two.get("b") == b"b" * KB
    assert one.usage() == two.usage() == TierUsage(2, 2 * KB, 4 * KB)
    # A pin made through one instance protects against eviction by the other.
    one.pin(["a"], owner="one")
    two.get("b")
    for i in range(6):
        two.put(f"k{i}", b"k" * KB)
    assert two.has("a")


def test_concurrent_puts_stay_within_budget(root: Path) -> None:
    budget = 8 * KB
    tiers = [HostTier(root, budget_bytes=budget) for _ in range(4)]
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(25):
                tiers[n].put(f"w{n}/o{i}", bytes([n]) * KB)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    usage = tiers[0].usage()
    assert usage.size_bytes <= budget
    assert usage.num_objects == 8
    assert not list(root.rglob(".tmp-*"))


def _mapping_kb(pid: int, path: Path) -> dict[str, int]:
    """Rss and Pss (kB) of the process's mapping of ``path``, from /proc/<pid>/smaps."""
    found: dict[str, int] = {}
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            inside = line.endswith(str(path))
        elif inside and head[0] in ("Rss:", "Pss:"):
            found[head[0][:-1]] = found.get(head[0][:-1], 0) + int(head[1])
    return found


def test_four_processes_mapping_one_object_hold_one_copy(root: Path) -> None:
    size = 64 * MIB
    tier = HostTier(root, budget_bytes=256 * MIB)
    key = "models/big/flat-bf16.bin"
    tier.put(key, b"\x5a" * size)
    path = root / key_to_path(key)
    procs = [run_child(root, 256 * MIB, "map", key) for _ in range(4)]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().split() == ["ready", str(size // 4096)]
        # All four hold the whole object mapped and resident right now.
        maps = [_mapping_kb(proc.pid, path) for proc in procs]
        size_kb = size // KB
        for m in maps:
            assert m["Rss"] >= 0.95 * size_kb, maps
            # Proportional share: each page is shared by four mappers, so ~1/4 each.
            assert m["Pss"] <= 0.3 * size_kb, maps
        assert 0.9 * size_kb <= sum(m["Pss"] for m in maps) <= 1.1 * size_kb, maps
        # Nor did any worker copy the bytes elsewhere: its whole-process share stays well
        # under one copy (interpreter + a quarter of the object).
        for proc in procs:
            rollup = Path(f"/proc/{proc.pid}/smaps_rollup").read_text().split()
            assert int(rollup[rollup.index("Pss:") + 1]) < 0.6 * size_kb
        # And the tmpfs holds the bytes once: the file's blocks are one copy.
        assert path.stat().st_blocks * 512 <= 1.05 * size
        assert tier.usage().size_bytes == size
    finally:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in procs:
            assert proc.wait(timeout=20) == 0
            assert proc.stdout is not None
            proc.stdout.close()
