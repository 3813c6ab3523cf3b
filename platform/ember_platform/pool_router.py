"""A ``Router`` over warm pools: one ``ModelPool`` of worker processes per model.

``prepare`` encodes the prompt with the pool's encoder (every worker of a model shares
it), so validation and pricing happen before anything waits. ``start`` refuses at once
with 429 when the pool's queue is full; otherwise the returned run places the request
when it is first read: on a worker now if one can take it, else after waiting (counted
as queued, which makes the pool start workers) up to ``queue_timeout_s``.

A worker that dies before the request received any output is not the request's problem:
it is retried once on another worker. Once output was delivered, the error reaches the
client (tokens cannot be taken back) and billing settles what was delivered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from ember_core import CapacityError, EngineError, WorkerUnavailableError
from ember_functions.prompt import Prompt
from ember_functions.sampling_params import SamplingParams
from ember_functions.sequence import RequestOutput
from ember_functions.stream import RequestStream
from ember_functions.worker_prompts import RemoteRequest
from ember_platform.router import Prepared, served
from ember_warmpool.manager import ModelPool

__all__ = ["PoolRouter"]

_POLL_S = 0.01  # how often a waiting request looks for a worker: << any cold start


class _PooledRun:
    """One request on a pool: placed on first read, retried once if its worker dies
    before any output."""

    def __init__(
        self, pool: ModelPool, request: RemoteRequest, queue_timeout_s: float, arrived_s: float
    ) -> None:
        self.request_id = request.request_id
        self._arrived_s = arrived_s  # on the pool's clock
        self._pool = pool
        self._request = request
        self._queue_timeout_s = queue_timeout_s
        self._stream: RequestStream | None = None
        self._cancelled = False
        self.attempts = 0

    @property
    def outputs(self) -> list[RequestOutput]:
        return self._stream.outputs if self._stream is not None else []

    def cancel(self) -> None:
        self._cancelled = True
        if self._stream is not None:
            self._stream.cancel()

    async def _place(self) -> None:
        pool = self._pool
        if self._submit_to_any():
            return
        deadline = time.monotonic() + self._queue_timeout_s
        with pool.waiting():
            while not self._submit_to_any():
                reason = pool.held_back()
                if reason is not None:
                    raise WorkerUnavailableError(f"no {pool.model} worker can start: {reason}")
                if time.monotonic() > deadline:
                    raise CapacityError(
                        f"no {pool.model} worker became free within "
                        f"{self._queue_timeout_s:.0f} s; retry later"
                    )
                if self._cancelled:
                    raise asyncio.CancelledError
                await asyncio.sleep(_POLL_S)

    def _submit_to_any(self) -> bool:
        with self._pool.placing() as worker:
            if worker is None:
                return False
            try:
                stream = worker.submit_prepared(self._request)
            except WorkerUnavailableError:
                return False  # it died after being chosen: the next look finds another
            self.attempts += 1
            if self.attempts == 1:
                self._pool.placed(worker, self._arrived_s)
            self._stream = stream
            return True

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while True:
            await self._place()
            stream = self._stream
            if stream is None:  # _place sets it or raises
                raise EngineError(f"request {self.request_id} was never placed")
            try:
                async for out in stream:
                    yield out
                return
            except EngineError:
                if stream.outputs[:-1] or self.attempts >= 2 or self._cancelled:
                    raise  # output was delivered, or it failed twice: the client is told
                # Its worker died before producing anything: nothing was sent or billed.


class PoolRouter:
    """One warm pool per model name."""

    def __init__(self, pools: Mapping[str, ModelPool], *, queue_timeout_s: float = 120.0) -> None:
        self._pools = dict(pools)
        self._queue_timeout_s = queue_timeout_s

    def models(self) -> list[str]:
        return sorted(self._pools)

    def _pool(self, model: str) -> ModelPool:
        return served(self._pools, model)

    def prepare(
        self,
        model: str,
        prompt: Prompt,
        params: SamplingParams,
        *,
        request_id: str,
        tenant: str,
    ) -> Prepared:
        pool = self._pool(model)
        if pool.encoder is None:
            raise WorkerUnavailableError(f"the {model} pool has not started; retry shortly")
        request = RemoteRequest(
            request_id, pool.encoder.encode(prompt, params), params, f"tenant:{tenant}"
        )
        return Prepared.of(request_id, model, request)

    def start(self, prepared: Prepared) -> _PooledRun:
        pool = self._pool(prepared.model)
        if not isinstance(prepared.handle, RemoteRequest):
            raise TypeError("start() takes what this router's prepare() returned")
        arrived_s = pool.admit()
        return _PooledRun(pool, prepared.handle, self._queue_timeout_s, arrived_s)

    def ready(self) -> bool:
        return bool(self._pools) and all(p.held_back() is None for p in self._pools.values())

    def queue_depth(self) -> int:
        return sum(p.in_flight() + p.queued for p in self._pools.values())

    def free_kv_blocks(self) -> dict[str, int]:
        return {name: p.free_kv_blocks() for name, p in self._pools.items()}

    def pool_stats(self) -> dict[str, dict[str, float]]:
        return {name: pool.stats() for name, pool in sorted(self._pools.items())}

    def workers(self) -> list[dict[str, Any]]:
        return [
            {"model": name, **row}
            for name, pool in sorted(self._pools.items())
            for row in pool.status()
        ]
