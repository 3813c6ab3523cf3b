"""Warm pools of worker processes for ``@llm.function(pool=...)``, run by the embedded backend.

An ``EmbeddedBackend`` holds one ``FunctionPools``: on the first pooled call it starts a
``Zygote`` (a fork server that imported torch and Ember once), then one ``ModelPool`` per
(model, policy) it is asked for, each behind a ``PoolRouter`` (placement, waiting for a
worker, a retry when a worker dies before any output). Functions that declare the same
model and the same policy share a pool; a different policy gets a pool of its own. The
policy scales each pool from then on: ``min_warm=0`` lets it go to zero workers after
``keepalive_s`` idle, and the next call starts one again (forked from the zygote).

Synchronous calls are carried by one event-loop thread (the router's runs are async):
each call's outputs are pumped into a queue its caller reads, so a sync ``stream`` yields
deltas as the worker produces them, and ``.map``'s threads all run at once. Async calls run
on the caller's own loop. ``close()`` stops the pools, then the zygote, then the loop
thread; it also runs at interpreter exit.

Errors are ``ember_core``'s: ``RateLimitError`` (429) when a pool's queue for workers is
full, ``CapacityError`` (503) when no worker came within ``queue_timeout_s``,
``WorkerUnavailableError`` when the model keeps failing to load, ``EngineError`` when a
worker died after output was delivered.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import itertools
import os
import queue
import sys
import threading
import uuid
import weakref
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ember._backends import Request
    from ember_functions.engine_config import EngineConfig
    from ember_functions.launch import Zygote
    from ember_functions.loading import StoreConfig
    from ember_platform.pool_router import PoolRouter
    from ember_warmpool import PoolPolicy
    from ember_warmpool.manager import ModelPool

__all__ = ["FunctionPools"]

PoolKey = tuple[str, "PoolPolicy"]

_TENANT = "local"  # the cache salt's tenant: everything in this process is one tenant
_ids = itertools.count(1)
_live: weakref.WeakSet[FunctionPools] = weakref.WeakSet()
_atexit_lock = threading.Lock()
_atexit_registered = False


def _close_all_at_exit() -> None:
    for pools in list(_live):
        with contextlib.suppress(Exception):
            pools.close()


class _Entry:
    """One started pool and its router."""

    def __init__(self, pool: ModelPool, router: PoolRouter) -> None:
        self.pool = pool
        self.router = router

    def start(self, request: Request) -> Any:
        """Validates and encodes the request (raising at once if it is bad), and starts
        its run (429 at once if the pool's queue is full); the run is placed when read."""
        from ember_functions.sampling_params import SamplingParams

        params = SamplingParams(
            max_tokens=request.max_tokens, temperature=request.temperature, seed=request.seed
        )
        prepared = self.router.prepare(
            self.pool.model,
            request.messages,  # chat messages are a Prompt
            params,
            request_id=f"sdk-{uuid.uuid4().hex}",
            tenant=_TENANT,
        )
        return self.router.start(prepared)


class FunctionPools:
    """The pools of one embedded backend, keyed by (model, policy), started lazily."""

    def __init__(
        self,
        home: Path,
        *,
        engine_config: EngineConfig | None = None,
        queue_timeout_s: float = 120.0,
        origin: StoreConfig | None = None,
    ) -> None:
        self.home = home
        self.engine_config = engine_config
        self.queue_timeout_s = queue_timeout_s
        self.origin = origin  # an S3 origin the models come from; None: installed here
        self._lock = threading.Lock()  # the tables below, and the zygote's start
        self._entries: dict[PoolKey, _Entry] = {}
        self._starting: dict[PoolKey, threading.Lock] = {}
        self._zygote: Zygote | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._generation = 0  # bumped by close(): a pool started across a close is closed

    # -- what callers and tests read ----------------------------------------------------

    def pools(self) -> dict[PoolKey, ModelPool]:
        """The started pools, by (model, policy)."""
        with self._lock:
            return {key: entry.pool for key, entry in self._entries.items()}

    @property
    def zygote(self) -> Zygote | None:
        return self._zygote

    # -- starting -----------------------------------------------------------------------

    def _entry(self, model: str, policy: PoolPolicy) -> _Entry:
        """The pool for (model, policy), started on first use (blocks until its first
        worker is READY)."""
        key: PoolKey = (model, policy)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                return entry
            start_lock = self._starting.setdefault(key, threading.Lock())
        with start_lock:  # one start per pool; other pools start meanwhile
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    return entry
            # An unknown model fails here, before any start.
            store = self._pool_store(model, max_workers=policy.max_workers)
            with self._lock:
                zygote = self._ensure_zygote()
                generation = self._generation
            entry = self._start_pool(model, store, policy, zygote)
            with self._lock:
                if generation == self._generation:
                    self._entries[key] = entry
                    return entry
            entry.pool.close()  # the backend closed while this pool started
            raise _closed_error()

    def _ensure_zygote(self) -> Zygote:  # under self._lock
        global _atexit_registered
        from ember_functions.launch import Zygote

        if self._zygote is None or not self._zygote.alive:
            self._zygote = Zygote.start(zygote_id=f"sdk-{os.getpid()}-{next(_ids)}")
            _live.add(self)
            with _atexit_lock:
                if not _atexit_registered:
                    atexit.register(_close_all_at_exit)
                    _atexit_registered = True
        return self._zygote

    def _pool_store(self, model: str, *, max_workers: int) -> StoreConfig:
        """Where the pool's workers load ``model`` from: installed in the home (installed
        once here, not in each worker at once) or the origin, through a host tier they
        share when the pool can run several workers (given back when it closes)."""
        from ember_warmpool.host_sharing import pool_store

        self.home.mkdir(parents=True, exist_ok=True)
        return pool_store(
            model, home=self.home, max_workers=max_workers, origin=self.origin, err=sys.stderr
        )[0]

    def _start_pool(
        self, model: str, store: StoreConfig, policy: PoolPolicy, zygote: Zygote
    ) -> _Entry:
        from ember_platform.pool_router import PoolRouter
        from ember_warmpool import HoltForecaster
        from ember_warmpool.forecast_file import forecast_path
        from ember_warmpool.manager import ModelPool

        forecast_file = None
        if policy.predictive:
            # Each (model, policy) pool learns its own traffic and keeps it across runs of
            # the program, named by both (the functions sharing the pool share it).
            policy_id = hashlib.sha256(repr(policy).encode()).hexdigest()[:12]
            forecast_file = forecast_path(self.home, f"sdk-{model}-{policy_id}")
        pool = ModelPool(
            model,
            home=self.home,
            policy=policy,
            engine_config=self.engine_config,
            store=store,
            release_host_tier=True,
            launcher=zygote,
            forecaster=HoltForecaster() if policy.predictive else None,
            forecast_file=forecast_file,
            # Worker ids name their sockets: two pools of one model in this process must
            # not share them.
            pool_id=f"sdk-{os.getpid()}-{next(_ids)}",
        )
        try:
            pool.start()
        except BaseException:
            pool.close()
            raise
        return _Entry(pool, PoolRouter({model: pool}, queue_timeout_s=self.queue_timeout_s))

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="ember-sdk-pools", daemon=True
                )
                thread.start()
                self._loop, self._loop_thread = loop, thread
            return self._loop

    # -- calling ------------------------------------------------------------------------

    def stream(self, request: Request) -> Iterator[str]:
        """Starts the request now and returns its text deltas as they are generated."""
        if request.pool is None:
            raise ValueError("FunctionPools.stream() takes requests that declare a pool")
        run = self._entry(request.model, request.pool).start(request)
        deltas: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()

        async def pump() -> None:
            try:
                async for out in run:
                    if out.text:
                        deltas.put(("text", out.text))
            except BaseException as exc:
                deltas.put(("error", exc))
                if not isinstance(exc, Exception):
                    raise
            else:
                deltas.put(("done", None))

        future = asyncio.run_coroutine_threadsafe(pump(), self._ensure_loop())
        return _drain(deltas, future, run)

    async def astream(self, request: Request) -> AsyncIterator[str]:
        """The same on the caller's event loop (a pool's start runs on a thread)."""
        if request.pool is None:
            raise ValueError("FunctionPools.astream() takes requests that declare a pool")
        entry = await asyncio.to_thread(self._entry, request.model, request.pool)
        run = entry.start(request)
        finished = False
        try:
            async for out in run:
                if out.text:
                    yield out.text
            finished = True
        finally:
            if not finished:
                run.cancel()  # the caller stopped reading: free the worker's slot

    # -- closing ------------------------------------------------------------------------

    def close(self) -> None:
        """Stops every pool's workers, then the zygote, then the loop thread. The object
        can be used again afterwards: the next pooled call starts afresh."""
        with self._lock:
            self._generation += 1
            entries, self._entries = list(self._entries.values()), {}
            zygote, self._zygote = self._zygote, None
            loop, thread = self._loop, self._loop_thread
            self._loop = self._loop_thread = None
            _live.discard(self)
        for entry in entries:
            entry.pool.close()  # open streams fail: their callers get EngineError
        if zygote is not None:
            zygote.close()
        if loop is not None and thread is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(_cancel_all(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            if not thread.is_alive():
                loop.close()


def _closed_error() -> Exception:
    from ember_core import EngineError

    return EngineError("the embedded backend was closed while a pool started; call again")


async def _cancel_all() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _drain(
    deltas: queue.SimpleQueue[tuple[str, Any]], future: Future[None], run: Any
) -> Iterator[str]:
    finished = False
    try:
        while True:
            kind, value = deltas.get()
            if kind == "text":
                yield value
            elif kind == "done":
                finished = True
                return
            else:
                finished = True
                if isinstance(value, asyncio.CancelledError):
                    from ember_core import EngineError

                    raise EngineError("the call was cancelled: its backend was closed")
                raise value
    finally:
        if not finished:  # the caller stopped reading: cancel the request on its worker
            run.cancel()
            future.cancel()
