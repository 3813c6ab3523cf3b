"""A pool's members: a sweep kills hung serving workers, takes out ended ones and stamps
idle ones; the policy's view and the status rows list starting workers too. (The real
processes behind this: the health check in test_worker_failures.py, scaling in
test_manager.py.)"""

from __future__ import annotations

from typing import Any, cast

from ember_functions.rpc import Warmth, WorkerState
from ember_functions.worker_process import WorkerProcess
from ember_warmpool.pool_members import PoolMembers


class Handle:
    """What a sweep, a view and a row read of a ``WorkerProcess``, settable."""

    def __init__(self, worker_id: str, state: WorkerState, *, in_flight: int = 0) -> None:
        self.worker_id = worker_id
        self.state = state
        self.warmth = Warmth.READY
        self.queue_depth = in_flight
        self.silent_s = 0.0
        self.failure: str | None = None

    @property
    def alive(self) -> bool:
        return self.state in (WorkerState.READY, WorkerState.BUSY) and self.warmth is Warmth.READY

    def kill(self, reason: str | None = None) -> None:
        self.failure, self.state = reason, WorkerState.FAILED

    def describe(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "state": self.state.value, "idle_s": None}


def members_of(*handles: Handle) -> PoolMembers:
    members = PoolMembers("tiny")
    for handle in handles:
        members.running[handle.worker_id] = cast(WorkerProcess, handle)
    return members


def test_a_sweep_kills_the_hung_takes_out_the_ended_and_stamps_the_idle() -> None:
    hung = Handle("hung", WorkerState.BUSY, in_flight=1)
    hung.silent_s = 31.0
    loading = Handle("loading", WorkerState.LOADING)
    loading.silent_s = 31.0  # loading workers have their own deadline (load_silence_s)
    crashed = Handle("crashed", WorkerState.FAILED)
    busy = Handle("busy", WorkerState.BUSY, in_flight=2)
    idle = Handle("idle", WorkerState.READY)
    members = members_of(hung, loading, crashed, busy, idle)
    members.idle_since["busy"] = 1.0  # idle before, busy now

    ended = members.sweep(10.0, health_timeout_s=30.0)

    assert sorted(w.worker_id for w in ended) == ["crashed", "hung"]
    assert hung.failure is not None and "health check" in hung.failure
    assert sorted(members.running) == ["busy", "idle", "loading"]
    assert members.idle_since["idle"] == 10.0 and "busy" not in members.idle_since
    members.sweep(12.0, health_timeout_s=30.0)
    assert members.idle_since["idle"] == 10.0  # idle since the first sweep that saw it


def test_the_view_and_the_rows_list_starting_workers_too() -> None:
    members = members_of(Handle("w1", WorkerState.READY))
    members.starting["w2"] = Warmth.HOST
    members.sweep(5.0, health_timeout_s=30.0)

    members.load_failed(4.0, "corrupt")
    view = members.view(queued=3)
    assert [(w.worker_id, w.state, w.idle_since_s) for w in view.workers] == [
        ("w1", WorkerState.READY, 5.0),
        ("w2", WorkerState.STARTING, None),
    ]
    assert view.workers[1].warmth is Warmth.HOST
    assert (view.queued, view.load_failures, view.last_failure_reason) == (3, 1, "corrupt")

    rows = members.rows(7.5)
    assert [(r["worker_id"], r["state"], r["idle_s"]) for r in rows] == [
        ("w1", "READY", 2.5),
        ("w2", "STARTING", None),
    ]


def test_load_failures_count_until_a_worker_loads() -> None:
    members = members_of()
    members.load_failed(1.0, "corrupt")
    members.load_failed(2.0, "still corrupt")
    assert members.load_failures == 2 and members.last_failure == (2.0, "still corrupt")
    view = members.view(queued=0)
    assert (view.load_failures, view.last_failure_s) == (2, 2.0)
    members.loaded()
    assert members.load_failures == 0 and members.view(queued=0).load_failures == 0
    assert members.last_failure == (2.0, "still corrupt")  # still the last reason known


def test_a_worker_being_placed_on_is_held_until_every_placement_lets_go() -> None:
    members = members_of(Handle("w1", WorkerState.READY))
    assert not members.held("w1")
    members.hold("w1")
    members.hold("w1")
    members.let_go("w1")
    assert members.held("w1")  # one placement still in progress
    members.let_go("w1")
    assert not members.held("w1")


def test_only_ready_workers_serve_and_a_promoted_one_once_its_promotion_is_recorded() -> None:
    parked, loading, promoted = (Handle(wid, WorkerState.READY) for wid in ("p", "l", "x"))
    parked.warmth = Warmth.HOST
    loading.state = WorkerState.LOADING
    members = members_of(Handle("w1", WorkerState.BUSY, in_flight=1), parked, loading, promoted)
    members.promoting.add("x")  # READY by its own account; the pool has not recorded it
    assert [w.worker_id for w in members.serving()] == ["w1"]
    members.promoting.discard("x")
    assert [w.worker_id for w in members.serving()] == ["w1", "x"]
