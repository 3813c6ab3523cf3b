"""What a pool has spent and served: worker-seconds, starts, requests, cold requests.

Every worker process counts from the moment its start begins until it is gone, whatever
it is doing meanwhile: that is what a GPU container is billed for. A request counts as
cold when the worker it was placed on became READY after the request arrived: it waited
on a cold start (or a promotion). ``/metrics`` and ``bench/trace.py`` read these.

Not thread-safe on its own: ``ModelPool`` calls it under its lock.
"""

from __future__ import annotations

__all__ = ["PoolAccounts"]


class PoolAccounts:
    """Example::

    accounts = PoolAccounts()
    accounts.born("w1", now_s=0.0)
    accounts.ready("w1", now_s=2.0)
    accounts.placed("w1", arrived_s=1.0)   # waited on w1's start: cold
    accounts.retire("w1", now_s=10.0)
    accounts.stats(now_s=10.0)  # {"worker_s": 10.0, "starts": 1.0, ...}
    """

    def __init__(self) -> None:
        self._born: dict[str, float] = {}  # worker id -> when its start began
        self._ready_at: dict[str, float] = {}  # worker id -> when it became READY
        self._worker_s_ended = 0.0  # lifetimes of workers gone
        self._starts = 0
        self._placed = 0  # requests placed on a worker (each once, retries not counted)
        self._placed_cold = 0  # ... of which on a worker that became READY after they arrived

    def born(self, worker_id: str, *, now_s: float) -> None:
        """A worker's start began."""
        self._born[worker_id] = now_s
        self._starts += 1

    def ready(self, worker_id: str, *, now_s: float) -> None:
        """It serves from now on (started to READY, or promoted)."""
        self._ready_at[worker_id] = now_s

    def parked(self, worker_id: str) -> None:
        """Demoted: it serves nothing until promoted again."""
        self._ready_at.pop(worker_id, None)

    def retire(self, worker_id: str, *, now_s: float) -> None:
        """Its process is leaving: its lifetime joins the total."""
        born = self._born.pop(worker_id, None)
        if born is not None:
            self._worker_s_ended += now_s - born
        self._ready_at.pop(worker_id, None)

    def live(self) -> list[str]:
        """Workers counted and not retired."""
        return list(self._born)

    def placed(self, worker_id: str, *, arrived_s: float) -> None:
        """A request, arrived at ``arrived_s``, was placed on ``worker_id``."""
        self._placed += 1
        if self._ready_at.get(worker_id, -float("inf")) > arrived_s:
            self._placed_cold += 1

    def stats(self, *, now_s: float) -> dict[str, float]:
        live_s = sum(now_s - born for born in self._born.values())
        return {
            "worker_s": self._worker_s_ended + live_s,
            "starts": float(self._starts),
            "requests": float(self._placed),
            "cold_requests": float(self._placed_cold),
        }
