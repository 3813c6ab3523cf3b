"""Per-request sampling options, validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ember_core import InvalidRequestError

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick tokens for one request.

    ``temperature == 0`` is greedy. ``max_tokens=None`` generates until EOS, a stop
    string, or the context window is full. ``seed`` makes sampling reproducible
    whatever else shares the batch.

    Example::

        SamplingParams(temperature=0.7, top_p=0.9, max_tokens=64, stop=("\\n\\n",))
    """

    max_tokens: int | None = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False  # benchmarks use it to generate exactly max_tokens

    def __post_init__(self) -> None:
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool)
            or not isinstance(self.max_tokens, int)
            or self.max_tokens <= 0
        ):
            raise InvalidRequestError(
                f"max_tokens must be a positive integer, got {self.max_tokens!r}",
                param="max_tokens",
            )
        if not _is_number(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            raise InvalidRequestError(
                f"temperature must be a number in [0, 100], got {self.temperature!r}; "
                "use 0 for greedy decoding",
                param="temperature",
            )
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(
                f"top_p must be in (0, 1], got {self.top_p!r}; use 1 to disable nucleus sampling",
                param="top_p",
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError(
                f"top_k must be a non-negative integer, got {self.top_k!r}; use 0 to disable it",
                param="top_k",
            )
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise InvalidRequestError(f"seed must be an integer, got {self.seed!r}", param="seed")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if len(stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(
                f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stop)}",
                param="stop",
            )
        for s in stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
                raise InvalidRequestError(
                    f"each stop string must be a non-empty string of at most {MAX_STOP_CHARS} "
                    f"characters, got {s!r}",
                    param="stop",
                )
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
