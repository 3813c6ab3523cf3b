"""Stop strings: cut a streamed text at the first stop, never leaking part of one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ember_core import InvalidRequestError


class StopStringMatcher:
    """Cuts a text stream at the first stop string, never emitting any part of one.

    Text that could still become a stop string is held back until the next delta settles
    it. The stop string itself is not emitted (OpenAI semantics). When several stops
    match, the one that ends first in the text wins (ties: the one that starts first), so
    the result does not depend on how the text was split into deltas.
    """

    MAX_STOPS = 16
    MAX_STOP_CHARS = 256

    def __init__(self, stops: Sequence[str] | str) -> None:
        # OpenAI's "stop" may be a single string; a str is also a Sequence[str] of letters.
        items: Sequence[Any] = [stops] if isinstance(stops, str) else stops
        if not isinstance(items, Sequence):
            raise InvalidRequestError(
                f"stop must be a string or a list of strings, got {type(stops).__name__}",
                param="stop",
            )
        if len(items) > self.MAX_STOPS:
            raise InvalidRequestError(
                f"stop has {len(items)} strings; send at most {self.MAX_STOPS}", param="stop"
            )
        for i, stop in enumerate(items):
            if not isinstance(stop, str) or not stop:
                raise InvalidRequestError(
                    f"stop[{i}] must be a non-empty string, got {stop!r}", param="stop"
                )
            if len(stop) > self.MAX_STOP_CHARS:
                raise InvalidRequestError(
                    f"stop[{i}] is {len(stop)} characters long; the limit is {self.MAX_STOP_CHARS}",
                    param="stop",
                )
        self._stops: tuple[str, ...] = tuple(dict.fromkeys(items))
        self._first_chars = frozenset(stop[0] for stop in self._stops)
        self._longest = max((len(stop) for stop in self._stops), default=0)
        self._held = ""
        self._matched: str | None = None

    @property
    def stopped(self) -> bool:
        return self._matched is not None

    @property
    def matched(self) -> str | None:
        """The stop string that ended the stream, if one did."""
        return self._matched

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add a text delta; return (text safe to show now, whether a stop string matched)."""
        if self._matched is not None:
            return "", True
        if not self._stops:
            return delta, False
        text = self._held + delta
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            start = text.find(stop)
            if start >= 0:
                candidate = (start + len(stop), start, stop)
                if best is None or candidate < best:
                    best = candidate
        if best is not None:
            _, start, self._matched = best
            self._held = ""
            return text[:start], True
        # Hold back from the earliest position where the rest of the text could still grow
        # into a stop string; nothing before it can ever be part of one.
        cut = len(text)
        for pos in range(max(0, len(text) - self._longest + 1), len(text)):
            if text[pos] in self._first_chars:
                tail = text[pos:]
                if any(stop.startswith(tail) for stop in self._stops):
                    cut = pos
                    break
        self._held = text[cut:]
        return text[:cut], False

    def flush(self) -> str:
        """Release held-back text at the natural end of the stream (no stop matched)."""
        held, self._held = self._held, ""
        return "" if self._matched is not None else held
