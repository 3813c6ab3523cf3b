"""Workers that fail, with real processes forked from a real zygote: one killed mid-stream
(the request errors, the pool replaces it), one dying before any output (the request is
retried on another), one that hangs (killed by the health check), and a model that cannot
load (not retried forever)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ember_core import EngineError, WorkerUnavailableError
from ember_functions.sequence import RequestOutput
from ember_platform.pool_router import PoolRouter
from ember_warmpool import PoolPolicy
from ember_warmpool.manager import ModelPool

from ..waiting import wait_for
from .pools import LONG, SHORT, TIMEOUT_S, live


def wait_replaced(pool: ModelPool, worker_id: object, what: str) -> None:
    """Waits until the pool's one live worker is READY and is not ``worker_id``."""
    wait_for(
        lambda: (
            [r["state"] for r in live(pool)] == ["READY"]
            and live(pool)[0]["worker_id"] != worker_id
        ),
        what,
    )


def test_kill_9_mid_stream_errors_cleanly_and_the_pool_replaces_the_worker(
    make_pool: Callable[..., ModelPool],
) -> None:
    pool = make_pool(PoolPolicy(min_warm=1, buffer=0, max_workers=2, keepalive_s=60))
    pool.start()
    router = PoolRouter({"m": pool})
    (first,) = pool.status()
    got: list[RequestOutput] = []

    async def run() -> None:
        prepared = router.prepare("m", [1, 2, 3], LONG, request_id="k", tenant="t")
        async for out in router.start(prepared):
            got.append(out)
            if len(got) == 3:
                os.kill(int(str(first["pid"])), signal.SIGKILL)

    with pytest.raises(EngineError, match="exited with code -9"):
        asyncio.run(run())
    assert 3 <= len(got) < 300  # output was delivered: the error reaches the client
    wait_replaced(pool, first["worker_id"], "the pool replaced the dead worker")
    (replacement,) = live(pool)
    assert replacement["in_flight"] == 0
    assert pool.free_kv_blocks() == 64  # the new worker's cache is whole


def test_a_worker_dying_before_any_output_is_retried_on_another(
    make_pool: Callable[..., ModelPool],
) -> None:
    pool = make_pool(PoolPolicy(min_warm=2, buffer=0, max_workers=2, keepalive_s=60))
    pool.start()
    wait_for(lambda: [r["state"] for r in live(pool)] == ["READY", "READY"], "two READY workers")
    router = PoolRouter({"m": pool})
    prepared = router.prepare("m", [1, 2, 3], SHORT, request_id="r", tenant="t")
    run = router.start(prepared)

    async def go() -> list[RequestOutput]:
        outs: list[RequestOutput] = []
        iterator = run.__aiter__()
        # Place it, freeze its worker so it cannot answer, then kill it.
        victim = pool.try_place()
        assert victim is not None
        os.kill(victim.proc.pid, signal.SIGSTOP)
        try:
            task = asyncio.ensure_future(iterator.__anext__())
            await asyncio.sleep(0.2)
            os.kill(victim.proc.pid, signal.SIGKILL)
            outs.append(await task)
            outs += [out async for out in iterator]
        finally:
            if victim.proc.poll() is None:
                os.kill(victim.proc.pid, signal.SIGKILL)
        return outs

    outs = asyncio.run(go())
    # Placement is deterministic (both idle: the oldest), so the run went to the frozen
    # worker, lost it before any output, and was retried on the other one.
    assert run.attempts == 2
    assert outs[-1].finish_reason == "length" and outs[-1].usage.completion_tokens == 4
    assert all(out.error is None for out in outs)


def test_a_model_that_cannot_load_is_not_retried_forever(
    make_pool: Callable[..., ModelPool], tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_model("llama").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    config = json.loads((broken / "config.json").read_text())
    config["hidden_size"] = 24
    (broken / "config.json").write_text(json.dumps(config))
    policy = PoolPolicy(min_warm=1, max_workers=2, max_load_failures=2, failure_backoff_s=0.05)
    pool = make_pool(policy, model=broken)
    with pytest.raises(EngineError, match="failed to load"):
        pool.start()
    deadline = time.monotonic() + TIMEOUT_S
    while pool.held_back() is None:
        assert time.monotonic() < deadline, "the pool never gave up"
        pool.tick()
        time.sleep(0.1)
    reason = pool.held_back()
    assert reason is not None and "failed to load 2 times" in reason
    assert "do not belong together" in reason  # the worker's own words reach the operator
    for _ in range(10):  # held back: ticks start nothing more
        pool.tick()
        time.sleep(0.1)
    assert pool.status() == [] and pool.load_failures == 2
    router = PoolRouter({"m": pool})
    assert not router.ready()  # /readyz says 503, with the pool's reason in the logs
    with pytest.raises(WorkerUnavailableError, match="has not started"):
        router.prepare("m", "hi", SHORT, request_id="x", tenant="t")


def test_a_hung_worker_is_killed_by_the_health_check_and_replaced(
    make_pool: Callable[..., ModelPool],
) -> None:
    pool = make_pool(
        PoolPolicy(min_warm=1, buffer=0, max_workers=2, keepalive_s=60), health_timeout_s=2.0
    )
    pool.start()
    router = PoolRouter({"m": pool})
    (first,) = pool.status()
    pid = int(str(first["pid"]))
    time.sleep(3.0)  # idle longer than the timeout: its heartbeats keep it healthy
    assert [r["worker_id"] for r in live(pool)] == [first["worker_id"]]
    got: list[RequestOutput] = []

    async def run() -> None:
        prepared = router.prepare("m", [1, 2, 3], LONG, request_id="h", tenant="t")
        async for out in router.start(prepared):
            got.append(out)
            if len(got) == 3:
                os.kill(pid, signal.SIGSTOP)  # hangs: alive, silent

    try:
        with pytest.raises(
            EngineError, match=r"did not respond .*\(health check\); retrying it is safe"
        ):
            asyncio.run(run())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    wait_replaced(pool, first["worker_id"], "the pool replaced the hung worker")
