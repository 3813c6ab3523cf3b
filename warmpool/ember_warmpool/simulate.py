"""A discrete-event simulator that replays an arrival trace through :func:`decide`.

For tuning policies and for tests; ``bench/trace.py`` replays through the real gateway.
The model: a worker reaches READY after a cold start whose length depends on the warmth
it starts from (:class:`ColdStartModel`); it serves ``target_concurrency`` requests at
once, each for ``service_s`` with its first token ``first_token_s`` after it starts.
Placement is the pool's (:func:`ember_warmpool.placement.place`): the busiest READY
worker under ``target_concurrency``, else (given ``max_in_flight``, the engine's cap) the
least loaded one under that cap, where the request runs stretched by in_flight /
target_concurrency; requests that find no place wait in one FIFO queue. The policy is consulted on
every arrival and every ``tick_s``, when the forecaster also observes the arrivals since
the last tick. Nothing here reads a clock: simulated time only.

Reported per policy: p50/p99 wait for a worker and time to first token (wait +
``first_token_s``), the share of requests that waited on a worker becoming READY (a cold
start or a promotion), and worker-seconds (every live worker process, whatever its
warmth), all measured from ``measure_from_s`` on so forecasters can train on a first day.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ember_functions.rpc import WorkerState
from ember_warmpool.forecast import Forecaster
from ember_warmpool.placement import place
from ember_warmpool.policy import Decision, PoolPolicy, decide
from ember_warmpool.view import PoolView, Warmth, WorkerView

__all__ = [
    "ColdStartModel",
    "SimConfig",
    "SimResult",
    "compare",
    "percentile",
    "policy_ratios",
    "simulate",
]


@dataclass(frozen=True, kw_only=True)
class ColdStartModel:
    """Seconds for a worker to become READY from each starting point.

    Example::

        ColdStartModel(cold_s=8.0, process_s=2.0, host_s=0.5).seconds(Warmth.HOST, Warmth.READY)
        # -> 0.5
    """

    cold_s: float = 8.0  # nothing -> READY: spawn, imports, fetch, bind
    process_s: float = 2.0  # PROCESS (imports done) -> READY
    host_s: float = 0.5  # HOST (weights in host RAM) -> READY

    def __post_init__(self) -> None:
        if not 0 <= self.host_s <= self.process_s <= self.cold_s:
            raise ValueError("cold start times must satisfy 0 <= host_s <= process_s <= cold_s")

    def to_ready_s(self, warmth: Warmth | None) -> float:
        if warmth is None:
            return self.cold_s
        return {Warmth.PROCESS: self.process_s, Warmth.HOST: self.host_s, Warmth.READY: 0.0}[warmth]

    def seconds(self, start: Warmth | None, target: Warmth) -> float:
        """From ``start`` (None: no process) to ``target``."""
        return max(0.0, self.to_ready_s(start) - self.to_ready_s(target))


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    service_s: float = 2.0  # a request occupies a worker slot this long
    first_token_s: float = 0.2  # from a request starting on a worker to its first token
    tick_s: float = 1.0
    measure_from_s: float = 0.0
    cold: ColdStartModel = field(default_factory=ColdStartModel)
    # Requests a worker's engine runs at once (``EngineConfig.max_num_seqs``): with every
    # worker at target_concurrency, a request overflows onto the least loaded one below
    # this, as ``ModelPool.try_place`` does, and runs slower there (see ``_Sim.dispatch``).
    # None: no overflow, requests wait for a slot.
    max_in_flight: int | None = None

    def __post_init__(self) -> None:
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ValueError(
                f"max_in_flight={self.max_in_flight}; give the engine's max_num_seqs (>= 1), "
                "or None for no overflow"
            )


@dataclass(frozen=True)
class SimResult:
    name: str
    requests: int
    p50_wait_s: float
    p99_wait_s: float
    p50_ttft_s: float
    p99_ttft_s: float
    cold_share: float  # of requests that waited on a worker becoming READY
    worker_s: float
    starts: int  # workers started (cold starts, whatever warmth they start to)
    promotions: int


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); 0.0 when empty.

    Example::

        percentile([1.0, 2.0, 3.0, 4.0], 0.5)   # -> 2.5
    """
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class _Worker:
    def __init__(self, worker_id: str, warmth: Warmth, eta_s: float, born_s: float) -> None:
        self.worker_id = worker_id
        self.warmth = warmth  # held, or heading for while not reached
        self.reached = False
        self.eta_s = eta_s
        self.generation = 0  # invalidates a scheduled WARM event when the target changes
        self.in_flight = 0
        self.idle_since_s: float | None = None
        self.ready_since_s = math.inf
        self.born_s = born_s

    def view(self) -> WorkerView:
        if not self.reached:
            state = WorkerState.STARTING if self.generation == 0 else WorkerState.LOADING
        else:
            state = WorkerState.BUSY if self.in_flight else WorkerState.READY
        return WorkerView(
            worker_id=self.worker_id,
            state=state,
            warmth=self.warmth,
            in_flight=self.in_flight,
            idle_since_s=self.idle_since_s,
        )


_DONE, _WARM, _ARRIVAL, _TICK = range(4)  # at equal times: free slots before new demand


class _Sim:
    def __init__(
        self,
        trace: Sequence[float],
        policy: PoolPolicy,
        config: SimConfig,
        forecaster: Forecaster | None,
        end_s: float,
    ) -> None:
        self.trace, self.policy, self.config = trace, policy, config
        self.forecaster, self.end_s = forecaster, end_s
        self.events: list[tuple[float, int, int, int, str]] = []
        self.seq = 0
        self.workers: dict[str, _Worker] = {}
        self.queue: deque[int] = deque()
        self.start_s = [math.nan] * len(trace)
        self.cold = [False] * len(trace)
        self.first_token_s = [config.first_token_s] * len(trace)
        self.next_id = 0
        self.starts = self.promotions = 0
        self.worker_s = 0.0
        self.now_s = 0.0
        self.arrivals_since_tick = 0
        self.forecast: float | None = None

    def push(self, t: float, kind: int, index: int = 0, worker_id: str = "") -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, kind, self.seq, index, worker_id))

    def run(self) -> None:
        for i, t in enumerate(self.trace):
            self.push(t, _ARRIVAL, i)
        self.push(0.0, _TICK)
        while self.events:
            t, kind, _, index, worker_id = heapq.heappop(self.events)
            self.advance(t)
            if kind == _ARRIVAL:
                self.arrivals_since_tick += 1
                self.queue.append(index)
                self.dispatch()
                self.consult()
            elif kind == _DONE:
                w = self.workers.get(worker_id)
                if w is not None:
                    w.in_flight -= 1
                    if w.in_flight == 0:
                        w.idle_since_s = t
                self.dispatch()
            elif kind == _WARM:
                self.warmed(worker_id, index)
            else:
                self.tick()
        self.advance(self.end_s)

    def advance(self, t: float) -> None:
        lo, hi = max(self.now_s, self.config.measure_from_s), min(t, self.end_s)
        if hi > lo:
            self.worker_s += len(self.workers) * (hi - lo)
        self.now_s = max(self.now_s, t)

    def tick(self) -> None:
        if self.forecaster is not None:
            self.forecaster.observe(self.now_s, self.arrivals_since_tick)
            self.forecast = self.forecaster.rate(self.now_s, self.policy.lead_s)
        self.arrivals_since_tick = 0
        self.consult()
        if self.now_s + self.config.tick_s <= self.end_s:
            self.push(self.now_s + self.config.tick_s, _TICK)

    def warmed(self, worker_id: str, generation: int) -> None:
        w = self.workers.get(worker_id)
        if w is None or w.generation != generation:
            return
        w.reached = True
        w.idle_since_s = self.now_s
        if w.warmth is Warmth.READY:
            w.ready_since_s = self.now_s
        self.dispatch()

    def dispatch(self) -> None:
        tc = self.policy.target_concurrency
        cap = max(tc, self.config.max_in_flight or tc)
        while self.queue:
            # Oldest first: workers are kept in the order they were started.
            ready = [w for w in self.workers.values() if w.reached and w.warmth is Warmth.READY]
            chosen = place([w.in_flight for w in ready], target=tc, cap=cap)
            if chosen is None:
                return
            w = ready[chosen]
            i = self.queue.popleft()
            w.in_flight += 1
            w.idle_since_s = None
            self.start_s[i] = self.now_s
            self.cold[i] = w.ready_since_s > self.trace[i]
            # Beyond target_concurrency the worker's requests share it: this one's first
            # token and its stay stretch by in_flight / target_concurrency (processor
            # sharing, fixed at admission; a batching engine does better than this).
            stretch = max(1.0, w.in_flight / tc)
            self.first_token_s[i] = self.config.first_token_s * stretch
            self.push(self.now_s + self.config.service_s * stretch, _DONE, worker_id=w.worker_id)

    def consult(self) -> None:
        view = PoolView(
            workers=tuple(w.view() for w in self.workers.values()), queued=len(self.queue)
        )
        self.apply(
            decide(
                self.policy,
                view,
                self.now_s,
                forecast_rate_per_s=self.forecast,
                service_s=self.config.service_s,
            )
        )

    def apply(self, decision: Decision) -> None:
        cold = self.config.cold
        for order in decision.start:
            for _ in range(order.count):
                self.next_id += 1
                eta = self.now_s + cold.seconds(None, order.warmth)
                w = _Worker(f"w{self.next_id}", order.warmth, eta, self.now_s)
                self.workers[w.worker_id] = w
                self.starts += 1
                self.push(eta, _WARM, 0, w.worker_id)
        for worker_id in decision.promote:
            w = self.workers[worker_id]
            w.eta_s = max(w.eta_s, self.now_s) + cold.seconds(w.warmth, Warmth.READY)
            w.warmth, w.reached = Warmth.READY, False
            w.generation += 1
            self.promotions += 1
            self.push(w.eta_s, _WARM, w.generation, w.worker_id)
        for worker_id in decision.demote:
            w = self.workers[worker_id]
            # Dropping the model is quick next to loading it: modelled as instant.
            w.warmth, w.ready_since_s = self.policy.reserve_warmth, math.inf
        for stop in decision.stop:
            del self.workers[stop.worker_id]


def simulate(
    trace: Sequence[float],
    policy: PoolPolicy,
    *,
    config: SimConfig,
    duration_s: float,
    forecaster: Forecaster | None = None,
    name: str = "",
) -> SimResult:
    """Replays ``trace`` (sorted arrival times) through ``policy``.

    Example::

        trace = poisson_arrivals(rate_per_s=1.0, duration_s=300.0, seed=1)
        simulate(trace, PoolPolicy(min_warm=2), config=SimConfig(), duration_s=300.0)
    """
    sim = _Sim(trace, policy, config, forecaster, duration_s)
    sim.run()
    measured = [i for i, t in enumerate(trace) if t >= config.measure_from_s]
    waits = [sim.start_s[i] - trace[i] for i in measured]
    ttfts = [wait + sim.first_token_s[i] for wait, i in zip(waits, measured, strict=True)]
    cold = sum(1 for i in measured if sim.cold[i])
    return SimResult(
        name=name,
        requests=len(measured),
        p50_wait_s=percentile(waits, 0.5),
        p99_wait_s=percentile(waits, 0.99),
        p50_ttft_s=percentile(ttfts, 0.5),
        p99_ttft_s=percentile(ttfts, 0.99),
        cold_share=cold / len(measured) if measured else 0.0,
        worker_s=sim.worker_s,
        starts=sim.starts,
        promotions=sim.promotions,
    )


def _ratio(a: float, b: float) -> float:
    if b == 0:
        return 0.0 if a == 0 else math.inf
    return a / b


def compare(
    trace: Sequence[float],
    *,
    zero: PoolPolicy,
    fixed: PoolPolicy,
    predictive: PoolPolicy,
    make_forecaster: Callable[[], Forecaster],
    config: SimConfig,
    duration_s: float,
) -> dict[str, float]:
    """The three policies of the warm-pool issue on one trace, keyed as ``bench/trace.py``
    reports them (``p99_ttft_s_zero``, ..., ``cold_share_ratio_predictive_vs_zero``).

    Example::

        compare(trace, zero=PoolPolicy(buffer=0), fixed=PoolPolicy(min_warm=4),
                predictive=PoolPolicy(predictive=True), make_forecaster=HoltForecaster,
                config=SimConfig(), duration_s=600.0)
    """
    results = {
        "zero": simulate(trace, zero, config=config, duration_s=duration_s, name="zero"),
        "fixed": simulate(trace, fixed, config=config, duration_s=duration_s, name="fixed"),
        "predictive": simulate(
            trace,
            predictive,
            config=config,
            duration_s=duration_s,
            forecaster=make_forecaster(),
            name="predictive",
        ),
    }
    out: dict[str, float] = {}
    for key, r in results.items():
        out[f"p50_wait_s_{key}"] = r.p50_wait_s
        out[f"p99_wait_s_{key}"] = r.p99_wait_s
        out[f"p50_ttft_s_{key}"] = r.p50_ttft_s
        out[f"p99_ttft_s_{key}"] = r.p99_ttft_s
        out[f"cold_share_{key}"] = r.cold_share
        out[f"worker_s_{key}"] = r.worker_s
        out[f"starts_{key}"] = r.starts
    out["requests"] = results["fixed"].requests
    out.update(policy_ratios(out))
    return out


def policy_ratios(figures: Mapping[str, float]) -> dict[str, float]:
    """The warm-pool issue's three ratios, from figures keyed ``<metric>_<policy>``
    (``p99_ttft_s_fixed``, ``worker_s_predictive``, ...): what the simulator and
    ``bench/trace.py`` both report.

    Example::

        policy_ratios({"p99_ttft_s_predictive": 0.6, "p99_ttft_s_fixed": 0.4, ...})
        # -> {"p99_ratio_predictive_vs_fixed": 1.5, ...}
    """
    return {
        "p99_ratio_predictive_vs_fixed": _ratio(
            figures["p99_ttft_s_predictive"], figures["p99_ttft_s_fixed"]
        ),
        "worker_s_ratio_predictive_vs_fixed": _ratio(
            figures["worker_s_predictive"], figures["worker_s_fixed"]
        ),
        "cold_share_ratio_predictive_vs_zero": _ratio(
            figures["cold_share_predictive"], figures["cold_share_zero"]
        ),
    }
