"""Per-key request rate limit and a short-lived authentication cache: plain Python, no I/O.

Tokens-per-minute limits and spend caps live in the ledger (``ember_billing`` checks them
atomically at reserve time, across gateway replicas). Requests per minute is a guard against
floods of cheap requests, checked before anything else, so it lives here in memory: per
gateway process, a sliding window of the last minute's request times per key.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from ember_core.errors import RateLimitError

__all__ = ["AuthCache", "RequestRateLimiter"]


class RequestRateLimiter:
    def __init__(self, per_minute: int | None, *, clock: Callable[[], float] = time.monotonic):
        self.per_minute = per_minute
        self._clock = clock
        self._seen: dict[str, deque[float]] = {}

    def check(self, key_id: str) -> None:
        """Counts one request for ``key_id`` or raises RateLimitError with when to retry."""
        if self.per_minute is None:
            return
        now = self._clock()
        window = self._seen.setdefault(key_id, deque())
        while window and window[0] <= now - 60.0:
            window.popleft()
        if len(window) >= self.per_minute:
            retry = 60.0 - (now - window[0])
            raise RateLimitError(
                f"this API key sent {len(window)} requests in the last minute, its limit is "
                f"{self.per_minute}; retry in {retry:.0f} s or ask for a higher limit",
                retry_after_s=retry,
            )
        window.append(now)


class AuthCache:
    """Remembers ``api key -> (tenant, key id)`` for ``ttl_s``: checking a key's salted hash
    in the ledger on every request would cost more than the rest of the gateway. A revoked
    key keeps working for at most ``ttl_s``."""

    def __init__(self, ttl_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[str, tuple[float, tuple[str, str]]] = {}

    def get(self, api_key: str) -> tuple[str, str] | None:
        hit = self._entries.get(api_key)
        if hit is None or hit[0] < self._clock():
            self._entries.pop(api_key, None)
            return None
        return hit[1]

    def put(self, api_key: str, who: tuple[str, str]) -> None:
        if self.ttl_s > 0:
            if len(self._entries) > 100_000:  # bound it: stale keys are dropped wholesale
                self._entries.clear()
            self._entries[api_key] = (self._clock() + self.ttl_s, who)
