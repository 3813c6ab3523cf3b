"""A worker process: one engine, serving its router over the RPC in ``ember_functions.rpc``.

    python -m ember_functions.worker --worker-id ID --socket PATH --home DIR --model NAME \
        [--engine-config JSON]

It connects to the router's socket before importing torch, so the router sees it alive
(LOADING) within an interpreter start, then loads the model through the weights store and
reports READY with the phases of its cold start, or FAILED with the reason. After that,
one thread reads commands and the main thread runs the engine: each ``step()``'s outputs
go back as one frame. The router's socket closing (it exited or was killed) ends the
worker; so does ``stop``. The worker holds no state a request needs after it ends: any
worker of the same model can serve the next one.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # before anything heavy is imported: the imports phase starts

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import queue  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

from ember_functions.rpc import (  # noqa: E402
    FrameReader,
    FrameWriter,
    pack_output,
    unpack_params,
)

if TYPE_CHECKING:
    from ember_functions.engine import LLMEngine
    from ember_functions.sequence import RequestOutput

log = logging.getLogger("ember.worker")

__all__ = ["main"]


class _Serve:
    """The loop after READY: commands in on a reader thread, engine steps on this one."""

    def __init__(self, engine: LLMEngine, reader: FrameReader, writer: FrameWriter) -> None:
        self.engine = engine
        self.reader = reader
        self.writer = writer
        self.inbox: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self.wake = threading.Event()

    def _read(self) -> None:
        try:
            while (message := self.reader.read()) is not None:
                self.inbox.put(message)
                self.wake.set()
        except Exception:  # a corrupt stream: treat it as the router going away
            log.exception("reading from the router failed")
        self.inbox.put(None)  # end of stream: the router is gone
        self.wake.set()

    def run(self) -> None:
        threading.Thread(target=self._read, name="ember-worker-rpc", daemon=True).start()
        engine = self.engine
        while self._drain():
            if not engine.has_unfinished():
                self.wake.wait(timeout=1.0)
                self.wake.clear()
                continue
            self._send(engine.step())
        engine.cancel_all()
        outs = engine.step()
        if outs:  # the router may be gone: then nobody is left to tell
            self.writer.try_send(self._frame(outs))

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
                message = self.inbox.get_nowait()
            except queue.Empty:
                return True
            if message is None or message["op"] == "stop":
                return False
            if message["op"] == "cancel":
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
    import torch  # noqa: F401

    import ember_functions.engine
    import ember_functions.loading  # noqa: F401
    import ember_weights_store  # noqa: F401


def _load(args: argparse.Namespace, t0: float) -> tuple[LLMEngine, dict[str, float]]:
    preload()
    from ember_functions.engine_config import EngineConfig
    from ember_functions.loading import StoreConfig, load_engine

    phases = {"imports_s": time.perf_counter() - t0}
    t_load = time.perf_counter()
    config = EngineConfig.from_dict(json.loads(args.engine_config))
    store = StoreConfig.from_dict(json.loads(args.store))
    engine = load_engine(
        store.catalog(Path(args.home)),
        args.model,
        config,
        err=sys.stderr,
        origin=store.origin_tier(),
    )
    phases["load_s"] = time.perf_counter() - t_load
    report = engine.load_report
    if report is not None:
        phases.update(
            manifest_s=report.manifest_s,
            fetch_s=report.fetch_s,
            decompress_s=report.decompress_s,
            verify_s=report.verify_s,
            weights_wall_s=report.wall_s,
        )
    return engine, phases


def main(argv: list[str] | None = None, *, started_s: float | None = None) -> int:
    """Runs a worker until its router goes away. ``started_s`` (``time.perf_counter()``) is
    when this worker began: a zygote's fork, else this module's import."""
    t0 = _T0 if started_s is None else started_s
    ap = argparse.ArgumentParser(prog="python -m ember_functions.worker")
    ap.add_argument("--worker-id", required=True)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--home", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--engine-config", default="{}")
    ap.add_argument("--store", default="{}", help="StoreConfig as JSON: where weights come from")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format=f"worker {args.worker_id}: %(levelname)s %(message)s"
    )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(args.socket)
    writer, reader = FrameWriter(sock), FrameReader(sock)
    writer.send({"op": "state", "state": "LOADING", "pid": os.getpid()})
    try:
        engine, phases = _load(args, t0)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"
        log.error("could not load %s: %s", args.model, reason)
        writer.send({"op": "failed", "reason": reason})
        return 1
    phases["ready_s"] = time.perf_counter() - t0
    writer.send(
        {
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
    )
    _Serve(engine, reader, writer).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
