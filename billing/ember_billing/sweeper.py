"""Releases reservations nobody settled: a gateway that crashed mid-request must not
hold a tenant's budget forever. Expired holds go back to the budgets; the reservation
stays settleable, so usage reported late is still billed (see ``sweep_expired``)."""

from __future__ import annotations

import logging
import threading

from ember_billing.service import BillingService

log = logging.getLogger(__name__)


class Sweeper:
    """Runs ``BillingService.sweep_expired`` every ``interval_s`` on a daemon thread.
    Safe with many sweepers (one per gateway replica): each claims rows with
    ``FOR UPDATE SKIP LOCKED`` and expires a row only while it is still open."""

    def __init__(self, service: BillingService, *, interval_s: float = 30.0, batch: int = 1000):
        if not interval_s > 0:
            raise ValueError(f"interval_s must be positive, got {interval_s!r}")
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch!r}")
        self.service = service
        self.interval_s = interval_s
        self.batch = batch
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> int:
        """Sweeps until no expired reservation is left; how many were released."""
        total = 0
        while True:
            n = self.service.sweep_expired(limit=self.batch)
            total += n
            if n < self.batch:
                return total

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                n = self.run_once()
                if n:
                    log.info("released %d expired reservations", n)
            except Exception:  # a database hiccup must not kill the sweeper for good
                log.exception("sweeping expired reservations failed; retrying next round")

    def start(self) -> Sweeper:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="ember-sweeper", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
