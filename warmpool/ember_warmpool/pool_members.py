"""The workers of one pool, by id: those running, those starting, since when each is idle,
which are being placed on, and how starting them has gone lately.

``ModelPool`` keeps its workers here and reads them two ways: as a ``PoolView`` for the
policy, and as status rows for operators (``ember pool status``, ``/workers``). Each tick
``sweep``s them first: a serving worker silent past the health timeout is killed (hung),
workers that ended are taken out, and idle ones are stamped with when they went idle.
A worker a request is being placed on (``hold``) is neither stopped nor demoted until
the request is sent (``let_go``). Requests go only to ``serving`` workers: READY ones,
less those being promoted until the pool has recorded them READY (a promoted worker
turns READY on its own reader thread first).

Not thread-safe on its own: ``ModelPool`` calls it under its lock.
"""

from __future__ import annotations

import logging
from typing import Any

from ember_functions.rpc import WorkerState
from ember_functions.worker_process import WorkerProcess
from ember_warmpool.view import PoolView, Warmth, WorkerView

__all__ = ["PoolMembers"]

log = logging.getLogger(__name__)


class PoolMembers:
    """One pool's workers. ``name`` (the model) labels its log lines."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.running: dict[str, WorkerProcess] = {}  # started: loading, serving or parked
        self.starting: dict[str, Warmth] = {}  # worker id -> the warmth it starts to
        self.idle_since: dict[str, float] = {}  # worker id -> clock seconds
        self._placing: dict[str, int] = {}  # worker id -> requests chosen, not yet sent
        self.promoting: set[str] = set()  # parked workers being brought to READY
        self.load_failures = 0  # consecutive; a worker reaching READY resets it
        self.last_failure: tuple[float, str] | None = None  # (clock seconds, reason)

    def serving(self) -> list[WorkerProcess]:
        """The workers a request may be placed on now."""
        return [w for wid, w in self.running.items() if w.alive and wid not in self.promoting]

    def hold(self, wid: str) -> None:
        """A request is being placed on ``wid``: keep it serving until :meth:`let_go`."""
        self._placing[wid] = self._placing.get(wid, 0) + 1

    def let_go(self, wid: str) -> None:
        left = self._placing.pop(wid) - 1
        if left:
            self._placing[wid] = left

    def held(self, wid: str) -> bool:
        return bool(self._placing.get(wid))

    def load_failed(self, now: float, reason: str) -> None:
        self.load_failures += 1
        self.last_failure = (now, reason)

    def loaded(self) -> None:
        """A worker reached READY: the model loads, whatever failed before."""
        self.load_failures = 0

    def sweep(self, now: float, *, health_timeout_s: float) -> list[WorkerProcess]:
        """Kills serving workers silent for over ``health_timeout_s``, takes out the
        workers that ended (those too) and returns them, and stamps idle ones."""
        ended = []
        for wid, worker in list(self.running.items()):
            serving = worker.state in (WorkerState.READY, WorkerState.BUSY)
            if serving and worker.silent_s > health_timeout_s:
                # Hung (a deadlock, a stopped process): its requests fail retryably now
                # rather than wait forever, and the policy replaces it.
                log.error(
                    "pool %s: worker %s silent for %.0f s; killing it",
                    self.name,
                    wid,
                    worker.silent_s,
                )
                worker.kill(
                    f"the worker did not respond for {worker.silent_s:.0f} s and was "
                    "killed (health check)"
                )
            if worker.state.ended:
                ended.append(self.running.pop(wid))
            elif worker.queue_depth == 0:
                self.idle_since.setdefault(wid, now)
            else:
                self.idle_since.pop(wid, None)
        return ended

    def view(self, *, queued: int) -> PoolView:
        """The pool as the policy sees it, with ``queued`` requests waiting for a worker."""
        last_failure = self.last_failure
        workers = [
            WorkerView(
                worker_id=wid,
                state=w.state,
                warmth=w.warmth,
                in_flight=w.queue_depth,
                idle_since_s=self.idle_since.get(wid),
            )
            for wid, w in self.running.items()
        ]
        workers += [
            WorkerView(worker_id=wid, state=WorkerState.STARTING, warmth=warmth)
            for wid, warmth in self.starting.items()
        ]
        return PoolView(
            workers=tuple(workers),
            queued=queued,
            load_failures=self.load_failures,
            last_failure_s=last_failure[0] if last_failure else None,
            last_failure_reason=last_failure[1] if last_failure else None,
        )

    def rows(self, now: float) -> list[dict[str, Any]]:
        """One status row per worker (``WorkerProcess.describe``), with its idle seconds;
        a starting worker has no process to describe yet, so its row is mostly empty."""
        rows = []
        for wid, worker in self.running.items():
            row = worker.describe()
            idle_since = self.idle_since.get(wid)
            row["idle_s"] = None if idle_since is None else round(now - idle_since, 1)
            rows.append(row)
        rows += [
            {
                "worker_id": wid,
                "pid": None,
                "state": WorkerState.STARTING.value,
                "warmth": warmth.name,
                "in_flight": 0,
                "pack_s": None,
                "pack_stopped": None,
                "idle_s": None,
                "cold_start": {},
                "chunks_by_tier": {},
            }
            for wid, warmth in self.starting.items()
        ]
        return rows
