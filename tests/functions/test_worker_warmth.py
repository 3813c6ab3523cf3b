"""Workers held in reserve below READY: started at PROCESS or HOST warmth they take no
requests, are promoted to READY on command and then serve what a READY-started worker
serves; an idle READY worker demoted to HOST drops its engine and can be promoted again."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ember_core import EngineError, WorkerUnavailableError
from ember_functions.engine_config import EngineConfig
from ember_functions.launch import Zygote
from ember_functions.rpc import Warmth, WorkerState
from ember_functions.sampling_params import SamplingParams
from ember_functions.worker_process import WorkerProcess

CONFIG = EngineConfig(dtype="float32", num_kv_blocks=64, block_size=16, num_threads=1)
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPT = [5, 17, 42, 8, 99, 3]


@pytest.fixture(scope="module")
def zygote() -> Iterator[Zygote]:
    with Zygote.start(zygote_id=f"warm{os.getpid()}") as z:
        yield z


@pytest.fixture
def spawn(
    tiny_model: Callable[..., Path], tmp_path: Path, zygote: Zygote
) -> Iterator[Callable[[Warmth], WorkerProcess]]:
    workers: list[WorkerProcess] = []

    def make(warmth: Warmth) -> WorkerProcess:
        w = WorkerProcess.spawn(
            worker_id=f"warm{os.getpid()}-{time.monotonic_ns()}",
            model=str(tiny_model("llama")),
            home=tmp_path,
            engine_config=CONFIG,
            launcher=zygote,
            warmth=warmth,
        )
        workers.append(w)
        return w

    yield make
    for w in workers:
        w.close()


def tokens(worker: WorkerProcess, rid: str) -> list[int]:
    from ember_functions.worker_prompts import RemoteRequest

    encoder = worker.prompts
    request = RemoteRequest(rid, encoder.encode(PROMPT, GREEDY), GREEDY, "")
    return worker.submit_prepared(request).result().token_ids


@pytest.mark.parametrize("warmth", [Warmth.PROCESS, Warmth.HOST])
def test_a_parked_worker_serves_nothing_until_promoted_then_serves_the_same_tokens(
    spawn: Callable[[Warmth], WorkerProcess], warmth: Warmth
) -> None:
    ready = spawn(Warmth.READY)
    parked = spawn(warmth)
    assert parked.state is WorkerState.READY and parked.warmth is warmth
    assert not parked.alive and parked.describe()["warmth"] == warmth.name
    assert f"{warmth.name.lower()}_s" in parked.phases
    if warmth is Warmth.HOST:  # the weights were read before it parked
        assert parked.phases["host_s"] > 0
    with pytest.raises(WorkerUnavailableError):
        parked.prepare(PROMPT, GREEDY, request_id="early")

    parked.promote()
    assert parked.alive and parked.warmth is Warmth.READY
    # From HOST a promotion only binds; from PROCESS it loads too.
    assert parked.phases["bind_s"] > 0
    assert ("load_s" in parked.phases) == (warmth is Warmth.PROCESS), parked.phases
    assert parked.phases["promote_s"] > 0
    assert tokens(parked, "p") == tokens(ready, "r")


def test_an_idle_ready_worker_demoted_to_host_drops_its_engine_and_comes_back(
    spawn: Callable[[Warmth], WorkerProcess],
) -> None:
    worker = spawn(Warmth.READY)
    want = tokens(worker, "before")
    assert worker.demote()
    assert not worker.alive and worker.warmth is Warmth.HOST
    deadline = time.monotonic() + 30
    while "host_s" not in worker.phases:  # the worker confirms with its host copy's load
        assert time.monotonic() < deadline, worker.phases
        time.sleep(0.01)
    assert not worker.demote()  # already parked: nothing to do
    worker.promote()
    assert worker.alive and "bind_s" in worker.phases
    assert tokens(worker, "after") == want


def test_promoting_a_worker_that_serves_is_refused(
    spawn: Callable[[Warmth], WorkerProcess],
) -> None:
    worker = spawn(Warmth.READY)
    with pytest.raises(EngineError, match="only a parked"):
        worker.promote()


def test_a_new_interpreter_parked_at_process_reaps_its_readahead_child(
    tiny_model: Callable[..., Path],
    tmp_path: Path,
    child_states: Callable[[int], dict[int, str]],
) -> None:
    # A new interpreter forks a readahead child before importing torch; parked at
    # PROCESS it loads nothing, so nothing else would wait for that child.
    worker = WorkerProcess.spawn(
        worker_id=f"reap{os.getpid()}",
        model=str(tiny_model("llama")),
        home=tmp_path,
        engine_config=CONFIG,
        warmth=Warmth.PROCESS,
    )
    try:
        assert worker.warmth is Warmth.PROCESS
        deadline = time.monotonic() + 10
        while states := child_states(worker.proc.pid):
            assert time.monotonic() < deadline, f"the worker's children stay: {states}"
            time.sleep(0.05)
        worker.promote()  # what the child did is still there for the load
        assert worker.alive and "load_s" in worker.phases
    finally:
        worker.close()
