"""A stream of one request's outputs, fed from another thread, read by ``for`` or ``async for``.

An in-process ``EngineService`` feeds it from the engine thread; a ``WorkerProcess`` feeds it
from the thread reading the worker's socket. Either way the reader sees the same thing:
token deltas, then a final output with the usage, or ``EngineError`` if the request failed.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Protocol

from ember_core import EngineError
from ember_functions.sequence import Completion, FinishReason, RequestOutput, Usage

__all__ = ["RequestStream", "aborted"]


def aborted(request_id: str, reason: str, usage: Usage) -> RequestOutput:
    """The final output of a request that ended without finishing: ``reason`` says why."""
    return RequestOutput(
        request_id=request_id,
        text="",
        token_ids=[],
        finished=True,
        finish_reason=FinishReason.ERROR.value,
        usage=usage,
        error=reason,
    )


class _Canceller(Protocol):
    def cancel(self, request_id: str) -> None: ...


class RequestStream:
    """Token deltas of one request, readable once, by ``for`` or ``async for``.

    Iteration ends after the final output; an engine failure raises
    :class:`ember_core.EngineError` after the text produced before it.
    """

    def __init__(self, request_id: str, service: _Canceller) -> None:
        self.request_id = request_id
        self._service = service
        self._lock = threading.Lock()
        self._sync: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
        self._async: asyncio.Queue[RequestOutput] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.outputs: list[RequestOutput] = []  # everything delivered so far

    def _deliver(self, out: RequestOutput) -> None:  # engine thread
        with self._lock:
            if self._loop is None:
                self._sync.put(out)
                return
            loop, aq = self._loop, self._async
        try:
            loop.call_soon_threadsafe(aq.put_nowait, out)  # type: ignore[union-attr]
        except RuntimeError:  # the consumer's loop closed: nobody is listening any more
            self._service.cancel(self.request_id)

    def _record(self, out: RequestOutput) -> RequestOutput:
        self.outputs.append(out)
        if out.error is not None:
            raise EngineError(
                f"request {self.request_id} failed in the engine: {out.error}; retrying it is safe"
            )
        return out

    def __iter__(self) -> Iterator[RequestOutput]:
        while not (self.outputs and self.outputs[-1].finished):
            yield self._record(self._sync.get())

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self._async = asyncio.Queue()
            while not self._sync.empty():  # outputs that arrived before we listened
                self._async.put_nowait(self._sync.get())
        aq = self._async
        try:
            while not (self.outputs and self.outputs[-1].finished):
                yield self._record(await aq.get())
        except asyncio.CancelledError:
            self.cancel()
            raise

    def text(self) -> Iterator[str]:
        """Only the text deltas, skipping empty ones."""
        for out in self:
            if out.text:
                yield out.text

    def result(self) -> Completion:
        """Blocks until the request ends; returns the whole completion."""
        for _ in self:
            pass
        return Completion.from_outputs(self.outputs)

    def cancel(self) -> None:
        self._service.cancel(self.request_id)
