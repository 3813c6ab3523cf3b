"""A pool's arrival forecast: fed each tick, asked ahead, kept across restarts.

The forecaster runs on wall-clock time, so its season is the time of day and a restart
resumes it at the right hour; that time is read through the pool's monotonic clock plus
an offset taken once, so it never jumps backwards with the system clock. With a file,
the state is saved every ``SAVE_EVERY_S`` and on close (``forecast_file``), and loaded
when the pool starts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from ember_warmpool.forecast import Forecaster
from ember_warmpool.forecast_file import load_forecast, save_forecast

__all__ = ["SAVE_EVERY_S", "PoolForecast"]

log = logging.getLogger(__name__)

SAVE_EVERY_S = 60.0  # a crash loses at most this much of what was learned


class PoolForecast:
    """Example::

    forecast = PoolForecast(SeasonalForecaster(...), file=path, clock=time.monotonic,
                            wall_clock=time.time, name="smollm2-135m")
    forecast.observe(now_s, arrivals=3)     # each tick
    rate = forecast.rate(now_s, lead_s=10)  # requests/s expected lead_s from now
    """

    def __init__(
        self,
        forecaster: Forecaster,
        *,
        file: Path | None,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
        name: str,
    ) -> None:
        self.forecaster = forecaster
        self.file = file
        self.name = name
        self._clock = clock
        self._wall_offset_s = wall_clock() - clock()
        self._saved_s = clock()
        if file is not None:
            note = load_forecast(forecaster, file, now_s=wall_clock())
            if note:
                log.info("pool %s: %s", name, note)

    def observe(self, now_s: float, arrivals: int) -> None:
        """``arrivals`` since the last call, at pool time ``now_s``; saves now and then."""
        self.forecaster.observe(now_s + self._wall_offset_s, arrivals)
        if now_s - self._saved_s >= SAVE_EVERY_S:
            self.save()

    def rate(self, now_s: float, lead_s: float) -> float:
        """The arrival rate expected ``lead_s`` after pool time ``now_s``."""
        return self.forecaster.rate(now_s + self._wall_offset_s, lead_s)

    def save(self) -> None:
        if self.file is None:
            return
        try:
            save_forecast(self.forecaster, self.file)
        except OSError as exc:  # a full disk must not stop the pool; the next save retries
            log.warning("pool %s: cannot save the forecast: %s", self.name, exc)
        self._saved_s = self._clock()
