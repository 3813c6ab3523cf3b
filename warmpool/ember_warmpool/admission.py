"""Admission to one model's pool: requests counted as they arrive and while they wait for
a worker, and refused (429, with a Retry-After) once the queue for workers is full.

The counts are the policy's inputs: arrivals since the last tick feed the forecaster,
the queue length is part of the ``PoolView``. They share the pool's condition, so a
request that starts waiting wakes the tick thread at once.

Example::

    admission = Admission("smollm2-135m", cond=threading.Condition(), max_queue=64,
                          retry_after_s=2.0, clock=time.monotonic)
    arrived_s = admission.admit()     # raises RateLimitError when 64 already wait
    with admission.waiting():
        ...                           # look for a worker until one can take it
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ember_core import RateLimitError

__all__ = ["Admission"]


class Admission:
    """Arrivals and waiting requests of one model's pool, under the pool's ``cond``."""

    def __init__(
        self,
        model: str,
        *,
        cond: threading.Condition,
        max_queue: int,
        retry_after_s: float,
        clock: Callable[[], float],
    ) -> None:
        self.model = model
        self.max_queue = max_queue
        self._cond = cond
        self._retry_after_s = max(1.0, retry_after_s)
        self._clock = clock
        self._queued = 0
        self._arrivals = 0  # since the last tick, for the forecaster

    def admit(self) -> float:
        """Counts a request's arrival and returns its time (``clock``), or refuses it now
        (``RateLimitError``, 429) when the queue for workers is full."""
        with self._cond:
            self._arrivals += 1
            if self._queued >= self.max_queue:
                raise RateLimitError(
                    f"{self.max_queue} requests already wait for a {self.model} worker; "
                    "retry shortly",
                    retry_after_s=self._retry_after_s,
                )
            return self._clock()

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Counts the caller as queued for a worker while inside, and wakes the policy."""
        with self._cond:
            self._queued += 1
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._queued -= 1

    @property
    def queued(self) -> int:
        """Requests waiting for a worker now."""
        return self._queued

    def take_arrivals(self) -> int:  # under the lock
        """Arrivals since the last call (the tick's, for the forecaster)."""
        arrivals, self._arrivals = self._arrivals, 0
        return arrivals
