"""Money around one request: reserve before it runs, settle after it ends, whatever way it
ends (finished, failed, cancelled, or the client went away), and exactly once.

A ``Run`` owns a started request. Its ``pump`` task reads the engine's stream into a queue
the HTTP response reads from, and settles billing with the engine's own final usage when the
stream ends. The pump is a task of its own, not part of the response: when a client
disconnects, the response is cancelled, the request is cancelled in the engine (its KV blocks
freed), and the pump still receives the final usage (the tokens generated up to the cut) and
settles it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from ember_billing.records import Usage as BilledUsage
from ember_billing.service import BillingService
from ember_core import EmberError, EngineError
from ember_functions.sequence import RequestOutput, Usage
from ember_platform.router import RunningRequest

__all__ = ["Run"]

log = logging.getLogger(__name__)


class Run:
    """One started request, its outputs as a queue, and its settlement."""

    def __init__(
        self,
        running: RunningRequest,
        *,
        billing: BillingService,
        reservation_id: str,
        prompt_tokens: int,
        on_settled: Any = None,
    ) -> None:
        self.running = running
        self.billing = billing
        self.reservation_id = reservation_id
        self.prompt_tokens = prompt_tokens
        self.queue: asyncio.Queue[RequestOutput | EmberError | None] = asyncio.Queue()
        # What is billed if the stream ends before the engine reports (nothing generated);
        # the pump replaces it with the engine's final usage.
        self.usage = Usage(prompt_tokens, 0)
        self.settled = asyncio.Event()
        self.started_s = time.perf_counter()
        self._on_settled = on_settled
        self.task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        last: RequestOutput | None = None
        try:
            async for out in self.running:
                last = out
                await self.queue.put(out)
        except EngineError as exc:
            await self.queue.put(exc)
        except asyncio.CancelledError:
            self.running.cancel()
            raise
        finally:
            outputs = getattr(self.running, "outputs", None)
            final = outputs[-1] if outputs else last
            if final is not None:
                self.usage = final.usage
            await self.queue.put(None)
            await self._settle()

    async def _settle(self) -> None:
        usage = self.usage
        billed = BilledUsage(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens,
        )
        try:
            await asyncio.to_thread(self.billing.settle, self.reservation_id, billed)
        except Exception:
            # The reservation stays open and the sweeper releases it; log loudly, since
            # the tokens are then unbilled. Never raise into the client's response.
            log.exception("settling reservation %s failed", self.reservation_id)
        finally:
            self.settled.set()
            if self._on_settled is not None:
                self._on_settled(self, usage)

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """The engine's outputs in order; raises the engine's error if it failed. If the
        consumer stops early (the client went away), the request is cancelled."""
        finished = False
        try:
            while True:
                item = await self.queue.get()
                if item is None:
                    finished = True
                    return
                if isinstance(item, EmberError):
                    finished = True
                    raise item
                yield item
        finally:
            if not finished:
                self.running.cancel()  # frees its KV blocks now; the pump settles what ran
