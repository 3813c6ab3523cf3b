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
import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import queue  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable, Mapping  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

from ember_core import EmberError  # noqa: E402
from ember_functions.deferred_imports import DeferredImports  # noqa: E402
from ember_functions.early_readahead import ChildReadahead  # noqa: E402
from ember_functions.kernel_caches import bound_kernel_caches  # noqa: E402
from ember_functions.rpc import FrameReader, FrameWriter  # noqa: E402
from ember_functions.worker_loop import (  # noqa: E402
    ALIVE,
    HEARTBEAT_S,
    Heartbeat,
    Inbox,
    ServeLoop,
)
from ember_weights_store.verified import Readahead  # noqa: E402

if TYPE_CHECKING:
    from ember_functions.engine import LLMEngine
    from ember_functions.host_model import HostModel
    from ember_functions.loading import WeightsSource
    from ember_functions.tokenizer import Tokenizer
    from ember_weights_store import LoadReport
    from ember_weights_store.manifest import Manifest
    from ember_weights_store.verified import VerifiedCopies

log = logging.getLogger("ember.worker")

__all__ = ["main"]


def preload() -> None:
    """Everything a worker imports before it can load a model: the imports phase of a
    cold start, and what the zygote does once for all its children."""
    import torch  # noqa: F401

    import ember_functions.engine
    import ember_functions.loading  # noqa: F401
    import ember_weights_store.catalog  # noqa: F401  (the package, and what it imports lazily)


def _weights_source(args: argparse.Namespace) -> WeightsSource:
    from ember_functions.loading import StoreConfig, WeightsSource

    store = StoreConfig.from_dict(json.loads(args.store))
    return WeightsSource(Path(args.home), args.model, store)


class _Loader:
    """Brings this worker's model up the warmth levels, timing each step."""

    def __init__(
        self,
        args: argparse.Namespace,
        tokenizers: Mapping[str, Tokenizer],
        writer: FrameWriter,
        ahead: Callable[[], Readahead | None],
    ) -> None:
        from ember_functions.engine_config import EngineConfig

        self.source = _weights_source(args)
        self.tokenizers = tokenizers  # parsed by the zygote before the fork
        self.writer = writer
        self.config = EngineConfig.from_dict(json.loads(args.engine_config))
        self.host: HostModel | None = None
        # What was done before the load (by this worker's readahead child, or its zygote:
        # chunk files checked, the manifest read): waits for it if need be.
        self.ahead = ahead
        self.done_ahead: Readahead | None = None  # what it did, once waited for
        self.readahead_wait_s = 0.0  # the load's wait for the readahead to finish

    def _weights_phases(self, report: LoadReport | None) -> dict[str, float]:
        if report is None:
            return {}
        return {
            "manifest_s": report.manifest_s,
            "fetch_s": report.fetch_s,
            "decompress_s": report.decompress_s,
            "verify_s": report.verify_s,
            # Filling the tier a sharing pool maps the model from (once per boot, or
            # after an install), from a further tier.
            "fill_s": report.fill_s,
            "weights_wall_s": report.wall_s,
            # Reading the chunks into the page cache, left over from the imports: part of
            # the load, before the weights' own wall time starts.
            "readahead_wait_s": self.readahead_wait_s,
        }

    def _load_host(self) -> HostModel:
        from ember_functions.loading import load_host

        # Its reads are the ones the loader would do, and a model the disk cannot read
        # during the imports is still being read after them: that wait is reported.
        ahead = self._readahead_done()
        store = self.source.store
        return load_host(
            store.catalog(self.source.home),
            self.source.model,
            err=sys.stderr,
            origin=store.origin_tier(),
            tokenizers=self.tokenizers,
            # The router parses the tokenizer too (its prompt encoder): told now, it does
            # so while this worker loads and binds, not after READY.
            on_tokenizer_dir=lambda path: _tell_tokenizer(self.writer, path),
            # Prompts come as ids: the merges are parsed at the first encode (the chat
            # preamble, once idle), not on the way to READY.
            decode_first=True,
            verified=None if ahead is None else ahead.verified,
            manifest=None if ahead is None else ahead.manifest,
        )

    def _readahead_done(self) -> Readahead | None:
        t0 = time.perf_counter()
        ahead = self.done_ahead = self.ahead()
        self.readahead_wait_s = time.perf_counter() - t0
        return ahead

    def chunk_sources(self, report: LoadReport | None) -> dict[str, int]:
        """Where the chunks came from, by tier: the loader's account, with those the
        readahead fetched counted for the tier it fetched them from."""
        found = report.chunks_by_tier if report is not None else {}
        return found if self.done_ahead is None else self.done_ahead.sources(found)

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
        host = self._load_host()
        bound_at = time.perf_counter()
        engine = LLMEngine.from_host(host, config=self.config)
        done = time.perf_counter()
        return engine, {
            "load_s": done - t0,
            "bind_s": done - bound_at,  # part of load_s: building the model on the weights
            **self._weights_phases(engine.load_report),
        }


def _tell_tokenizer(writer: FrameWriter, path: Path) -> None:
    """Tells the router where the tokenizer's files are, before READY: its prompt encoder
    parses them meanwhile (``WorkerPrompts.announced``; a second telling is ignored)."""
    writer.try_send({"op": "tokenizer", "dir": str(path)})


def leave_stop_signals_to_the_router() -> None:
    """Ignores SIGINT and SIGTERM. A terminal's Ctrl-C, ``systemctl stop`` and
    ``timeout`` signal the router's whole process group (or cgroup) at once; a worker
    that died of that could not finish what it runs, and its zygote, dying with it,
    could not report its exit. The router stops its workers itself, draining first; a
    worker still exits when its router's connection closes, and SIGKILL still works."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def gc_settled() -> None:
    """Freezes what the worker holds now (imports, weights, engine) out of the collector's
    reach and turns collection on: a later collection walks only what requests make, and
    in a forked worker it never writes to the pages it shares with the zygote (which
    would copy them). Cycles among frozen objects are not collected until ``gc.unfreeze``:
    loading makes few, and a demotion unfreezes before it collects."""
    gc.freeze()
    gc.enable()


def _ready_frame(
    engine: LLMEngine, phases: dict[str, float], chunks_by_tier: dict[str, int]
) -> dict[str, Any]:
    return {
        "op": "ready",
        "model": engine.model_name,
        "pid": os.getpid(),
        "token_capacity": engine.token_capacity,
        "vocab_size": engine.model.config.vocab_size,
        "tokenizer_dir": str(engine.tokenizer.source_dir),
        "free_kv_blocks": engine.blocks.num_free_blocks,
        "phases": phases,
        "chunks_by_tier": chunks_by_tier,
    }


_LEVELS = ("PROCESS", "HOST", "READY")


def _serve(
    args: argparse.Namespace,
    t0: float,
    writer: FrameWriter,
    inbox: Inbox,
    tokenizers: Mapping[str, Tokenizer],
    ahead: Callable[[], Readahead | None],
    deferred: DeferredImports | None,
    connected_s: float,
) -> int:
    """Climbs to ``args.warmth``, then serves or waits to be told to climb further;
    a READY worker told to demote drops its engine and waits at HOST. ``connected_s``:
    when it connected, seconds after ``t0`` (the router tells its own start-up from the
    imports with it)."""
    gc.disable()  # a forked worker inherits the zygote's collector, switched on
    heartbeat = Heartbeat(writer)
    heartbeat.start()
    preload()
    if deferred is not None:
        deferred.stop()
    phases = {"imports_s": time.perf_counter() - t0, "connected_s": connected_s}
    loader = _Loader(args, tokenizers, writer, ahead)
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
            sources = loader.chunk_sources(engine.load_report)
            writer.send(_ready_frame(engine, phases, sources))
            if ServeLoop(engine, inbox, writer, deferred=deferred).run() == "stop":
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
                writer.send(ALIVE)
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
    manifests: Mapping[WeightsSource, Manifest] | None = None,
) -> int:
    """Runs a worker until its router goes away. ``started_s`` (``time.perf_counter()``) is
    when this worker began: a zygote's fork, else this module's import. ``tokenizers``
    (directory -> parsed), ``verified`` (chunk files checked) and ``manifests`` (read with
    them, by the weights' source) are what its zygote prepared before the fork."""
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
    leave_stop_signals_to_the_router()  # inherited already, when forked from a zygote
    # A new interpreter reads and checks its chunks while torch imports, in a child forked
    # now, while this process has one thread (``early_readahead``). A zygote's child has
    # what the zygote checked once for all its children (``zygote.prepare``), if anything.
    child = deferred = None
    if "torch" not in sys.modules:
        child = ChildReadahead.start(
            lambda told: _weights_source(args).read_ahead(on_tokenizer_dir=told)
        )
        # What serving needs of torch now, the rest once idle (``deferred_imports``).
        deferred = DeferredImports()
        deferred.start()
    prepared = None
    if verified is not None:
        # The zygote's manifest, if it read this worker's: every worker it forks then loads
        # the same one, and none reads it again (from S3: a client and a GET, ~0.1 s).
        manifest = None
        if manifests:
            # A bad --store is the loader's to report (FAILED, with the reason), not this
            # lookup's, which runs before the worker has connected.
            with contextlib.suppress(EmberError):
                manifest = manifests.get(_weights_source(args))
        prepared = Readahead(verified=verified, manifest=manifest)
    ahead = child.result if child is not None else (lambda: prepared)
    logging.basicConfig(
        level=logging.WARNING, format=f"worker {args.worker_id}: %(levelname)s %(message)s"
    )
    bound_kernel_caches()  # before the first matmul: a worker's memory stays flat
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(args.socket)
    connected_s = time.perf_counter() - t0
    writer = FrameWriter(sock)
    writer.send({"op": "state", "state": "LOADING", "pid": os.getpid()})
    if child is not None:
        # The router parses the tokenizer as soon as it hears where it is (its prompt
        # encoder): from the child, that is while torch imports here.
        child.collect_in_background(on_tokenizer_dir=lambda path: _tell_tokenizer(writer, path))
    inbox = Inbox(FrameReader(sock))
    return _serve(args, t0, writer, inbox, tokenizers or {}, ahead, deferred, connected_s)


if __name__ == "__main__":
    sys.exit(main())
