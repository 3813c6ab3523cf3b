"""Arrival-rate forecasters: how many requests per second to expect a little ahead.

Both forecasters count arrivals into fixed buckets of ``bucket_s`` seconds and update on
each bucket that closes; a bucket with no observation closes as zero arrivals, so the
caller should call ``observe(now_s, 0)`` on its regular tick. ``rate`` never mutates and
never returns a negative number.

* :class:`HoltForecaster`: exponential smoothing of the rate with a damped trend
  (Holt's linear method, Gardner's damping). Reacts to a step within a few buckets.
* :class:`SeasonalForecaster`: the same, on top of a learned seasonal profile
  (additive Holt-Winters). The season is a day in production; tests compress it to
  minutes with ``season_s``. The profile is initialized from the first full season
  observed and then refined on every bucket, so replaying a day of traces trains it.
  Its forecast never falls below ``floor`` times what the season typically brings at
  that hour: a lull inside a busy hour is more often a pause than the end of the day's
  traffic, and scaling to zero in it makes every request of the resumption wait on a
  cold start. ``floor=0`` is plain Holt-Winters.

Time is any clock that does not go backwards; the pool manager feeds wall-clock seconds
(Unix time), so the seasonal profile is anchored to the time of day, and the bucket grid
to multiples of ``bucket_s``: a forecaster saved with :meth:`HoltForecaster.state` and
restored after a restart with :meth:`HoltForecaster.restore` resumes at the right hour.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

__all__ = ["Forecaster", "HoltForecaster", "SeasonalForecaster"]


class Forecaster(Protocol):
    def observe(self, now_s: float, arrivals: int) -> None:
        """Records ``arrivals`` counted since the previous call, up to ``now_s``."""

    def rate(self, now_s: float, horizon_s: float) -> float:
        """Expected arrivals per second at ``now_s + horizon_s``; never negative."""

    def state(self) -> dict[str, Any]:
        """What the forecaster learned, as JSON-ready values (see ``restore``)."""

    def restore(self, state: dict[str, Any], now_s: float) -> None:
        """Takes up ``state`` at ``now_s``; ValueError if it is another forecaster's."""


def _check_fraction(name: str, value: float, *, allow_zero: bool = False) -> None:
    low_ok = value >= 0 if allow_zero else value > 0
    if not (math.isfinite(value) and low_ok and value <= 1):
        bound = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be in {bound}, got {value!r}")


def _or_none(t_s: float) -> float | None:
    return None if math.isnan(t_s) else t_s


class HoltForecaster:
    """EWMA of the arrival rate with a damped trend.

    ``alpha`` smooths the level, ``beta`` the trend, ``phi`` damps the trend per bucket
    (1.0: no damping; below 1 a trend flattens out instead of running away).

    Example::

        f = HoltForecaster(bucket_s=5.0)
        for t in range(1, 61):
            f.observe(float(t), 3)        # three arrivals each second
        f.rate(60.0, 10.0)                # -> about 3.0
    """

    def __init__(
        self,
        *,
        alpha: float = 0.5,
        beta: float = 0.2,
        phi: float = 0.9,
        bucket_s: float = 5.0,
        start_s: float | None = None,  # None: the bucket-grid point before the first observe
    ) -> None:
        _check_fraction("alpha", alpha)
        _check_fraction("beta", beta, allow_zero=True)
        _check_fraction("phi", phi, allow_zero=True)
        if not (math.isfinite(bucket_s) and bucket_s > 0):
            raise ValueError(f"bucket_s must be a positive number of seconds, got {bucket_s!r}")
        self.alpha, self.beta, self.phi, self.bucket_s = alpha, beta, phi, bucket_s
        self.level: float | None = None  # arrivals per second; None until a bucket closes
        self.trend = 0.0  # change of the level per bucket
        self._bucket_start_s = start_s if start_s is not None else math.nan
        self._bucket_count = 0.0
        self._last_s = self._bucket_start_s

    # -- observing -------------------------------------------------------------------

    def observe(self, now_s: float, arrivals: int) -> None:
        if arrivals < 0:
            raise ValueError(f"arrivals must be >= 0, got {arrivals}")
        if math.isnan(self._last_s):
            self._anchor(self._grid_floor(now_s))
        if now_s < self._last_s:
            raise ValueError(f"time went backwards: {now_s} < {self._last_s}")
        span_s = now_s - self._last_s
        # Spread the count over the interval it was counted in, bucket by bucket.
        t = self._last_s
        while self._bucket_start_s + self.bucket_s <= now_s:
            end_s = self._bucket_start_s + self.bucket_s
            if span_s > 0:
                self._bucket_count += arrivals * (end_s - t) / span_s
            self._close_bucket(self._bucket_count / self.bucket_s)
            self._bucket_start_s, self._bucket_count, t = end_s, 0.0, end_s
        if span_s > 0:
            self._bucket_count += arrivals * (now_s - t) / span_s
        elif arrivals:
            self._bucket_count += arrivals
        self._last_s = now_s

    def _grid_floor(self, t_s: float) -> float:
        return math.floor(t_s / self.bucket_s) * self.bucket_s

    def _anchor(self, start_s: float) -> None:
        self._bucket_start_s = self._last_s = start_s

    def _close_bucket(self, rate_per_s: float) -> None:
        self._update(rate_per_s)

    def _update(self, x: float) -> None:
        if self.level is None:
            self.level = x
            return
        previous = self.level
        self.level = self.alpha * x + (1 - self.alpha) * (previous + self.phi * self.trend)
        self.trend = self.beta * (self.level - previous) + (1 - self.beta) * self.phi * self.trend

    # -- forecasting -----------------------------------------------------------------

    def _steps_ahead(self, now_s: float, horizon_s: float) -> float:
        # From the end of the last closed bucket, in buckets (fractional).
        return max(0.0, (now_s + horizon_s - self._bucket_start_s) / self.bucket_s)

    def _damped(self, h: float) -> float:
        """phi + phi^2 + ... + phi^h, continuous in h."""
        if self.phi >= 1.0:
            return h
        return self.phi * (1 - self.phi**h) / (1 - self.phi)

    def rate(self, now_s: float, horizon_s: float) -> float:
        if self.level is None:
            return 0.0
        h = self._steps_ahead(now_s, horizon_s)
        return max(0.0, self.level + self._damped(h) * self.trend)

    # -- persistence -----------------------------------------------------------------

    def _params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta, "phi": self.phi, "bucket_s": self.bucket_s}

    def _check_kind(self, state: dict[str, Any]) -> None:
        kind, params = state.get("kind"), state.get("params")
        if kind != type(self).__name__ or params != self._params():
            raise ValueError(
                f"saved forecast is a {kind} with {params}; this pool uses a "
                f"{type(self).__name__} with {self._params()}"
            )

    def state(self) -> dict[str, Any]:
        """Everything learned, JSON-ready, with the parameters it was learned under.

        Example::

            saved = f.state()                # before a restart
            g = HoltForecaster(bucket_s=5.0)
            g.restore(saved, now_s=time.time())
        """
        return {
            "kind": type(self).__name__,
            "params": self._params(),
            "level": self.level,
            "trend": self.trend,
            "bucket_start_s": _or_none(self._bucket_start_s),
            "bucket_count": self._bucket_count,
        }

    def restore(self, state: dict[str, Any], now_s: float) -> None:
        """Takes up a ``state()`` saved earlier, at ``now_s``.

        The time between the save and ``now_s`` was not observed (the process was down),
        which is not the same as no arrivals: it closes no bucket. If whole buckets were
        skipped, the trend is dropped (extrapolating it over an unseen gap is a guess) and
        counting resumes in the bucket holding ``now_s``. ValueError if the state is not
        this forecaster's kind or was learned under other parameters.
        """
        self._check_kind(state)
        # Read and convert everything before changing anything: a state that fails
        # half-way must leave this forecaster as it was (learning afresh).
        level = None if state["level"] is None else float(state["level"])
        trend = float(state["trend"])
        saved_start = state["bucket_start_s"]
        start_s = None if saved_start is None else float(saved_start)
        count = float(state["bucket_count"])
        self.level, self.trend = level, trend
        if start_s is None:  # saved before its first observation
            return
        if start_s <= now_s < start_s + self.bucket_s:
            self._bucket_start_s, self._bucket_count, self._last_s = start_s, count, now_s
            return
        self.trend = 0.0
        self._anchor(self._grid_floor(now_s))
        self._last_s = now_s
        self._bucket_count = 0.0


class SeasonalForecaster(HoltForecaster):
    """Holt's damped level and trend plus an additive seasonal profile.

    The season (``season_s``) is split into ``profile_buckets`` profile buckets, each
    updated (with ``gamma``) by every rate bucket falling in it, so a profile bucket
    averages several noisy observations per season. The forecast interpolates the
    profile between bucket centres, so a ramp is forecast as a ramp.

    Example::

        f = SeasonalForecaster(season_s=600.0, profile_buckets=24, bucket_s=5.0)
        # replay two compressed days of arrivals through f.observe(...), then:
        f.rate(now_s, 10.0)
    """

    def __init__(
        self,
        *,
        season_s: float = 86_400.0,
        profile_buckets: int = 48,
        alpha: float = 0.3,
        beta: float = 0.05,
        gamma: float = 0.2,
        phi: float = 0.8,
        floor: float = 0.5,
        bucket_s: float = 60.0,
        start_s: float | None = None,
    ) -> None:
        super().__init__(alpha=alpha, beta=beta, phi=phi, bucket_s=bucket_s, start_s=start_s)
        _check_fraction("gamma", gamma, allow_zero=True)
        _check_fraction("floor", floor, allow_zero=True)
        if not (math.isfinite(season_s) and season_s >= 2 * bucket_s):
            raise ValueError(
                f"season_s must be at least two buckets ({2 * bucket_s} s), got {season_s!r}"
            )
        if profile_buckets < 2 or season_s / profile_buckets < bucket_s:
            raise ValueError(
                f"profile_buckets must be >= 2 and no finer than bucket_s={bucket_s} s "
                f"(at most {int(season_s // bucket_s)} for season_s={season_s}), "
                f"got {profile_buckets}"
            )
        self.season_s, self.profile_buckets, self.gamma = season_s, profile_buckets, gamma
        self.floor = floor
        self.profile = [0.0] * profile_buckets  # arrivals/s above (or below) the baseline
        self.baseline = 0.0  # the season's mean rate, tracked over about one season
        self._baseline_weight = bucket_s / season_s
        self._first_season: list[list[float]] = [[] for _ in range(profile_buckets)]
        self._learned = False
        self._start_s = self._bucket_start_s  # the first season ends season_s after this

    @property
    def learned(self) -> bool:
        """True once a full season has been observed and the profile initialized."""
        return self._learned

    def _anchor(self, start_s: float) -> None:
        first = math.isnan(self._last_s)
        super()._anchor(start_s)
        if first:
            self._start_s = start_s

    def _index(self, t_s: float) -> int:
        phase = (t_s % self.season_s) / self.season_s
        return min(int(phase * self.profile_buckets), self.profile_buckets - 1)

    def _close_bucket(self, rate_per_s: float) -> None:
        mid_s = self._bucket_start_s + self.bucket_s / 2
        j = self._index(mid_s)
        if not self._learned:
            self._first_season[j].append(rate_per_s)
            self._update(rate_per_s)  # plain Holt until a season is known
            if self._bucket_start_s + self.bucket_s - self._start_s >= self.season_s:
                self._initialize_profile(j)
            return
        previous = self.level if self.level is not None else 0.0
        self._update(rate_per_s - self.profile[j])
        self.baseline += self._baseline_weight * (rate_per_s - self.profile[j] - self.baseline)
        # The seasonal part learns what the level does not explain.
        self.profile[j] += self.gamma * (rate_per_s - previous - self.profile[j])

    def _initialize_profile(self, j_now: int) -> None:
        # A profile bucket never observed (the process was down then) starts at the
        # baseline rather than at zero traffic.
        seen = [sum(v) / len(v) for v in self._first_season if v]
        overall = sum(seen) / len(seen) if seen else 0.0
        self.profile = [sum(v) / len(v) - overall if v else 0.0 for v in self._first_season]
        self.baseline = overall
        # The Holt level tracked the raw rate so far; deseasonalize it.
        self.level = (self.level or 0.0) - self.profile[j_now]
        self.trend = 0.0
        self._learned = True
        self._first_season = []

    def _profile_at(self, t_s: float) -> float:
        width = self.season_s / self.profile_buckets
        pos = (t_s % self.season_s) / width - 0.5  # in bucket-centre coordinates
        lo = math.floor(pos)
        frac = pos - lo
        a = self.profile[lo % self.profile_buckets]
        b = self.profile[(lo + 1) % self.profile_buckets]
        return a + (b - a) * frac

    def rate(self, now_s: float, horizon_s: float) -> float:
        if not self._learned or self.level is None:
            return super().rate(now_s, horizon_s)
        # The deseasonalized level may go negative in a trough; only the sum is clipped.
        level = self.level + self._damped(self._steps_ahead(now_s, horizon_s)) * self.trend
        return max(
            0.0,
            level + self._profile_at(now_s + horizon_s),
            self.floor * self.typical(now_s + horizon_s),
        )

    def typical(self, t_s: float) -> float:
        """What the season brings at ``t_s`` on an ordinary day, in arrivals per second;
        0.0 until a full season has been observed."""
        if not self._learned:
            return 0.0
        return max(0.0, self.baseline + self._profile_at(t_s))

    def _params(self) -> dict[str, Any]:
        return {
            **super()._params(),
            "season_s": self.season_s,
            "profile_buckets": self.profile_buckets,
            "gamma": self.gamma,
            "floor": self.floor,
        }

    def state(self) -> dict[str, Any]:
        return {
            **super().state(),
            "learned": self._learned,
            "profile": list(self.profile),
            "baseline": self.baseline,
            "first_season": [list(v) for v in self._first_season],
            "start_s": _or_none(self._start_s),
        }

    def restore(self, state: dict[str, Any], now_s: float) -> None:
        """As :meth:`HoltForecaster.restore`; the profile is kept whatever the gap, since
        it is anchored to the time of day, and a first season still being observed goes
        on counting from where it began."""
        self._check_kind(state)
        profile, first = state.get("profile"), state.get("first_season")
        if not isinstance(profile, list) or len(profile) != self.profile_buckets:
            raise ValueError(f"saved forecast has no profile of {self.profile_buckets} buckets")
        learned = bool(state["learned"])
        first = first if isinstance(first, list) else []
        if not learned and len(first) != self.profile_buckets:
            raise ValueError("saved forecast's first season does not match its profile")
        values = [float(x) for x in profile]
        baseline = float(state["baseline"])
        first_season = [] if learned else [[float(x) for x in v] for v in first]
        start_s = None if state["start_s"] is None else float(state["start_s"])
        super().restore(state, now_s)  # the last step that can fail: nothing is half-set
        self._learned, self.profile, self.baseline = learned, values, baseline
        self._first_season = first_season
        if start_s is not None:
            self._start_s = start_s
