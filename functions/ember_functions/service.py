"""Runs an :class:`LLMEngine` on a background thread and streams its outputs.

Callers on any thread (or event loop) submit requests and read token deltas from a
:class:`RequestStream`, synchronously or with ``async for``. Validation and
tokenization happen on the caller's thread, so a bad request raises right there and
never reaches the engine; everything that mutates engine state happens on the
engine thread, which owns it.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Any

from ember_core import EngineError, InvalidRequestError
from ember_functions.engine import LLMEngine, Prompt, RequestOutput
from ember_functions.request import PreparedRequest
from ember_functions.sampling_params import SamplingParams
from ember_functions.sequence import Usage
from ember_functions.stream import RequestStream, aborted

log = logging.getLogger(__name__)


class EngineService:
    """The engine thread. Use as a context manager, or call start() and close()."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, RequestStream] = {}
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ember-engine", daemon=True)
        self._lock = threading.Lock()
        self._failure: str | None = None
        self._stopped = False  # set once, under _lock, when no stream can be added

    def __enter__(self) -> EngineService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def submit(
        self, prompt: Prompt, params: SamplingParams | None = None, **kwargs: Any
    ) -> RequestStream:
        """Queues a request; raises at once if it is invalid."""
        return self.submit_prepared(self.prepare(prompt, params, **kwargs))

    def prepare(
        self, prompt: Prompt, params: SamplingParams | None = None, **kwargs: Any
    ) -> PreparedRequest:
        """Validates and tokenizes on the caller's thread, without queueing: the gateway
        learns the prompt's token count (to reserve its cost) before anything runs."""
        if self._closed.is_set():
            raise EngineError("the engine is shut down; start a new one to submit requests")
        return self.engine.make_request(prompt, params or SamplingParams(), **kwargs)

    def submit_prepared(self, request: PreparedRequest) -> RequestStream:
        """Queues a request from :meth:`prepare`."""
        if self._closed.is_set():
            raise EngineError("the engine is shut down; start a new one to submit requests")
        stream = RequestStream(request.seq.request_id, self)
        with self._lock:
            if self._stopped:
                raise EngineError("the engine is shut down; start a new one to submit requests")
            if stream.request_id in self._streams:
                raise InvalidRequestError(
                    f"request id {stream.request_id!r} is already running; use a unique id"
                )
            self._streams[stream.request_id] = stream
        self._inbox.put(("add", request))
        self._wake.set()
        return stream

    @property
    def alive(self) -> bool:
        """The engine thread is running and has not failed."""
        return self._thread.is_alive() and not self._closed.is_set()

    @property
    def queue_depth(self) -> int:
        """Requests submitted and not finished (waiting or running); a gauge, read racily."""
        return len(self._streams)

    @property
    def free_kv_blocks(self) -> int:
        return int(self.engine.blocks.num_free_blocks)

    def describe(self) -> dict[str, Any]:
        """A status row: the engine runs on a thread of this process."""
        busy = self.queue_depth > 0
        return {
            "worker_id": "in-process",
            "pid": os.getpid(),
            "state": ("BUSY" if busy else "READY") if self.alive else "STOPPED",
            "in_flight": self.queue_depth,
            "idle_s": None,
            "cold_start": {},
        }

    def cancel(self, request_id: str) -> None:
        self._inbox.put(("cancel", request_id))
        self._wake.set()

    def call(self, fn: Any) -> Any:
        """Runs ``fn(engine)`` on the engine thread between steps; returns its result."""
        if self._closed.is_set():
            raise EngineError("the engine is shut down; start a new one to call into it")
        done: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._inbox.put(("call", (fn, done)))
        self._wake.set()
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # a bug, not a bad request: fail loudly, hang nobody
            log.exception("engine thread crashed; failing every open request")
            self._failure = f"{type(exc).__name__}: {exc}"
            self._closed.set()
        self._shutdown()

    def _loop(self) -> None:
        engine = self.engine
        while not self._closed.is_set():
            self._drain_inbox()
            if not engine.has_unfinished():
                if not self._inbox.qsize():  # idle housekeeping, while nothing waits
                    if engine.extend_kv_runway():
                        continue  # fresh KV pages faulted in now, not in a request
                    if engine.public_prefix_tokens is None:
                        engine.cache_public_prefix()  # once
                        continue
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            for out in engine.step():
                self._dispatch(out)

    def _shutdown(self) -> None:
        """Ends every open stream: requests still running are cancelled, and calls
        or submits that raced with close() are answered instead of left waiting."""
        try:
            self._drain_inbox()
            for rid in list(self._streams):
                self.engine.cancel(rid)
            for out in self.engine.step():
                self._dispatch(out)
        except Exception:
            log.exception("engine shutdown failed; ending streams without final usage")
        reason = self._failure or "the engine shut down before the request finished"
        with self._lock:
            self._stopped = True
            streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            usage = self.engine.usage_of(stream.request_id) or Usage(0, 0)
            stream._deliver(aborted(stream.request_id, reason, usage))

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, arg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self.engine.enqueue(arg)  # ids are unique: submit() checked under the lock
            elif kind == "cancel":
                self.engine.cancel(arg)
            else:
                fn, done = arg
                if self._closed.is_set() and self._failure is not None:
                    done.put((False, EngineError(f"the engine failed: {self._failure}")))
                    continue
                try:
                    done.put((True, fn(self.engine)))
                except Exception as exc:
                    done.put((False, exc))

    def _dispatch(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        if out.finished:
            with self._lock:
                self._streams.pop(out.request_id, None)
        stream._deliver(out)
