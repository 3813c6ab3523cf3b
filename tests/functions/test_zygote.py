"""The zygote: workers forked from a process that has imported torch and Ember serve the
same tokens without paying the imports; their exits (kill -9 included) are reported
through it; signals meant for the router leave them alone; and a worker outliving its
zygote still stops."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ember_core import EngineError
from ember_functions.launch import UNKNOWN_EXIT, Zygote
from ember_functions.rpc import WorkerState
from ember_functions.worker_process import WorkerProcess

from .random_prompts import prompt_ids
from .streams import result_within
from .worker_processes import CONFIG, GREEDY_16, LONG, spawn, submit


@pytest.fixture
def zygote() -> Iterator[Zygote]:
    with Zygote.start(zygote_id=f"t{os.getpid()}-{time.monotonic_ns()}") as z:
        yield z


def fork(zygote: Zygote, model: Path, home: Path, name: str) -> WorkerProcess:
    return WorkerProcess.spawn(
        worker_id=f"{name}{os.getpid()}",
        model=str(model),
        home=home,
        engine_config=CONFIG,
        launcher=zygote,
    )


def test_a_worker_forked_from_the_zygote_skips_the_imports_and_serves_the_same_tokens(
    zygote: Zygote, tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    worker = spawn(tiny_model("llama"), tmp_path)  # a new interpreter, for comparison
    assert zygote.imports_s > 0.2  # torch and Ember, paid once, in the zygote
    forked = fork(zygote, tiny_model("llama"), tmp_path, "f")
    try:
        # A fork starts with everything imported: what an interpreter spends on imports,
        # the forked worker does not.
        assert forked.phases["imports_s"] < worker.phases["imports_s"] / 4, forked.phases
        assert forked.proc.pid != zygote.proc.pid
        prompt = prompt_ids(9, 12)
        got = result_within(submit(forked, prompt, GREEDY_16, "z1"))
        want = result_within(submit(worker, prompt, GREEDY_16, "p1"))
        assert got.token_ids == want.token_ids
    finally:
        forked.close()
        worker.close()
    assert forked.proc.wait(timeout=10) == 0  # the exit code came from the zygote


def test_kill_9_of_a_forked_worker_is_reported_through_the_zygote(
    zygote: Zygote, tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    forked = fork(zygote, tiny_model("llama"), tmp_path, "k")
    stream = submit(forked, prompt_ids(10, 10), LONG, "zk")
    next(iter(stream))
    forked.kill()
    with pytest.raises(EngineError, match="exited with code -9"):
        result_within(stream)
    assert forked.proc.wait(timeout=10) == -9 and forked.state is WorkerState.FAILED
    # The zygote is unharmed and forks the next one.
    again = fork(zygote, tiny_model("llama"), tmp_path, "k2")
    assert result_within(submit(again, "after", GREEDY_16, "za")).token_ids
    again.close()


def test_the_zygote_and_its_workers_leave_sigint_and_sigterm_to_the_router(
    zygote: Zygote, tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    forked = fork(zygote, tiny_model("llama"), tmp_path, "sig")
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):  # as a terminal or systemd sends them
            os.kill(forked.proc.pid, sig)
            os.kill(zygote.proc.pid, sig)
        time.sleep(0.3)
        assert forked.proc.poll() is None and zygote.alive
        assert result_within(submit(forked, "still here", GREEDY_16, "s1")).token_ids
    finally:
        forked.close()
    assert forked.proc.wait(timeout=10) == 0


def test_a_forked_worker_that_outlives_its_zygote_still_stops(
    zygote: Zygote, tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    forked = fork(zygote, tiny_model("llama"), tmp_path, "orphan")
    os.kill(zygote.proc.pid, signal.SIGKILL)
    zygote.proc.wait(timeout=10)
    # It serves on: its router connection is its own.
    assert result_within(submit(forked, "orphan", GREEDY_16, "o1")).token_ids
    t0 = time.monotonic()
    forked.close()
    # Its exit can no longer be reported by the zygote; it is seen through its pid.
    assert time.monotonic() - t0 < 5
    assert forked.proc.wait(timeout=5) == UNKNOWN_EXIT and forked.state is WorkerState.STOPPED
