"""Pool policy: how many workers a model's pool holds, and how warm, decided in one place.

The process manager observes its workers, describes them in a :class:`PoolView` and calls
:func:`decide` on every arrival and on a regular tick; it carries out the returned
:class:`Decision` (start, promote, stop) and nothing else decides. ``decide`` is pure:
no clock, no I/O; time and the forecast come in as arguments.

The rules, in the order ``decide`` applies them:

1. **Capacity.** Live workers are STARTING, LOADING, READY and BUSY ones. Workers still
   starting or loading count as capacity, so a burst that arrives while they load does
   not start duplicates. DRAINING workers are leaving: they count against
   ``max_workers`` (their processes exist) but not as capacity. STOPPED and FAILED
   workers count for nothing.
2. **Demand**, in workers: ``busy`` = live workers with requests in flight;
   ``queued demand`` = ceil((in flight + queued) / target_concurrency).
3. **Target**: ``desired = max(min_warm, busy + buffer, queued demand, predictive)``
   clipped to ``max_workers``. The buffer applies only while something runs or waits
   (as Modal's ``buffer_containers``), so ``min_warm=0`` scales to zero when idle.
   ``predictive`` (only with ``policy.predictive`` and a forecast) is Little's law with
   square-root staffing: load = rate_per_s * service_s / target_concurrency, and
   ceil(load + headroom_sd * sqrt(load)) + buffer workers, where the caller takes
   the rate ``lead_s`` ahead (a typical cold start), so workers started now are ready
   when the demand arrives. Rates below ``min_forecast_rate_per_s`` count as zero:
   otherwise a decaying forecast would hold one worker forever.
4. **Warmth.** ``ready_target = max(busy, queued demand, Little's-law workers)`` of the
   desired workers must be READY; the rest are held at ``reserve_warmth``. When READY
   workers fall short, reserve workers are promoted first (warmest first), then new
   READY workers start, then new reserve ones.
5. **Stops.** A worker with requests in flight is never stopped. Idle workers beyond
   ``desired`` stop once idle for ``keepalive_s``, longest idle first, but never one
   that would take the READY workers below ``ready_target``. Idle READY workers
   beyond ``ready_target`` that are kept are demoted to ``reserve_warmth`` after the
   same ``keepalive_s`` (the model leaves the worker; its process stays).
6. **Load failures.** After a load failure the next start waits
   ``failure_backoff_s * 2**(failures - 1)``; after ``max_load_failures`` consecutive
   failures no worker starts or is promoted until the manager resets the count (a
   worker reached READY, or an operator fixed the model). ``Decision.held_back`` says
   why, so the manager can fail queued requests with that reason instead of letting
   them wait.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ember_core import ConfigError
from ember_functions.rpc import WorkerState
from ember_warmpool.view import PoolView, Warmth, WorkerView

__all__ = [
    "Decision",
    "PoolPolicy",
    "StartOrder",
    "StopOrder",
    "can_start",
    "can_stop",
    "decide",
    "start_hold",
]

_LIVE = (WorkerState.STARTING, WorkerState.LOADING, WorkerState.READY, WorkerState.BUSY)


@dataclass(frozen=True, kw_only=True)
class PoolPolicy:
    """How one model's (or one ``@llm.function``'s) pool scales.

    Example::

        PoolPolicy(min_warm=1, buffer=1, max_workers=8, keepalive_s=120.0)
        PoolPolicy.from_dict({"max_workers": 8, "reserve_warmth": "HOST", "predictive": True})
    """

    # Workers kept whatever the load. Idle ones are held at ``reserve_warmth`` like any
    # other reserve: with HOST, min_warm=1 keeps one worker whose first request waits
    # for a bind (~0.05 s for SmolLM2), not a cold start; READY (the default) keeps it
    # serving-ready, at the cost of its bound weights and KV cache in memory.
    min_warm: int = 0
    buffer: int = 1  # idle workers kept beyond the busy ones, while there is load
    max_workers: int = 4
    keepalive_s: float = 60.0  # an idle worker beyond the target stops after this long
    reserve_warmth: Warmth = Warmth.READY  # warmth of workers held beyond the serving ones
    predictive: bool = False
    target_concurrency: int = 1  # requests one worker serves at once, for sizing
    lead_s: float = 10.0  # how far ahead the forecast is taken: a typical cold start
    # Workers held above the forecast load, in standard deviations of Poisson demand
    # (square-root staffing): 0 holds the mean (Little's law), 1-2 keeps arrivals from
    # finding every worker busy.
    headroom_sd: float = 0.0
    min_forecast_rate_per_s: float = 0.01
    max_load_failures: int = 3  # consecutive load failures before starts stop
    failure_backoff_s: float = 5.0  # wait after the first load failure; doubles after each

    def __post_init__(self) -> None:
        for name in ("min_warm", "buffer"):
            _check_int(name, getattr(self, name), minimum=0)
        for name in ("max_workers", "target_concurrency", "max_load_failures"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in (
            "keepalive_s",
            "lead_s",
            "min_forecast_rate_per_s",
            "failure_backoff_s",
            "headroom_sd",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{name} must be a number of seconds or a rate, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be finite and >= 0, got {value!r}")
        if not isinstance(self.reserve_warmth, Warmth):
            raise ConfigError(
                f"reserve_warmth must be a Warmth ({', '.join(w.name for w in Warmth)}), "
                f"got {self.reserve_warmth!r}; from_dict accepts the names"
            )
        if not isinstance(self.predictive, bool):
            raise ConfigError(f"predictive must be true or false, got {self.predictive!r}")
        for name in ("min_warm", "buffer"):
            if getattr(self, name) > self.max_workers:
                raise ConfigError(
                    f"{name}={getattr(self, name)} exceeds max_workers={self.max_workers}; "
                    f"lower {name} or raise max_workers"
                )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PoolPolicy:
        """Builds a policy from config-file values; unknown keys are refused.

        Example::

            PoolPolicy.from_dict({"min_warm": 1, "reserve_warmth": "host"})
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown pool setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        kwargs = dict(values)
        if isinstance(kwargs.get("reserve_warmth"), str):
            kwargs["reserve_warmth"] = Warmth.parse(kwargs["reserve_warmth"])
        return cls(**kwargs)


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class StartOrder:
    """Start ``count`` new workers and bring each to ``warmth``."""

    count: int
    warmth: Warmth


@dataclass(frozen=True)
class StopOrder:
    """Stop worker ``worker_id``; ``reason`` is for logs and ``ember pool status``."""

    worker_id: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class Decision:
    """What the process manager does now. Empty tuples mean: nothing to do."""

    desired: int  # workers the pool should hold
    ready_target: int  # of which READY
    start: tuple[StartOrder, ...] = ()
    promote: tuple[str, ...] = ()  # worker ids to bring to READY
    demote: tuple[str, ...] = ()  # idle READY worker ids to drop to the reserve warmth
    stop: tuple[StopOrder, ...] = ()
    held_back: str | None = None  # why no worker may start now (load failures)
    retry_at_s: float | None = None  # when starts may resume; None: not by waiting

    @property
    def starts(self) -> int:
        return sum(order.count for order in self.start)

    @property
    def is_noop(self) -> bool:
        return not (self.start or self.promote or self.demote or self.stop)


def start_hold(policy: PoolPolicy, view: PoolView, now_s: float) -> tuple[str, float | None] | None:
    """Why no worker may start (or be promoted) now, and when that may change; None if
    starts are allowed.

    Example::

        hold = start_hold(policy, view, now_s=12.0)
        if hold: log.warning("pool held: %s", hold[0])
    """
    failures = view.load_failures
    if failures <= 0:
        return None
    last = f" (last: {view.last_failure_reason})" if view.last_failure_reason else ""
    if failures >= policy.max_load_failures:
        return (
            f"the model failed to load {failures} times in a row{last}; no worker starts "
            "until the pool is reset: fix the model or its weights, then reset the pool",
            None,
        )
    since = view.last_failure_s if view.last_failure_s is not None else now_s
    retry_at_s = since + policy.failure_backoff_s * 2 ** (failures - 1)
    if now_s < retry_at_s:
        return (
            f"the model failed to load {failures} of {policy.max_load_failures} times{last}; "
            f"the next start waits until t={retry_at_s:.1f} s",
            retry_at_s,
        )
    return None


def can_start(policy: PoolPolicy, view: PoolView, now_s: float) -> bool:
    """True when load failures do not hold starts back (see :func:`start_hold`)."""
    return start_hold(policy, view, now_s) is None


def can_stop(worker: WorkerView) -> bool:
    """A worker may be stopped only while it is idle and not loading: never a busy one."""
    return worker.state is WorkerState.READY and worker.in_flight == 0


def decide(
    policy: PoolPolicy,
    view: PoolView,
    now_s: float,
    *,
    forecast_rate_per_s: float | None = None,
    service_s: float | None = None,
) -> Decision:
    """The one place pool scaling is decided; the module docstring lists the rules.

    Example::

        view = PoolView(workers=(WorkerView(worker_id="w1", state=WorkerState.BUSY,
                                            in_flight=1),), queued=2)
        decide(PoolPolicy(max_workers=4), view, now_s=3.0).starts   # -> 2
    """
    if policy.predictive and forecast_rate_per_s is not None and service_s is None:
        raise ValueError("decide() got a forecast without service_s; pass both or neither")
    live = [w for w in view.workers if w.state in _LIVE]
    occupying = sum(1 for w in view.workers if not w.state.ended)
    tc = policy.target_concurrency

    busy = sum(1 for w in live if w.in_flight > 0)
    in_flight = sum(w.in_flight for w in live)
    queued_demand = -(-(in_flight + view.queued) // tc)
    little = 0
    rate = forecast_rate_per_s
    if (
        policy.predictive
        and rate is not None
        and service_s is not None
        and rate >= policy.min_forecast_rate_per_s
    ):
        # Square-root staffing: Poisson arrivals at ``load`` busy workers on average
        # fluctuate by about sqrt(load); holding ``headroom_sd`` of that above the mean
        # keeps the chance that an arrival finds every worker busy small (Halfin-Whitt).
        load = rate * service_s / tc
        # The epsilon keeps float noise (2.0000000001 workers) from adding a worker.
        little = math.ceil(load + policy.headroom_sd * math.sqrt(load) - 1e-9)
    predictive = little + policy.buffer if little > 0 else 0
    under_load = busy > 0 or view.queued > 0
    desired = max(policy.min_warm, busy + policy.buffer if under_load else 0)
    desired = min(max(desired, queued_demand, predictive), policy.max_workers)
    if policy.reserve_warmth is Warmth.READY:
        ready_target = desired
    else:
        ready_target = min(desired, max(busy, queued_demand, little))

    hold = start_hold(policy, view, now_s)
    ready = [w for w in live if w.warmth is Warmth.READY]
    reserve = [w for w in live if w.warmth is not Warmth.READY]
    promote: list[str] = []
    start: list[StartOrder] = []
    short = ready_target - len(ready)
    if hold is None:
        if short > 0:
            order = sorted(reserve, key=lambda w: (-w.warmth, _PROMOTE_RANK[w.state], w.worker_id))
            promote = [w.worker_id for w in order[:short]]
        room = policy.max_workers - occupying
        new_ready = max(0, min(short - len(promote), room))
        new_reserve = max(0, min(desired - len(live) - new_ready, room - new_ready))
        if policy.reserve_warmth is Warmth.READY:
            new_ready, new_reserve = new_ready + new_reserve, 0
        if new_ready:
            start.append(StartOrder(new_ready, Warmth.READY))
        if new_reserve:
            start.append(StartOrder(new_reserve, policy.reserve_warmth))

    stops = _stops(policy, live, now_s, desired, ready_target, len(ready) + len(promote), promote)
    demote = _demotions(policy, live, now_s, ready_target, len(ready), stops)
    return Decision(
        desired=desired,
        ready_target=ready_target,
        start=tuple(start),
        promote=tuple(promote),
        demote=tuple(demote),
        stop=tuple(stops),
        held_back=hold[0] if hold else None,
        retry_at_s=hold[1] if hold else None,
    )


# Promote the worker closest to serving first: parked ones before those still loading.
_PROMOTE_RANK = {WorkerState.READY: 0, WorkerState.LOADING: 1, WorkerState.STARTING: 2}


def _stops(
    policy: PoolPolicy,
    live: list[WorkerView],
    now_s: float,
    desired: int,
    ready_target: int,
    ready_count: int,
    promoted: list[str],
) -> list[StopOrder]:
    surplus = len(live) - desired
    if surplus <= 0:
        return []
    expired = [
        w
        for w in live
        if can_stop(w)
        and w.worker_id not in promoted
        and w.idle_since_s is not None
        and now_s - w.idle_since_s >= policy.keepalive_s
    ]
    expired.sort(key=lambda w: (w.idle_since_s, w.worker_id))
    stops: list[StopOrder] = []
    for w in expired:
        if len(stops) == surplus:
            break
        if w.warmth is Warmth.READY:
            if ready_count - 1 < ready_target:
                continue
            ready_count -= 1
        idle_s = now_s - (w.idle_since_s or now_s)
        stops.append(
            StopOrder(
                w.worker_id,
                f"idle {idle_s:.1f} s >= keepalive_s={policy.keepalive_s:g} with "
                f"{len(live)} live workers for a target of {desired}",
            )
        )
    return stops


def _demotions(
    policy: PoolPolicy,
    live: list[WorkerView],
    now_s: float,
    ready_target: int,
    ready_count: int,
    stops: list[StopOrder],
) -> list[str]:
    if policy.reserve_warmth is Warmth.READY:
        return []
    stopped = {s.worker_id for s in stops}
    ready_count -= sum(1 for w in live if w.worker_id in stopped and w.warmth is Warmth.READY)
    idle = [
        w
        for w in live
        if w.warmth is Warmth.READY
        and can_stop(w)
        and w.worker_id not in stopped
        and w.idle_since_s is not None
        and now_s - w.idle_since_s >= policy.keepalive_s
    ]
    idle.sort(key=lambda w: (w.idle_since_s, w.worker_id))
    excess = max(0, ready_count - ready_target)
    return [w.worker_id for w in idle[:excess]]
