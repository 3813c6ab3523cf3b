"""Arrival-rate forecasters and the seeded traces they are evaluated on."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable

import pytest

from ember_warmpool import HoltForecaster, SeasonalForecaster
from ember_warmpool.forecast import Forecaster
from ember_warmpool.traces import bursty_arrivals, daily_arrivals, poisson_arrivals


def feed(f: Forecaster, trace: list[float], *, start_s: float, end_s: float) -> None:
    """Observes ``trace`` once per second over ``[start_s, end_s)``."""
    i = next((k for k, t in enumerate(trace) if t >= start_s), len(trace))
    t = start_s
    while t < end_s:
        t += 1.0
        n = 0
        while i < len(trace) and trace[i] < t:
            n, i = n + 1, i + 1
        f.observe(t, n)


def ahead_errors(
    forecasters: dict[str, Forecaster],
    trace: list[float],
    true_rate: Callable[[float], float],
    *,
    start_s: float,
    end_s: float,
) -> dict[str, float]:
    """Mean absolute error of each forecaster's rate 30 s ahead, fed ``trace`` 10 s at a
    time over ``[start_s, end_s)``."""
    errors: dict[str, list[float]] = {name: [] for name in forecasters}
    t = start_s
    while t < end_s:
        for f in forecasters.values():
            feed(f, trace, start_s=t, end_s=t + 10)
        t += 10
        for name, f in forecasters.items():
            errors[name].append(abs(f.rate(t, 30.0) - true_rate(t + 30)))
    return {name: sum(v) / len(v) for name, v in errors.items()}


def test_holt_tracks_a_step_change_within_a_few_buckets() -> None:
    f = HoltForecaster(bucket_s=5.0)
    for t in range(1, 121):
        f.observe(float(t), 1)
    assert f.rate(120.0, 0.0) == pytest.approx(1.0, abs=0.05)
    for t in range(121, 136):  # three buckets at ten times the rate
        f.observe(float(t), 10)
    assert f.rate(135.0, 0.0) > 7.0
    for t in range(136, 200):
        f.observe(float(t), 10)
    assert f.rate(199.0, 10.0) == pytest.approx(10.0, rel=0.1)
    for t in range(200, 240):  # traffic stops: the forecast follows it down, never below 0
        f.observe(float(t), 0)
        assert f.rate(float(t), 30.0) >= 0.0
    assert f.rate(239.0, 10.0) < 0.5


def test_seasonal_learns_a_daily_curve_and_forecasts_the_ramp() -> None:
    day_s = 600.0
    trace = daily_arrivals(
        peak_rate_per_s=4.0, trough_rate_per_s=0.05, day_s=day_s, days=3, seed=11
    )
    seasonal = SeasonalForecaster(season_s=day_s, profile_buckets=24, bucket_s=5.0)
    holt = HoltForecaster(bucket_s=5.0)
    feed(seasonal, trace, start_s=0.0, end_s=2 * day_s)
    feed(holt, trace, start_s=0.0, end_s=2 * day_s)
    assert seasonal.learned

    def true_rate(t: float) -> float:
        return 0.05 + 3.95 * (1 - math.cos(2 * math.pi * t / day_s)) / 2

    # Through the third day, 30 s ahead: the seasonal forecast knows the ramp is coming.
    forecasters = {"seasonal": seasonal, "holt": holt}
    mae = ahead_errors(forecasters, trace, true_rate, start_s=2 * day_s, end_s=3 * day_s - 30)
    assert mae["seasonal"] < 0.45, mae
    assert mae["seasonal"] < 0.8 * mae["holt"], mae
    # In the trough the floor keeps nothing warm that the season does not expect.
    assert seasonal.rate(3 * day_s, 0.0) < 0.5


def test_seasonal_reacts_to_a_burst_within_a_few_buckets() -> None:
    f = SeasonalForecaster(season_s=100.0, profile_buckets=4, bucket_s=5.0)
    for t in range(1, 301):
        f.observe(float(t), 1)
    for t in range(301, 316):
        f.observe(float(t), 8)
    assert f.rate(315.0, 0.0) > 4.0


def test_forecasters_never_go_negative() -> None:
    trace = bursty_arrivals(rate_per_s=2.0, duration_s=600.0, seed=5, burst_factor=6.0)
    for f in (
        HoltForecaster(bucket_s=2.0, beta=1.0, phi=1.0),
        SeasonalForecaster(season_s=120.0, profile_buckets=6, bucket_s=2.0, floor=0.0),
    ):
        t = 0.0
        i = 0
        while t < 600.0:
            t += 1.0
            n = 0
            while i < len(trace) and trace[i] < t:
                n, i = n + 1, i + 1
            f.observe(t, n)
            for horizon_s in (0.0, 10.0, 1000.0):
                assert f.rate(t, horizon_s) >= 0.0


def test_forecaster_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="alpha"):
        HoltForecaster(alpha=0.0)
    with pytest.raises(ValueError, match="bucket_s"):
        HoltForecaster(bucket_s=-1.0)
    with pytest.raises(ValueError, match="season_s"):
        SeasonalForecaster(season_s=5.0, bucket_s=5.0)
    with pytest.raises(ValueError, match="profile_buckets"):
        SeasonalForecaster(season_s=100.0, profile_buckets=50, bucket_s=5.0)
    f = HoltForecaster()
    f.observe(10.0, 1)
    with pytest.raises(ValueError, match="backwards"):
        f.observe(5.0, 1)


def test_same_seed_same_trace() -> None:
    def daily(seed: int) -> list[float]:
        return daily_arrivals(
            peak_rate_per_s=3.0,
            trough_rate_per_s=0.1,
            day_s=300.0,
            days=2,
            seed=seed,
            burst_every_s=60.0,
            gap_every_s=120.0,
        )

    assert daily(3) == daily(3)
    assert daily(3) != daily(4)
    assert poisson_arrivals(rate_per_s=1.0, duration_s=100.0, seed=1) == poisson_arrivals(
        rate_per_s=1.0, duration_s=100.0, seed=1
    )
    trace = daily(3)
    assert trace == sorted(trace) and trace[0] >= 0.0 and trace[-1] < 600.0


def test_traces_have_the_shape_they_claim() -> None:
    steady = poisson_arrivals(rate_per_s=5.0, duration_s=400.0, seed=2)
    assert len(steady) == pytest.approx(2000, rel=0.1)
    gaps = bursty_arrivals(
        rate_per_s=5.0, duration_s=600.0, seed=2, burst_every_s=1e9, gap_every_s=100.0, gap_s=30.0
    )
    assert max(b - a for a, b in itertools.pairwise(gaps)) >= 25.0  # idle gaps
    bursts = bursty_arrivals(
        rate_per_s=1.0,
        duration_s=600.0,
        seed=2,
        burst_every_s=60.0,
        burst_s=10.0,
        burst_factor=8.0,
        gap_every_s=1e9,
    )
    per_10s = [sum(1 for t in bursts if k * 10 <= t < k * 10 + 10) for k in range(60)]
    assert max(per_10s) >= 40  # a burst: ~80 in 10 s against ~10 outside
    day = daily_arrivals(peak_rate_per_s=4.0, trough_rate_per_s=0.0, day_s=600.0, days=1, seed=2)
    night = sum(1 for t in day if t < 60 or t >= 540)
    noon = sum(1 for t in day if 270 <= t < 390)
    assert noon > 10 * night


EPOCH_S = 1_764_000_123.0  # an arbitrary wall-clock start, not a multiple of the day


def test_a_restored_forecaster_resumes_the_day_at_the_right_hour() -> None:
    day_s = 600.0
    trace = [
        EPOCH_S + t
        for t in daily_arrivals(
            peak_rate_per_s=4.0, trough_rate_per_s=0.05, day_s=day_s, days=3, seed=11
        )
    ]

    def make() -> SeasonalForecaster:
        return SeasonalForecaster(season_s=day_s, profile_buckets=24, bucket_s=5.0)

    before = make()
    feed(before, trace, start_s=EPOCH_S, end_s=EPOCH_S + 2 * day_s)
    saved = json.loads(json.dumps(before.state()))  # what the file holds
    # Down for a quarter of a day: the restored forecaster closes no bucket for the gap
    # (no arrivals were seen, which is not zero arrivals) and drops its trend.
    back_s = EPOCH_S + 2.25 * day_s
    restored, fresh = make(), make()
    restored.restore(saved, now_s=back_s)
    assert restored.learned and restored.level == before.level and restored.trend == 0.0
    assert restored.profile == before.profile

    def true_rate(t: float) -> float:
        return 0.05 + 3.95 * (1 - math.cos(2 * math.pi * (t - EPOCH_S) / day_s)) / 2

    forecasters = {"restored": restored, "fresh": fresh}
    mae = ahead_errors(
        forecasters, trace, true_rate, start_s=back_s, end_s=EPOCH_S + 3 * day_s - 30
    )
    assert mae["restored"] < 0.45, mae
    assert mae["restored"] < 0.7 * mae["fresh"], mae


def test_restoring_within_the_same_bucket_loses_nothing() -> None:
    f = HoltForecaster(bucket_s=5.0)
    for t in range(1, 43):
        f.observe(EPOCH_S + t, 2)
    g = HoltForecaster(bucket_s=5.0)
    g.restore(f.state(), now_s=EPOCH_S + 42.0)  # back at once, in the same bucket
    for h in (f, g):
        h.observe(EPOCH_S + 50.0, 20)
    assert g.state() == f.state()
    assert g.rate(EPOCH_S + 50.0, 10.0) == pytest.approx(f.rate(EPOCH_S + 50.0, 10.0))


def test_a_forecast_learned_under_other_settings_is_refused() -> None:
    f = SeasonalForecaster(season_s=600.0, profile_buckets=24, bucket_s=5.0)
    f.observe(EPOCH_S, 1)
    with pytest.raises(ValueError, match="this pool uses a SeasonalForecaster"):
        SeasonalForecaster(season_s=1200.0, profile_buckets=24, bucket_s=5.0).restore(
            f.state(), now_s=EPOCH_S
        )
    with pytest.raises(ValueError, match="saved forecast is a SeasonalForecaster"):
        HoltForecaster(bucket_s=5.0).restore(f.state(), now_s=EPOCH_S)
    unobserved = HoltForecaster(bucket_s=5.0)
    unobserved.restore(HoltForecaster(bucket_s=5.0).state(), now_s=EPOCH_S)
    assert unobserved.rate(EPOCH_S, 0.0) == 0.0


def test_buckets_follow_the_wall_clock_grid() -> None:
    # Anchored on multiples of bucket_s, whenever the first observation comes: two
    # pools started at different moments bucket (and so forecast) the same hour alike.
    a, b = HoltForecaster(bucket_s=5.0), HoltForecaster(bucket_s=5.0)
    a.observe(EPOCH_S + 0.5, 0)
    b.observe(EPOCH_S + 3.0, 0)
    for f in (a, b):
        f.observe(EPOCH_S + 4.0, 3)
        f.observe(EPOCH_S + 12.0, 8)
    assert a.state()["bucket_start_s"] == b.state()["bucket_start_s"] == 1_764_000_135.0
