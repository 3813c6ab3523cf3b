"""The worker RPC: length-prefixed JSON frames over one Unix stream socket per worker.

Each frame is a big-endian ``u32`` byte count and a JSON object with an ``op``. The router
encodes prompts itself (``ember_functions.prompt``), so a worker receives token ids only.

Router -> worker::

    {"op": "start", "id", "prompt_ids", "chat", "max_tokens", "params": {...}, "cache_salt"}
    {"op": "cancel", "id"}          end one request now; its final output follows
    {"op": "warm", "to": WARMTH}    a parked worker: load up to HOST or READY
    {"op": "demote"}                an idle READY worker: drop the engine, keep the weights
    {"op": "stop"}                  cancel everything still running and exit

Worker -> router::

    {"op": "state", "state": "LOADING"}              right after connecting
    {"op": "tokenizer", "dir"}                       where its tokenizer is, as soon as it
                                                     knows: the router parses it meanwhile
    {"op": "ready", "model", "pid", "token_capacity", "vocab_size", "tokenizer_dir",
     "free_kv_blocks", "phases": {name: seconds}}     the model is loaded
    {"op": "warm", "warmth": WARMTH, "phases"}       parked at PROCESS or HOST, waiting
    {"op": "alive"}                                  idle or parked: every second
    {"op": "packed", "pack_s", "stopped", "shared", "layers"}  (PackReport)
                                                     packed what host RAM allows (again);
                                                     shared: mapped from the host tier;
                                                     layers: how many it packed itself
    {"op": "failed", "reason"}                       it could not load; the process exits
    {"op": "outs", "outs": [OUT, ...], "free_kv_blocks"}   everything one engine step made

where ``OUT`` is ``[id, text, token_ids, finished, finish_reason, prompt_tokens,
completion_tokens, cached_tokens, error]``: one frame per step whatever the batch size.
JSON rather than pickle: a socket peer can never make the other side run code.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO

from ember_core import ConfigError, EngineError
from ember_functions.sampling_params import SamplingParams
from ember_functions.sequence import RequestOutput, Usage

__all__ = [
    "FrameReader",
    "FrameWriter",
    "PackReport",
    "Warmth",
    "WorkerState",
    "pack_output",
    "unpack_output",
]

_HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 64 << 20  # a frame this big is a corrupt stream, not a message


class WorkerState(enum.Enum):
    """A worker process's lifecycle, as its router sees it."""

    STARTING = "STARTING"  # spawned, not connected yet
    LOADING = "LOADING"  # connected, loading the model
    READY = "READY"  # loaded and idle
    BUSY = "BUSY"  # running requests
    DRAINING = "DRAINING"  # finishing what it runs, taking nothing new
    STOPPED = "STOPPED"  # exited when asked to
    FAILED = "FAILED"  # could not load, or died

    @property
    def ended(self) -> bool:
        return self in (WorkerState.STOPPED, WorkerState.FAILED)


class Warmth(enum.IntEnum):
    """How close a worker is to serving, cheapest first (so ``HOST < READY``).

    A worker's ``warmth`` is the level it holds, or the one it is starting or loading
    towards; a READY-state worker whose warmth is below ``READY`` is parked in reserve
    and cannot serve until promoted.
    """

    PROCESS = 1  # a started worker process with its imports done, no model
    HOST = 2  # the model's weights in the worker's host RAM, not bound: no engine, no KV cache
    READY = 3  # the model loaded: the worker can serve

    @classmethod
    def parse(cls, value: str | Warmth) -> Warmth:
        """``"host"``, ``"HOST"`` or ``Warmth.HOST`` -> ``Warmth.HOST``.

        Example::

            Warmth.parse("ready")   # -> Warmth.READY
        """
        if isinstance(value, Warmth):
            return value
        try:
            return cls[str(value).upper()]
        except KeyError:
            names = ", ".join(w.name for w in cls)
            raise ConfigError(f"unknown warmth {value!r}; use one of {names}") from None


class FrameWriter:
    """Sends frames; safe to call from several threads."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        body = json.dumps(message, separators=(",", ":")).encode()
        with self._lock:
            self._sock.sendall(_HEADER.pack(len(body)) + body)

    def try_send(self, message: dict[str, Any]) -> bool:
        """Sends unless the peer is gone; whoever reads the socket notices that anyway."""
        try:
            self.send(message)
        except OSError:
            return False
        return True


class FrameReader:
    """Reads frames from one thread; ``read()`` returns None at a clean end of stream."""

    def __init__(self, sock: socket.socket) -> None:
        self._file: BinaryIO = sock.makefile("rb")

    def read(self) -> dict[str, Any] | None:
        head = self._file.read(_HEADER.size)
        if not head:
            return None
        if len(head) < _HEADER.size:
            raise EngineError("the worker connection ended inside a frame header")
        (size,) = _HEADER.unpack(head)
        if size > MAX_FRAME_BYTES:
            raise EngineError(f"a worker frame claims {size} bytes; the stream is corrupt")
        body = self._file.read(size)
        if len(body) < size:
            raise EngineError("the worker connection ended inside a frame")
        message = json.loads(body)
        if not isinstance(message, dict) or "op" not in message:
            raise EngineError(f"a worker frame is not an RPC message: {body[:80]!r}")
        return message

    def close(self) -> None:
        self._file.close()


def pack_output(out: RequestOutput) -> list[Any]:
    u = out.usage
    return [
        out.request_id,
        out.text,
        out.token_ids,
        out.finished,
        out.finish_reason,
        u.prompt_tokens,
        u.completion_tokens,
        u.cached_tokens,
        out.error,
    ]


def unpack_output(row: list[Any]) -> RequestOutput:
    rid, text, token_ids, finished, reason, prompt, completion, cached, error = row
    return RequestOutput(
        request_id=rid,
        text=text,
        token_ids=token_ids,
        finished=finished,
        finish_reason=reason,
        usage=Usage(prompt, completion, cached),
        error=error,
    )


@dataclass(frozen=True)
class PackReport:
    """A worker's ``packed`` frame: its engine packed what host RAM allows (again)."""

    pack_s: float  # seconds its engine spent packing (``Linear.pack``), all told
    stopped: str | None = None  # why it stopped part-way (host RAM ran short), or None
    shared: bool = False  # its packed matrices are another's, mapped from the host tier
    layers: int = 0  # layers it packed itself (the LM head counts as one)

    def frame(self) -> dict[str, Any]:
        return {"op": "packed", **dataclasses.asdict(self)}

    @classmethod
    def from_frame(cls, message: dict[str, Any]) -> PackReport:
        return cls(
            pack_s=float(message["pack_s"]),
            stopped=message.get("stopped"),
            shared=bool(message.get("shared")),
            layers=int(message.get("layers", 0)),
        )


def pack_params(params: SamplingParams) -> dict[str, Any]:
    return dataclasses.asdict(params)


def unpack_params(values: dict[str, Any]) -> SamplingParams:
    return SamplingParams(**values)  # router and worker run the same version
