"""Host-tier leases: one holder at a time; a lease its holder stopped renewing can be
taken; one held until released cannot; a dead holder's is free at once, in another
process too."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ember_core import InvalidRequestError
from ember_weights_store.host_lease import HostLease, forget_dead_leases
from ember_weights_store.host_tier import HostTier


def lease(root: Path, holder: str, *, stale_s: float = 60.0) -> HostLease:
    return HostLease(root, "pack-model-bfloat16", holder=holder, stale_s=stale_s)


def age(root: Path, seconds: float) -> None:
    """Makes the lease look last renewed ``seconds`` ago."""
    path = root / ".leases" / "pack-model-bfloat16.json"
    then = path.stat().st_mtime - seconds
    os.utime(path, (then, then))


def test_one_holder_at_a_time_and_the_holder_renews(tmp_path: Path) -> None:
    a, b = lease(tmp_path, "a"), lease(tmp_path, "b")
    assert not a.held_elsewhere() and a.acquire()
    assert b.held_elsewhere() and not b.acquire()
    assert not a.held_elsewhere() and a.acquire()  # renewing
    assert not b.release() and b.held_elsewhere()  # only the holder releases
    assert a.release() and not a.release()
    assert not b.held_elsewhere() and b.acquire() and a.held_elsewhere()


def test_a_lease_not_renewed_for_stale_s_can_be_taken(tmp_path: Path) -> None:
    a, b = lease(tmp_path, "a", stale_s=3.0), lease(tmp_path, "b", stale_s=3.0)
    assert a.acquire()
    age(tmp_path, 2.0)
    assert not b.acquire()
    age(tmp_path, 2.0)  # 4 s without a renewal: its holder stopped
    assert not b.held_elsewhere() and b.acquire()
    assert a.held_elsewhere() and not a.acquire()  # the old holder lost it


def test_the_holders_stale_s_counts_not_the_waiters(tmp_path: Path) -> None:
    """A holder whose next piece takes long says so as it renews: others wait that long."""
    a, b = lease(tmp_path, "a", stale_s=3.0), lease(tmp_path, "b", stale_s=3.0)
    assert a.acquire(stale_s=30.0)
    age(tmp_path, 10.0)
    assert b.held_elsewhere() and not b.acquire()
    assert a.renew(stale_s=1.0)  # a short piece next
    age(tmp_path, 2.0)
    assert b.acquire()
    with pytest.raises(InvalidRequestError, match="stale_s"):
        a.acquire(stale_s=-1.0)


def test_renew_never_takes_a_lease(tmp_path: Path) -> None:
    a, b = lease(tmp_path, "a", stale_s=0.0), lease(tmp_path, "b")
    assert not a.renew()  # free: renewing is not taking
    assert a.acquire() and b.acquire()  # a's went stale at once: b took it
    assert not a.renew() and a.held_elsewhere()
    assert b.release() and not a.renew() and not a.held_elsewhere()


def test_a_lease_held_until_released_never_goes_stale(tmp_path: Path) -> None:
    a, b = lease(tmp_path, "a", stale_s=0.0), lease(tmp_path, "b", stale_s=0.0)
    assert a.acquire(until_released=True)
    age(tmp_path, 3600.0)
    assert b.held_elsewhere() and not b.acquire()
    assert a.release()
    assert b.acquire()


def _hold_in_child(root: Path, *, then: str) -> subprocess.Popen[str]:
    code = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from ember_weights_store.host_lease import HostLease
        lease = HostLease(Path({str(root)!r}), "pack-model-bfloat16", holder="w", stale_s=60)
        assert lease.acquire()
        print("held", flush=True)
        {then}
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdout.readline() == "held\n"
    return child


def test_another_processs_lease_holds_while_it_lives_and_frees_when_it_dies(
    tmp_path: Path,
) -> None:
    child = _hold_in_child(tmp_path, then="sys.stdin.read()")
    mine = lease(tmp_path, "w")  # the same holder name, but another process
    try:
        assert mine.held_elsewhere() and not mine.acquire()
    finally:
        child.kill()
        child.wait()
    assert not mine.held_elsewhere() and mine.acquire()  # killed: nobody will release it


def test_bad_names_and_staleness_are_refused_with_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="derive it from the object key"):
        HostLease(tmp_path, "packed/with/slashes", holder="a", stale_s=1.0)
    with pytest.raises(InvalidRequestError, match="stale_s"):
        HostLease(tmp_path, "ok", holder="a", stale_s=-1.0)


def test_giving_the_tier_back_forgets_the_leases_of_dead_holders(tmp_path: Path) -> None:
    """A packer killed while it stored never releases its lease: free already, but its
    file stays in /dev/shm until the tier is given back."""
    tier = HostTier(tmp_path, budget_bytes=1 << 20)
    child = _hold_in_child(tmp_path, then="")  # takes the lease and exits holding it
    child.wait()
    mine = HostLease(tmp_path, "pack-mine", holder="a", stale_s=60.0)
    assert mine.acquire()
    assert tier.release_unpinned() == 0
    assert sorted(p.name for p in (tmp_path / ".leases").glob("*.json")) == ["pack-mine.json"]
    assert HostLease(tmp_path, "pack-mine", holder="b", stale_s=60.0).held_elsewhere()
    assert forget_dead_leases(tmp_path) == 0  # a live holder's lease stays
