"""The pool policy: pure decisions from a snapshot of the pool."""

from __future__ import annotations

import pytest

from ember_core import ConfigError
from ember_functions.rpc import WorkerState
from ember_warmpool import (
    PoolPolicy,
    PoolView,
    Warmth,
    WorkerView,
    can_start,
    can_stop,
    decide,
)

S = WorkerState


def worker(
    worker_id: str,
    state: WorkerState = S.READY,
    *,
    in_flight: int = 0,
    idle_since_s: float | None = 0.0,
    warmth: Warmth = Warmth.READY,
) -> WorkerView:
    if in_flight:
        idle_since_s = None
    return WorkerView(
        worker_id=worker_id,
        state=state,
        warmth=warmth,
        in_flight=in_flight,
        idle_since_s=idle_since_s,
    )


def busy(worker_id: str, n: int = 1) -> WorkerView:
    return worker(worker_id, S.BUSY, in_flight=n)


def test_scales_up_under_load() -> None:
    policy = PoolPolicy(max_workers=8, buffer=1)
    view = PoolView(workers=(busy("a"), busy("b")), queued=3)
    d = decide(policy, view, now_s=10.0)
    # 2 running + 3 queued = 5 workers' worth of work; busy + buffer = 3.
    assert d.desired == 5
    assert d.starts == 3
    assert [(o.count, o.warmth) for o in d.start] == [(3, Warmth.READY)]
    assert not d.stop


def test_an_empty_pool_starts_a_worker_for_the_first_request() -> None:
    d = decide(PoolPolicy(buffer=0), PoolView(queued=1), now_s=0.0)
    assert d.starts == 1


def test_starting_and_loading_workers_count_so_a_burst_does_not_start_duplicates() -> None:
    policy = PoolPolicy(max_workers=10, buffer=0)
    first = decide(policy, PoolView(queued=4), now_s=0.0)
    assert first.starts == 4
    # The same burst seen again while those four load: nothing more to start.
    loading = tuple(worker(f"w{i}", S.STARTING if i % 2 else S.LOADING) for i in range(4))
    again = decide(policy, PoolView(workers=loading, queued=4), now_s=0.5)
    assert again.starts == 0 and again.is_noop


def test_back_to_zero_after_keepalive_when_idle() -> None:
    policy = PoolPolicy(min_warm=0, buffer=1, keepalive_s=60.0)
    idle = (worker("a", idle_since_s=100.0), worker("b", idle_since_s=130.0))
    assert decide(policy, PoolView(workers=idle), now_s=150.0).stop == ()
    early = decide(policy, PoolView(workers=idle), now_s=170.0)
    assert [s.worker_id for s in early.stop] == ["a"]  # only a has been idle 60 s
    late = decide(policy, PoolView(workers=idle), now_s=200.0)
    assert [s.worker_id for s in late.stop] == ["a", "b"]  # longest idle first
    assert "keepalive_s=60" in late.stop[0].reason
    assert late.desired == 0 and late.starts == 0


def test_idle_workers_within_the_target_are_kept() -> None:
    policy = PoolPolicy(buffer=1, keepalive_s=10.0, max_workers=8)
    view = PoolView(workers=(busy("a"), worker("b", idle_since_s=0.0)))
    assert decide(policy, view, now_s=1000.0).is_noop  # b is the buffer


def test_min_warm_floor() -> None:
    policy = PoolPolicy(min_warm=2, buffer=0, keepalive_s=1.0)
    assert decide(policy, PoolView(), now_s=0.0).starts == 2
    three = tuple(worker(n, idle_since_s=0.0) for n in "abc")
    d = decide(policy, PoolView(workers=three), now_s=1e6)
    assert len(d.stop) == 1 and d.desired == 2


def test_max_workers_ceiling() -> None:
    policy = PoolPolicy(max_workers=3, buffer=2)
    d = decide(policy, PoolView(workers=(busy("a"),), queued=50), now_s=0.0)
    assert d.desired == 3 and d.starts == 2
    # Draining workers still hold a process: they count against the ceiling.
    draining = PoolView(workers=(busy("a"), worker("b", S.DRAINING, in_flight=1)), queued=50)
    assert decide(policy, draining, now_s=0.0).starts == 1


def test_never_stops_a_busy_worker() -> None:
    policy = PoolPolicy(min_warm=0, buffer=0, keepalive_s=0.0, max_workers=4)
    view = PoolView(workers=(busy("a", 3), busy("b"), worker("c", S.LOADING, idle_since_s=0.0)))
    # Even with a target below what runs, nothing busy or loading is stopped.
    d = decide(PoolPolicy(max_workers=1, buffer=0, keepalive_s=0.0), view, now_s=1e9)
    assert d.stop == ()
    assert decide(policy, view, now_s=1e9).stop == ()
    assert not can_stop(busy("a")) and can_stop(worker("d"))


def test_failed_and_stopped_workers_do_not_count() -> None:
    policy = PoolPolicy(min_warm=2, buffer=0)
    view = PoolView(workers=(worker("a", S.FAILED), worker("b", S.STOPPED), worker("c")))
    assert decide(policy, view, now_s=0.0).starts == 1


def test_load_failures_back_off_then_stop_starting() -> None:
    policy = PoolPolicy(min_warm=1, max_load_failures=3, failure_backoff_s=5.0)
    once = PoolView(load_failures=1, last_failure_s=100.0, last_failure_reason="bad chunk")
    held = decide(policy, once, now_s=102.0)
    assert held.starts == 0 and held.retry_at_s == 105.0
    assert held.held_back is not None and "bad chunk" in held.held_back
    assert decide(policy, once, now_s=105.0).starts == 1
    twice = PoolView(load_failures=2, last_failure_s=100.0)
    assert decide(policy, twice, now_s=109.0).starts == 0  # backoff doubled to 10 s
    assert can_start(policy, twice, now_s=110.0)
    capped = PoolView(load_failures=3, last_failure_s=100.0, queued=5, last_failure_reason="x")
    for now_s in (101.0, 1e4, 1e9):  # not retried forever, however long we wait
        d = decide(policy, capped, now_s=now_s)
        assert d.starts == 0 and d.retry_at_s is None
        assert d.held_back is not None and "3 times in a row" in d.held_back
        assert "reset" in d.held_back
    assert decide(policy, PoolView(load_failures=0, queued=5), now_s=1e9).starts >= 1


def test_reserve_warmth_holds_cheap_workers_and_promotes_them_on_demand() -> None:
    policy = PoolPolicy(min_warm=2, buffer=0, reserve_warmth=Warmth.HOST)
    d = decide(policy, PoolView(), now_s=0.0)
    assert [(o.count, o.warmth) for o in d.start] == [(2, Warmth.HOST)]
    parked = (
        worker("p", warmth=Warmth.PROCESS),
        worker("h", warmth=Warmth.HOST),
    )
    assert decide(policy, PoolView(workers=parked), now_s=1.0).is_noop
    demand = decide(policy, PoolView(workers=parked, queued=1), now_s=1.0)
    assert demand.promote == ("h",)  # the warmest first
    assert demand.starts == 0


def test_predictive_target_uses_littles_law_plus_buffer() -> None:
    policy = PoolPolicy(predictive=True, buffer=1, max_workers=20, target_concurrency=2)
    # 3 requests/s * 2 s each = 6 in flight = 3 workers of 2, plus the buffer.
    d = decide(policy, PoolView(), now_s=0.0, forecast_rate_per_s=3.0, service_s=2.0)
    assert d.desired == 4 and d.starts == 4
    quiet = decide(policy, PoolView(), now_s=0.0, forecast_rate_per_s=0.001, service_s=2.0)
    assert quiet.desired == 0  # a trickle is no reason to hold a worker
    ignored = PoolPolicy(predictive=False, buffer=1)
    assert decide(ignored, PoolView(), 0.0, forecast_rate_per_s=3.0, service_s=2.0).desired == 0
    capped = decide(policy, PoolView(), 0.0, forecast_rate_per_s=100.0, service_s=2.0)
    assert capped.desired == 20


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"min_warm": -1}, "min_warm must be an integer >= 0"),
        ({"buffer": -2}, "buffer must be an integer >= 0"),
        ({"max_workers": 0}, "max_workers must be an integer >= 1"),
        ({"keepalive_s": -5.0}, "keepalive_s must be finite and >= 0"),
        ({"keepalive_s": float("nan")}, "keepalive_s must be finite"),
        ({"lead_s": -1}, "lead_s"),
        ({"target_concurrency": 0}, "target_concurrency"),
        ({"min_warm": 5, "max_workers": 4}, "min_warm=5 exceeds max_workers=4"),
        ({"buffer": 9, "max_workers": 4}, "buffer=9 exceeds max_workers=4"),
        ({"min_warm": 1.5}, "min_warm must be an integer"),
        ({"predictive": "yes"}, "predictive must be true or false"),
        ({"reserve_warmth": "lukewarm"}, "unknown warmth 'lukewarm'"),
        ({"keepalive": 60}, "unknown pool setting(s) keepalive"),
    ],
)
def test_config_validation(values: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        PoolPolicy.from_dict(values)
    assert fragment in str(info.value)


def test_from_dict_accepts_warmth_names() -> None:
    policy = PoolPolicy.from_dict({"reserve_warmth": "host", "min_warm": 1, "max_workers": 2})
    assert policy.reserve_warmth is Warmth.HOST
    assert Warmth.PROCESS < Warmth.HOST < Warmth.READY
    with pytest.raises(ConfigError, match="reserve_warmth must be a Warmth"):
        PoolPolicy(reserve_warmth="HOST")  # type: ignore[arg-type]


def test_decide_is_pure() -> None:
    policy = PoolPolicy(max_workers=8)
    view = PoolView(workers=(busy("a"), worker("b", idle_since_s=3.0)), queued=2)
    assert decide(policy, view, 50.0) == decide(policy, view, 50.0)


def test_idle_ready_workers_beyond_the_serving_ones_are_demoted_to_the_reserve() -> None:
    policy = PoolPolicy(min_warm=1, buffer=0, reserve_warmth=Warmth.HOST, keepalive_s=10.0)
    view = PoolView(workers=(worker("a", idle_since_s=0.0),))
    assert decide(policy, view, now_s=5.0).demote == ()
    assert decide(policy, view, now_s=11.0).demote == ("a",)
    ready_policy = PoolPolicy(min_warm=1, buffer=0, keepalive_s=10.0)
    assert decide(ready_policy, view, now_s=1e6).is_noop


def test_square_root_staffing_holds_headroom_above_the_forecast_load() -> None:
    view = PoolView(workers=())
    # 2 requests/s for 2 s each on one-request workers: 4 busy on average; one standard
    # deviation of Poisson demand above that is sqrt(4) = 2 more.
    little = PoolPolicy(max_workers=16, buffer=0, predictive=True)
    staffed = PoolPolicy(max_workers=16, buffer=0, predictive=True, headroom_sd=1.0)
    assert decide(little, view, 0.0, forecast_rate_per_s=2.0, service_s=2.0).desired == 4
    assert decide(staffed, view, 0.0, forecast_rate_per_s=2.0, service_s=2.0).desired == 6
    with pytest.raises(ConfigError, match="headroom_sd must be finite and >= 0"):
        PoolPolicy(headroom_sd=-1.0)
