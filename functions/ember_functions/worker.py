"""A worker process: one engine, serving its router over the RPC in ``ember_functions.rpc``.

    python -m ember_functions.worker --worker-id ID --socket PATH --home DIR --model NAME \
        [--engine-config JSON] [--store JSON] [--warmth PROCESS|HOST|READY]

It connects to the router's socket before importing torch, so the router sees it alive
(LOADING) within an interpreter start, then loads the model through the weights store and
reports READY with the phases of its cold start, or FAILED with the reason. A worker held
in reserve stops short: at PROCESS (imports done) or HOST (weights in RAM, not bound) it
reports ``warm`` and waits to be told to climb; a READY worker told to ``demote`` drops its
engine and waits at HOST. One thread reads commands and the main thread runs the engine:
each ``step()``'s outputs go back as one frame. The router's socket closing (it exited
or was killed) ends the worker; so does ``stop``. The worker holds no state a request
needs after it ends: any worker of the same model can serve the next one.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # before anything heavy is imported: the imports phase starts

import gc  # noqa: E402

# No cyclic GC while importing and loading: torch's import makes hundreds of thousands of
# long-lived objects, and each full collection walks all of them (3 full and ~380 young
# collections cost 0.19-0.24 s of a 1.2-1.5 s import here). ``gc_settled`` turns it
# back on, with all that frozen out of its reach, before the worker serves or parks.
# Only as a program: a process importing this module keeps its collector as it was.
if __name__ == "__main__":
    gc.disable()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import queue  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from collections.abc import Callable, Mapping  # noqa: E402
from concurrent.futures import Future  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

from ember_functions.host_memory import (  # noqa: E402
    HostMemory,
    PackAction,
    packing_action,
    read_host_memory,
)
from ember_functions.kernel_caches import bound_kernel_caches  # noqa: E402
from ember_functions.rpc import (  # noqa: E402
    FrameReader,
    FrameWriter,
    pack_output,
    unpack_params,
)

if TYPE_CHECKING:
    from ember_functions.engine import LLMEngine
    from ember_functions.host_model import HostModel
    from ember_functions.loading import WeightsSource
    from ember_functions.sequence import RequestOutput
    from ember_functions.tokenizer import Tokenizer
    from ember_weights_store import LoadReport
    from ember_weights_store.verified import VerifiedCopies

log = logging.getLogger("ember.worker")

# An idle worker says it is alive this often (a busy one's outputs say it every step), so
# its router can tell a hung worker from a quiet one (see ``WorkerProcess.silent_s``).
HEARTBEAT_S = 1.0
_ALIVE = {"op": "alive"}
# A READY worker packs its matrices (Linear.pack) only once it has been idle this long: one
# that has just started was usually started for a request on its way, which packing
# would delay (its first layer also pays oneDNN's first call, ~10 ms).
PACK_AFTER_IDLE_S = 0.25

__all__ = ["main"]


class _Inbox:
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


class _Heartbeat:
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
            self.writer.try_send(_ALIVE)


class _Serve:
    """The loop while READY: commands from the inbox, engine steps on this thread."""

    def __init__(
        self,
        engine: LLMEngine,
        inbox: _Inbox,
        writer: FrameWriter,
        *,
        memory: Callable[[], HostMemory | None] = read_host_memory,
    ) -> None:
        self.engine = engine
        self.inbox = inbox
        self.writer = writer
        self.memory = memory  # host RAM, read before each packing decision
        self.demote = False  # the router asked for the engine to go, the weights to stay
        self.pack_s = 0.0  # time spent packing, reported in "packed" frames

    def run(self) -> str:
        """Serves until told to stop or demote; returns ``"stop"`` or ``"demote"``.

        Idle for ``PACK_AFTER_IDLE_S``, it faults in the KV pages the next requests will
        write (``LLMEngine.extend_kv_runway``; again after any spell that used them up),
        caches the chat template's preamble
        (``LLMEngine.cache_public_prefix``), then packs its matrices one layer at a time,
        looking at the inbox between layers, and says so once it has packed all that host RAM
        allows ("packed"). From then on, once a heartbeat, idle or busy, it looks at host
        RAM again: short of it, it gives the last packed layer back; with room again, it
        packs the rest once idle (``host_memory.packing_action``). The model's first
        worker, once its packed copy is stored in the host tier, runs on the stored one
        and frees its own (``Packing.share_stored``), and says so ("packed", shared)."""
        engine, wake = self.engine, self.inbox.wake
        settled = False  # packed all it may for now, and said so
        busy_until = time.monotonic()  # when the engine last had work
        look_at_ram_s = busy_until  # when a busy worker next looks at host RAM
        while self._drain():
            if not engine.has_unfinished():
                if self.demote:
                    return "demote"
                now = time.monotonic()
                look_at_ram_s = now + HEARTBEAT_S  # a busy spell's first look: a beat in
                idle_s = now - busy_until
                quiet = not wake.is_set() and idle_s >= PACK_AFTER_IDLE_S
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
                    if action is PackAction.PACK:
                        t0 = time.perf_counter()
                        engine.packing.pack(max_layers=1)
                        self.pack_s += time.perf_counter() - t0
                        continue  # the inbox first: a request waits for one layer at most
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
                wait_s = HEARTBEAT_S if settled else max(0.0, PACK_AFTER_IDLE_S - idle_s)
                if not wake.wait(timeout=wait_s) and settled:
                    self.writer.send(_ALIVE)  # idle, and this loop still turns
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
        shared = self.engine.packing.shared
        return {"op": "packed", "pack_s": self.pack_s, "stopped": stopped, "shared": shared}

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


def preload() -> None:
    """Everything a worker imports before it can load a model: the imports phase of a
    cold start, and what the zygote does once for all its children."""
    import torch.utils._device  # noqa: F401  (torch, and what `with torch.device("meta")` imports)

    import ember_functions.engine
    import ember_functions.loading  # noqa: F401
    import ember_weights_store.catalog  # noqa: F401  (the package, and what it imports lazily)


def _start_readahead(args: argparse.Namespace) -> Future[VerifiedCopies | None]:
    """Starts reading this worker's chunks into the page cache, checking each against its
    checksum on the way, on a thread, while this (main) thread imports torch (1-2 s in a
    new interpreter): nothing there imports torch, and the thread waits on the reads and
    hashes without the GIL (``WeightsStore.readahead``). Its own imports are done here
    first: a thread importing beside ``import torch`` would take turns at the GIL with
    it (a few percent of the import, measured). The future holds the chunk files it
    checked, which the loader then does not hash again; None if it could not run. A
    forked worker has no imports left to overlap, so it skips this and takes what its
    zygote checked (``zygote.prepare``)."""
    import ember_functions.loading  # noqa: F401  (for the thread)
    from ember_weights_store.catalog import ModelCatalog  # noqa: F401  (for the thread)
    from ember_weights_store.store import WeightsStore  # noqa: F401  (for the thread)

    done: Future[VerifiedCopies | None] = Future()

    def run() -> None:
        try:
            done.set_result(_weights_source(args).check_local_chunks())
        except Exception as exc:  # only a head start: the loader does whatever this did not
            log.debug("readahead for %s skipped: %s", args.model, exc)
            done.set_result(None)

    threading.Thread(target=run, name="ember-readahead", daemon=True).start()
    return done


def _weights_source(args: argparse.Namespace) -> WeightsSource:
    from ember_functions.loading import StoreConfig, WeightsSource

    store = StoreConfig.from_dict(json.loads(args.store))
    return WeightsSource(Path(args.home), args.model, store)


def _checked(verified: VerifiedCopies | None) -> Future[VerifiedCopies | None]:
    done: Future[VerifiedCopies | None] = Future()
    done.set_result(verified)
    return done


class _Loader:
    """Brings this worker's model up the warmth levels, timing each step."""

    def __init__(
        self,
        args: argparse.Namespace,
        tokenizers: Mapping[str, Tokenizer],
        writer: FrameWriter,
        verified: Future[VerifiedCopies | None],
    ) -> None:
        from ember_functions.engine_config import EngineConfig

        self.source = _weights_source(args)
        self.tokenizers = tokenizers  # parsed by the zygote before the fork
        self.writer = writer
        self.config = EngineConfig.from_dict(json.loads(args.engine_config))
        self.host: HostModel | None = None
        # Chunk files checked before the load: by this worker's readahead, or its zygote.
        self.verified = verified

    def _weights_phases(self, report: LoadReport | None) -> dict[str, float]:
        if report is None:
            return {}
        return {
            "manifest_s": report.manifest_s,
            "fetch_s": report.fetch_s,
            "decompress_s": report.decompress_s,
            "verify_s": report.verify_s,
            "weights_wall_s": report.wall_s,
        }

    def _load_host(self) -> HostModel:
        from ember_functions.loading import load_host

        store = self.source.store
        return load_host(
            store.catalog(self.source.home),
            self.source.model,
            err=sys.stderr,
            origin=store.origin_tier(),
            tokenizers=self.tokenizers,
            # The router parses the tokenizer too (its prompt encoder): told now, it does
            # so while this worker loads and binds, not after READY.
            on_tokenizer_dir=lambda path: self.writer.try_send(
                {"op": "tokenizer", "dir": str(path)}
            ),
            # Prompts come as ids: the merges are parsed at the first encode (the chat
            # preamble, once idle), not on the way to READY.
            decode_first=True,
            # Done long before the imports, as a rule; if not, its reads are the ones the
            # loader would do.
            verified=self.verified.result(),
        )

    def to_host(self) -> dict[str, float]:
        t0 = time.perf_counter()
        self.host = self._load_host()
        return {"host_s": time.perf_counter() - t0, **self._weights_phases(self.host.report)}

    def to_ready(self) -> tuple[LLMEngine, dict[str, float]]:
        from ember_functions.engine import LLMEngine

        t0 = time.perf_counter()
        if self.host is not None:  # promoted from HOST: bind what is in RAM
            engine = LLMEngine.from_host(self.host, config=self.config)
            return engine, {"bind_s": time.perf_counter() - t0}
        # Straight to READY: the host copy is not kept (a demotion reloads it).
        engine = LLMEngine.from_host(self._load_host(), config=self.config)
        return engine, {
            "load_s": time.perf_counter() - t0,
            **self._weights_phases(engine.load_report),
        }


def gc_settled() -> None:
    """Freezes what the worker holds now (imports, weights, engine) out of the collector's
    reach and turns collection on: a later collection walks only what requests make, and
    in a forked worker it never writes to the pages it shares with the zygote (which
    would copy them). Cycles among frozen objects are not collected until ``gc.unfreeze``:
    loading makes few, and a demotion unfreezes before it collects."""
    gc.freeze()
    gc.enable()


def _ready_frame(engine: LLMEngine, phases: dict[str, float]) -> dict[str, Any]:
    return {
        "op": "ready",
        "model": engine.model_name,
        "pid": os.getpid(),
        "token_capacity": engine.token_capacity,
        "vocab_size": engine.model.config.vocab_size,
        "tokenizer_dir": str(engine.tokenizer.source_dir),
        "free_kv_blocks": engine.blocks.num_free_blocks,
        "phases": phases,
        "chunks_by_tier": engine.load_report.chunks_by_tier if engine.load_report else {},
    }


_LEVELS = ("PROCESS", "HOST", "READY")


def _serve(
    args: argparse.Namespace,
    t0: float,
    writer: FrameWriter,
    inbox: _Inbox,
    tokenizers: Mapping[str, Tokenizer],
    verified: VerifiedCopies | None,
) -> int:
    """Climbs to ``args.warmth``, then serves or waits to be told to climb further;
    a READY worker told to demote drops its engine and waits at HOST."""
    gc.disable()  # a forked worker inherits the zygote's collector, switched on
    heartbeat = _Heartbeat(writer)
    heartbeat.start()
    # A new interpreter: its reads and checks overlap the imports. A zygote's child has
    # what the zygote checked once for all its children (``zygote.prepare``), if anything.
    checked = _start_readahead(args) if "torch" not in sys.modules else _checked(verified)
    preload()
    phases = {"imports_s": time.perf_counter() - t0}
    loader = _Loader(args, tokenizers, writer, checked)
    target = args.warmth
    since = t0  # a first start is timed from the fork, a promotion from its command
    while True:
        try:
            if target == "HOST" and loader.host is None:
                phases.update(loader.to_host())
            if target == "READY":
                engine, more = loader.to_ready()
                phases.update(more)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"
            log.error("could not load %s: %s", args.model, reason)
            heartbeat.stop()
            writer.send({"op": "failed", "reason": reason})
            return 1
        heartbeat.stop()
        gc_settled()
        if target == "READY":
            phases["ready_s"] = time.perf_counter() - since
            writer.send(_ready_frame(engine, phases))
            if _Serve(engine, inbox, writer).run() == "stop":
                return 0
            del engine  # demoted: the bound weights and the KV cache go, the host copy stays
            gc.unfreeze()  # the engine's cycles, if any, were frozen with it
            gc.collect()
            if loader.host is None:  # it was loaded straight to READY: keep a host copy now
                phases = loader.to_host()
            target = "HOST"
        writer.send({"op": "warm", "warmth": target, "phases": phases})
        phases = {}
        while True:  # parked: wait to be told to climb, or to go
            try:
                message = inbox.queue.get(timeout=HEARTBEAT_S)
            except queue.Empty:
                writer.send(_ALIVE)
                continue
            if message is None or message["op"] == "stop":
                return 0
            if message["op"] == "warm" and _LEVELS.index(message["to"]) > _LEVELS.index(target):
                target, since = message["to"], time.perf_counter()
                gc.disable()  # until the climb is done (see gc_settled)
                heartbeat.start()
                break
            log.warning("ignoring %r while parked at %s", message["op"], target)


def main(
    argv: list[str] | None = None,
    *,
    started_s: float | None = None,
    tokenizers: Mapping[str, Tokenizer] | None = None,
    verified: VerifiedCopies | None = None,
) -> int:
    """Runs a worker until its router goes away. ``started_s`` (``time.perf_counter()``) is
    when this worker began: a zygote's fork, else this module's import. ``tokenizers``
    (directory -> parsed) and ``verified`` (chunk files checked) are what its zygote
    prepared before the fork."""
    t0 = _T0 if started_s is None else started_s
    ap = argparse.ArgumentParser(prog="python -m ember_functions.worker")
    ap.add_argument("--worker-id", required=True)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--home", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--engine-config", default="{}")
    ap.add_argument("--store", default="{}", help="StoreConfig as JSON: where weights come from")
    ap.add_argument(
        "--warmth", default="READY", choices=_LEVELS, help="how far to load before waiting"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format=f"worker {args.worker_id}: %(levelname)s %(message)s"
    )
    bound_kernel_caches()  # before the first matmul: a worker's memory stays flat
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(args.socket)
    writer = FrameWriter(sock)
    writer.send({"op": "state", "state": "LOADING", "pid": os.getpid()})
    return _serve(args, t0, writer, _Inbox(FrameReader(sock)), tokenizers or {}, verified)


if __name__ == "__main__":
    sys.exit(main())
