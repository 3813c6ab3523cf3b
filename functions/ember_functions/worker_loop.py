"""A READY worker's loop: the router's commands, engine steps, and what it does when idle.

One thread reads the router's frames into an ``Inbox`` for the worker's whole life; the
main thread runs ``ServeLoop``: it applies the queued commands between steps, sends each
``step()``'s outputs back as one frame and, once idle, does the work that makes the next
requests faster (KV runway, the chat preamble, packing; see ``ServeLoop.run``). While the
worker climbs (imports, loads, binds) a ``Heartbeat`` thread says it is alive instead.
Imports no torch: ``ember_functions.worker`` imports this before its own clock starts
counting the imports phase.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ember_functions.host_memory import (
    HostMemory,
    PackAction,
    packing_action,
    read_host_memory,
)
from ember_functions.rpc import (
    FrameReader,
    FrameWriter,
    PackReport,
    pack_output,
    unpack_params,
)

if TYPE_CHECKING:
    from ember_functions.deferred_imports import DeferredImports
    from ember_functions.engine import LLMEngine
    from ember_functions.sequence import RequestOutput

__all__ = ["ALIVE", "HEARTBEAT_S", "PACK_AFTER_IDLE_S", "Heartbeat", "Inbox", "ServeLoop"]

log = logging.getLogger("ember.worker")

# An idle worker says it is alive this often (a busy one's outputs say it every step), so
# its router can tell a hung worker from a quiet one (see ``WorkerProcess.silent_s``).
HEARTBEAT_S = 1.0
ALIVE = {"op": "alive"}
# A READY worker packs its matrices (Linear.pack) only once it has been idle this long: one
# that has just started was usually started for a request on its way, which packing
# would delay (its first layer also pays oneDNN's first call, ~10 ms).
PACK_AFTER_IDLE_S = 0.25


class Inbox:
    """The router's commands, read on a thread of their own for the worker's whole life:
    the engine loop polls them between steps, a parked worker blocks on them."""

    def __init__(self, reader: FrameReader) -> None:
        self.reader = reader
        self.queue: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self.wake = threading.Event()
        threading.Thread(target=self._read, name="ember-worker-rpc", daemon=True).start()

    def _read(self) -> None:
        try:
            while (message := self.reader.read()) is not None:
                self.queue.put(message)
                self.wake.set()
        except Exception:  # a corrupt stream: treat it as the router going away
            log.exception("reading from the router failed")
        self.queue.put(None)  # end of stream: the router is gone
        self.wake.set()


class Heartbeat:
    """Sends ``alive`` every heartbeat from a thread while the main thread climbs (imports,
    loads, binds: seconds to minutes without a frame otherwise), so the router can tell a
    worker that is loading from one that hangs (``WorkerProcess`` ``load_silence_s``)."""

    def __init__(self, writer: FrameWriter) -> None:
        self.writer = writer
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ember-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Before the frame that ends the climb (ready, warm or failed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.writer.try_send(ALIVE)


class ServeLoop:
    """The loop while READY: commands from the inbox, engine steps on this thread."""

    def __init__(
        self,
        engine: LLMEngine,
        inbox: Inbox,
        writer: FrameWriter,
        *,
        memory: Callable[[], HostMemory | None] = read_host_memory,
        deferred: DeferredImports | None = None,
    ) -> None:
        self.engine = engine
        self.inbox = inbox
        self.writer = writer
        self.memory = memory  # host RAM, read before each packing decision
        self.deferred = deferred  # torch modules a new interpreter left for idle time
        self.demote = False  # the router asked for the engine to go, the weights to stay
        self.pack_s = 0.0  # time spent packing, reported in "packed" frames

    def run(self) -> str:
        """Serves until told to stop or demote; returns ``"stop"`` or ``"demote"``.

        Idle for ``PACK_AFTER_IDLE_S``, it faults in the KV pages the next requests will
        write (``LLMEngine.extend_kv_runway``; again after any spell that used them up),
        caches the chat template's preamble
        (``LLMEngine.cache_public_prefix``), then packs its matrices one layer at a time,
        looking at the inbox between layers, and says so once it has packed all that host RAM
        allows ("packed"); while another worker packs them for the machine
        (``Packing.waits_for_another``), it packs none and says "packed" once it runs on
        that worker's copy. From then on, once a heartbeat, idle or busy, it looks at host
        RAM again: short of it, it gives the last packed layer back; with room again, it
        packs the rest once idle (``host_memory.packing_action``). The model's first
        worker, once its packed copy is stored in the host tier, runs on the stored one
        and frees its own (``Packing.share_stored``), and says so ("packed", shared).
        Last, a worker started as a new interpreter runs the torch modules it deferred
        (``deferred_imports``), one between looks at the inbox."""
        engine, wake = self.engine, self.inbox.wake
        settled = False  # packed all it may for now, and said so
        busy_until = time.monotonic()  # when the engine last had work
        look_at_ram_s = busy_until  # when a busy worker next looks at host RAM
        alive_due_s = busy_until  # an idle worker says it is alive a heartbeat apart
        while self._drain():
            if not engine.has_unfinished():
                if self.demote:
                    return "demote"
                now = time.monotonic()
                look_at_ram_s = now + HEARTBEAT_S  # a busy spell's first look: a beat in
                idle_s = now - busy_until
                quiet = not wake.is_set() and idle_s >= PACK_AFTER_IDLE_S
                waiting = False  # for another worker's packed copy
                if quiet and engine.extend_kv_runway():
                    continue  # the next requests' fresh KV pages, faulted in now
                if quiet and not settled:
                    if engine.public_prefix_tokens is None:
                        # First, the chat template's preamble into the prefix cache: a
                        # short prefill that saves every chat request it (23 of SmolLM2's
                        # ~37 tokens for a one-line question).
                        engine.cache_public_prefix()
                        continue
                    action, why = self._packing_action()
                    if action is PackAction.PACK and engine.packing.waits_for_another():
                        waiting = True  # another worker packs for the machine
                    elif action is PackAction.PACK:
                        t0 = time.perf_counter()
                        engine.packing.pack(max_layers=1)
                        self.pack_s += time.perf_counter() - t0
                        continue  # the inbox first: a request waits for one layer at most
                    else:
                        if why:
                            log.warning("stopped packing: %s", why)
                        self.writer.send(self._packed_frame(why))
                        settled = True
                        continue
                if quiet and settled and engine.packing.share_stored():
                    # Its own packed copy reached the host tier: it runs on that one now,
                    # as the model's later workers do, and frees its own.
                    self.writer.send(self._packed_frame(None))
                    continue
                if quiet and settled and self._load_deferred():
                    continue
                if settled:
                    wait_s = HEARTBEAT_S
                elif waiting:  # the other worker's copy may land any moment
                    wait_s = PACK_AFTER_IDLE_S
                else:
                    wait_s = max(0.0, PACK_AFTER_IDLE_S - idle_s)
                if not wake.wait(timeout=wait_s) and (settled or waiting):
                    if time.monotonic() >= alive_due_s:
                        self.writer.send(ALIVE)  # idle, and this loop still turns
                        alive_due_s = time.monotonic() + HEARTBEAT_S
                    if settled:
                        settled = self._follow_host_memory()
                wake.clear()
                continue
            self._send(engine.step())
            busy_until = time.monotonic()
            if settled and engine.packing.private_units and busy_until >= look_at_ram_s:
                # Busy a heartbeat long: RAM other workers need is given back now, a layer
                # a heartbeat, not when this one next idles (packing waits for idleness).
                look_at_ram_s = busy_until + HEARTBEAT_S
                settled = self._follow_host_memory()
        engine.cancel_all()
        outs = engine.step()
        if outs:  # the router may be gone: then nobody is left to tell
            self.writer.try_send(self._frame(outs))
        return "stop"

    def _load_deferred(self) -> bool:
        """Runs one deferred torch module; False when none is left."""
        if self.deferred is None or (name := self.deferred.load_next()) is None:
            return False
        log.debug("ran the deferred import of %s", name)
        if not self.deferred.pending():
            gc.freeze()  # torch's last modules stay out of the collector's reach, as the rest
        return True

    def _packing_action(self, *, margin_bytes: int = 0) -> tuple[PackAction, str | None]:
        return packing_action(
            next_pack_bytes=self.engine.packing.next_bytes(),
            packed_units=self.engine.packing.private_units,  # shared ones free nothing
            memory=self.memory(),
            min_free_bytes=self.engine.config.pack_min_free_bytes,
            margin_bytes=margin_bytes,
        )

    def _follow_host_memory(self) -> bool:
        """One idle heartbeat's look at host RAM: gives one packed layer back if it runs
        short; returns False when there is room to pack again, with a layer to spare (the
        loop then packs)."""
        action, why = self._packing_action(margin_bytes=self.engine.packing.next_bytes())
        if action is PackAction.UNPACK:
            freed = self.engine.packing.unpack()
            log.warning("gave back %.0f MiB of packed matrices: %s", freed / 2**20, why)
            self.writer.send(self._packed_frame(why))
        return action is not PackAction.PACK

    def _packed_frame(self, stopped: str | None) -> dict[str, Any]:
        packing = self.engine.packing
        report = PackReport(self.pack_s, stopped, packing.shared, packing.packed_layers)
        return report.frame()

    def _frame(self, outs: list[RequestOutput]) -> dict[str, Any]:
        return {
            "op": "outs",
            "outs": [pack_output(o) for o in outs],
            "free_kv_blocks": self.engine.blocks.num_free_blocks,
        }

    def _send(self, outs: list[RequestOutput]) -> None:
        if outs:
            self.writer.send(self._frame(outs))

    def _drain(self) -> bool:
        """Applies queued commands; False when the worker should exit."""
        from ember_functions.prompt import EncodedPrompt
        from ember_functions.sequence import FinishReason, RequestOutput, Usage

        while True:
            try:
                message = self.inbox.queue.get_nowait()
            except queue.Empty:
                return True
            if message is None or message["op"] == "stop":
                return False
            if message["op"] == "demote":
                self.demote = True  # once what runs has finished (the router sent it idle)
            elif message["op"] == "cancel":
                self.engine.cancel(message["id"])
            elif message["op"] == "start":
                rid = message["id"]
                try:
                    request = self.engine.request_from_encoded(
                        EncodedPrompt(
                            message["prompt_ids"], message["chat"], message["max_tokens"]
                        ),
                        unpack_params(message["params"]),
                        request_id=rid,
                        cache_salt=message["cache_salt"],
                    )
                    self.engine.enqueue(request)
                except Exception as exc:  # refuse this request, keep serving
                    reason = str(getattr(exc, "message", exc))
                    refused = RequestOutput(
                        rid, "", [], True, FinishReason.ERROR.value, Usage(0, 0), reason
                    )
                    self._send([refused])
            else:
                log.warning("ignoring unknown command %r", message["op"])
