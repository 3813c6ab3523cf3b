"""The router's handle on one worker process: spawn it, wait until it is READY, send it
requests, stream their outputs back, and notice at once when it dies.

It has the same surface as an in-process ``EngineService`` (``prepare``,
``submit_prepared``, ``alive``, ``queue_depth``, ``free_kv_blocks``, ``close``), so a router
can put either behind a model name. Prompts are encoded here, with the worker's tokenizer
and capacity, so a bad request is refused before it crosses the socket.

Example::

    worker = WorkerProcess.spawn(worker_id="w1", model="smollm2-135m", home=home)
    stream = worker.submit_prepared(worker.prepare("Hello", SamplingParams(max_tokens=8),
                                                   request_id="r1"))
    print(stream.result().text)
    worker.close()
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember_core import EngineError, InvalidRequestError, WorkerUnavailableError
from ember_functions.engine_config import EngineConfig
from ember_functions.launch import (
    Launched,
    Launcher,
    SubprocessLauncher,
    socket_path,
    start_connected,
)
from ember_functions.loading import StoreConfig
from ember_functions.prompt import Prompt, PromptEncoder
from ember_functions.rpc import (
    FrameReader,
    FrameWriter,
    PackReport,
    Warmth,
    WorkerState,
    unpack_output,
)
from ember_functions.sampling_params import SamplingParams
from ember_functions.sequence import RequestOutput, Usage
from ember_functions.stream import RequestStream, aborted
from ember_functions.worker_prompts import RemoteRequest, WorkerPrompts

__all__ = ["WorkerProcess", "socket_path"]

log = logging.getLogger(__name__)


#: A loading worker silent this long hangs: killed then, whatever ``load_timeout_s`` says.
LOAD_SILENCE_S = 30.0


@dataclass
class _Open:
    stream: RequestStream
    usage: Usage = field(default_factory=lambda: Usage(0, 0))  # as of the last output
    submitted_s: float = field(default_factory=time.monotonic)


class WorkerProcess:
    """One worker process and the connection to it. Build with :meth:`spawn`."""

    def __init__(self, worker_id: str, proc: Launched, sock: socket.socket) -> None:
        self.worker_id = worker_id
        self.proc = proc
        self.state = WorkerState.LOADING
        # The level it holds (state READY) or is loading towards (state LOADING): below
        # READY it is parked in reserve and takes no requests until promoted.
        self.warmth = Warmth.READY
        self.failure: str | None = None
        # The last cold start, seconds per phase; its last, ``first_token_s``, comes with
        # the first token its engine makes: from the first request's submission (or READY,
        # if that came later) to that token reaching the router.
        self.phases: dict[str, float] = {}
        self._ready_at_s = 0.0  # monotonic: when its engine last became READY
        self._first_token_due = False
        # How its engine's matrices came to be packed (a READY worker packs while idle,
        # and runs at full speed from then on): None until its engine has packed.
        self.packed: PackReport | None = None
        self.chunks_by_tier: dict[str, int] = {}  # where its weights came from
        self.model_name = ""
        self._sock = sock
        self._reader = FrameReader(sock)
        self._writer = FrameWriter(sock)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # state, warmth or failure changed
        self._open: dict[str, _Open] = {}
        self._free_kv_blocks = 0
        self._prompts = WorkerPrompts(worker_id=worker_id)  # its engine's prompt encoder
        self._closing = False
        self._heard_s = time.monotonic()  # the last frame from the worker
        # Silence while loading that means it hangs (it sends a heartbeat every second).
        self.load_silence_s = LOAD_SILENCE_S

    # -- lifecycle ----------------------------------------------------------------

    @classmethod
    def spawn(
        cls,
        *,
        worker_id: str,
        model: str,
        home: Path,
        engine_config: EngineConfig | None = None,
        store: StoreConfig | None = None,
        run_dir: Path | None = None,
        launcher: Launcher | None = None,
        warmth: Warmth = Warmth.READY,
        prompts: PromptEncoder | None = None,
        connect_timeout_s: float = 60.0,
        load_timeout_s: float = 600.0,
        load_silence_s: float = LOAD_SILENCE_S,
    ) -> WorkerProcess:
        """Starts a worker (a new interpreter, or a fork of a ``Zygote`` given as
        ``launcher``) and returns when it holds ``warmth`` (READY: it serves; PROCESS or
        HOST: parked until :meth:`promote`); raises ``EngineError`` with the worker's
        reason when it fails to start or to load. ``prompts`` is an encoder another worker
        of this model gave (``WorkerProcess.prompts``: a pool's first worker): used if the
        worker reports the same tokenizer and window, it spares parsing the tokenizer.
        A loading worker sends a heartbeat every second: one that sends nothing for
        ``load_silence_s`` hangs and is killed then, not at ``load_timeout_s``."""
        t0 = time.perf_counter()
        config = dataclasses.asdict(engine_config or EngineConfig())
        args = [
            *("--worker-id", worker_id),
            *("--home", str(home), "--model", model),
            *("--engine-config", json.dumps(config)),
            *("--store", json.dumps(dataclasses.asdict(store or StoreConfig()))),
            *("--warmth", warmth.name),
        ]
        launch = (launcher or SubprocessLauncher()).launch
        proc, sock = start_connected(
            worker_id,
            lambda path: launch([*args, "--socket", str(path)]),
            what=f"worker {worker_id}",
            run_dir=run_dir,
            timeout_s=connect_timeout_s,
        )
        worker = cls(worker_id, proc, sock)
        worker.warmth = warmth
        worker._prompts.known = prompts
        worker.load_silence_s = load_silence_s
        connected_s = time.perf_counter() - t0
        threading.Thread(
            target=worker._read_loop, name=f"ember-worker-{worker_id}", daemon=True
        ).start()
        worker._await_warmth(load_timeout_s)
        # The worker's own imports (it times them from its first line, or its fork) began
        # before it connected: spawn is what came before them, so the phases add up.
        worker.phases["spawn_s"] = max(0.0, connected_s - worker.phases.pop("connected_s", 0.0))
        worker.phases["ready_s" if warmth is Warmth.READY else f"{warmth.name.lower()}_s"] = (
            time.perf_counter() - t0
        )
        return worker

    def promote(self, *, timeout_s: float = 600.0) -> None:
        """Brings a parked worker to READY (from HOST: binds the weights in its RAM; from
        PROCESS: loads them) and returns when it serves; ``EngineError`` if it fails."""
        t0 = time.perf_counter()
        with self._lock:
            if self.state is not WorkerState.READY or self.warmth is Warmth.READY:
                raise EngineError(
                    f"worker {self.worker_id} is {self.state.value} at {self.warmth.name}; "
                    "only a parked (READY, below READY warmth) worker can be promoted"
                )
            self.state, self.warmth = WorkerState.LOADING, Warmth.READY
            self.phases = {}
        self._writer.try_send({"op": "warm", "to": Warmth.READY.name})
        self._await_warmth(timeout_s)
        self.phases["promote_s"] = time.perf_counter() - t0

    def demote(self) -> bool:
        """Parks an idle READY worker at HOST: its engine and KV cache go, its weights
        stay in RAM. False (nothing done) if it is running requests or not READY."""
        with self._lock:
            if self.state is not WorkerState.READY or self.warmth is not Warmth.READY:
                return False
            if self._open:
                return False
            self.warmth = Warmth.HOST  # from now on nothing is placed on it
        self._writer.try_send({"op": "demote"})
        return True

    def _await_warmth(self, timeout_s: float) -> None:
        """Waits until the worker holds the warmth it is loading towards. A loading worker
        sends a heartbeat every second; one silent for ``load_silence_s`` hangs (a
        deadlock, a stopped process) and is killed then, not when ``timeout_s`` runs out."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self.state is WorkerState.LOADING:
                left_s = deadline - time.monotonic()
                if left_s <= 0 or self.silent_s > self.load_silence_s:
                    break
                self._changed.wait(timeout=min(left_s, 0.5))
            loading = self.state is WorkerState.LOADING
            failed = self.state is WorkerState.FAILED
        if failed:
            raise EngineError(f"worker {self.worker_id} failed to load its model: {self.failure}")
        if not loading:
            return
        if self.silent_s > self.load_silence_s:
            why = f"sent nothing for {self.silent_s:.0f} s while loading (hung)"
            advice = "check the worker's log; a stopped or deadlocked process shows this"
        else:
            why = f"not {self.warmth.name} after {timeout_s:.0f} s"
            advice = "raise load_timeout_s or check the worker's log"
        with self._lock:
            self._fail(why)
        self.proc.kill()
        raise EngineError(f"worker {self.worker_id} {why}; {advice}")

    def _on_ready(self, message: dict[str, Any]) -> None:
        prompts = self._prompts.for_ready(message)
        with self._changed:
            self.model_name = message["model"]
            self._free_kv_blocks = message["free_kv_blocks"]
            self.phases.update(message["phases"])
            self.chunks_by_tier = dict(message.get("chunks_by_tier", {}))
            self._prompts.current = prompts
            self.packed = None  # a new engine: packing starts over
            self.state, self.warmth = WorkerState.READY, Warmth.READY
            self._ready_at_s, self._first_token_due = time.monotonic(), True
            self._changed.notify_all()

    def _on_warm(self, message: dict[str, Any]) -> None:
        held = Warmth[message["warmth"]]
        with self._changed:
            if self.state is WorkerState.LOADING and held < self.warmth:
                return  # a demotion's confirmation overtaken by a promotion: not there yet
            self.phases.update(message["phases"])
            if self.state is WorkerState.LOADING:
                self.state = WorkerState.READY
            self.warmth = held  # reached (a demotion was already noted when it was sent)
            self._changed.notify_all()

    def _fail(self, reason: str) -> None:  # under the lock
        if self.failure is None:  # the first reason is the one that explains
            self.failure = reason
        self.state = WorkerState.FAILED
        self._changed.notify_all()

    def drain(self, timeout_s: float) -> bool:
        """DRAINING: takes nothing new and waits up to ``timeout_s`` for what it runs to
        finish; True if it did. :meth:`close` then stops it."""
        with self._changed:
            if self.state in (WorkerState.READY, WorkerState.BUSY):
                self.state = WorkerState.DRAINING
            return self._changed.wait_for(lambda: not self._open, timeout=timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stops the worker: requests still running end cancelled, with their usage."""
        self._closing = True
        if self.proc.poll() is None:
            self._writer.try_send({"op": "stop"})
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._sock.close()
        if not self.state.ended:
            self.state = WorkerState.STOPPED

    def kill(self, reason: str | None = None) -> None:
        """SIGKILL: its open requests fail (retryably) with ``reason``, or with its exit
        code when there is none (a crash, as tests simulate)."""
        if reason is not None:
            with self._lock:
                self._fail(reason)
        self.proc.kill()

    @property
    def silent_s(self) -> float:
        """Seconds since the worker last sent anything. A serving worker sends a frame
        every engine step or, idle, every heartbeat; long silence means it hangs."""
        return time.monotonic() - self._heard_s

    # -- requests -----------------------------------------------------------------

    @property
    def prompts(self) -> PromptEncoder:
        """Encodes prompts the way this worker's engine would (its tokenizer and window)."""
        if self._prompts.current is None:
            raise WorkerUnavailableError(self._down())
        return self._prompts.current

    @property
    def alive(self) -> bool:
        """It serves requests: READY or BUSY, and not parked below READY warmth."""
        return self.state in (WorkerState.READY, WorkerState.BUSY) and self.warmth is Warmth.READY

    @property
    def queue_depth(self) -> int:
        return len(self._open)

    @property
    def free_kv_blocks(self) -> int:
        """As of the worker's last step."""
        return int(self._free_kv_blocks)

    def wait_packed(self, timeout_s: float) -> bool:
        """Waits until this READY worker has packed its matrices, or stopped packing for
        want of RAM (see ``packed``); False if neither happened within
        ``timeout_s``, or it stopped being READY."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self.packed is None:
                left = deadline - time.monotonic()
                if left <= 0 or self.state not in (WorkerState.READY, WorkerState.BUSY):
                    return False
                self._changed.wait(left)
            return True

    def describe(self) -> dict[str, Any]:
        """A status row for ``ember pool status`` and /workers."""
        packed = self.packed
        return {
            "worker_id": self.worker_id,
            "pid": self.proc.pid,
            "state": self.state.value,
            "warmth": self.warmth.name,
            "in_flight": self.queue_depth,
            "pack_s": packed.pack_s if packed else None,
            "pack_stopped": packed.stopped if packed else None,
            "pack_shared": packed.shared if packed else False,
            "packed_layers": packed.layers if packed else 0,
            "idle_s": None,
            "cold_start": dict(self.phases),
            "chunks_by_tier": dict(self.chunks_by_tier),
        }

    def prepare(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        request_id: str,
        cache_salt: str = "",
    ) -> RemoteRequest:
        encoder = self._prompts.current
        if encoder is None or not self.alive:
            raise WorkerUnavailableError(self._down())
        params = params or SamplingParams()
        return RemoteRequest(request_id, encoder.encode(prompt, params), params, cache_salt)

    def submit_prepared(self, request: RemoteRequest) -> RequestStream:
        stream = RequestStream(request.request_id, self)
        with self._lock:
            if not self.alive:
                raise WorkerUnavailableError(self._down())
            if request.request_id in self._open:
                raise InvalidRequestError(
                    f"request id {request.request_id!r} is already running; use a unique id"
                )
            self._open[request.request_id] = _Open(stream)
            self.state = WorkerState.BUSY
        self._writer.try_send(
            request.start_frame()
        )  # if the worker is gone, the reader fails the stream
        return stream

    def cancel(self, request_id: str) -> None:
        self._writer.try_send({"op": "cancel", "id": request_id})

    def _down(self) -> str:
        why = f": {self.failure}" if self.failure else ""
        return (
            f"worker {self.worker_id} is {self.state.value.lower()}{why}; "
            "it takes no requests, retrying on another worker is safe"
        )

    # -- the reader thread ----------------------------------------------------------

    def _read_loop(self) -> None:
        try:
            while (message := self._reader.read()) is not None:
                self._heard_s = time.monotonic()
                op = message["op"]
                if op == "outs":
                    # Before delivering: whoever a finished stream wakes sees its blocks free.
                    self._free_kv_blocks = message["free_kv_blocks"]
                    self._deliver([unpack_output(row) for row in message["outs"]])
                elif op == "tokenizer":
                    self._prompts.announced(str(message["dir"]))
                elif op == "ready":
                    self._on_ready(message)
                elif op == "warm":
                    self._on_warm(message)
                elif op == "packed":
                    with self._changed:
                        self.packed = PackReport.from_frame(message)
                        self._changed.notify_all()
                elif op == "failed":
                    with self._lock:
                        self._fail(message["reason"])
        except (OSError, EngineError, ValueError) as exc:
            if not self._closing:
                log.warning("worker %s connection broke: %s", self.worker_id, exc)
        code = self.proc.wait()
        with self._changed:
            if self._closing and not self.state.ended:
                self.state = WorkerState.STOPPED
                self._changed.notify_all()
            else:
                self._fail(f"the worker process (pid {self.proc.pid}) exited with code {code}")
            orphans, self._open = self._open, {}
        reason = self.failure or "the worker stopped before the request finished"
        for rid, entry in orphans.items():
            entry.stream._deliver(aborted(rid, reason, entry.usage))

    def _deliver(self, outs: list[RequestOutput]) -> None:
        for out in outs:
            with self._lock:
                entry = self._open.get(out.request_id)
                if entry is None:
                    continue
                entry.usage = out.usage
                if self._first_token_due and out.token_ids:
                    self._first_token_due = False
                    since_s = max(self._ready_at_s, entry.submitted_s)
                    self.phases["first_token_s"] = time.monotonic() - since_s
                if out.finished:
                    del self._open[out.request_id]
                    if not self._open:
                        if self.state is WorkerState.BUSY:
                            self.state = WorkerState.READY
                        self._changed.notify_all()  # a drain waits for this
            entry.stream._deliver(out)
