"""Seeded synthetic arrival traces: sorted arrival times in seconds from 0.

Every generator is pure: the same arguments and ``seed`` give the same trace, on any
machine (``random.Random`` with an explicit seed is stable across Python versions).
Arrivals are a non-homogeneous Poisson process drawn by thinning: candidates at the
highest rate the trace reaches, each kept with probability rate(t) / highest.

Bursts and idle gaps are windows placed at random (their starts a Poisson process):
inside a burst the rate is multiplied by ``burst_factor``; inside an idle gap nothing
arrives. A gap wins over a burst.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

__all__ = ["bursty_arrivals", "daily_arrivals", "poisson_arrivals"]

Windows = list[tuple[float, float]]


def poisson_arrivals(*, rate_per_s: float, duration_s: float, seed: int) -> list[float]:
    """A homogeneous Poisson trace.

    Example::

        poisson_arrivals(rate_per_s=2.0, duration_s=60.0, seed=1)   # ~120 times in [0, 60)
    """
    _check_positive(duration_s=duration_s)
    _check_non_negative(rate_per_s=rate_per_s)
    return _thin(lambda t: rate_per_s, rate_per_s, duration_s, random.Random(seed))


def bursty_arrivals(
    *,
    rate_per_s: float,
    duration_s: float,
    seed: int,
    burst_every_s: float = 120.0,
    burst_s: float = 15.0,
    burst_factor: float = 4.0,
    gap_every_s: float = 300.0,
    gap_s: float = 60.0,
) -> list[float]:
    """Poisson at ``rate_per_s`` with random bursts and idle gaps.

    Example::

        bursty_arrivals(rate_per_s=1.0, duration_s=600.0, seed=7, burst_factor=5.0)
    """
    return daily_arrivals(
        peak_rate_per_s=rate_per_s,
        trough_rate_per_s=rate_per_s,
        day_s=duration_s,
        days=1.0,
        seed=seed,
        burst_every_s=burst_every_s,
        burst_s=burst_s,
        burst_factor=burst_factor,
        gap_every_s=gap_every_s,
        gap_s=gap_s,
    )


def daily_arrivals(
    *,
    peak_rate_per_s: float,
    trough_rate_per_s: float,
    day_s: float,
    days: float,
    seed: int,
    burst_every_s: float | None = None,
    burst_s: float = 15.0,
    burst_factor: float = 4.0,
    gap_every_s: float | None = None,
    gap_s: float = 60.0,
) -> list[float]:
    """A daily curve compressed into ``day_s`` seconds, optionally with bursts and gaps.

    The rate follows a raised cosine from ``trough_rate_per_s`` at the start of each day
    to ``peak_rate_per_s`` at its middle. ``None`` for ``burst_every_s`` or
    ``gap_every_s`` leaves bursts or gaps out.

    Example::

        daily_arrivals(peak_rate_per_s=4.0, trough_rate_per_s=0.1, day_s=600.0, days=2,
                       seed=3, burst_every_s=150.0, gap_every_s=400.0)
    """
    _check_positive(day_s=day_s, days=days, burst_s=burst_s, gap_s=gap_s)
    _check_non_negative(peak_rate_per_s=peak_rate_per_s, trough_rate_per_s=trough_rate_per_s)
    if burst_factor < 1:
        raise ValueError(f"burst_factor must be >= 1, got {burst_factor!r}")
    rng = random.Random(seed)
    duration_s = day_s * days
    bursts = _windows(rng, duration_s, burst_every_s, burst_s)
    gaps = _windows(rng, duration_s, gap_every_s, gap_s)
    swing = peak_rate_per_s - trough_rate_per_s

    def rate(t: float) -> float:
        if _inside(gaps, t):
            return 0.0
        base = trough_rate_per_s + swing * (1 - math.cos(2 * math.pi * t / day_s)) / 2
        return base * burst_factor if _inside(bursts, t) else base

    top = max(peak_rate_per_s, trough_rate_per_s) * (burst_factor if bursts else 1.0)
    return _thin(rate, top, duration_s, rng)


def _windows(
    rng: random.Random, duration_s: float, every_s: float | None, length_s: float
) -> Windows:
    if every_s is None:
        return []
    _check_positive(every_s=every_s)
    windows: Windows = []
    t = rng.expovariate(1 / every_s)
    while t < duration_s:
        windows.append((t, t + length_s))
        t += length_s + rng.expovariate(1 / every_s)
    return windows


def _inside(windows: Windows, t: float) -> bool:
    # Traces hold a handful of windows; a linear scan is clearer than bisecting.
    return any(start <= t < end for start, end in windows)


def _thin(
    rate: Callable[[float], float], top_per_s: float, duration_s: float, rng: random.Random
) -> list[float]:
    if top_per_s <= 0:
        return []
    times: list[float] = []
    t = rng.expovariate(top_per_s)
    while t < duration_s:
        if rng.random() * top_per_s < rate(t):
            times.append(t)
        t += rng.expovariate(top_per_s)
    return times


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _check_non_negative(**values: float) -> None:
    for name, value in values.items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
