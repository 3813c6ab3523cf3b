"""A READY worker's loop over the real frame protocol (a socket pair): while idle it
faults in its next requests' KV pages and packs its matrices one layer at a time, a
request sent meanwhile is still served, and packed layers are given back when host RAM
runs short (and packed again when it returns)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from ember_functions.engine import LLMEngine
from ember_functions.engine_config import EngineConfig
from ember_functions.host_memory import HostMemory
from ember_functions.host_model import HostModel
from ember_functions.packed_cache import sharing_works
from ember_functions.rpc import FrameReader, FrameWriter, pack_params, unpack_output
from ember_functions.sampling_params import SamplingParams
from ember_functions.worker_loop import PACK_AFTER_IDLE_S, Inbox, ServeLoop
from ember_weights_store import ModelCatalog

GIB = 1 << 30


class FakeMemory:
    """Host RAM as the worker reads it, set by the test."""

    def __init__(self, available_gib: float) -> None:
        self.available_gib = available_gib

    def __call__(self) -> HostMemory:
        return HostMemory(total_bytes=16 * GIB, available_bytes=int(self.available_gib * GIB))


@pytest.fixture
def memory() -> FakeMemory:
    return FakeMemory(available_gib=12.0)  # plenty: the default floor keeps 1.6 GiB


Serving = tuple[LLMEngine, FrameWriter, FrameReader, threading.Thread]


class FakeDeferred:
    """Deferred imports as the loop sees them; records when each was run."""

    def __init__(self, engine: LLMEngine, names: list[str]) -> None:
        self.engine = engine
        self.names = names
        self.ran: list[tuple[str, bool]] = []  # (name, the LM head packed by then)

    def pending(self) -> list[str]:
        return self.names[len(self.ran) :]

    def load_next(self) -> str | None:
        pending = self.pending()
        if not pending:
            return None
        self.ran.append((pending[0], self.engine.model.head_packed is not None))
        return pending[0]


@contextmanager
def serve(
    engine: LLMEngine, memory: FakeMemory, deferred: FakeDeferred | None = None
) -> Iterator[Serving]:
    """The engine's ServeLoop on a thread, and the router's ends of its socket."""
    worker_end, router_end = socket.socketpair()
    loop = ServeLoop(
        engine,
        Inbox(FrameReader(worker_end)),
        FrameWriter(worker_end),
        memory=memory,
        deferred=deferred,  # type: ignore[arg-type]
    )
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    router = FrameWriter(router_end), FrameReader(router_end)
    try:
        yield engine, *router, thread
    finally:
        router[0].try_send({"op": "stop"})
        thread.join(timeout=10)
        worker_end.close()
        router_end.close()


@pytest.fixture
def serving(
    tiny_model: Callable[..., Path], packing_dtype: str, memory: FakeMemory
) -> Iterator[Serving]:
    engine = LLMEngine.from_dir(
        tiny_model("llama", torch.bfloat16),
        config=EngineConfig(num_kv_blocks=32, dtype=packing_dtype),
    )
    with serve(engine, memory) as served:
        yield served


def test_an_idle_worker_packs_its_matrices_and_still_serves(
    serving: Serving,
) -> None:
    engine, send, receive, thread = serving
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    deadline = time.monotonic() + 30
    while engine.model.head_packed is None:  # the LM head is packed last
        assert time.monotonic() < deadline, "the idle worker never finished packing"
        time.sleep(0.01)
    assert all(layer.packed for layer in engine.model.decoder_layers)
    # Before any of that, the next requests' fresh KV pages (here: the whole cache).
    assert engine.kv_cache.prefaulted_to == engine.blocks.num_blocks

    send.send(
        {
            "op": "start",
            "id": "r1",
            "prompt_ids": [5, 6, 7, 8],
            "chat": False,
            "max_tokens": 6,
            "params": pack_params(params),
            "cache_salt": None,
        }
    )
    tokens: list[int] = []
    finished = False
    while not finished:
        frame = receive.read()
        assert frame is not None
        if frame["op"] != "outs":
            continue  # heartbeats
        for out in map(unpack_output, frame["outs"]):
            tokens += out.token_ids
            finished = finished or out.finished
    assert len(tokens) == 6
    send.send({"op": "stop"})
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_an_idle_worker_runs_its_deferred_imports_after_packing(
    tiny_model: Callable[..., Path], packing_dtype: str, memory: FakeMemory
) -> None:
    engine = LLMEngine.from_dir(
        tiny_model("llama", torch.bfloat16),
        config=EngineConfig(num_kv_blocks=32, dtype=packing_dtype),
    )
    deferred = FakeDeferred(engine, ["torch.export", "torch._meta_registrations"])
    with serve(engine, memory, deferred):
        deadline = time.monotonic() + 30
        while deferred.pending():
            assert time.monotonic() < deadline, "the idle worker never ran its deferred imports"
            time.sleep(0.01)
    # Packing speeds requests up and the imports do not: the matrices come first.
    assert deferred.ran == [("torch.export", True), ("torch._meta_registrations", True)]


def test_a_worker_that_has_just_become_ready_waits_before_packing(
    serving: Serving,
) -> None:
    """A new worker was usually started for a request on its way: packing waits until
    the worker has been idle PACK_AFTER_IDLE_S, so that request does not wait on it."""
    engine, _send, _receive, _thread = serving
    time.sleep(PACK_AFTER_IDLE_S / 3)
    assert not any(layer.packed for layer in engine.model.decoder_layers)
    assert engine.kv_cache.prefaulted_to == 0
    deadline = time.monotonic() + 30
    while engine.model.head_packed is None:
        assert time.monotonic() < deadline, "the idle worker never packed"
        time.sleep(0.01)


def packed_frames(receive: FrameReader, count: int) -> list[dict[str, object]]:
    frames = []
    while len(frames) < count:
        frame = receive.read()
        assert frame is not None, "the worker closed its socket"
        if frame["op"] == "packed":
            frames.append(frame)
    return frames


def test_an_idle_worker_gives_packed_layers_back_when_ram_runs_short_and_packs_again(
    serving: Serving, memory: FakeMemory
) -> None:
    engine, send, receive, _thread = serving
    units = engine.model.config.num_layers + 1  # every layer and the LM head
    [done] = packed_frames(receive, 1)
    assert done["stopped"] is None and engine.packing.units == units

    memory.available_gib = 1.0  # other workers came: under the 1.6 GiB floor
    frames = packed_frames(receive, 2)  # one layer given back per idle heartbeat
    assert all("giving packed layers back" in str(f["stopped"]) for f in frames)
    assert engine.packing.units == units - 2 and engine.model.head_packed is None

    memory.available_gib = 12.0  # they went: it packs what it gave back, and says so
    [again] = packed_frames(receive, 1)
    assert again["stopped"] is None and engine.packing.units == units
    send.send({"op": "stop"})


def test_a_busy_worker_gives_packed_layers_back_without_waiting_to_idle(
    serving: Serving,
    memory: FakeMemory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ember_functions.worker_loop as worker_loop

    engine, send, receive, _thread = serving
    monkeypatch.setattr(worker_loop, "HEARTBEAT_S", 0.02)  # a heartbeat every 20 ms
    units = engine.model.config.num_layers + 1
    [done] = packed_frames(receive, 1)
    assert done["stopped"] is None and engine.packing.units == units
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    send.send(
        {
            "op": "start",
            "id": "long",
            "prompt_ids": [5, 6, 7, 8],
            "chat": False,
            "max_tokens": 400,
            "params": pack_params(params),
            "cache_salt": None,
        }
    )
    given_back: list[dict[str, object]] = []
    tokens_after_ram_ran_short = 0
    finished = False
    while not finished:
        frame = receive.read()
        assert frame is not None, "the worker closed its socket"
        if frame["op"] == "packed":
            given_back.append(frame)
        elif frame["op"] == "outs":
            if memory.available_gib > 1.0:  # busy now: other workers come
                memory.available_gib = 1.0
            elif not given_back:
                tokens_after_ram_ran_short += 1
            finished = any(unpack_output(o).finished for o in frame["outs"])
    # Given back while the request ran (a layer a heartbeat), not once it had finished.
    assert given_back and all("giving packed layers back" in str(f["stopped"]) for f in given_back)
    assert tokens_after_ram_ran_short < 399
    assert engine.packing.units <= units - len(given_back)


def test_a_worker_waits_while_another_packs_for_the_machine_then_maps_its_copy(
    host_catalog: ModelCatalog,
    host_model: Callable[[ModelCatalog, Path], HostModel],
    tiny_model: Callable[..., Path],
    memory: FakeMemory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Workers started together: while one packs the model for the machine, another
    packs nothing, looks again every PACK_AFTER_IDLE_S (saying it is alive once a
    heartbeat), not in a busy loop, and says "packed" only once it runs on the copy the
    first stored."""
    if not sharing_works(torch.float32):
        pytest.skip("packed float32 matrices cannot be shared with this torch build and CPU")
    model_dir = tiny_model("llama")
    cfg = EngineConfig(num_kv_blocks=32, dtype="float32", num_threads=1)
    packer, waiter = (
        LLMEngine.from_host(host_model(host_catalog, model_dir), config=cfg) for _ in range(2)
    )
    assert not packer.packing.pack(max_layers=1)  # the lease is the packer's
    looks = 0
    waits_for_another = waiter.packing.waits_for_another

    def counted() -> bool:
        nonlocal looks
        looks += 1
        return waits_for_another()

    monkeypatch.setattr(waiter.packing, "waits_for_another", counted)
    with serve(waiter, memory) as (_, _send, receive, _thread):
        seen: list[str] = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.5:
            frame = receive.read()
            assert frame is not None
            seen.append(str(frame["op"]))
        assert "packed" not in seen
        assert 1 <= seen.count("alive") <= 3  # a heartbeat apart
        assert 1 <= looks <= 12  # every PACK_AFTER_IDLE_S, not in a busy loop
        assert waiter.packing.packed_layers == 0 and waiter.packing.private_units == 0
        assert packer.packing.pack()  # the rest, then stored on a thread
        [packed] = packed_frames(receive, 1)
    assert packed["shared"] is True and packed["layers"] == 0
    assert waiter.packing.shared
