"""What the process manager tells the pool policy: its workers and its queue, at one moment.

A snapshot, immutable and cheap to build: the manager makes one per decision, so the
policy never sees a pool change under it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ember_functions.rpc import Warmth, WorkerState

__all__ = ["PoolView", "Warmth", "WorkerView"]


@dataclass(frozen=True, kw_only=True)
class WorkerView:
    """One worker as the manager sees it now.

    Example::

        WorkerView(worker_id="w3", state=WorkerState.READY, idle_since_s=41.5)
    """

    worker_id: str
    state: WorkerState
    warmth: Warmth = Warmth.READY
    in_flight: int = 0  # requests it runs now
    idle_since_s: float | None = None  # monotonic seconds; None while it runs requests

    def __post_init__(self) -> None:
        if self.in_flight < 0:
            raise ValueError(
                f"worker {self.worker_id}: in_flight must be >= 0, got {self.in_flight}"
            )
        if self.idle_since_s is not None and not math.isfinite(self.idle_since_s):
            raise ValueError(f"worker {self.worker_id}: idle_since_s must be finite")


@dataclass(frozen=True, kw_only=True)
class PoolView:
    """A model's pool at one moment: its workers, its queue and its recent load failures.

    ``load_failures`` counts consecutive failures to load the model; the manager resets
    it to 0 when a worker reaches READY (or an operator resets the pool).

    Example::

        PoolView(workers=(WorkerView(worker_id="w1", state=WorkerState.BUSY, in_flight=1),),
                 queued=3)
    """

    workers: tuple[WorkerView, ...] = ()
    queued: int = 0  # requests waiting for a worker
    load_failures: int = 0
    last_failure_s: float | None = None
    last_failure_reason: str | None = None

    def __post_init__(self) -> None:
        if self.queued < 0 or self.load_failures < 0:
            raise ValueError("queued and load_failures must be >= 0")
        ids = [w.worker_id for w in self.workers]
        if len(set(ids)) != len(ids):
            raise ValueError(f"worker ids must be unique in a pool view, got {sorted(ids)}")
