"""The process manager: one model's pool of worker processes, run the way ``decide`` says.

``ModelPool`` owns the workers of one model. A tick thread observes them (and the
requests waiting for one), builds a ``PoolView``, asks :func:`ember_warmpool.decide`, and
carries out the ``Decision``: it starts workers (each on a thread of its own, since a
start blocks until the worker is READY), and stops idle ones. Nothing else decides.

Placement (``try_place``) packs, as :func:`ember_warmpool.placement.place` decides: the
busiest worker under ``target_concurrency``, else the least loaded one the engine still
has room on. Only when no worker can take the request does it wait, counted in
``queued``. Every placement and every wait wakes the tick thread, so the policy sees an
arrival when it happens (as :mod:`ember_warmpool.simulate` models it), not up to
``tick_s`` later: a burst that overflows onto busy workers starts the workers it needs at
once. The seam for adapter and session locality is ``try_place``.

Workers held in reserve (``policy.reserve_warmth`` below READY) are started to that
warmth and parked: a PROCESS worker has its imports done, a HOST worker also has the
weights in its RAM. ``promote`` orders bring them to READY (a HOST worker only binds),
``demote`` orders park idle READY workers at HOST; only READY workers are placed on,
a promoted one once the pool has recorded it READY (``PoolMembers.serving``).

Example::

    pool = ModelPool("smollm2-135m", home=home, policy=PoolPolicy(min_warm=1))
    pool.start()                      # boots one worker: the prompt encoder comes from it
    worker = pool.try_place()
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from ember_core import EngineError
from ember_functions.engine_config import EngineConfig
from ember_functions.launch import Launcher
from ember_functions.loading import StoreConfig, WeightsSource
from ember_functions.prompt import PromptEncoder
from ember_functions.worker_process import WorkerProcess
from ember_warmpool.admission import Admission
from ember_warmpool.forecast import Forecaster
from ember_warmpool.placement import place
from ember_warmpool.policy import Decision, PoolPolicy, decide, start_hold
from ember_warmpool.pool_accounts import PoolAccounts
from ember_warmpool.pool_forecast import PoolForecast
from ember_warmpool.pool_members import PoolMembers
from ember_warmpool.view import PoolView, Warmth

__all__ = ["ModelPool"]

log = logging.getLogger(__name__)

Spawn = Callable[..., WorkerProcess]


class ModelPool:
    """The worker processes of one model, scaled by a ``PoolPolicy``."""

    def __init__(
        self,
        model: str,
        *,
        home: Path,
        policy: PoolPolicy,
        engine_config: EngineConfig | None = None,
        store: StoreConfig | None = None,
        release_host_tier: bool = False,  # on close (see host_sharing.py)
        launcher: Launcher | None = None,
        forecaster: Forecaster | None = None,
        forecast_file: Path | None = None,  # kept across restarts (see forecast_file.py)
        service_s: float = 2.0,  # a request's typical time on a worker, for the forecast
        max_queue: int = 64,
        tick_s: float = 0.25,
        health_timeout_s: float = 30.0,  # a serving worker silent this long is killed
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        spawn: Spawn = WorkerProcess.spawn,
        pool_id: str | None = None,  # names worker ids and sockets; default: model and pid
    ) -> None:
        self.model = model
        self.policy = policy
        self.engine_config = engine_config or EngineConfig()
        self.store = store or StoreConfig()
        self.release_host_tier = release_host_tier
        self.host_tier_released_bytes = 0
        self.home = home
        self.pool_id = (
            pool_id or f"{re.sub(r'[^A-Za-z0-9]+', '-', Path(model).name)[:24]}-{os.getpid()}"
        )
        self.encoder: PromptEncoder | None = None  # from the first worker: all share it
        self.model_name = ""
        self.last_decision: Decision | None = None
        self.cold_starts: dict[str, dict[str, float]] = {}  # worker id -> its phases
        self._launcher = launcher
        self._forecast = (
            None
            if forecaster is None
            else PoolForecast(
                forecaster, file=forecast_file, clock=clock, wall_clock=wall_clock, name=model
            )
        )
        self._service_s = service_s
        self._tick_s = tick_s
        self._health_timeout_s = health_timeout_s
        self._clock = clock
        self._spawn = spawn
        self._cond = threading.Condition()
        self._members = PoolMembers(model)
        self._admission = Admission(
            model, cond=self._cond, max_queue=max_queue, retry_after_s=service_s, clock=clock
        )
        self._accounts = PoolAccounts()  # for /metrics and bench/trace.py
        self._ids = itertools.count(1)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"ember-pool-{model}", daemon=True)

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """Boots one worker (its READY message carries the tokenizer and the capacity every
        request is encoded with), then lets the policy run the pool."""
        worker = self._spawn_one()
        if worker is None:
            failure = self._members.last_failure
            reason = failure[1] if failure else "unknown"
            raise EngineError(f"the first worker of {self.model} failed to load: {reason}")
        self._thread.start()

    def close(self, *, drain_timeout_s: float = 0.0) -> None:
        """Stops every worker. With ``drain_timeout_s``, workers first drain: they take
        nothing new and finish what they run, for up to that long in all; what is still
        running then ends cancelled, with its usage."""
        with self._cond:
            self._closed = True
            workers = list(self._members.running.values())
            self._cond.notify_all()
        deadline = time.monotonic() + drain_timeout_s
        for worker in workers if drain_timeout_s > 0 else ():
            worker.drain(max(0.0, deadline - time.monotonic()))
        with self._cond:
            self._members.running = {}
            for wid in self._accounts.live():
                self._retire(wid)
        for worker in workers:
            worker.close()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self._forecast is not None:
            self._forecast.save()
        if self.release_host_tier:
            from ember_warmpool.host_sharing import release_host_tier

            self.host_tier_released_bytes = release_host_tier(self.home)

    # -- placement ------------------------------------------------------------------

    def try_place(self) -> WorkerProcess | None:
        """A worker to send one request to now, or None if none can take it (see
        :meth:`placing`, which also keeps it from being stopped meanwhile)."""
        with self._cond:
            serving = self._members.serving()
            chosen = place(
                [w.queue_depth for w in serving],
                target=self.policy.target_concurrency,
                cap=self.engine_config.max_num_seqs,
            )
            return None if chosen is None else serving[chosen]

    @contextmanager
    def placing(self) -> Iterator[WorkerProcess | None]:
        """``try_place``, with the chosen worker kept from being stopped until the block
        ends: submit the request inside it. Without this, a worker idle past keepalive
        could be stopped between being chosen and receiving the request."""
        with self._cond:
            worker = self.try_place()
            if worker is not None:
                self._members.hold(worker.worker_id)
        try:
            yield worker
        finally:
            if worker is not None:
                with self._cond:
                    self._members.let_go(worker.worker_id)

    def admit(self) -> float:
        """Counts a request's arrival (the forecaster's input) and returns its time for
        :meth:`placed`, or refuses it now (429) when the queue for workers is full."""
        return self._admission.admit()

    def waiting(self) -> AbstractContextManager[None]:
        """Counts the caller as queued for a worker while inside, and wakes the policy."""
        return self._admission.waiting()

    def held_back(self) -> str | None:
        """Why no worker can come for a waiting request (the model keeps failing to load
        and none is running or starting); None while one may."""
        with self._cond:
            if (
                any(not w.state.ended for w in self._members.running.values())
                or self._members.starting
            ):
                return None
            hold = start_hold(self.policy, self._view(), self._clock())
        if hold is None or hold[1] is not None:  # no hold, or one that ends by waiting
            return None
        return hold[0]

    # -- what the gateway and `ember pool status` read --------------------------------

    @property
    def queued(self) -> int:
        return self._admission.queued

    @property
    def max_queue(self) -> int:
        """Requests that may wait for a worker before more are refused (429)."""
        return self._admission.max_queue

    @max_queue.setter
    def max_queue(self, value: int) -> None:
        self._admission.max_queue = value

    @property
    def load_failures(self) -> int:
        """Consecutive failures to start a worker; a worker reaching READY resets it."""
        return self._members.load_failures

    def placed(self, worker: WorkerProcess, arrived_s: float) -> None:
        """Counts a request placed on ``worker`` (once per request); it waited on a cold
        start if the worker became READY after the request arrived (``clock`` time)."""
        with self._cond:
            self._accounts.placed(worker.worker_id, arrived_s=arrived_s)
            # The policy decides on arrivals too: a request overflowing onto a busy
            # worker should start the next one now, not at the next tick.
            self._cond.notify_all()

    def stats(self) -> dict[str, float]:
        """Cumulative since the pool started: ``worker_s`` (seconds summed over every worker
        process, starting ones included), ``starts``, ``requests`` placed and
        ``cold_requests`` (those that waited on a worker becoming READY)."""
        with self._cond:
            return self._accounts.stats(now_s=self._clock())

    def _retire(self, wid: str) -> None:  # under the lock: the worker's process is leaving
        self._accounts.retire(wid, now_s=self._clock())
        self._members.idle_since.pop(wid, None)

    def in_flight(self) -> int:
        with self._cond:
            return sum(w.queue_depth for w in self._members.running.values())

    def free_kv_blocks(self) -> int:
        with self._cond:
            return sum(w.free_kv_blocks for w in self._members.running.values() if w.alive)

    def status(self) -> list[dict[str, Any]]:
        """One row per worker: id, pid, state, requests in flight, idle seconds, and the
        phases of its cold start."""
        with self._cond:
            return self._members.rows(self._clock())

    # -- the tick thread ------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                self._cond.wait(self._tick_s)
                if self._closed:
                    return
            try:
                self.tick()
            except Exception:  # a bug must not stop scaling for good; say so loudly
                log.exception("pool %s: tick failed", self.model)

    def tick(self) -> Decision:
        """One observe-decide-act round; the tick thread calls it, tests may too."""
        now = self._clock()
        with self._cond:
            ended = self._members.sweep(now, health_timeout_s=self._health_timeout_s)
            for worker in ended:
                self._retire(worker.worker_id)
            arrivals = self._admission.take_arrivals()
            view = self._view()
        for worker in ended:
            log.warning(
                "pool %s: worker %s ended: %s", self.model, worker.worker_id, worker.failure
            )
        rate = None
        if self._forecast is not None:
            self._forecast.observe(now, arrivals)
            if self.policy.predictive:
                rate = self._forecast.rate(now, self.policy.lead_s)
        decision = decide(
            self.policy,
            view,
            now,
            forecast_rate_per_s=rate,
            service_s=self._service_s if rate is not None else None,
        )
        self.last_decision = decision
        self._act(decision)
        return decision

    def _view(self) -> PoolView:  # under the lock
        return self._members.view(queued=self._admission.queued)

    def _act(self, decision: Decision) -> None:
        for order in decision.start:
            for _ in range(order.count):
                threading.Thread(target=self._spawn_one, args=(order.warmth,), daemon=True).start()
        for wid in decision.promote:
            with self._cond:
                worker = self._members.running.get(wid)
                if worker is None or wid in self._members.promoting:
                    continue
                self._members.promoting.add(wid)
            threading.Thread(target=self._promote, args=(worker,), daemon=True).start()
        for wid in decision.demote:
            with self._cond:
                worker = self._members.running.get(wid)
                if worker is None or self._members.held(wid):
                    continue  # a request is being placed on it: keep it serving
                # To HOST whatever the reserve warmth: a PROCESS reserve gains nothing by
                # also dropping weights it already holds (a worker demotes to HOST only).
                if worker.demote():
                    self._accounts.parked(wid)
                    log.info("pool %s: %s parked at %s", self.model, wid, worker.warmth.name)
        for stop in decision.stop:
            with self._cond:
                worker = self._members.running.get(stop.worker_id)
                if worker is not None and (
                    worker.queue_depth or self._members.held(stop.worker_id)
                ):
                    continue  # a request reached it since the view was taken: keep it
                self._members.running.pop(stop.worker_id, None)
                self._retire(stop.worker_id)
            if worker is not None:
                log.info("pool %s: stopping %s (%s)", self.model, stop.worker_id, stop.reason)
                threading.Thread(target=worker.close, daemon=True).start()

    def _promote(self, worker: WorkerProcess) -> None:
        """Brings a parked worker to READY (a thread per promotion: it blocks)."""
        wid = worker.worker_id
        try:
            worker.promote()
        except EngineError as exc:
            with self._cond:
                self._members.load_failed(self._clock(), exc.message)
            log.error("pool %s: promoting %s failed: %s", self.model, wid, exc.message)
        else:
            with self._cond:
                self._accounts.ready(wid, now_s=self._clock())
                self._members.loaded()
                self.cold_starts[wid] = dict(worker.phases)
        finally:
            with self._cond:
                self._members.promoting.discard(wid)  # placeable from here on
                self._cond.notify_all()

    def _prepare_launcher(self, tokenizer_dir: Path | None) -> None:
        """Has a zygote parse the model's tokenizer and check its local chunks once, for
        every worker it forks next."""
        if self._launcher is None or tokenizer_dir is None:
            return
        weights = WeightsSource(self.home, self.model, self.store)
        try:
            self._launcher.prepare(tokenizer_dir, weights=weights)
        except EngineError as exc:  # the workers parse it themselves, as before
            log.warning("pool %s: zygote not prepared: %s", self.model, exc.message)

    def _spawn_one(self, warmth: Warmth = Warmth.READY) -> WorkerProcess | None:
        wid = f"{self.pool_id}-{next(self._ids)}"
        with self._cond:
            if self._closed:
                return None
            self._members.starting[wid] = warmth
            self._accounts.born(wid, now_s=self._clock())
        try:
            worker = self._spawn(
                worker_id=wid,
                model=self.model,
                home=self.home,
                engine_config=self.engine_config,
                store=self.store,
                launcher=self._launcher,
                warmth=warmth,
                prompts=self.encoder,
            )
        except EngineError as exc:
            with self._cond:
                self._members.starting.pop(wid, None)
                self._retire(wid)
                self._members.load_failed(self._clock(), exc.message)
                self._cond.notify_all()
            log.error("pool %s: worker %s failed to start: %s", self.model, wid, exc.message)
            return None
        first = False  # the pool's first READY worker: its tokenizer is everyone's
        with self._cond:
            self._members.starting.pop(wid, None)
            if self._closed:
                closing = True
                self._retire(wid)
            else:
                closing = False
                self._members.running[wid] = worker
                if warmth is Warmth.READY:
                    self._accounts.ready(wid, now_s=self._clock())
                self._members.loaded()
                self.cold_starts[wid] = dict(worker.phases)
                first = self.encoder is None and warmth is Warmth.READY
                if first:
                    self.encoder, self.model_name = worker.prompts, worker.model_name
                self._cond.notify_all()
        if first:
            self._prepare_launcher(worker.prompts.tokenizer.source_dir)
        if closing:
            worker.close()
            return None
        return worker
